"""mlora-tui's front ends: the Typer CLI (`mlora`) and the Textual TUI (`mlora-tui`).

Nothing in this package imports torch at module level; commands that train import the
engine inside the command.
"""
