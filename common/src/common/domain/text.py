"""The one rule for text a client sends (names, tags, keys): no control characters."""

from __future__ import annotations

import unicodedata

# Control characters, and lone surrogates (text that is not valid UTF-8 once encoded).
CONTROL_CATEGORIES = frozenset({"Cc", "Cs"})


def first_control(text: str) -> str | None:
    """The first control character or lone surrogate in ``text``, if there is one."""
    return next((ch for ch in text if unicodedata.category(ch) in CONTROL_CATEGORIES), None)


def without_controls(text: str) -> str:
    return "".join(ch for ch in text if unicodedata.category(ch) not in CONTROL_CATEGORIES)
