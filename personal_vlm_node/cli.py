"""``personal-vlm``: teach, ask, recognize, list, forget and calibrate from a shell.

Exit codes: 0 success, 2 a user error (one line on stderr, no traceback), 1 an internal error.
Progress goes to stderr, results to stdout (``--json`` for machine-readable output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import bench, evaluation
from .errors import PersonalVLMError
from .runtime.command import add_export_parser, run_export

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code is 2 too; keep its one-line style
        self.print_usage(sys.stderr)
        print(f"personal-vlm: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parse_roi(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--roi takes x,y,w,h in pixels, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="personal-vlm", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help=f"Hugging Face id or local checkpoint folder (default: $PERSONAL_VLM_MODEL or "
                             f"{DEFAULT_MODEL}; bench: a random-weight model)")
    parser.add_argument("--store", default=None, help="concept store directory (default: $XDG_DATA_HOME/personal_vlm)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--profile", default=None, help="model profile YAML (default: models/<model>.yaml)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    teach = sub.add_parser("teach", help="teach a concept from 1..N pictures")
    teach.add_argument("name")
    teach.add_argument("images", nargs="+")
    teach.add_argument("--category", default="")
    teach.add_argument("--roi", type=_parse_roi, action="append",
                       help="x,y,w,h of the subject in pixels; once for all images or once per image")
    teach.add_argument("--overwrite", action="store_true")
    teach.add_argument("--add", action="store_true",
                       help="the images are further views of an existing concept: add them to its memory")
    teach.add_argument("--no-wait", action="store_true", help="don't wait for the fingerprint to complete")

    ask = sub.add_parser("ask", help="ask a question about an image")
    ask.add_argument("question")
    ask.add_argument("--image", required=True)

    recognize = sub.add_parser("recognize", help="which taught concepts are in an image")
    recognize.add_argument("image")
    recognize.add_argument("--concept", action="append", help="check only these concepts")

    detect = sub.add_parser("detect", help="named detections on an image, a folder of frames or a video")
    detect.add_argument("source", help="image file, folder of images (sorted by name) or video file")
    detect.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"],
                        help="vision encoder backend")
    detect.add_argument("--engine-cache", default=None, help="cache for exported encoders / engines")
    detect.add_argument("--verify", action="store_true", help="settle uncertain scores with the model")

    sub.add_parser("list", help="list taught concepts")
    forget = sub.add_parser("forget", help="forget a concept and all its files")
    forget.add_argument("name")

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
    bench.add_parser(sub)
    evaluation.add_parser(sub)
    add_export_parser(sub)
    return parser


def _emit(args, payload: dict, text: str) -> None:
    print(json.dumps(payload, ensure_ascii=False) if args.json else text)


def _open(args, verification: bool = False):
    from .assistant import Assistant

    return Assistant.open(args.model, store_dir=args.store, device=args.device, dtype=args.dtype,
                          profile_path=args.profile, verification=verification)


def _cmd_teach(args) -> None:
    with _open(args) as assistant:
        result = assistant.teach(args.name, args.images, category=args.category, rois=args.roi,
                                 overwrite=args.overwrite, add=args.add)
        fingerprint = {} if args.no_wait else result.wait_fingerprint()
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    _emit(args, {"name": result.name, "memory_tokens": result.memory_tokens, "keywords": result.keywords,
                 "attributes": fingerprint.get("attributes", {}), "seconds": round(result.seconds, 3),
                 "timings": {k: round(v, 3) for k, v in result.timings.items()}},
          f"taught {result.name!r}: {result.memory_tokens} memory tokens, keywords "
          f"{', '.join(result.keywords) or '-'} ({steps})")


def _cmd_ask(args) -> None:
    with _open(args) as assistant:
        result = assistant.ask(args.question, args.image)
    _emit(args, {"answer": result.answer, "concepts": result.concepts, "seconds": round(result.seconds, 3)},
          f"{result.answer}\n(concepts in context: {', '.join(result.concepts) or 'none'}; {result.seconds:.2f}s)")


def _cmd_recognize(args) -> None:
    with _open(args) as assistant:
        results = assistant.recognize(args.image, names=args.concept)
    rows = [{"name": r.name, "p_yes": round(r.p_yes, 4), "present": r.present} for r in results]
    text = "\n".join(f"{'yes' if r.present else 'no ':3}  p={r.p_yes:.3f}  {r.name}" for r in results)
    _emit(args, {"concepts": rows}, text or "no concepts taught yet")


VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif"}


def _frames(source: Path):
    """(label, image) for every frame of an image, a folder of images or a video."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PersonalVLMError(f"no images in {source}")
        for path in files:
            yield path.name, str(path)
    elif source.suffix.lower() in VIDEO_SUFFIXES:
        yield from _video_frames(source)
    elif source.is_file():
        yield source.name, str(source)
    else:
        raise PersonalVLMError(f"not found: {source}")


def _video_frames(path: Path):
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as gif:
            for i, frame in enumerate(ImageSequence.Iterator(gif)):
                yield f"{path.name}#{i}", frame.convert("RGB")
        return
    try:
        import cv2
    except ImportError as exc:
        raise PersonalVLMError("reading videos needs OpenCV: pip install opencv-python-headless "
                               "(or extract frames into a folder)") from exc
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise PersonalVLMError(f"cannot open video {path}")
    index = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        yield f"{path.name}#{index}", frame[:, :, ::-1].copy()        # BGR → RGB
        index += 1
    capture.release()


