"""'Did you mean' helper shared by config, registry and CLI messages."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, options: Iterable[str], prefix: str = "") -> str:
    """Return ``" Did you mean 'x'?"`` for the closest option, or ``""`` when nothing is close."""
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" Did you mean '{prefix}{matches[0]}'?" if matches else ""
