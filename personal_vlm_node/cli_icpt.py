"""``personal-vlm icpt-train``: train the ICPT projector for the model of ``--model`` (:mod:`.icpt`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import evaluation
from .errors import PersonalVLMError
from .output import emit as _emit

PROGRESS_EVERY_S = 10.0      # off a terminal: one progress line this often


def add_icpt_parser(sub) -> None:
    parser = sub.add_parser(
        "icpt-train", help="train the ICPT projector (concept → prompt tokens) for this model, once",
        description="Train the ICPT projector on labelled datasets (eval layouts) with the VLM frozen, and write it "
                    "as safetensors. A checkpoint beside --out (<out>.ckpt) lets the same command resume.")
    parser.add_argument("datasets", nargs="+", metavar="DATASET", help="training datasets (eval layouts)")
    parser.add_argument("--out", required=True, help="the projector file to write (.safetensors)")
    parser.add_argument("--layout", default="auto", choices=("auto",) + evaluation.LAYOUTS)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-r1", action="store_true", help="without R1 (view invariance, background, object terms)")
    parser.add_argument("--no-r2", action="store_true", help="without R2 (separation of concepts)")
    parser.add_argument("--fixed-length", type=int, default=None, metavar="L",
                        help="every concept gets L prompt tokens (no adaptive length)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="restart", action="store_false", default=False,
                        help="continue from the checkpoint of the same settings (default)")
    resume.add_argument("--restart", dest="restart", action="store_true", help="discard the checkpoint")


def _progress(tag: str):
    """The bar of ``calibrate --auto`` on a terminal; elsewhere a line every PROGRESS_EVERY_S seconds."""
    from .cli_calibration import _bar_progress
    from .output import stderr_progress

    if sys.stderr.isatty():
        return _bar_progress(tag)
    say, last = stderr_progress(tag), [float("-inf")]

    def throttled(line: str) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or "resuming" in line:
            last[0] = now
            say(line)

    return throttled


def cmd_icpt_train(args) -> None:
    from .icpt_training import TrainOptions, read_training_set, train_projector
    from .vlm import load_vlm

    options = TrainOptions(steps=args.steps, seed=args.seed, r1=not args.no_r1, r2=not args.no_r2,
                           fixed_length=args.fixed_length, layout=args.layout).check()
    options.projector_config(1)          # refuses a bad --fixed-length before the model loads
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise PersonalVLMError(f"--out {out} is a folder; give the projector file to write")
    # Everything a user can get wrong in the datasets is checked before the model loads.
    data = read_training_set([Path(p).expanduser() for p in args.datasets], args.layout)
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    figures = train_projector(vlm, [], out, options, progress=_progress("icpt-train"), restart=args.restart,
                              data=data)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    _emit(args, figures, f"trained the ICPT projector on {figures['concepts']} concepts in {figures['seconds']:.0f}s: "
          f"loss {figures['loss_start']:.3f} → {figures['loss_end']:.3f}; written to {out}")
