"""A synthetic world of personal objects, deterministic from a seed, with exact masks and boxes.

Objects have a category drawn as a distinct silhouette (mug, ball, bag, toy, bottle, hat), one or
two colours, a pattern (plain, stripes, dots, checks) and a small distinctive mark (a sticker).
Scenes place one or several objects at varied position, scale, rotation, lighting and partial
occlusion on cluttered, low-saturation backgrounds. Every object gets an exact mask (the pixels
it finally covers, after occlusion) and a box.

Personal concepts come in look-alike pairs: the same category and colour, a different pattern or
mark — the hard negatives personalization is about. Datasets are written in the layouts
``personal-vlm eval`` reads, plus image/mask pairs for ``personal-vlm calibrate``:

    python -m personal_vlm_node.testing.toy_world OUT --seed S --concepts N --layout yollava|perva|generic|calibrate

Every dataset also gets ``toy_world.json``: the concepts' attributes, every image's objects, and
``lookalike_pairs`` — the (query, concept) negatives whose query shows a look-alike of the concept
(see :func:`lookalike_pairs`), so figures can be split into easy and hard negatives.

The same seed gives the same bytes (PNG files written by the same Pillow version).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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


@dataclass
class Placed:
    look: ObjectLook
    cx: float
    cy: float
    size: float                 # side of the object's square canvas, pixels
    angle: float                # degrees, counter-clockwise
    concept: str | None = None  # the concept's name when the object is a personal concept


@dataclass
class SceneSpec:
    """Everything a scene is rendered from; :func:`render` is a pure function of it."""

    seed: int
    objects: list[Placed]
    background: tuple[int, int, int]
    occluders: list[tuple[float, float, float, float, tuple[int, int, int]]] = field(default_factory=list)
    brightness: float = 1.0
    gradient: tuple[float, float] = (0.0, 0.0)
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size: int = IMAGE_SIZE


@dataclass
class Rendered:
    image: Image.Image
    masks: list[np.ndarray]                                 # (H, W) bool per object, after occlusion
    boxes: list[tuple[int, int, int, int] | None]           # x0, y0, x1, y1 (exclusive); None if hidden

    def area(self, i: int) -> float:
        """Percent of the image covered by object ``i``."""
        return 100.0 * float(self.masks[i].mean())


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


# ---- drawing -------------------------------------------------------------------------------
def _shape_mask(category: str, s: int) -> Image.Image:
    """The category's silhouette on an s×s canvas (mode L, 0/255)."""
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)

    def box(x0, y0, x1, y1):
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    if category == "mug":
        d.ellipse(box(0.52, 0.28, 0.95, 0.78), fill=255)
        d.ellipse(box(0.64, 0.40, 0.84, 0.66), fill=0)
        d.rounded_rectangle(box(0.08, 0.16, 0.72, 0.94), radius=0.08 * s, fill=255)
    elif category == "ball":
        d.ellipse(box(0.06, 0.06, 0.94, 0.94), fill=255)
    elif category == "bag":
        d.ellipse(box(0.26, 0.04, 0.74, 0.62), fill=255)
        d.ellipse(box(0.35, 0.13, 0.65, 0.53), fill=0)
        d.polygon([(0.18 * s, 0.36 * s), (0.82 * s, 0.36 * s), (0.96 * s, 0.96 * s), (0.04 * s, 0.96 * s)], fill=255)
    elif category == "toy":
        d.ellipse(box(0.18, 0.02, 0.40, 0.24), fill=255)
        d.ellipse(box(0.60, 0.02, 0.82, 0.24), fill=255)
        d.ellipse(box(0.26, 0.08, 0.74, 0.50), fill=255)
        d.ellipse(box(0.20, 0.42, 0.80, 0.98), fill=255)
        d.ellipse(box(0.04, 0.50, 0.30, 0.70), fill=255)
        d.ellipse(box(0.70, 0.50, 0.96, 0.70), fill=255)
    elif category == "bottle":
        d.rectangle(box(0.40, 0.02, 0.60, 0.12), fill=255)
        d.rectangle(box(0.43, 0.10, 0.57, 0.34), fill=255)
        d.rounded_rectangle(box(0.28, 0.30, 0.72, 0.98), radius=0.1 * s, fill=255)
    elif category == "hat":
        d.ellipse(box(0.02, 0.62, 0.98, 0.90), fill=255)
        d.chord(box(0.20, 0.14, 0.80, 1.30), 180, 360, fill=255)
        d.rectangle(box(0.20, 0.70, 0.80, 0.76), fill=255)
    else:
        raise ValueError(f"unknown category {category!r}")
    return m


