"""Recognition figures of a ``personal-vlm eval`` run on a toy dataset, split by kind of pair.

The toy world records which negatives show a look-alike of the concept (same category and colour,
another pattern or mark). This splits an eval run's pairs into positives, look-alike negatives and
other negatives, and gives Wtd, precision, recall and F1 overall, on the look-alike split
(positives + look-alike negatives), on that split by what tells the two apart (the pattern, or only
the sticker), and on single- versus multi-concept queries.

    python -m personal_vlm_node.testing.toy_report WORLD RUN_DIR [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..evaluation import PROGRESS_FILE, Counts, read_lines, recognition_metrics


_LOOK_KEYS = ("category", "color", "pattern", "color2", "mark")


def lookalike_kinds(meta: dict) -> dict[tuple[str, str], str]:
    """(query image, concept) → what tells the concept from its look-alike in the image: "pattern"
    (the pattern or its colour) or "sticker" (only the mark)."""
    out = {}
    for query, concept in meta["lookalike_pairs"]:
        look = meta["concepts"][concept]
        twins = [o for o in meta["images"].get(query, []) if o.get("box") and o["category"] == look["category"]
                 and o["color"] == look["color"] and any(o[k] != look[k] for k in _LOOK_KEYS)]
        differs_in_pattern = any(o["pattern"] != look["pattern"] or o["color2"] != look["color2"] for o in twins)
        out[(query, concept)] = "pattern" if differs_in_pattern or not twins else "sticker"
    return out


def split_figures(world, run) -> dict:
    world, run = Path(world), Path(run)
    meta = json.loads((world / "toy_world.json").read_text())
    hard = lookalike_kinds(meta)
    groups = {name: Counts() for name in ("all", "lookalike", "lookalike_pattern", "lookalike_sticker",
                                          "single", "multi", "no_concept")}
    kinds = {"positive": [0, 0], "lookalike_negative": [0, 0], "other_negative": [0, 0]}
    for record in read_lines(run / PROGRESS_FILE):
        if "pairs" not in record:
            continue
        n_present = len(record.get("concepts", []))
        group = "no_concept" if n_present == 0 else ("single" if n_present == 1 else "multi")
        for pair in record["pairs"]:
            label, predicted = bool(pair["label"]), bool(pair["predicted"])
            groups["all"].add(label, predicted)
            groups[group].add(label, predicted)
            is_hard = (record["query"], pair["concept"]) in hard
            if label or is_hard:
                groups["lookalike"].add(label, predicted)
            for differs in ("pattern", "sticker"):      # positives + the look-alikes that differ so
                if label or hard.get((record["query"], pair["concept"])) == differs:
                    groups[f"lookalike_{differs}"].add(label, predicted)
            kind = "positive" if label else ("lookalike_negative" if is_hard else "other_negative")
            kinds[kind][0] += 1
            kinds[kind][1] += int(predicted == label)
    out = {name: recognition_metrics(c) for name, c in groups.items() if c.tp + c.fn + c.tn + c.fp}
    out["accuracy_by_kind"] = {k: (round(ok / n, 4) if n else None) for k, (n, ok) in kinds.items()}
    out["pairs_by_kind"] = {k: n for k, (n, _) in kinds.items()}
    return out


def _fmt(v):
    return "–" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personal_vlm_node.testing.toy_report",
                                     description="Split an eval run on a toy dataset by kind of pair.")
    parser.add_argument("world", help="the toy dataset (with toy_world.json)")
    parser.add_argument("run", help="the eval --out folder (with progress.jsonl)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = split_figures(args.world, args.run)
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    print("split              Wtd    precision recall  F1     pairs")
    for name in ("all", "lookalike", "lookalike_pattern", "lookalike_sticker", "single", "multi", "no_concept"):
        m = figures.get(name)
        if m:
            print(f"{name:18s} {_fmt(m['weighted_accuracy'])}  {_fmt(m['precision'])}     {_fmt(m['recall'])}   "
                  f"{_fmt(m['f1'])}  {m['positives'] + m['negatives']}")
    print("accuracy by kind:", json.dumps(figures["accuracy_by_kind"]), "pairs:", json.dumps(figures["pairs_by_kind"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
