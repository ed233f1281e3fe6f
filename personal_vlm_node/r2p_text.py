"""What R2P reads from the model's own words: fingerprints, chain-of-thought answers, attribute keys.

Every parser here tolerates prose, broken JSON and names the model was not offered, and never
raises: a generation that says nothing usable becomes "no attributes" or "no candidate".
:mod:`.r2p` runs the method; this is the text it asks for and reads back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .ego_text import json_objects
from .prompts import ATTRIBUTE_QUESTION, DESCRIPTION_QUESTION

if TYPE_CHECKING:
    from .r2p import Candidate

# ---- the fingerprint: what R2P knows of a concept beyond its memory ----------------------------
FINGERPRINT_KEYS = ("shape", "material", "color", "pattern", "distinct_features", "text_or_brand")


def parse_fingerprint(text: str) -> dict:
    """R2P attributes + description from the fingerprint answer; never raises."""
    attributes: dict[str, str] = {}
    description = ""
    for obj in json_objects(text):
        lowered = {str(k).lower().replace(" ", "_"): v for k, v in obj.items()}
        lowered.setdefault("color", lowered.get("colour"))
        for key in FINGERPRINT_KEYS:
            value = lowered.get(key)
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            if value is not None and str(value).strip() and str(value).strip().lower() != "none":
                attributes[key] = str(value).strip()[:120]
        description = str(lowered.get("description") or "").strip()[:300]
        break
    if not attributes:
        for key in FINGERPRINT_KEYS:
            match = re.search(rf"{key.replace('_', '[ _]')}\W*[:=]\W*([^\n,;\"}}]+)", text, re.IGNORECASE)
            if match and match.group(1).strip().lower() != "none":
                attributes[key] = match.group(1).strip()[:120]
    if not description:
        plain = re.sub(r"[{}\[\]\"]", " ", text).strip()
        description = re.split(r"(?<=[.!?])\s", plain)[0][:300] if plain else ""
    return {"attributes": attributes, "description": description}


# How an attribute key reads in a question ("Does the object … have this colour: red?").
ATTRIBUTE_LABELS = {"shape": "shape", "material": "material", "color": "colour", "pattern": "pattern",
                    "distinct_features": "feature", "text_or_brand": "text or brand"}
_NONE_ANSWERS = {"", "none", "no", "null", "nothing", "neither", "none of them", "none of these",
                 "no match", "unknown", "n/a"}


def attribute_question(key: str, value: str) -> str:
    if key == "description":
        return DESCRIPTION_QUESTION.format(value=value)
    return ATTRIBUTE_QUESTION.format(label=ATTRIBUTE_LABELS.get(key, key.replace("_", " ")), value=value)


# ---- parsing the chain of thought --------------------------------------------------------------
_ANSWER_KEYS = ("answer", "best_match", "best", "concept", "match", "prediction", "name")
_SEEN_KEYS = ("seen_attributes", "attributes_seen", "matched_attributes", "seen", "attributes")
_QUOTED_OR_BARE = r"""\s*[:=]\s*(?:(["'])(.*?)\1(?=\s*(?:[,}\]\n]|$))|([^\n,;}\]]*?)(?=\s*(?:\.\s|\.$|[\n,;}\]]|$)))"""
_ANSWER_FIELD = re.compile(r"""(?<!\w)["']?(?:answer|best[ _]match|concept)["']?""" + _QUOTED_OR_BARE, re.IGNORECASE)
_ANSWER_PROSE = re.compile(r"\banswer\s+is\s*:?\s*(.+?)(?:\.\s|\.$|[\n;]|$)", re.IGNORECASE)
_SEEN_FIELD = re.compile(r"""["']?seen[ _]attributes["']?\s*[:=]\s*\[?([^\]\n}]*?)(?=\s*(?:\.\s|\.$|[\]\n}]|$))""",
                         re.IGNORECASE)


def resolve_name(raw, names: list[str]) -> str | None:
    """Map the model's answer to one of ``names`` (case-insensitive, 1-based index, or a phrase that
    contains exactly one name); "none" and anything unknown → None."""
    if raw is None:
        return None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        index = int(raw)
        return names[index - 1] if float(raw) == index and 1 <= index <= len(names) else None
    text = str(raw).strip().strip("\"'`*.,;:!? ").strip()
    lowered = text.lower()
    if lowered in _NONE_ANSWERS:
        return None
    for name in names:
        if name.lower() == lowered:
            return name
    if lowered.isdigit():
        return resolve_name(int(lowered), names)
    if re.match(r"none\b", lowered):
        return None
    contained = [n for n in names if re.search(rf"(?<!\w){re.escape(n.lower())}(?!\w)", lowered)]
    # "my mug" and "mug" both contained: the longer name is the one meant.
    contained = [n for n in contained if not any(n != m and n.lower() in m.lower() for m in contained)]
    return contained[0] if len(contained) == 1 else None


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}: {v}" for k, v in value.items() if v not in (None, False, "", "no", "none")]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip().strip("\"'") for s in re.split(r"[,;]", str(value)) if s.strip().strip("\"'")]


