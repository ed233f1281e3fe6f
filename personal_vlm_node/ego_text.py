"""What Ego reads from the model's own words: the introduction's keywords and area.

The parsers tolerate prose, broken JSON and chatter around the answer, and never raise.
:mod:`.ego` runs the method; this is the answer it reads back.
"""

from __future__ import annotations

import json
import re

_STOPWORDS = frozenset(
    "a an the and or of with on in at to for is are it its this that photo image picture shows "
    "keywords keyword area json answer percent percentage covers cover like".split())


# ---- robust parsing of model output ---------------------------------------------------------
def json_objects(text: str):
    """Yield every parsable ``{...}`` object in ``text`` (models wrap, truncate and chat)."""
    for start in [m.start() for m in re.finditer(r"\{", text)]:
        depth = 0
        for end in range(start, len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    chunk = text[start:end + 1]
                    for candidate in (chunk, re.sub(r",\s*([}\]])", r"\1", chunk.replace("'", '"'))):
                        try:
                            value = json.loads(candidate)
                        except ValueError:
                            continue
                        if isinstance(value, dict):
                            yield value
                            break
                    break


def introduction_complete(text: str) -> bool:
    """Whether ``text`` already holds a whole answer object with keywords: generation can stop
    there (a model may go on with a closing code fence, a comment or another object)."""
    return "}" in text and any("keywords" in obj or "keyword" in obj for obj in json_objects(text))


def parse_introduction(text: str) -> tuple[list[str], float | None]:
    """Keywords and area (percent) from the introduction answer; never raises."""
    keywords: list[str] = []
    area: float | None = None
    for obj in json_objects(text):
        raw = obj.get("keywords") or obj.get("keyword") or []
        if isinstance(raw, str):
            raw = re.split(r"[,;]", raw)
        if isinstance(raw, list):
            keywords = [str(k).strip() for k in raw if str(k).strip()]
        value = obj.get("area", obj.get("coverage"))
        try:
            area = float(str(value).rstrip("% ")) if value is not None else None
        except ValueError:
            area = None
        break
    if not keywords:
        match = re.search(r"keywords?\W*[:=]\W*\[?([^\]\n}.]*)", text, re.IGNORECASE)
        source = match.group(1) if match else text
        keywords = [w for w in re.findall(r"[^\W\d_][\w'-]*", source) if w.lower() not in _STOPWORDS][:6]
    if area is None:
        match = re.search(r"area\W*[:=]?\W*(\d+(?:\.\d+)?)", text, re.IGNORECASE) or \
            re.search(r"(\d+(?:\.\d+)?)\s*%", text)
        area = float(match.group(1)) if match else None
    if area is not None and not 0.0 < area <= 100.0:
        area = None
    seen, unique = set(), []
    for k in keywords:
        if k.lower() not in seen and len(k) <= 40:
            seen.add(k.lower())
            unique.append(k)
    return unique[:8], area