def _cmd_detect(args) -> None:
    from .tracker import Tracker

    source = Path(args.source)
    frames = _frames(source)
    still = source.is_file() and source.suffix.lower() not in VIDEO_SUFFIXES
    with _open(args, verification=args.verify) as assistant:
        if args.backend != "torch":
            from .runtime.backends import make_encoder

            assistant.encoder = make_encoder(assistant.vlm, args.backend, cache_dir=args.engine_cache,
                                             progress=lambda m: print(f"[personal-vlm] {m}", file=sys.stderr))
        if still:
            assistant.tracker = Tracker(k=1, n=1)     # one frame: no hysteresis to wait for
        for label, frame in frames:
            result = assistant.observe(frame)
            rows = [{"name": d.name, "score": round(d.score, 4), "box": [round(v, 1) for v in d.box],
                     "source": d.source, "track_id": d.track_id} for d in result.detections]
            text = ", ".join(f"{d['name']} {d['score']:.2f} at {d['box']}" for d in rows) or "nothing"
            _emit(args, {"frame": label, "detections": rows}, f"{label}: {text}")


def _store(args):
    from .store import ConceptStore

    return ConceptStore(args.store)


def _cmd_list(args) -> None:
    records = _store(args).list()
    rows = [{"name": r.name, "category": r.category, "memory_tokens": r.memory_tokens,
             "keywords": r.keywords, "created": r.created} for r in records]
    text = "\n".join(f"{r.name}\t{r.category or '-'}\t{r.memory_tokens} tokens\t{', '.join(r.keywords)}"
                     for r in records)
    _emit(args, {"concepts": rows}, text or "no concepts taught yet")


def _cmd_forget(args) -> None:
    from .store import validate_name

    _store(args).forget(validate_name(args.name))
    _emit(args, {"forgotten": args.name}, f"forgot {args.name!r}")


def _pairs(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise PersonalVLMError(f"folder not found: {folder}")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs = [(p, masks[p.stem]) for p in sorted(images_dir.iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in masks]
    if not pairs:
        raise PersonalVLMError(f"no image in {images_dir} has a mask with the same name in {masks_dir}")
    return pairs


def _cmd_calibrate(args) -> None:
    from . import calibration
    from .profiles import default_profile_path, load_profile, save_profile
    from .vlm import load_vlm

    if args.top_k < 1 or args.keep < 1:
        raise PersonalVLMError("--top-k and --keep must be at least 1")
    if (args.images is None) != (args.masks is None):
        raise PersonalVLMError("--images and --masks go together")
    if args.images is None and args.dataset is None:
        raise PersonalVLMError("give --images and --masks (layers), --dataset (thresholds), or both")
    if not 0.0 < args.max_error < 0.5:
        raise PersonalVLMError("--max-error must lie between 0 and 0.5")
    pairs = _pairs(Path(args.images), Path(args.masks)) if args.images else []
    dataset = evaluation.load_dataset(args.dataset, args.layout) if args.dataset else None
    profile = load_profile(args.model, args.profile)
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    progress = lambda m: print(f"[personal-vlm] {m}", file=sys.stderr, flush=True)   # noqa: E731
    calibration_record = dict(profile.calibration or {})
    result = {}
    if pairs:
        t0 = time.perf_counter()
        scores = calibration.rank_layers_on_masks(vlm, pairs, args.top_k, progress, profile)
        ranked = sorted(scores, key=lambda l: -scores[l])
        profile.layers = sorted(ranked[: min(args.keep, len(ranked))])
        calibration_record.update({"images": len(pairs), "top_k": args.top_k,
                                   "mask_hit_rate": {int(l): round(s, 4) for l, s in scores.items()},
                                   "seconds": round(time.perf_counter() - t0, 2)})
        result.update({"layers": profile.layers, "mask_hit_rate": calibration_record["mask_hit_rate"]})
    if dataset is not None:
        fitted = calibration.calibrate_thresholds(vlm, profile, dataset, progress, args.max_error)
        calibration_record["thresholds"] = fitted["figures"]
        result.update({k: v for k, v in fitted.items() if k != "figures"})
    calibration_record.pop("note", None)
    profile.calibration = calibration_record
    out = save_profile(profile, args.out or default_profile_path(args.model))
    summary = ", ".join(f"{k} {v}" for k, v in result.items() if k != "mask_hit_rate")
    _emit(args, {"profile": str(out), **result}, f"{summary} written to {out}")


COMMANDS = {"teach": _cmd_teach, "ask": _cmd_ask, "recognize": _cmd_recognize, "list": _cmd_list,
            "forget": _cmd_forget, "calibrate": _cmd_calibrate, "bench": bench.run,
            "detect": _cmd_detect, "eval": evaluation.run, "export-encoder": run_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.model = args.model or os.environ.get("PERSONAL_VLM_MODEL") or (
        None if args.command == "bench" else DEFAULT_MODEL)
    try:
        COMMANDS[args.command](args)
    except PersonalVLMError as exc:
        print(f"personal-vlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("personal-vlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
