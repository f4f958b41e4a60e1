"""Side-by-side generation speed: one batched decode for N adapters against PEFT one adapter
after another, and against the same batched decode without a KV cache.

Not a test: a measurement script. In one process, on the bundled SmolLM2-135M (fp32, so
greedy outputs can be compared token for token), with N PEFT LoRA adapters (r = 8 on q and
v, B filled with small random values so they differ), every variant generates
``--new-tokens`` tokens greedily for the same prompt with every adapter (stop tokens off, so
every row makes them all):

  batched   engine.train.decode.BatchedDecoder: every adapter a row of one batch, one
            forward per new token for all rows, a KV cache.
  peft      peft.PeftModel holding the N adapters, ``set_adapter`` then ``generate`` for
            each in turn (transformers' generate, KV cache on).
  nocache   the batched rows, but every step runs the whole sequence again (no cache).

Rounds alternate the variants in a rotating order, so load from elsewhere hits them
alike; reported are median seconds per variant, tokens per second (all adapters' new tokens
counted) and the ratios. The batched rows' tokens are checked against PEFT's.

    .venv/bin/python -m bench.generate_speed --adapters 4 --new-tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import MALLOC_ENV

PROMPT = "Classify the sentiment of the review as positive or negative."
INPUT = "The headphones broke after two days. Avoid it."


def _reexec_with_malloc_env() -> None:
    if all(k in os.environ for k in MALLOC_ENV) or "--no-malloc-env" in sys.argv:
        return
    os.execve(sys.executable, [sys.executable, "-m", "bench.generate_speed", *sys.argv[1:]],
              {**os.environ, **MALLOC_ENV})


def _make_adapters(model_dir: Path, root: Path, n: int) -> list[Path]:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    folders = []
    for i in range(n):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        folder = root / f"adapter{i}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="2 adapters, 8 tokens, 1 round")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--no-malloc-env", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.adapters, args.new_tokens, args.rounds = 2, 8, 1

    import peft
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from engine.core.prompts import load_template
    from engine.train.adapter_set import load_adapter_set
    from engine.train.decode import BatchedDecoder, DecodeRow, SamplingSettings
    from engine.train.generate import prompt_ids
    from engine.train.models import resolve_base_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_base_model("smollm2-135m", print)
    work = Path(tempfile.mkdtemp(prefix="genbench-"))
    folders = _make_adapters(model_dir, work, args.adapters)
    aset = load_adapter_set(folders)
    ids = prompt_ids(PROMPT, aset.tokenizer, load_template("alpaca"), INPUT)
    settings = SamplingSettings(max_new_tokens=args.new_tokens)
    NEVER = len(aset.tokenizer) - 1

    def batched() -> list[list[int]]:
        rows = [DecodeRow(r.adapter, ids, key=r.name) for r in aset.rows]
        with torch.inference_mode():      # as engine.train.generate.generate_many runs it
            BatchedDecoder(aset, rows, settings, stop_ids=[NEVER]).run()
        return [r.tokens for r in rows]

    def nocache() -> list[list[int]]:
        from engine.train.scoring import RowPasses
        passes = RowPasses(aset)
        adapters = [r.adapter for r in aset.rows]
        out = [[] for _ in adapters]
        with torch.no_grad():
            for _ in range(args.new_tokens):
                # Each adapter's own sequence so far (row a of the pass goes through adapter a).
                for a, adapter in enumerate(adapters):
                    hidden, _mask, _ = passes.forward([adapter], [ids + out[a]])
                    out[a].append(int(passes.head_logits(hidden[:, -1]).argmax(-1)))
        return out

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        peft_model.load_adapter(folder, adapter_name=f"a{i}")
    peft_model.eval()
    # The same stop rule on both sides, one that does not fire: the last vocabulary id as
    # the only stop token (min_new_tokens would mask the EOS logit, so change the argmax
    # where EOS is the best token; eos_token_id None falls back to the model's own).
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False,
                              eos_token_id=[NEVER], pad_token_id=aset.tokenizer.eos_token_id)

    def one_after_another() -> list[list[int]]:
        out = []
        tensor = torch.tensor([ids])
        with torch.no_grad():
            for i in range(len(folders)):
                peft_model.set_adapter(f"a{i}")
                tokens = peft_model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor),
                                             generation_config=config)
                out.append(tokens[0, len(ids):].tolist())
        return out

    variants = {"batched": batched, "peft": one_after_another, "nocache": nocache}
    report(args, variants, len(ids))


def report(args, variants: dict, prompt_tokens: int) -> None:
    """Run the variants in rotating order, round by round; print the table (and --out)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs = {}
    names = list(variants)
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            start = time.perf_counter()
            outputs[name] = variants[name]()
            times[name].append(time.perf_counter() - start)
            print(f"round {round_ + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    tokens = sum(len(t) for t in outputs["batched"])
    median = {k: statistics.median(v) for k, v in times.items()}
    same = outputs["batched"] == outputs["peft"]
    for row, (ours, theirs) in enumerate(zip(outputs["batched"], outputs["peft"])):
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                      min(len(ours), len(theirs)))
            print(f"adapter {row}: first differs at new token {at} (lengths {len(ours)}, "
                  f"{len(theirs)})")
    same_nocache = outputs["batched"] == outputs["nocache"]
    result = {"adapters": args.adapters, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "threads": args.threads, "prompt_tokens": prompt_tokens,
              "seconds": times, "median_s": median,
              "tokens_per_s": {k: tokens / v for k, v in median.items()},
              "speedup_vs_peft": median["peft"] / median["batched"],
              "speedup_vs_nocache": median["nocache"] / median["batched"],
              "greedy_tokens_equal_peft": same, "greedy_tokens_equal_nocache": same_nocache}
    print()
    print(f"| variant | median s | new tokens/s ({args.adapters} adapters x "
          f"{args.new_tokens}) | vs batched |")
    print("|---|---|---|---|")
    for k in names:
        print(f"| {k} | {median[k]:.2f} | {tokens / median[k]:.1f} | "
              f"{median[k] / median['batched']:.2f}x |")
    print(f"\nbatched vs PEFT one after another: {result['speedup_vs_peft']:.2f}x; vs no KV "
          f"cache: {result['speedup_vs_nocache']:.2f}x; greedy tokens equal PEFT's: {same}, "
          f"no-cache's: {same_nocache}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    _reexec_with_malloc_env()
    main()
