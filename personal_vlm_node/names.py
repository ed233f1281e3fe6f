"""Concept names: what a name may be.

A name is user text; it is never used in a path. This module holds the rules the store, the
assistant, the node and the command all apply to the names and categories they are given.
"""

from __future__ import annotations

import unicodedata

from personal_vlm_node.errors import PersonalVLMError

MAX_NAME_CHARS = 64

# Zero-width (non-)joiners are format characters (category Cf) but are part of ordinary
# writing: emoji sequences such as 👩‍🔬 and several scripts need them.
_ALLOWED_FORMAT_CHARS = {"\u200c", "\u200d"}

# Refused in names and categories: controls (terminal escapes), surrogates, and format characters
# other than the joiners (bidirectional overrides, zero-width spaces). Unassigned code points (Cn)
# are allowed: emoji newer than this Python's Unicode tables are unassigned to it.
_REFUSED_CATEGORIES = {"Cc", "Cs", "Cf"}


def validate_name(name: str) -> str:
    """Return ``name`` without surrounding whitespace, in NFC form, or raise PersonalVLMError.

    NFC makes the same name typed on different keyboards (é as one or two code points) the same
    concept.
    """
    if not isinstance(name, str):
        raise PersonalVLMError(f"a concept name must be text, got {type(name).__name__}")
    bad = _refused_char(name)
    if bad is not None:
        raise PersonalVLMError(
            f"concept name {_excerpt(name)} contains the control or invisible character "
            f"U+{ord(bad):04X}; use only letters, digits, spaces and punctuation"
        )
    name = unicodedata.normalize("NFC", name.strip())
    if not name:
        raise PersonalVLMError("a concept name must not be empty; give the object a name such as 'my mug'")
    if all(ch in _ALLOWED_FORMAT_CHARS or ch.isspace() for ch in name):
        raise PersonalVLMError(
            f"concept name {_excerpt(name)} has only invisible characters; give the object a name such as 'my mug'"
        )
    if len(name) > MAX_NAME_CHARS:
        raise PersonalVLMError(
            f"concept name {name[:20]!r}... is {len(name)} characters long; "
            f"use at most {MAX_NAME_CHARS}"
        )
    if "/" in name or "\\" in name:
        raise PersonalVLMError(f"concept name {name!r} must not contain '/' or '\\'; choose another name")
    if name in (".", ".."):
        raise PersonalVLMError(f"{name!r} is not a valid concept name; choose a name with letters")
    return name


def _excerpt(text: str, limit: int = 40) -> str:
    """``text`` as quoted in a message: its start only, so a hostile name is never echoed whole."""
    while limit > 1 and len(repr(text[:limit])) > 60:     # escaped characters take up to 10 each
        limit //= 2
    return repr(text[:limit]) + (f"... ({len(text)} characters)" if len(text) > limit else "")


def _refused_char(text: str) -> str | None:
    for ch in text:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES and ch not in _ALLOWED_FORMAT_CHARS:
            return ch
    return None


def validate_category(category: str) -> str:
    """Return ``category`` stripped, or raise PersonalVLMError for control or invisible characters."""
    if not isinstance(category, str):
        raise PersonalVLMError(f"a category must be text, got {type(category).__name__}")
    bad = _refused_char(category)
    if bad is not None:
        raise PersonalVLMError(
            f"category {category[:40]!r} contains the control or invisible character U+{ord(bad):04X}; "
            "use only letters, digits, spaces and punctuation"
        )
    return unicodedata.normalize("NFC", category.strip())
