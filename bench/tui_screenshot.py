"""Write the README's picture of the TUI (docs/tui.svg): the app run headless on the
demo's recorded state (tests/tui_recorded.py: three adapters part way through, losses
over their steps, an eval, a checkpoint; fixed times, no GPU as on the demo's CPU run),
saved as Textual's SVG screenshot, with every adapter's loss in the chart (the key ``l``:
the point of the tool is several adapters at once). Run it again after a layout change:

    python -m bench.tui_screenshot [--out docs/tui.svg] [--size 120x40] [--keys l]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from bench.fixtures import _test_module

ROOT = Path(__file__).resolve().parents[1]


async def screenshot(size: tuple[int, int], keys: list[str]) -> str:
    from mlora_tui.app import MloraApp
    from mlora_tui.gpu import NO_GPU

    recorded = _test_module("tui_recorded")
    app = MloraApp(state=recorded.recorded_state(), gpu_sampler=recorded.FixedGpus(NO_GPU))
    async with app.run_test(size=size) as pilot:
        screen = app.screen
        deadline = time.monotonic() + 10
        while screen.gpu_report is None and time.monotonic() < deadline:
            await pilot.pause(0.02)         # the first GPU reading comes from a thread
        await pilot.press(*keys)
        screen.redraw()
        await pilot.pause()
        return app.export_screenshot(title="mlora-tui configs/demo.toml")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tui.svg")
    parser.add_argument("--size", default="120x40", help="columns x lines (default 120x40)")
    parser.add_argument("--keys", default="l",
                        help="keys pressed before the shot, comma-separated ('' for none)")
    args = parser.parse_args(argv)
    columns, lines = (int(n) for n in args.size.lower().split("x"))
    # Clock times on screen are local: pinned, so the picture changes only with the layout.
    os.environ["TZ"] = "UTC"
    time.tzset()
    keys = [key for key in args.keys.split(",") if key]
    svg = asyncio.run(screenshot((columns, lines), keys))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg, encoding="utf-8")
    print(f"wrote {args.out} ({columns}x{lines})")


if __name__ == "__main__":
    main()
