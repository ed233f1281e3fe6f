"""Concept names: which are refused, how they are printed, and which look alike."""

from __future__ import annotations

import unicodedata

import pytest

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.names import (find_lookalike, lookalike_error, name_skeleton, quoted, shown,
                                     validate_category, validate_name)

MUG_VARIANTS = [
    "mug",
    "mug\ufe0f",                          # emoji presentation selector after the g
    "\u043cug",                           # Cyrillic м
    "\uff4d\uff55\uff47",                 # fullwidth ｍｕｇ
]


@pytest.mark.parametrize("blank", [
    "\u3164",                  # Hangul filler
    "\uffa0",                  # halfwidth Hangul filler
    "\u115f\u1160",            # Hangul choseong + jungseong fillers
    "\u2800",                  # braille pattern blank
    " \u2800 \u3164 ",
    "\u0301",                  # a combining mark alone
    "\u0301\u0308",
    "\ufe0f",                  # a variation selector alone
    "\u200d\ufe0f",
    "\u034f",                  # combining grapheme joiner
])
def test_names_that_show_nothing_are_refused(blank):
    with pytest.raises(PersonalVLMError, match="shows nothing") as refused:
        validate_name(blank)
    assert "U+" in str(refused.value)          # the message names what is there, since it cannot show it


@pytest.mark.parametrize("name", ["\u0301mug", "\ufe0fmug", " \u0308a"])
def test_a_name_starting_with_a_combining_mark_is_refused(name):
    with pytest.raises(PersonalVLMError, match="starts with U\\+"):
        validate_name(name)


@pytest.mark.parametrize("name, stored", [
    ("Grandpa's cane", "Grandpa's cane"),
    ("caf\u00e9", "caf\u00e9"),
    ("cafe\u0301", "caf\u00e9"),                                  # NFD typed, NFC stored
    ("\U0001F469\u200d\U0001F52C kit", "\U0001F469\u200d\U0001F52C kit"),   # 👩‍🔬, emoji joined by ZWJ
    ("\u2764\ufe0f mug", "\u2764\ufe0f mug"),                     # ❤️: a variation selector after its base
    ("\u1100\u1161 \u115f\u1161", "\uac00 \u115f\u1161"),          # a filler inside a visible syllable
    ("\u3164mug", "\u3164mug"),                                  # visible text beside a filler: a look-alike case
])
def test_ordinary_names_are_accepted_in_nfc(name, stored):
    assert validate_name(name) == stored


def test_nfc_and_nfd_spellings_are_one_name():
    assert validate_name("caf\u00e9") == validate_name("cafe\u0301")
    assert find_lookalike("cafe\u0301", ["caf\u00e9"]) is None    # the same concept, not a look-alike


@pytest.mark.parametrize("variant", MUG_VARIANTS)
def test_mug_variants_have_the_same_skeleton(variant):
    assert validate_name(variant) == unicodedata.normalize("NFC", variant)   # each is a valid name
    assert name_skeleton(variant) == "mug"


@pytest.mark.parametrize("a, b", [
    ("mug", "mugs"),
    ("Anna", "Anja"),
    ("caf\u00e9", "cafe"),
    ("my mug", "mymug"),
    ("\u043c\u0443\u0433", "myr"),       # Cyrillic "муг": г is not mapped, it does not look like r
    ("\u041fen", "Nen"),                 # Cyrillic capital П: its lower case п looks like n, П does not
])
def test_different_names_have_different_skeletons(a, b):
    assert name_skeleton(a) != name_skeleton(b)


@pytest.mark.parametrize("a, b", [
    ("Mug", "mug"),
    ("my\u00a0mug", "my  mug"),                   # no-break space, two spaces
    ("\u0391nna", "Anna"),                        # Greek capital alpha
    ("\u0440\u0435\u043f", "pen"),                # Cyrillic р е and п
    ("\u0456\u0458\u0455\u0501", "ijsd"),
    ("\u03bf\u03c1\u03bd\u03b9\u03ba\u03c4", "opvikt"),
    ("\u0261\u0578", "gn"),
    ("\u0451\u0436", "\u00eb\u0436"),             # Cyrillic ё: mapped under its accent
])
def test_lookalike_letters_and_spacing_have_the_same_skeleton(a, b):
    assert name_skeleton(a) == name_skeleton(b)


def test_find_lookalike_returns_the_existing_name_that_looks_the_same():
    existing = ["mugs", "Anna", "mug"]
    assert find_lookalike("\u043cug", existing) == "mug"
    assert find_lookalike("\uff4d\uff55\uff47", existing) == "mug"
    assert find_lookalike("mug", existing) is None                 # the name itself is no look-alike
    assert find_lookalike("Anja", existing) is None
    assert find_lookalike("mug", ["mug\ufe0f"]) == "mug\ufe0f"


def test_lookalike_error_names_both_names_and_the_differing_character():
    message = str(lookalike_error("\u043cug", "mug"))
    assert message.startswith("'\u043cug' looks like the existing concept 'mug'")
    assert "U+043C CYRILLIC SMALL LETTER EM" in message
    # A name without the variation selector: the existing name's extra character is the difference.
    assert "U+FE0F VARIATION SELECTOR-16" in str(lookalike_error("mug", "mug\ufe0f"))
    assert "differ only in how often a space" in str(lookalike_error("my  mug", "my mug"))


def test_shown_keeps_joiners_and_escapes_what_a_terminal_would_act_on():
    assert shown("\U0001F469\u200d\U0001F52C kit") == "\U0001F469\u200d\U0001F52C kit"
    assert shown("caf\u00e9 \u2764\ufe0f") == "caf\u00e9 \u2764\ufe0f"
    assert shown("cup\x1b[2J") == "cup\\x1b[2J"
    assert shown("a\u202eb") == "a\\u202eb"                         # right-to-left override
    assert shown("a\u2028b") == "a\\u2028b"                         # line separator
    assert shown("\ud800") == "\\ud800"                             # a lone surrogate cannot be printed


def test_quoted_prints_a_joined_emoji_as_typed_and_cuts_a_long_text():
    assert quoted("\U0001F469\u200d\U0001F52C kit") == "'\U0001F469\u200d\U0001F52C kit'"
    assert quoted("Grandpa's cane") == '"Grandpa\'s cane"'
    long = quoted("y" * 5000)
    assert long.startswith("'" + "y" * 40 + "'...") and "5000 characters" in long


def test_a_refused_name_is_quoted_without_repr_escapes_for_joiners():
    with pytest.raises(PersonalVLMError) as refused:
        validate_name("\U0001F469\u200d\U0001F52C/kit")
    assert "'\U0001F469\u200d\U0001F52C/kit'" in str(refused.value)
    assert "\\u200d" not in str(refused.value)


def test_categories_keep_their_rules():
    assert validate_category("  caf\u0065\u0301 ") == "caf\u00e9"
    with pytest.raises(PersonalVLMError, match="category 'mug\\\\x1b"):
        validate_category("mug\x1b[31m")
