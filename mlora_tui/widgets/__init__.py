"""The TUI's widgets and screens, one per file; ``formatting`` is how they write numbers."""
