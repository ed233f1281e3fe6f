"""Concept names: what a name may be.

A name is user text; it is never used in a path. ``validate_name`` returns it stripped of
surrounding whitespace and in NFC form (é typed as one code point or as e + accent is one
concept), and refuses a name that:

- is empty or longer than ``MAX_NAME_CHARS`` characters;
- contains a control, surrogate or format character other than the zero-width (non-)joiners
  (terminal escapes, bidirectional overrides, zero-width spaces);
- shows nothing: only spaces, invisible characters (joiners, Hangul fillers, the braille blank,
  variation selectors) and combining marks;
- starts with a combining mark or variation selector, which has no character to sit on;
- contains '/' or '\\', or is '.' or '..'.
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

# Characters that draw nothing although they are neither whitespace nor format characters: the
# Hangul fillers and the braille blank are letters and symbols to Unicode and are used to make names
# that look empty; the combining grapheme joiner, the Khmer inherent vowels and the Mongolian
# free variation selectors are marks that never draw on their own.
_BLANK_CHARS = {
    "\u115f", "\u1160", "\u3164", "\uffa0",        # Hangul choseong, jungseong, compatibility, halfwidth fillers
    "\u2800",                                      # braille pattern blank
    "\u034f",                                      # combining grapheme joiner
    "\u17b4", "\u17b5",                            # Khmer inherent vowels
    "\u180b", "\u180c", "\u180d", "\u180f",        # Mongolian free variation selectors
}


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
    if all(_draws_nothing(ch) or _is_mark(ch) for ch in name):
        # Quoting a blank name would show nothing; the code point says what is there.
        first = next(ch for ch in name if not ch.isspace())
        raise PersonalVLMError(
            f"concept name shows nothing: it has only spaces, invisible characters and accents without "
            f"a letter ({_described(first)}); give the object a name such as 'my mug'"
        )
    if _is_mark(name[0]):
        raise PersonalVLMError(
            f"concept name {_excerpt(name)} starts with {_described(name[0])}, which belongs after the "
            "character it modifies; remove it or put it after its letter"
        )
    if len(name) > MAX_NAME_CHARS:
        raise PersonalVLMError(
            f"concept name {_excerpt(name[:20])}... is {len(name)} characters long; use at most {MAX_NAME_CHARS}"
        )
    if "/" in name or "\\" in name:
        raise PersonalVLMError(f"concept name {_excerpt(name)} must not contain '/' or '\\'; choose another name")
    if name in (".", ".."):
        raise PersonalVLMError(f"{_excerpt(name)} is not a valid concept name; choose a name with letters")
    return name


def validate_category(category: str) -> str:
    """Return ``category`` stripped, or raise PersonalVLMError for control or invisible characters."""
    if not isinstance(category, str):
        raise PersonalVLMError(f"a category must be text, got {type(category).__name__}")
    bad = _refused_char(category)
    if bad is not None:
        raise PersonalVLMError(
            f"category {_excerpt(category)} contains the control or invisible character U+{ord(bad):04X}; "
            "use only letters, digits, spaces and punctuation"
        )
    return unicodedata.normalize("NFC", category.strip())


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


def _draws_nothing(ch: str) -> bool:
    return (ch.isspace() or unicodedata.category(ch) == "Cf" or ch in _BLANK_CHARS
            or _is_variation_selector(ch))


def _is_variation_selector(ch: str) -> bool:
    return "\ufe00" <= ch <= "\ufe0f" or "\U000e0100" <= ch <= "\U000e01ef"


def _is_mark(ch: str) -> bool:
    """A combining mark or a variation selector: drawn on, or changing, the character before it."""
    return unicodedata.category(ch).startswith("M")


def _described(ch: str) -> str:
    """U+0301 COMBINING ACUTE ACCENT, or the code point alone when this Python has no name for it."""
    label = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X} {label}" if label else f"U+{ord(ch):04X}"
