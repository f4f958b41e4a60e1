"""The `mlora-tui` console script: the Textual TUI's entry point.

The interactive TUI is the next milestone; until it exists this says so plainly and points
at the headless CLI, exiting with 1. It imports neither torch nor textual.
"""

from __future__ import annotations

import sys

NOT_BUILT = (
    "mlora-tui: the interactive terminal UI is not built yet.\n"
    "Train and watch a run with the CLI instead:\n"
    "  mlora validate CONFIG    check a config\n"
    "  mlora run CONFIG         train, with progress bars\n"
    "  mlora --help             every command\n"
)


def main() -> None:
    """Entry point of the `mlora-tui` console script."""
    sys.stderr.write(NOT_BUILT)
    raise SystemExit(1)


if __name__ == "__main__":
    main()
