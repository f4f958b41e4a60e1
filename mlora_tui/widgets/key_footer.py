"""The footer: Textual's, less the keys that do not fit the width.

A key cut in half ("S S") reads as a different key; so the footer shows whole keys from the
first while they fit and drops the rest. `?` comes first in the screen's bindings, so it
always shows, and the help screen lists every key.
"""

from __future__ import annotations

from textual.widgets import Footer
from textual.widgets._footer import FooterKey


def _width(key: FooterKey) -> int:
    """Cells a compact footer key takes, with the gap after it."""
    return len(key.key_display) + (len(key.description) + 1 if key.description else 0) + 1


class KeyFooter(Footer):
    def __init__(self, **kwargs):
        super().__init__(compact=True, **kwargs)
        self._width = 0

    def compose(self):
        items = list(super().compose())
        room = self.size.width or self.app.size.width
        keys = [item for item in items if isinstance(item, FooterKey)
                and not item.has_class("-command-palette")]
        rest = [item for item in items if item not in keys]
        room -= sum(_width(item) for item in rest if isinstance(item, FooterKey))
        shown = []
        for key in keys:
            room -= _width(key)
            if room < 0:
                break
            shown.append(key)
        self.styles.grid_size_columns = len(shown)
        yield from shown
        yield from rest

    def on_resize(self) -> None:
        if self.size.width != self._width:
            self._width = self.size.width
            self.call_after_refresh(self.recompose)
