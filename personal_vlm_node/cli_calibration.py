"""``personal-vlm calibrate`` (on your own images, or ``--auto`` on the built-in synthetic world) and
``personal-vlm profile show``: the CLI's calibration commands, beside :mod:`.cli` by job."""

from __future__ import annotations

import sys
from pathlib import Path

from . import evaluation, media
from .errors import PersonalVLMError
from .output import emit as _emit
from .output import stderr_progress


def add_calibration_parsers(sub, parser_class) -> None:
    """The ``calibrate`` and ``profile`` sub-commands."""
    calibrate = sub.add_parser("calibrate", help="measure the attention layers and decision thresholds for this model")
    calibrate.add_argument("--images", default=None, help="folder of single-subject images (layer ranking)")
    calibrate.add_argument("--masks", default=None, help="folder of masks with the same file stems")
    calibrate.add_argument("--dataset", default=None,
                           help="held-out labelled split in an eval layout: fits the matcher's accept/reject, "
                                "Ego's threshold and the R2P margin")
    calibrate.add_argument("--layout", default="auto", choices=("auto",) + evaluation.LAYOUTS,
                           help="layout of --dataset")
    calibrate.add_argument("--max-error", type=float, default=0.05,
                           help="error share the matcher band and the R2P margin may leave (default 0.05)")
    calibrate.add_argument("--top-k", type=int, default=16, help="top attended tokens per layer")
    calibrate.add_argument("--keep", type=int, default=4, help="layers to keep (L)")
    calibrate.add_argument("--out", default=None, help="profile to write (default: models/<model>.yaml in a checkout, else ~/.config/personal_vlm/models/)")
    calibrate.add_argument("--auto", action="store_true",
                           help="measure what the profile lacks on the built-in synthetic world and cache it per "
                                "checkpoint, as the node does on first start (again, even when cached)")
    calibrate.add_argument("--cache", default=None,
                           help="--auto: the calibration cache (default: $PERSONAL_VLM_CALIBRATION_CACHE or "
                                "$XDG_CACHE_HOME/personal_vlm/calibration)")
    profile = sub.add_parser("profile", help="the model profile in use: where it comes from, what is calibrated")
    profile_verbs = profile.add_subparsers(dest="profile_command", required=True, parser_class=parser_class)
    show = profile_verbs.add_parser("show", help="the profile in use for --model, its calibration and its values")
    show.add_argument("--cache", default=None, help="the calibration cache (default: as calibrate --auto)")


def _bar_progress(tag: str):
    """Progress lines on stderr; on a terminal one line redrawn in place, with a bar."""
    if not sys.stderr.isatty():
        return stderr_progress(tag)

    def say(line: str) -> None:
        import re

        m = re.search(r"\((\d+)/(\d+)", line)
        bar = ""
        if m:
            done, total = int(m.group(1)), max(1, int(m.group(2)))
            filled = round(24 * done / total)
            bar = "[" + "#" * filled + "." * (24 - filled) + "] "
        print(f"\r[{tag}] {bar}{line}"[:160].ljust(160), end="", file=sys.stderr, flush=True)

    return say


def _cmd_calibrate_auto(args) -> None:
    from .autocalibration import calibrate_checkpoint

    if args.images is not None or args.masks is not None or args.dataset is not None:
        raise PersonalVLMError("--auto measures on the built-in synthetic world, --images/--masks and --dataset on "
                               "your own data: give one or the other")
    result = calibrate_checkpoint(args.model, profile_path=args.profile, cache=args.cache, device=args.device,
                                  dtype=args.dtype, progress=_bar_progress("calibrate"), out=args.out)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    _emit(args, result, result["summary"])


def _cmd_profile(args) -> None:
    from .autocalibration import describe_profile

    shown = describe_profile(args.model, profile_path=args.profile, cache=args.cache)
    _emit(args, shown, shown["text"])


def _cmd_calibrate(args) -> None:
    from .assistant import Assistant

    if args.auto:
        return _cmd_calibrate_auto(args)
    if args.top_k < 1 or args.keep < 1:
        raise PersonalVLMError("--top-k and --keep must be at least 1")
    if (args.images is None) != (args.masks is None):
        raise PersonalVLMError("--images and --masks go together")
    if args.images is None and args.dataset is None:
        raise PersonalVLMError("give --images and --masks (layers), --dataset (thresholds), both, or --auto "
                               "(the built-in synthetic world)")
    if not 0.0 < args.max_error < 0.5:
        raise PersonalVLMError("--max-error must lie between 0 and 0.5")
    pairs = media.image_mask_pairs(Path(args.images), Path(args.masks)) if args.images else []
    dataset = evaluation.load_dataset(args.dataset, args.layout) if args.dataset else None
    result = Assistant.calibrate(args.model, pairs, dataset, top_k=args.top_k, keep=args.keep,
                                 max_error=args.max_error, out=args.out, profile_path=args.profile,
                                 device=args.device, dtype=args.dtype, progress=stderr_progress())
    summary = ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("profile", "mask_hit_rate"))
    _emit(args, result, f"{summary} written to {result['profile']}")
