"""How a search ends other than finished, light to import (the CLI catches these without importing Ray)."""
from __future__ import annotations


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a search; its message says how to resume it."""


class SearchFailed(Exception):
    """Every trial of a search failed; the message gives the most common reason."""
