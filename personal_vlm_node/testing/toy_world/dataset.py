"""Toy datasets on disk, in the layouts ``personal-vlm eval`` and ``personal-vlm calibrate`` read."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .looks import IMAGE_SIZE, LAYOUTS, ObjectLook, lookalike, random_look, random_name
from .scenes import Rendered, SceneSpec, distractor, render, scene


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

    # Objects keep their share of the picture at any size (the scenes' sizes are in pixels of IMAGE_SIZE).
    scale = image_size / IMAGE_SIZE

    def sized(low: float, high: float) -> tuple[float, float]:
        return (low * scale, high * scale) if scale != 1 else (low, high)

    if layout == "calibrate":
        n = max(concepts, 1) * 4
        for i in range(n):
            rng = rng_for(2, i)
            look = random_look(rng)
            spec = scene(rng, [look], size_range=sized(60, 120), occlusion=0.2, image_size=image_size)
            rendered = emit(f"images/{i:03d}.png", spec)
            _save(Image.fromarray(rendered.masks[0].astype(np.uint8) * 255), out / f"masks/{i:03d}.png")
    else:
        for k, c in enumerate(cs):
            ref_dir = {"yollava": f"{c.name}/train", "perva": f"train/{c.category_word}/{c.name}",
                       "generic": f"concepts/{c.name}"}[layout]
            for r in range(references):
                # reference_scene's, at this size: the object alone, large, unoccluded
                emit(f"{ref_dir}/{r}.png", scene(rng_for(3, k, r), [c.look], [c.name], size_range=sized(80, 124),
                                                 occlusion=0.0, image_size=image_size))
            if layout == "generic":
                continue
            test_dir = {"yollava": f"{c.name}/test", "perva": f"test/{c.category_word}/{c.name}"}[layout]
            for t in range(tests):
                rng = rng_for(4, k, t)
                extra = int(rng.integers(0, 3))
                others = [distractor(rng, looks) for _ in range(extra)]
                spec = scene(rng, [c.look] + others, [c.name] + [None] * extra, size_range=sized(52, 96),
                             image_size=image_size)
                emit(f"{test_dir}/{t}.png", spec, is_query=True)
        if layout == "generic":
            q = 0

            def query(looks_in, names_in):
                nonlocal q
                rng = rng_for(5, q)
                spec = scene(rng, looks_in, names_in, size_range=sized(52, 96), image_size=image_size)
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