def _pattern_layer(look: ObjectLook, s: int) -> Image.Image:
    img = Image.new("RGB", (s, s), COLORS[look.color])
    if look.pattern == "plain":
        return img
    d = ImageDraw.Draw(img)
    c2 = COLORS[look.color2]
    period = max(6.0, s / 5.0)
    if look.pattern == "stripes":
        y = period * 0.25
        while y < s:
            d.rectangle([0, y, s, y + period * 0.45], fill=c2)
            y += period
    elif look.pattern == "dots":
        r = period * 0.24
        for i in range(7):
            for j in range(7):
                x = (i + 0.5 + 0.5 * (j % 2)) * period
                y = (j + 0.5) * period
                d.ellipse([x - r, y - r, x + r, y + r], fill=c2)
    elif look.pattern == "checks":
        cells = int(math.ceil(s / period)) + 1
        for i in range(cells):
            for j in range(cells):
                if (i + j) % 2:
                    d.rectangle([i * period, j * period, (i + 1) * period, (j + 1) * period], fill=c2)
    return img


def _mark_center(category: str) -> tuple[float, float]:
    return {"mug": (0.40, 0.55), "ball": (0.5, 0.5), "bag": (0.5, 0.66), "toy": (0.5, 0.70),
            "bottle": (0.5, 0.64), "hat": (0.5, 0.48)}[category]


def _draw_mark(img: Image.Image, look: ObjectLook, s: int) -> None:
    if look.mark == "none":
        return
    d = ImageDraw.Draw(img)
    cx, cy = (v * s for v in _mark_center(look.category))
    r = 0.13 * s
    bright = sum(COLORS[look.color]) > 450
    ink = (20, 20, 24) if bright else (250, 250, 250)
    if look.mark == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=ink)
    elif look.mark == "cross":
        w = r * 0.38
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=ink)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=ink)
    elif look.mark == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
        d.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=COLORS[look.color])
    elif look.mark == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=ink)


def _object_layers(p: Placed) -> tuple[Image.Image, Image.Image]:
    """RGB and binary mask of the placed object, rotated, on its own canvas."""
    s = max(8, int(round(p.size)))
    mask = _shape_mask(p.look.category, s)
    rgb = _pattern_layer(p.look, s)
    _draw_mark(rgb, p.look, s)
    # A soft shading so objects are not flat cut-outs: darker towards the lower right.
    yy, xx = np.mgrid[0:s, 0:s] / max(1, s - 1)
    shade = 1.08 - 0.22 * (0.5 * xx + 0.5 * yy)
    rgb = Image.fromarray(np.clip(np.asarray(rgb, np.float32) * shade[..., None], 0, 255).astype(np.uint8))
    if p.angle:
        rgb = rgb.rotate(p.angle, resample=Image.BILINEAR, expand=True)
        mask = mask.rotate(p.angle, resample=Image.NEAREST, expand=True)
    return rgb, mask


def _background(spec: SceneSpec) -> np.ndarray:
    rng = np.random.default_rng([spec.seed, 7])
    s = spec.size
    img = Image.new("RGB", (s, s), spec.background)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 18))):
        grey = int(rng.integers(60, 200))
        jitter = rng.integers(-22, 23, size=3)
        col = tuple(int(np.clip(grey + j, 0, 255)) for j in jitter)
        x0, y0 = rng.uniform(-20, s, size=2)
        w, h = rng.uniform(8, 70, size=2)
        kind = rng.integers(3)
        if kind == 0:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        elif kind == 1:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            d.line([x0, y0, x0 + w, y0 + h], fill=col, width=int(rng.integers(2, 6)))
    arr = np.asarray(img, np.float32)
    arr += rng.normal(0, 6, size=arr.shape).astype(np.float32)
    return arr


