"""Concept names: which are refused."""

from __future__ import annotations

import pytest

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.names import validate_name


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
