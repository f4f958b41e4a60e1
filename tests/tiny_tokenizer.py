"""A small byte-level BPE tokenizer trained offline in well under a second, for tests.

It has BOS/EOS/PAD tokens and a ChatML-style chat template, like the real demo model's.
"""

from __future__ import annotations

from functools import lru_cache

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX.",
    "Alice is 31 years old and lives in Paris. Bob is 27. {\"name\": \"Alice\", \"age\": 31}",
    "positive negative review sentiment great terrible movie film book",
    "0123456789 + - * / = ( ) [ ] , . ; : ! ?",
    "system user assistant hello world how are you",
]


@lru_cache(maxsize=4)
def build_tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