def render(spec: SceneSpec) -> Rendered:
    """The scene's image and the exact mask and box of every object."""
    s = spec.size
    canvas = _background(spec)
    label = np.full((s, s), -1, dtype=np.int32)
    for i, p in enumerate(spec.objects):
        rgb, mask = _object_layers(p)
        w, h = rgb.size
        x0, y0 = int(round(p.cx - w / 2)), int(round(p.cy - h / 2))
        # Clip the object's canvas to the scene.
        sx0, sy0 = max(0, -x0), max(0, -y0)
        sx1, sy1 = min(w, s - x0), min(h, s - y0)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        m = np.asarray(mask, np.uint8)[sy0:sy1, sx0:sx1] > 127
        c = np.asarray(rgb, np.float32)[sy0:sy1, sx0:sx1]
        region = (slice(y0 + sy0, y0 + sy1), slice(x0 + sx0, x0 + sx1))
        canvas[region][m] = c[m]
        label[region][m] = i
    occ = Image.new("L", (s, s), 0)
    occ_rgb = Image.new("RGB", (s, s))
    for (x0, y0, x1, y1, col) in spec.occluders:
        ImageDraw.Draw(occ).rectangle([x0, y0, x1, y1], fill=255)
        ImageDraw.Draw(occ_rgb).rectangle([x0, y0, x1, y1], fill=col)
    om = np.asarray(occ) > 127
    canvas[om] = np.asarray(occ_rgb, np.float32)[om]
    label[om] = -1
    # Lighting: brightness, a linear gradient and a colour tint over the whole scene.
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1) - 0.5
    light = spec.brightness * (1.0 + spec.gradient[0] * xx + spec.gradient[1] * yy)
    canvas = canvas * light[..., None] * np.asarray(spec.tint, np.float32)
    image = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8))
    masks, boxes = [], []
    for i in range(len(spec.objects)):
        m = label == i
        masks.append(m)
        if m.any():
            ys, xs = np.nonzero(m)
            boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        else:
            boxes.append(None)
    return Rendered(image, masks, boxes)


# ---- scenes --------------------------------------------------------------------------------
def scene(rng: np.random.Generator, looks: list[ObjectLook], concepts: list[str | None] | None = None,
          size_range: tuple[float, float] = (52, 96), occlusion: float = 0.3, image_size: int = IMAGE_SIZE) -> SceneSpec:
    """Place ``looks`` (first = main) without heavy overlap; maybe occlude one partly."""
    concepts = concepts or [None] * len(looks)
    s = image_size
    placed: list[Placed] = []
    shrink = 1.0 if len(looks) == 1 else (0.85 if len(looks) == 2 else 0.72)
    for look, concept in zip(looks, concepts):
        for attempt in range(60):
            size = float(rng.uniform(*size_range)) * shrink
            margin = size * 0.38
            cx, cy = (float(v) for v in rng.uniform(margin, s - margin, size=2))
            ok = all(math.hypot(cx - q.cx, cy - q.cy) > 0.62 * (size + q.size) / 2 * (1 + attempt / 60 * 0)
                     for q in placed)
            if ok or attempt == 59:
                break
        angle = float(rng.uniform(-25, 25))
        placed.append(Placed(look, cx, cy, size, angle, concept))
    occluders = []
    if placed and rng.random() < occlusion:
        target = placed[int(rng.integers(len(placed)))]
        side = int(rng.integers(4))
        half = target.size / 2
        depth = float(rng.uniform(0.15, 0.35)) * target.size
        grey = int(rng.integers(70, 190))
        col = (grey, grey + int(rng.integers(-10, 11)), grey + int(rng.integers(-10, 11)))
        x0, y0, x1, y1 = target.cx - half, target.cy - half, target.cx + half, target.cy + half
        if side == 0:
            box = (x0 - 6, y0 - 6, x0 + depth, y1 + 6)
        elif side == 1:
            box = (x1 - depth, y0 - 6, x1 + 6, y1 + 6)
        elif side == 2:
            box = (x0 - 6, y0 - 6, x1 + 6, y0 + depth)
        else:
            box = (x0 - 6, y1 - depth, x1 + 6, y1 + 6)
        occluders.append((*box, col))
    grey = rng.integers(70, 170)
    background = tuple(int(np.clip(grey + j, 0, 255)) for j in rng.integers(-25, 26, size=3))
    return SceneSpec(
        seed=int(rng.integers(2 ** 31)), objects=placed, background=background, occluders=occluders,
        brightness=float(rng.uniform(0.75, 1.2)), gradient=tuple(float(v) for v in rng.uniform(-0.3, 0.3, size=2)),
        tint=tuple(float(v) for v in rng.uniform(0.92, 1.08, size=3)), size=image_size)


