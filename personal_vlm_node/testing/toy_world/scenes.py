"""Scenes of the toy world: where objects stand (:func:`scene`) and the pixels, masks and boxes drawn from it (:func:`render`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .looks import COLORS, IMAGE_SIZE, ObjectLook, random_look


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
