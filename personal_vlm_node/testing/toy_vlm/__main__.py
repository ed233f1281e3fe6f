from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from . import MARKER, RECIPE, Recipe, ensure_toy_vlm, weak_yes_no
from .recipe import _say


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personal_vlm_node.testing.toy_vlm",
                                     description="Train (once, cached) the toy Qwen2.5-VL and copy it to OUT.")
    parser.add_argument("out", help="folder to write the checkpoint to")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps (new cache key)")
    args = parser.parse_args(argv)
    recipe = RECIPE if args.steps is None else Recipe(**{**asdict(RECIPE), "tasks": RECIPE.tasks, "steps": args.steps})
    cached = ensure_toy_vlm(recipe)
    out = Path(args.out)
    if out.resolve() != cached.resolve():
        shutil.copytree(cached, out, dirs_exist_ok=True)
    meta = json.loads((out / MARKER).read_text())
    print(json.dumps({"model": str(out), "cached": str(cached), "training": meta["training"],
                      "held_out_accuracy": meta.get("held_out_accuracy")}, indent=1))
    weak = weak_yes_no(meta["held_out_accuracy"]) if meta.get("held_out_accuracy") else None
    if weak:
        _say(f"warning: {weak}")
    return 0


sys.exit(main())
