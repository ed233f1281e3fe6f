"""Concept names: what a name may be, how it is printed, and when two names look alike.

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

Look-alikes. Two different names can look the same on screen: ``mug``, ``mug`` + VS16, ``мug``
with a Cyrillic м, fullwidth ``ｍｕｇ``. As separate concepts the user could not tell them apart in
``list``, and ``forget mug`` would find a different concept than the one that shows as ``mug``.

Names keep the form the user typed (NFC only), so a name is shown back as it was typed. Whether two
names look alike is decided on their *skeletons* (``name_skeleton``): NFKC (fullwidth and other
compatibility forms become plain letters), case folded (``Mug`` and ``mug`` are told apart by
neither a listener nor most readers), invisible characters dropped, runs of spaces made one, and
Cyrillic, Greek and other letters that are drawn like Latin ones replaced by that Latin letter.
Comparing skeletons instead of folding names when they are stored leaves every name as typed, and
the comparison applies as well to names stored before it existed.

A new name that looks like an existing concept's is to be refused (``find_lookalike`` finds the
existing name, ``lookalike_error`` words the refusal), not merged into that concept: merging would
silently change what the user typed, and teaching ``мug`` would add views to, or overwrite, ``mug``
without the user having asked for that. The refusal names the existing concept, so the user can
use that name or choose one that looks different.

The look-alike table is small and hand-written: the letters a keyboard layout switch or a spoofer
puts into a Latin name, not all of Unicode's confusables.txt, which also maps sequences such as
"rn" to "m" and would refuse ordinary pairs of names.
"""

from __future__ import annotations

import unicodedata
from typing import Iterable

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

# Categories of code points printed as escapes: they would act on a terminal (controls), hide or
# reorder the text around them (format characters), break the line (line and paragraph separators)
# or cannot be encoded at all (lone surrogates). The joiners are printed as they are: escaped, a name
# such as 👩‍🔬 could not be copied back into a command.
_ESCAPED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}

# Letters drawn like a Latin letter, each mapped to that letter. The table is applied before case
# folding, so each case is listed by its own shape: Н is H but н is not h, п is n but П is not N.
_LATIN_LOOKALIKES = str.maketrans(
    # Cyrillic
    "аеорсухіјѕԁһԛԝӏмп" "АВЕКМНОРСТХУІЈЅԚԜӀ"
    # Greek
    "αορνικτυχγηω" "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ"
    # Latin letters of the phonetic alphabet, Armenian
    "ɡɑ" "ոսօհ",
    "aeopcyxijsdhqwlmn" "ABEKMHOPCTXYIJSQWI"
    "aopviktuxynw" "ABEZHIKMNOPTYX"
    "ga" "nuoh",
)


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
            f"concept name {quoted(name)} contains the control or invisible character "
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
            f"concept name {quoted(name)} starts with {_described(name[0])}, which belongs after the "
            "character it modifies; remove it or put it after its letter"
        )
    if len(name) > MAX_NAME_CHARS:
        raise PersonalVLMError(
            f"concept name {quoted(name[:20])}... is {len(name)} characters long; use at most {MAX_NAME_CHARS}"
        )
    if "/" in name or "\\" in name:
        raise PersonalVLMError(f"concept name {quoted(name)} must not contain '/' or '\\'; choose another name")
    if name in (".", ".."):
        raise PersonalVLMError(f"{quoted(name)} is not a valid concept name; choose a name with letters")
    return name


def validate_category(category: str) -> str:
    """Return ``category`` stripped, or raise PersonalVLMError for control or invisible characters."""
    if not isinstance(category, str):
        raise PersonalVLMError(f"a category must be text, got {type(category).__name__}")
    bad = _refused_char(category)
    if bad is not None:
        raise PersonalVLMError(
            f"category {quoted(category)} contains the control or invisible character U+{ord(bad):04X}; "
            "use only letters, digits, spaces and punctuation"
        )
    return unicodedata.normalize("NFC", category.strip())


def name_skeleton(name: str) -> str:
    """What ``name`` looks like, as a string: two names with the same skeleton look alike.

    NFKC-style compatibility folding (ｍ → m), Latin look-alikes mapped (Cyrillic м → m), case
    folded, invisible characters dropped, whitespace runs made one space. Accents are kept: café and
    cafe look different.
    """
    # NFKD first, so an accented look-alike (Cyrillic ё) splits into a mapped base and its accent.
    text = unicodedata.normalize("NFKD", name)
    # Spaces are kept to be made one below; "my mug" and "mymug" look different.
    text = "".join(ch for ch in text if ch.isspace() or not _draws_nothing(ch))
    text = text.translate(_LATIN_LOOKALIKES).casefold()
    return " ".join(unicodedata.normalize("NFC", text).split())


def find_lookalike(name: str, existing_names: Iterable[str]) -> str | None:
    """The first of ``existing_names`` that is a different name but looks like ``name``, else None.

    Names are compared in NFC, as ``validate_name`` stores them: the same name typed with a
    decomposed accent is the same concept, not a look-alike.
    """
    name = unicodedata.normalize("NFC", name)
    skeleton = name_skeleton(name)
    for other in existing_names:
        if unicodedata.normalize("NFC", other) != name and name_skeleton(other) == skeleton:
            return other
    return None


def lookalike_error(name: str, existing: str) -> PersonalVLMError:
    """The refusal of a new ``name`` that looks like the ``existing`` concept's name."""
    # The characters to point at are the new name's own; when it has none (it lacks a variation
    # selector the existing name has), the existing name's.
    differing = ([ch for ch in dict.fromkeys(name) if ch not in existing]
                 or [ch for ch in dict.fromkeys(existing) if ch not in name])
    detail = ", ".join(_described(ch) for ch in differing[:2]) + (", ..." if len(differing) > 2 else "")
    # Same characters, different counts: "my  mug" and "my mug".
    detail = detail or "how often a space or an invisible character repeats"
    return PersonalVLMError(
        f"{quoted(name, MAX_NAME_CHARS)} looks like the existing concept {quoted(existing, MAX_NAME_CHARS)} "
        f"(they differ only in {detail}); use {quoted(existing, MAX_NAME_CHARS)} for that concept, or choose a "
        "name that looks different"
    )


def shown(text: str) -> str:
    """``text`` as printed for a user to read and to copy into a command: as typed, except control,
    format (other than the joiners), line-separator and surrogate code points, which appear as
    escapes such as ``\\x1b`` or ``\\u202e`` and so are never interpreted by a terminal."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in _ESCAPED_CATEGORIES and ch not in _ALLOWED_FORMAT_CHARS
        else ch
        for ch in text
    )


def quoted(text: str, limit: int = 40) -> str:
    """``text`` quoted in a message, printed as ``shown`` prints it: its start only, so a hostile name
    is never echoed whole."""
    longest = limit * 3 // 2                # escaped characters take up to 10 each
    head = shown(text[:limit])
    while limit > 1 and len(head) > longest:
        limit //= 2
        head = shown(text[:limit])
    quote = '"' if "'" in head and '"' not in head else "'"
    return quote + head + quote + (f"... ({len(text)} characters)" if len(text) > limit else "")


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
