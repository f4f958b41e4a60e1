"""The torch-free side stays torch-free: every module of engine.core, engine.tools and
mlora_tui imports without torch or transformers, and all but the Textual app and its widgets
without Textual too, so that `mlora --help`, `mlora validate` and the TUI start fast and run
where torch is not installed.

Modules are found by walking the packages, so a new module is covered without being named
here; each is imported in a fresh interpreter, in order, and the first one that pulls in a
heavy package is named.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine.core", "engine.tools", "mlora_tui")
# The Textual app, its keys and widgets import textual (nothing heavier); the rest none of it.
TEXTUAL_MODULES = ("mlora_tui.app", "mlora_tui.actions", "mlora_tui.widgets")

SCRIPT = """
import importlib, json, pkgutil, sys

def names(package):
    yield package
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__,
                                      package + "."):
        yield info.name

def textual(name):
    return any(name == m or name.startswith(m + ".") for m in TEXTUAL_MODULES)

every = [name for package in PACKAGES for name in names(package)]
first_heavy = {}
for name in sorted(every, key=textual):      # the modules without Textual first
    importlib.import_module(name)
    heavy = ("torch", "transformers") + (() if textual(name) else ("textual",))
    loaded = [module for module in heavy if module in sys.modules]
    if loaded:
        first_heavy = {name: loaded}
        break
print(json.dumps({"modules": every, "first_heavy_import": first_heavy}))
"""


def test_every_torch_free_module_imports_without_torch():
    code = (f"PACKAGES = {PACKAGES!r}\nTEXTUAL_MODULES = {TEXTUAL_MODULES!r}\n" + SCRIPT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["first_heavy_import"] == {}
    modules = set(result["modules"])
    # The walk reached into every package and subpackage (a walk that found nothing
    # would pass the check above).
    for name in ("engine.core.config", "engine.core.jobs", "engine.core.preflight",
                 "engine.tools.convert", "engine.tools.scaffold", "mlora_tui.cli",
                 "mlora_tui.commands.run", "mlora_tui.tui_entry", "mlora_tui.app",
                 "mlora_tui.widgets.jobs_table"):
        assert name in modules, name
