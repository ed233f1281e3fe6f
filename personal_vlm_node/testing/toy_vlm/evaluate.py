"""The toy's held-out accuracy on its own tasks, measured through the project's adapter."""

from __future__ import annotations

import json

import numpy as np

from .. import toy_world as tw
from .data import _Img, make_sample


# ---- held-out accuracy on its own tasks -------------------------------------------------------
def evaluate_tasks(folder, seed: int = 12345, per_task: int = 60, progress=None) -> dict:
    """Accuracy of the model at ``folder`` on fresh scenes (seed never used in training), through
    the project's adapter (``load_vlm``), exactly as the methods call it."""
    from ... import ego
    from ...r2p_text import read_reasoning
    from ...vlm import load_vlm

    vlm = load_vlm(str(folder), device="cpu", dtype="float32")
    size = tw.IMAGE_SIZE        # scenes as the world draws them; the adapter's processor resizes them

    def realise(parts):
        return [vlm.encode_image(p.image) if isinstance(p, _Img) else p for p in parts]

    results: dict[str, dict] = {}

    def tally(group: str, key: str, ok: bool):
        g = results.setdefault(group, {})
        n, c = g.get(key, (0, 0))
        g[key] = (n + 1, c + int(ok))

    area_err = []
    for t, task in enumerate(("describe", "recognize", "attribute", "scene", "cot")):
        rng = np.random.default_rng([seed, 100 + t])
        count = per_task * (3 if task == "recognize" else 1)
        for i in range(count):
            s = make_sample(task, rng, size)
            parts = realise(s.parts)
            assert all(not isinstance(p, _Img) for p in parts)
            if task == "describe":
                text = vlm.generate(parts, max_new_tokens=48).text
                keywords, area = ego.parse_introduction(text)
                look = s.info["look"]
                kws = {k.lower() for k in keywords}
                tally("describe", "color", look.color in kws)
                tally("describe", "pattern", tw.PATTERN_WORDS[look.pattern] in kws)
                tally("describe", "category", look.category in kws)
                # Apart: copied from a prompt that names it ("Fluffy (a ball)") or read from the image.
                tally("describe", "category_given" if s.info["category_given"] else "category_read",
                      look.category in kws)
                tally("describe", "mark", (look.mark in kws) if look.mark != "none" else not (kws & set(tw.MARKS)))
                if area is not None:
                    area_err.append(abs(area - s.info["area"]))
                tally("describe", "area_within_10", area is not None and abs(area - s.info["area"]) <= 10)
            elif task in ("recognize", "attribute"):
                p = vlm.yes_probability(parts)
                truth = s.answer == "Yes"
                key = s.info.get("kind") or s.info.get("key")
                tally(task, key, (p >= 0.5) == truth)
                tally(task, "all", (p >= 0.5) == truth)
            elif task == "scene":
                text = vlm.generate(parts, max_new_tokens=6).text.strip().lower()
                tally("scene", s.info["kind"].lower(), text == s.answer)
            else:
                text = vlm.generate(parts, max_new_tokens=160).text
                want = json.loads(s.answer)["answer"]
                reading = read_reasoning(text, s.info["names"])
                tally("cot", "answer", (reading.answer or "none") == want and not reading.refused)
                tally("cot", "reasoning_first", not reading.refused and "answer" in text)
                tally("cot", "present" if want != "none" else "absent", (reading.answer or "none") == want)
        if progress:
            progress(f"held-out {task}: done")
    out = {g: {k: round(c / n, 3) for k, (n, c) in v.items()} for g, v in results.items()}
    out["describe"]["area_mean_abs_error"] = round(float(np.mean(area_err)), 2) if area_err else None
    out["samples"] = {g: max(n for n, _ in v.values()) for g, v in results.items()}
    out["seed"] = seed
    # Look-alikes together, as the methods need them.
    rec = results.get("recognize", {})
    la = [rec[k] for k in ("lookalike_pattern", "lookalike_mark") if k in rec]
    if la:
        out["recognize"]["lookalike"] = round(sum(c for _, c in la) / sum(n for n, _ in la), 3)
    return out