def _seen_by_name(value, names: list[str]) -> dict[str, list[str]] | None:
    """{"my mug": ["red"], …} → per candidate; None when the keys are not candidate names."""
    if not isinstance(value, dict) or not value:
        return None
    resolved = {resolve_name(k, names): v for k, v in value.items()}
    if None in resolved:
        return None
    return {name: _as_list(v) for name, v in resolved.items()}


def parse_seen_by_candidate(text: str, names: list[str]) -> dict[str, list[str]]:
    """A_{q,i}: the attributes the CoT says it saw, per candidate, when it answered that way."""
    for obj in json_objects(text or ""):
        lowered = {str(k).lower().replace(" ", "_"): v for k, v in obj.items()}
        for key in _SEEN_KEYS:
            per = _seen_by_name(lowered.get(key), names)
            if per is not None:
                return per
    return {}


_REASONING_KEYS = _SEEN_KEYS + ("reasoning", "reason", "thoughts", "thinking", "analysis", "notes", "checks")
_REASONING_FIELD = re.compile(r"""["']?(?:seen[ _]attributes|reasoning|analysis|notes)["']?\s*[:=]""", re.IGNORECASE)
ANSWER_FIRST = "the answer came before its reasoning"


@dataclass(frozen=True)
class Reading:
    """What the chain of thought said: ĉ_CoT (None for none, or when refused), the attributes it
    says it saw, and why its answer was refused ("" when it was not)."""

    answer: str | None
    seen: list[str]
    refused: str = ""


def _prose_before(text: str) -> bool:
    """Whether ``text`` (all that precedes an answer) holds reasoning: a reasoning field, or at
    least three words of prose besides lead-ins such as "Sure!" and code fences."""
    if _REASONING_FIELD.search(text):
        return True
    words = re.findall(r"[^\W\d_]{2,}", re.sub(r"```\w*|\b(?:sure|okay|ok|here|json|is|the)\b", " ", text,
                                              flags=re.IGNORECASE))
    return len(words) >= 3


def read_reasoning(text: str, names: list[str]) -> Reading:
    """The CoT answer, read as the prompt asks for it: reasoning first, the answer last.

    An answer given before any reasoning (a JSON object whose answer key precedes every reasoning
    key, or an "Answer: X" that opens the text) is refused: its reasoning, if any, is a rationale
    written after the fact, which the method does not trust. Never raises."""
    for obj in json_objects(text or ""):
        keys = [str(k).lower().replace(" ", "_") for k in obj]
        lowered = dict(zip(keys, obj.values()))
        answer_key = next((k for k in _ANSWER_KEYS if k in lowered), None)
        if answer_key is None:
            continue
        raw = next((lowered[k] for k in _SEEN_KEYS if k in lowered), None)
        per = _seen_by_name(raw, names)
        seen = [a for values in per.values() for a in values] if per is not None else _as_list(raw)
        if not any(k in _REASONING_KEYS for k in keys[:keys.index(answer_key)]):
            return Reading(None, seen, ANSWER_FIRST)
        return Reading(resolve_name(lowered[answer_key], names), seen)
    # Not JSON (truncated, prose): the last "answer: X" field, else the last "the answer is X".
    text = text or ""
    seen_match = _SEEN_FIELD.search(text)
    seen = _as_list(seen_match.group(1)) if seen_match else []
    if seen_match and seen_match.group(1).lstrip().startswith("{"):
        # Per candidate ({"my mug": ["red"], …}) and cut off: the items of its lists so far.
        rest = re.split(r"""["']?(?:reasoning|answer)["']?\s*[:=]""", text[seen_match.start(1):], maxsplit=1)[0]
        seen = [item for found in re.findall(r"\[([^\]]*)\]?", rest) for item in _as_list(found)]
    fields = list(_ANSWER_FIELD.finditer(text))
    if fields:
        last, raw = fields[-1], fields[-1].group(2) if fields[-1].group(2) is not None else fields[-1].group(3)
    else:
        prose = list(_ANSWER_PROSE.finditer(text))
        if not prose:
            return Reading(None, seen)
        last, raw = prose[-1], prose[-1].group(1)
    answer = resolve_name(raw, names)
    if answer is not None and not _prose_before(text[:last.start()]):
        return Reading(None, seen, ANSWER_FIRST)
    return Reading(answer, seen)


def parse_reasoning(text: str, names: list[str]) -> tuple[str | None, list[str]]:
    """(ĉ_CoT or None, the attributes the model says it saw): :func:`read_reasoning` in short."""
    reading = read_reasoning(text, names)
    return reading.answer, reading.seen


def seen_keys(seen: list[str], candidates: list[Candidate]) -> list[str]:
    """The attribute keys (color, shape, …) that the model's seen attributes refer to.

    An item refers to a key when it names the key ("colour", "color: red") or quotes one of the
    candidates' values for it ("red", "white handle").
    """
    keys = []
    for key in FINGERPRINT_KEYS:
        labels = {key, key.replace("_", " "), ATTRIBUTE_LABELS[key]}
        values = [c.attributes[key].lower() for c in candidates if key in c.attributes]
        for item in (s.lower().strip() for s in seen):
            head = item.split(":", 1)[0].strip()
            if head in labels or any(v and (v in item or (len(item) >= 3 and item in v)) for v in values):
                keys.append(key)
                break
    return keys