def reference_scene(rng: np.random.Generator, look: ObjectLook, concept: str | None = None,
                    image_size: int = IMAGE_SIZE) -> SceneSpec:
    """A teaching picture: the object alone, large, unoccluded, on clutter."""
    return scene(rng, [look], [concept], size_range=(80, 124), occlusion=0.0, image_size=image_size)


def distractor(rng: np.random.Generator, avoid: list[ObjectLook]) -> ObjectLook:
    """A random object that is neither one of ``avoid`` nor a look-alike of one of them."""
    while True:
        look = random_look(rng)
        if all(look != a and not look.is_lookalike_of(a) for a in avoid):
            return look


# ---- datasets ------------------------------------------------------------------------------
@dataclass
class Concept:
    name: str
    look: ObjectLook
    category_word: str


def make_concepts(seed: int, count: int) -> tuple[list[Concept], dict[str, ObjectLook]]:
    """``count`` concepts, in look-alike pairs (the second of each pair is a look-alike of the first),
    and one extra non-concept look-alike per concept for negatives."""
    rng = np.random.default_rng([seed, 1])
    taken: set[str] = set()
    concepts: list[Concept] = []
    used: set[tuple[str, str]] = set()
    while len(concepts) < count:
        for _ in range(200):
            look = random_look(rng)
            if (look.category, look.color) not in used:
                break
        used.add((look.category, look.color))
        concepts.append(Concept(random_name(rng, taken), look, look.category))
        if len(concepts) < count:
            twin = lookalike(rng, look)
            concepts.append(Concept(random_name(rng, taken), twin, twin.category))
    outsiders = {}
    looks = [c.look for c in concepts]
    for c in concepts:
        for _ in range(200):
            other = lookalike(rng, c.look)
            if other not in looks and other not in outsiders.values():
                outsiders[c.name] = other
                break
    return concepts, outsiders


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=6)


def _object_records(spec: SceneSpec, rendered: Rendered) -> list[dict]:
    out = []
    for p, box, m in zip(spec.objects, rendered.boxes, rendered.masks):
        out.append({"concept": p.concept, **asdict(p.look), "box": list(box) if box else None,
                    "area": round(100.0 * float(m.mean()), 2)})
    return out


def lookalike_pairs(images: dict[str, list[dict]], concepts: list[Concept]) -> list[list[str]]:
    """[image, concept] for every negative pair whose image shows a look-alike of the concept."""
    out = []
    for rel, objects in images.items():
        present = {o["concept"] for o in objects if o["concept"]}
        looks = [ObjectLook(o["category"], o["color"], o["pattern"], o["color2"], o["mark"])
                 for o in objects if o["box"]]
        for c in concepts:
            if c.name not in present and any(l.is_lookalike_of(c.look) for l in looks):
                out.append([rel, c.name])
    return sorted(out)


