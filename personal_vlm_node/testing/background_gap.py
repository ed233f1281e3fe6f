"""Does a concept's ICPT prompt (or Ego memory) carry its references' background? R1's own claim, measured.

Toy concepts are taught from one reference picture each; every query is drawn twice from one scene
spec: once on the background of the concept's reference (same clutter, same colour), once on a
fresh one. Positives show the concept; negatives show a look-alike of it. A prompt that encodes the
background says "yes" more often on the reference's background (more false positives, or fewer
misses); one that does not gives the same answers on both. The gap is Wtd on the reference's
background minus Wtd on a fresh one.

    python -m personal_vlm_node.testing.background_gap TOY_VLM PROJECTOR... [--seed 343] [--concepts 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import numpy as np

from . import toy_world as tw


def _queries(rng, look, reference_spec, per_kind: int):
    """(image on the reference's background, image on a fresh one, is it the concept) pairs."""
    out = []
    for positive in [True] * per_kind + [False] * per_kind:
        shown = look if positive else tw.lookalike(rng, look)
        spec = tw.scene(rng, [shown, tw.distractor(rng, [look, shown])])
        same = replace(spec, seed=reference_spec.seed, background=reference_spec.background)
        out.append((tw.render(same).image, tw.render(spec).image, positive))
    return out


def _wtd(pairs) -> float:
    pos = [ok for ok, label in pairs if label]
    neg = [ok for ok, label in pairs if not label]
    return 0.5 * (float(np.mean(pos)) + float(np.mean(neg)))


def measure(vlm, projectors: dict, seed: int = 343, concepts: int = 16, per_kind: int = 3,
            ego_threshold: float = 0.5) -> dict:
    """Wtd on the reference's background and on a fresh one, per method (each projector, and Ego)."""
    from .. import ego, icpt, prompts
    from ..profiles import load_profile
    from ..vlm import Memory

    rng = np.random.default_rng([seed, 61])
    profile = load_profile(vlm.model_id)
    options = ego.IntroductionOptions.from_profile(profile, profile.resolved_layers(vlm.num_layers))
    results = {name: {"same": [], "fresh": []} for name in [*projectors, "ego"]}
    for c in range(concepts):
        look = tw.random_look(rng)
        name = tw.random_name(rng, set())
        reference_spec = tw.reference_scene(rng, look)
        reference = vlm.encode_image(tw.render(reference_spec).image)
        memories = {key: icpt.make_prompt(vlm, p, [reference], name) for key, p in projectors.items()}
        memories["ego"] = Memory.from_stored(ego.introduce(vlm, [reference], name, "", options).memory, name)
        for same, fresh, positive in _queries(rng, look, reference_spec, per_kind):
            for where, image in (("same", same), ("fresh", fresh)):
                tokens = vlm.encode_image(image)
                for key, memory in memories.items():
                    threshold = ego_threshold if key == "ego" else 0.5
                    p = vlm.yes_probability(prompts.recognize(memory, tokens, vlm.family))
                    results[key][where].append(((p >= threshold) == positive, positive))
    return {key: {"same_background_wtd": round(_wtd(r["same"]), 3), "fresh_background_wtd": round(_wtd(r["fresh"]), 3),
                  "gap": round(_wtd(r["same"]) - _wtd(r["fresh"]), 3), "pairs": len(r["same"])}
            for key, r in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personal_vlm_node.testing.background_gap",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the toy VLM folder")
    parser.add_argument("projectors", nargs="+", help="ICPT projector files to compare")
    parser.add_argument("--seed", type=int, default=343)
    parser.add_argument("--concepts", type=int, default=16)
    args = parser.parse_args(argv)
    from .. import icpt
    from ..errors import PersonalVLMError
    from ..profiles import load_profile
    from ..vlm import load_vlm

    vlm = load_vlm(args.model, device="cpu", dtype="float32")
    try:
        projectors = {p: icpt.load_projector(p, vlm) for p in args.projectors}
    except PersonalVLMError as exc:
        print(f"background_gap: error: {exc}", file=sys.stderr)
        return 2
    figures = measure(vlm, projectors, args.seed, args.concepts,
                      ego_threshold=load_profile(args.model).recognize_threshold)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
