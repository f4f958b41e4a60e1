"""The `mlora` commands, one module per group; mlora_tui/cli.py puts them together."""
