"""What the toy world's objects look like: categories, colours, patterns, marks, and drawing them at random.

A look is what tells one object apart from another; :func:`lookalike` draws the hard negative of a
look (same category and colour, a different pattern or mark).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

IMAGE_SIZE = 168
CATEGORIES = ("mug", "ball", "bag", "toy", "bottle", "hat")
COLORS = {
    "red": (215, 38, 38), "blue": (38, 84, 220), "green": (36, 165, 62), "yellow": (236, 208, 36),
    "purple": (138, 58, 190), "orange": (245, 138, 28), "white": (240, 240, 236),
}
PATTERNS = ("plain", "stripes", "dots", "checks")
PATTERN_WORDS = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checks": "checked"}
MARKS = ("none", "star", "cross", "ring", "triangle")
LAYOUTS = ("yollava", "perva", "generic", "calibrate")
SYLLABLES = ("ka", "lo", "mi", "bu", "ta", "ne", "ri", "so", "pa", "du", "ve", "zo", "fi", "ga", "ho", "ju",
              "ke", "ma", "no", "pi", "ru", "se", "ti", "wa")


@dataclass(frozen=True)
class ObjectLook:
    """What tells one object apart from another."""

    category: str
    color: str
    pattern: str = "plain"
    color2: str = ""            # the pattern's colour; empty for plain objects
    mark: str = "none"          # a small sticker; "none" for no mark

    def keywords(self) -> list[str]:
        words = [self.color, PATTERN_WORDS[self.pattern]]
        if self.pattern != "plain":
            words.append(self.color2)
        words.append(self.category)
        if self.mark != "none":
            words.append(self.mark)
        return words

    def description(self) -> str:
        text = f"a {self.color} {self.category}"
        if self.pattern != "plain":
            text += f" with {self.color2} {self.pattern}"
        if self.mark != "none":
            text += f" and a {self.mark} sticker"
        return text

    def phrase(self) -> str:
        """A short referring phrase: ``the red mug``."""
        return f"the {self.color} {self.category}"

    def fingerprint(self) -> dict[str, str]:
        return {
            "shape": self.category,
            "material": "plastic",
            "color": self.color if self.pattern == "plain" else f"{self.color} and {self.color2}",
            "pattern": "plain" if self.pattern == "plain" else f"{self.color2} {self.pattern}",
            "distinct_features": f"{self.mark} sticker" if self.mark != "none" else "none",
            "text_or_brand": "none",
            "description": self.description(),
        }

    def is_lookalike_of(self, other: ObjectLook) -> bool:
        """Same category and main colour, yet a different object."""
        return self.category == other.category and self.color == other.color and self != other


# ---- looks ---------------------------------------------------------------------------------
def random_look(rng: np.random.Generator, category: str | None = None, color: str | None = None) -> ObjectLook:
    colors = list(COLORS)
    category = category or CATEGORIES[rng.integers(len(CATEGORIES))]
    color = color or colors[rng.integers(len(colors))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    color2 = ""
    if pattern != "plain":
        others = [c for c in colors if c != color]
        color2 = others[rng.integers(len(others))]
    mark = MARKS[rng.integers(len(MARKS))]
    return ObjectLook(category, color, pattern, color2, mark)


def lookalike(rng: np.random.Generator, look: ObjectLook) -> ObjectLook:
    """Same category and colour; a different pattern (usually) or only a different mark."""
    for _ in range(100):
        if rng.random() < 0.7:
            pattern = [p for p in PATTERNS if p != look.pattern][rng.integers(len(PATTERNS) - 1)]
            color2 = look.color2
            if pattern != "plain" and not color2:
                others = [c for c in COLORS if c != look.color]
                color2 = others[rng.integers(len(others))]
            if pattern == "plain":
                color2 = ""
            candidate = ObjectLook(look.category, look.color, pattern, color2, look.mark)
        else:
            mark = [m for m in MARKS if m != look.mark][rng.integers(len(MARKS) - 1)]
            candidate = replace(look, mark=mark)
        if candidate != look:
            return candidate
    raise RuntimeError("no look-alike found")


def random_name(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        name = "".join(SYLLABLES[rng.integers(len(SYLLABLES))] for _ in range(2 + int(rng.random() < 0.3)))
        if name not in taken:
            taken.add(name)
            return name