def write_dataset(out: str | Path, seed: int = 0, concepts: int = 6, layout: str = "yollava",
                  references: int = 3, tests: int = 6, image_size: int = IMAGE_SIZE) -> Path:
    """Write a toy dataset in ``layout`` to ``out`` and return the folder."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if concepts < 1:
        raise ValueError("need at least one concept")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cs, outsiders = make_concepts(seed, concepts)
    looks = [c.look for c in cs]
    images: dict[str, list[dict]] = {}
    queries = []

    query_images: list[str] = []

    def emit(rel: str, spec: SceneSpec, is_query: bool = False) -> Rendered:
        rendered = render(spec)
        _save(rendered.image, out / rel)
        images[rel] = _object_records(spec, rendered)
        if is_query:
            query_images.append(rel)
        return rendered

    def rng_for(*key: int) -> np.random.Generator:
        return np.random.default_rng([seed, *key])

    if layout == "calibrate":
        n = max(concepts, 1) * 4
        for i in range(n):
            rng = rng_for(2, i)
            look = random_look(rng)
            spec = scene(rng, [look], size_range=(60, 120), occlusion=0.2, image_size=image_size)
            rendered = emit(f"images/{i:03d}.png", spec)
            _save(Image.fromarray(rendered.masks[0].astype(np.uint8) * 255), out / f"masks/{i:03d}.png")
    else:
        for k, c in enumerate(cs):
            ref_dir = {"yollava": f"{c.name}/train", "perva": f"train/{c.category_word}/{c.name}",
                       "generic": f"concepts/{c.name}"}[layout]
            for r in range(references):
                emit(f"{ref_dir}/{r}.png", reference_scene(rng_for(3, k, r), c.look, c.name, image_size))
            if layout == "generic":
                continue
            test_dir = {"yollava": f"{c.name}/test", "perva": f"test/{c.category_word}/{c.name}"}[layout]
            for t in range(tests):
                rng = rng_for(4, k, t)
                extra = int(rng.integers(0, 3))
                others = [distractor(rng, looks) for _ in range(extra)]
                spec = scene(rng, [c.look] + others, [c.name] + [None] * extra, image_size=image_size)
                emit(f"{test_dir}/{t}.png", spec, is_query=True)
        if layout == "generic":
            q = 0

            def query(looks_in, names_in):
                nonlocal q
                rng = rng_for(5, q)
                spec = scene(rng, looks_in, names_in, image_size=image_size)
                rel = f"queries/{q:03d}.png"
                emit(rel, spec, is_query=True)
                queries.append({"image": rel, "concepts": sorted({n for n in names_in if n})})
                q += 1

            for k, c in enumerate(cs):
                for t in range(tests):
                    rng = rng_for(6, k, t)
                    kind = t % 3
                    if kind == 0:      # the concept alone among distractors
                        extra = int(rng.integers(0, 3))
                        query([c.look] + [distractor(rng, looks) for _ in range(extra)], [c.name] + [None] * extra)
                    elif kind == 1:    # several concepts in one scene
                        partner = cs[int(rng.integers(len(cs)))]
                        pair = [c] if partner is c else [c, partner]
                        query([p.look for p in pair], [p.name for p in pair])
                    else:              # a look-alike that is not a concept, plus a distractor: negative
                        query([outsiders[c.name], distractor(rng, looks)], [None, None])
            for t in range(max(2, concepts)):
                rng = rng_for(7, t)
                query([distractor(rng, looks) for _ in range(int(rng.integers(1, 3)))], [None, None, None])
            (out / "queries.json").write_text(json.dumps(queries, indent=1) + "\n")
    meta = {
        "generator": "personal_vlm_node.testing.toy_world", "seed": seed, "layout": layout,
        "image_size": image_size,
        "concepts": {c.name: {"category": c.category_word, **asdict(c.look), "lookalike_outsider": asdict(outsiders[c.name])}
                     for c in cs} if layout != "calibrate" else {},
        "images": images,
        "lookalike_pairs": lookalike_pairs({r: images[r] for r in query_images}, cs) if layout != "calibrate" else [],
    }
    (out / "toy_world.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m personal_vlm_node.testing.toy_world",
        description="Write a synthetic personal-object dataset (deterministic from --seed).")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concepts", type=int, default=6, help="personal concepts (in look-alike pairs)")
    parser.add_argument("--layout", default="yollava", choices=LAYOUTS)
    parser.add_argument("--references", type=int, default=3, help="teaching pictures per concept")
    parser.add_argument("--tests", type=int, default=6, help="query pictures per concept")
    args = parser.parse_args(argv)
    try:
        out = write_dataset(args.out, args.seed, args.concepts, args.layout, args.references, args.tests)
    except ValueError as exc:
        print(f"toy_world: error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((out / "toy_world.json").read_text())
    print(f"wrote a {args.layout} toy dataset ({len(meta['images'])} images, {len(meta['concepts'])} concepts, "
          f"{len(meta['lookalike_pairs'])} look-alike negative pairs) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
