"""``personal-vlm``: teach, ask, recognize, list, forget and calibrate from a shell.

``personal-vlm web`` runs the node with its web console (:mod:`.cli_web`).

``personal-vlm node …`` talks to a running ROS node instead (:mod:`.ros.client`; rclpy is imported
only then, so everything else works without ROS).

Exit codes: 0 success, 2 a user error (one line on stderr, no traceback), 1 an internal error.
Progress goes to stderr, results to stdout (``--json`` for machine-readable output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

from . import evaluation, media
from .errors import PersonalVLMError
from .names import MAX_NAME_CHARS, quoted, shown, validate_category, validate_name
from .options import (BACKENDS, DEFAULT_MODEL, DEFAULT_VERIFIER, DTYPES, ENCODER_CHOICES, EXPORT_OPSET,
                      PAIRWISE_REFERENCES, PRECISIONS, RANDOM_MODEL_SIZES, RECOGNITION_METHODS, RECOGNITIONS,
                      SIGLIP_VERIFIER, AssistantOptions)
from .cli_calibration import _cmd_calibrate, _cmd_profile, add_calibration_parsers
from .cli_icpt import add_icpt_parser, cmd_icpt_train
from .cli_store import add_store_parser, cmd_store
from .output import emit as _emit
from .output import stderr_progress
from .cli_web import _cmd_web, add_web_parser


NODE_TIMEOUT_S = 10.0   # seconds `personal-vlm node` waits for the node to appear


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
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"--roi values must be finite numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="personal-vlm", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help=f"Hugging Face id or local checkpoint folder (default: $PERSONAL_VLM_MODEL or "
                             f"{DEFAULT_MODEL}; bench: a random-weight model)")
    parser.add_argument("--store", default=None, help="concept store: a folder (default: $XDG_DATA_HOME/personal_vlm) or a "
                        "fleet library's URL, postgresql://user@host/database (docs/store.md)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--profile", default=None, help="model profile YAML (default: models/<model>.yaml)")
    parser.add_argument("--icpt-projector", default=None,
                        help="ICPT projector file (icpt-train) for teaching and recognition (default: the profile's icpt.projector)")
    parser.add_argument("--recognition-method", default=None, choices=RECOGNITION_METHODS,
                        help="what recognize, ask and the uncertain band use: ego memories or icpt prompts "
                             "(default: the profile's recognition_method)")
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
    teach.add_argument("--no-wait", action="store_true",
                       help="return once the memory is stored; the R2P fingerprint is then not computed")

    ask = sub.add_parser("ask", help="ask a question about an image")
    ask.add_argument("question")
    ask.add_argument("--image", required=True)

    recognize = sub.add_parser("recognize", help="which taught concepts are in an image")
    recognize.add_argument("image")
    recognize.add_argument("--concept", action="append", help="check only these concepts")
    recognize.add_argument("--all", action="store_true",
                           help="check every concept (default: the similarity filter's top M)")

    detect = sub.add_parser("detect", help="named detections on an image, a folder of frames or a video")
    detect.add_argument("source", help="image file, folder of images (natural order: 2 before 10) or video file")
    detect.add_argument("--backend", default="torch", choices=ENCODER_CHOICES,
                        help="vision encoder backend")
    detect.add_argument("--engine-cache", default=None, help="cache for exported encoders / engines")
    detect.add_argument("--verify", action="store_true", help="settle uncertain scores with the model")

    sub.add_parser("list", help="list taught concepts")
    forget = sub.add_parser("forget", help="forget a concept and all its files")
    forget.add_argument("name")
    add_store_parser(sub, _Parser)
    add_calibration_parsers(sub, _Parser)
    add_icpt_parser(sub)
    _add_bench_parser(sub)
    _add_eval_parser(sub)
    _add_export_parser(sub)
    _add_node_parser(sub)
    add_web_parser(sub, _Parser)
    return parser


def _open(args, options: AssistantOptions | None = None):
    from .assistant import Assistant

    return Assistant.open(args.model, store_dir=args.store, device=args.device, dtype=args.dtype,
                          profile_path=args.profile,
                          options=_with_method(args, options or AssistantOptions(verification=False, verifier_model=None)))


def _with_method(args, options: AssistantOptions) -> AssistantOptions:
    """``options`` with the global ICPT choices (--icpt-projector, --recognition-method) where given."""
    return replace(options, icpt_projector=getattr(args, "icpt_projector", None) or options.icpt_projector,
                   recognition_method=getattr(args, "recognition_method", None) or options.recognition_method)


def _pictures(paths) -> list:
    from .images import load_image

    return [load_image(path) for path in paths]


def _cmd_teach(args) -> None:
    from .teaching import expand_rois

    # Everything a user can get wrong is checked before the model loads (that takes a while).
    name, category = _store(args).check_new_name(args.name), validate_category(args.category)
    pictures = _pictures(args.images)
    expand_rois(args.roi, pictures)
    assistant = _open(args)
    try:
        result = assistant.teach(name, pictures, category=category, rois=args.roi, overwrite=args.overwrite,
                                 add=args.add)
        fingerprint = {} if args.no_wait else result.wait_fingerprint()
    finally:
        assistant.close(wait=not args.no_wait)
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    _emit(args, {"name": result.name, "memory_tokens": result.memory_tokens, "keywords": result.keywords,
                 "attributes": fingerprint.get("attributes", {}), "seconds": round(result.seconds, 3),
                 "timings": {k: round(v, 3) for k, v in result.timings.items()}},
          f"taught {quoted(result.name, MAX_NAME_CHARS)}: {result.memory_tokens} memory tokens, keywords "
          f"{shown(', '.join(result.keywords)) or '-'} ({steps})")


def _cmd_ask(args) -> None:
    _pictures([args.image])
    with _open(args) as assistant:
        result = assistant.ask(args.question, args.image)
    _emit(args, {"answer": result.answer, "concepts": result.concepts, "seconds": round(result.seconds, 3)},
          f"{result.answer}\n(concepts in context: {', '.join(result.concepts) or 'none'}; {result.seconds:.2f}s)")


def _cmd_recognize(args) -> None:
    _pictures([args.image])
    if args.concept:
        store = _store(args)
        for name in args.concept:
            store.get(validate_name(name))
    with _open(args) as assistant:
        names = args.concept or (assistant.recognizable() if args.all else None)
        results = assistant.recognize(args.image, names=names)
        taught = len(assistant.concepts())
    rows = [{"name": r.name, "p_yes": round(r.p_yes, 4), "present": r.present} for r in results]
    text = "\n".join(f"{'yes' if r.present else 'no ':3}  p={r.p_yes:.3f}  {r.name}" for r in results)
    if taught and not args.concept and len(rows) < taught:
        text += (f"\n(checked the {len(rows)} best-matching of {taught} concepts, as many as one prompt holds "
                 "(the profile's max_concepts_in_context, context_tokens); --all checks every one, --concept chooses)")
    _emit(args, {"concepts": rows, "checked": len(rows), "taught": taught}, text or "no concepts taught yet")


def _cmd_detect(args) -> None:
    source = Path(args.source)
    if not source.exists():
        raise PersonalVLMError(f"not found: {source}")
    frames = media.frames(source)
    still = source.is_file() and not media.is_video(source)
    hysteresis = {"tracker_k": 1, "tracker_n": 1} if still else {}   # one frame: nothing to wait for
    options = AssistantOptions(backend=args.backend, engine_cache=args.engine_cache,
                               verification=args.verify, **hysteresis)
    with _open(args, options) as assistant:
        for label, frame in frames:
            try:
                # One picture has no later frame to carry verdicts: wait for them.
                result = assistant.observe_settled(frame) if still else assistant.observe(frame)
            except PersonalVLMError as exc:
                if not source.is_dir():
                    raise
                print(f"[personal-vlm] {label} skipped: {exc}", file=sys.stderr, flush=True)
                continue
            rows = [{"name": d.name, "score": round(d.score, 4), "box": [round(v, 1) for v in d.box],
                     "source": d.source, "track_id": d.track_id} for d in result.detections]
            text = ", ".join(f"{d['name']} {d['score']:.2f} at {d['box']}" for d in rows) or "nothing"
            _emit(args, {"frame": label, "detections": rows, "unverified": list(result.uncertain)
                         if args.verify else []}, f"{label}: {text}")


def _store(args):
    from .store import open_library

    return open_library(args.store)


def _cmd_list(args) -> None:
    store = _store(args)
    records = store.list()
    damaged = store.problems()
    rows = [{"name": r.name, "category": r.category, "memory_tokens": r.memory_tokens,
             "keywords": r.keywords, "created": r.created, "damaged": damaged.get(r.name)} for r in records]
    # A row whose index entry itself cannot be read has no record: listed by name, as damaged.
    rows += [{"name": n, "damaged": reason} for n, reason in sorted(damaged.items())
             if n not in {r.name for r in records}]
    # Names as typed, so one can be copied into forget; only what a terminal would act on is escaped.
    lines = [f"{shown(row['name'])}\t{shown(row.get('category', '')) or '-'}\t{row.get('memory_tokens', 0)} tokens\t"
             f"{shown(', '.join(row.get('keywords', [])))}"
             + (f"\tDAMAGED: {shown(row['damaged'])} (forget it and teach it again)" if row["damaged"] else "")
             for row in sorted(rows, key=lambda row: row["name"])]
    _emit(args, {"concepts": sorted(rows, key=lambda row: row["name"])}, "\n".join(lines) or "no concepts taught yet")


def _cmd_forget(args) -> None:
    result = _store(args).forget(validate_name(args.name))
    if result.left_behind:
        print(f"personal-vlm: warning: {result.message}", file=sys.stderr)
    _emit(args, {"forgotten": result.name, "left_behind": result.left_behind},
          f"forgot {quoted(result.name, MAX_NAME_CHARS)}")


def _add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``personal-vlm`` subcommands."""
    parser = subparsers.add_parser(
        "eval", help="recognition accuracy on a personalization dataset (Yo'LLaVA, PerVA, MyVLM, generic)",
        description=evaluation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset root folder")
    parser.add_argument("--out", required=True, help="results folder; a rerun resumes the run in it")
    parser.add_argument("--layout", default="auto", choices=("auto",) + evaluation.LAYOUTS)
    parser.add_argument("--method", default="match", choices=evaluation.METHODS)
    parser.add_argument("--shots", type=int, default=1, help=f"reference images per concept (1..{evaluation.MAX_SHOTS})")
    parser.add_argument("--test-list", default=None, help="myvlm: file listing the query images (<concept>/<file>)")
    parser.add_argument("--test-last", type=int, default=None,
                        help="myvlm: the last N images of each concept are queries (default: all after --shots)")
    parser.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N queries")
    parser.add_argument("--accept", type=float, default=None, help="matcher accept threshold (default: profile)")
    parser.add_argument("--reject", type=float, default=None, help="matcher reject threshold (default: profile)")
    parser.add_argument("--threshold", type=float, default=None, help="Ego p_yes threshold (default: profile)")
    parser.add_argument("--margin", type=float, default=None,
                        help="cascade: R2P when |p_yes - threshold| < margin (default: the model profile's r2p_margin)")
    parser.add_argument("--top-k", type=int, default=3, help="R2P: candidates kept by retrieval")
    parser.add_argument("--r2p-pool", type=int, default=10, help="R2P: the matcher's top concepts it retrieves from")
    parser.add_argument("--pairwise-threshold", type=float, default=0.5, help="R2P: p_i needed to decide")
    parser.add_argument("--pairwise-reference", default="image", choices=PAIRWISE_REFERENCES,
                        help="R2P's pairwise step shows the candidate's reference picture (as R2P does) or its memory")
    parser.add_argument("--concept-thresholds", action="store_true",
                        help="match / cascade: each concept its own accept threshold, from the library's impostors")
    parser.add_argument("--recognition", default=None, choices=RECOGNITIONS,
                        help="ego and cascade: Ego checks each concept in a prompt of its own, or joint: beside the "
                             "best-matching others (max_concepts_in_context memories) in one prompt "
                             "(default: the model profile's)")
    parser.add_argument("--verifier-model", default=DEFAULT_VERIFIER,
                        help="R2P: CLIP/SigLIP id or folder for retrieval and attribute checks (default: "
                             f"{DEFAULT_VERIFIER}, or {SIGLIP_VERIFIER}); weights that cannot be had: a warning and "
                             "the VLM's own yes/no; '' = no contrastive model")
    parser.add_argument("--restart", action="store_true", help="discard the results already in --out")
    return parser


def _cmd_eval(args) -> None:
    """``personal-vlm eval``: load the model, evaluate, print the overall metrics."""
    from .assistant import Assistant
    from .evaluation import RESULTS_MD, EvalOptions, evaluate, load_dataset, pairs
    from .evaluation.report import format_value as _fmt

    _say = stderr_progress("eval")

    dataset = load_dataset(args.dataset, args.layout, args.shots, args.test_list, args.test_last)
    options = EvalOptions(method=args.method, accept=args.accept, reject=args.reject, threshold=args.threshold,
                          margin=args.margin, top_k=args.top_k, pairwise_threshold=args.pairwise_threshold,
                          pairwise_reference=args.pairwise_reference, recognition=args.recognition,
                          recognition_method=args.recognition_method,
                          verifier_model=args.verifier_model, r2p_pool=args.r2p_pool,
                          max_queries=args.max_queries, concept_thresholds=args.concept_thresholds).check()
    out = Path(args.out).expanduser()
    _say(f"{dataset.layout} dataset: {len(dataset.concepts)} concepts, {len(dataset.queries)} queries, "
         f"{len(pairs(dataset))} pairs")
    split = {"test_list": str(args.test_list) if args.test_list else None, "test_last": args.test_last}
    with Assistant.open(args.model, store_dir=out / "store", device=args.device, dtype=args.dtype,
                        profile_path=getattr(args, "profile", None), progress=_say,
                        # evaluate() loads the R2P verifier model of --verifier-model itself
                        options=_with_method(args, AssistantOptions(verification=False, verifier_model=None)),
                        rebuild=False) as assistant:
        results = evaluate(assistant, dataset, out, options, restart=args.restart, test_split=split)
    overall = results["overall"]
    if getattr(args, "json", False):
        print(json.dumps({k: results[k] for k in ("method", "dataset", "overall", "macro_weighted_accuracy",
                                                  "timing", "decided_by")} | {"out": str(out)}, ensure_ascii=False))
    else:
        print(f"{options.method}: Wtd {_fmt(overall['weighted_accuracy'])} (positive {_fmt(overall['positive_accuracy'])}, "
              f"negative {_fmt(overall['negative_accuracy'])}), precision {_fmt(overall['precision'])}, "
              f"recall {_fmt(overall['recall'])}, F1 {_fmt(overall['f1'])} over {results['dataset']['queries']} "
              f"queries; {_fmt(results['timing']['seconds_per_query'])} s/query. Results in {out / RESULTS_MD}")


def _add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="measure teaching, the frame path, the matcher and ask")
    bench.add_argument("--json", dest="json_out", default=None, help="write the figures to this JSON file")
    bench.add_argument("--size", default="tiny", choices=RANDOM_MODEL_SIZES,
                       help="random-weight model to measure when --model is not given")
    bench.add_argument("--backends", default=",".join(BACKENDS))
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--frames", type=int, default=10, help="frames for the verification p95")
    bench.add_argument("--node", action="store_true",
                       help="measure the node over ROS 2 instead: detection rate with and without overlay "
                            "subscribers, overlay bytes raw vs JPEG, at 640x480 and 1280x720")
    bench.add_argument("--seconds", type=float, default=8.0, help="with --node: length of each measured phase")
    bench.add_argument("--library", default=None, metavar="URL",
                       help="only the fleet library's prefilter, pgvector vs in memory, in this EMPTY PostgreSQL "
                            "database (it writes and removes the synthetic concepts)")
    bench.add_argument("--library-sizes", default="1000,10000,100000", help="with --library: library sizes")


def _cmd_bench(args) -> None:
    from .bench import format_table, run_bench

    if args.repeats < 1 or args.frames < 2:
        raise PersonalVLMError("--repeats must be >= 1 and --frames >= 2")
    dtype = "float32" if args.dtype == "auto" else args.dtype
    if args.library:
        from .bench_library import format_library_table, run_library_bench

        try:
            sizes = sorted({int(v) for v in args.library_sizes.split(",") if v.strip()})
        except ValueError:
            sizes = []
        if not sizes or sizes[0] < 100 or sizes[-1] > 1_000_000:
            raise PersonalVLMError("--library-sizes must be comma-separated counts in [100, 1000000]")
        report = run_library_bench(args.library, sizes, frames=max(3, args.frames // 2),
                                   progress=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
        _print_bench(format_library_table(report), report, args.json_out)
        return
    if args.node:
        from .bench import synthetic_model
        from .ros.bench import format_node_table, run_node_bench

        if not 1.0 <= args.seconds <= 600.0:
            raise PersonalVLMError("--seconds must lie in [1, 600]")
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "personal_vlm" / "bench"
        model = args.model or str(synthetic_model(args.size, cache))
        device = "cpu" if args.device == "auto" else args.device
        report = run_node_bench(model, device=device, dtype=dtype, seconds=args.seconds,
                                progress=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
        _print_bench(format_node_table(report), report, args.json_out)
        return
    report = run_bench(args.model, size=args.size, device=args.device, dtype=dtype,
                       backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
                       repeats=args.repeats, frames=args.frames, icpt_projector=args.icpt_projector)
    _print_bench(format_table(report), report, args.json_out)


def _print_bench(table: str, report: dict, json_out: str | None) -> None:
    print(table)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
        print(f"\nwritten to {json_out}")


def _add_export_parser(subparsers):
    """Add ``export-encoder --out DIR [--image-size S] [--opset N] [--backend-check]`` to ``subparsers``."""
    parser = subparsers.add_parser(
        "export-encoder", help="export the vision tower + projector to ONNX (checked against torch)",
        description="Export the model's vision tower + projector to DIR/encoder.onnx with DIR/encoder.json, "
                    "and check the graph against torch on onnxruntime CPU. The node exports on its own into "
                    "its cache; use this to prepare a folder for another machine or to see which backends work.")
    parser.add_argument("--out", required=True, help="folder to write encoder.onnx and encoder.json to")
    parser.add_argument("--image-size", type=int, default=None, metavar="S",
                        help="fix the graph to S×S px images (a static TensorRT engine); default: any size")
    parser.add_argument("--opset", type=int, default=EXPORT_OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--backend-check", action="store_true",
                        help="also run the graph on every onnxruntime provider here and on TensorRT if installed, "
                             "and report each one's error against torch and its time")
    parser.add_argument("--precision", default="fp16", choices=PRECISIONS,
                        help="TensorRT precision for --backend-check (default: %(default)s)")
    return parser


def _cmd_export(args) -> None:
    """The command: uses args.model / device / dtype / json from the global options."""
    from .assistant import Assistant

    result = Assistant.export_encoder(args.model, args.out, device=args.device, dtype=args.dtype,
                                      image_size=args.image_size, opset=args.opset,
                                      backend_check=args.backend_check, precision=getattr(args, "precision", "fp16"))
    if getattr(args, "json", False):
        print(json.dumps(result, ensure_ascii=False))
        return
    sizes = "any image size" if result["image_size"] is None else f"{result['image_size']} px images only"
    lines = [f"exported the {result['family']} encoder ({sizes}, {result['bytes'] / 1e6:.1f} MB) to {result['onnx']}; "
             f"max abs error vs torch {result['max_abs_error']:.2e}"]
    for row in result.get("backends", []):
        if "unavailable" in row:
            lines.append(f"  {row['backend']:<12} {row['provider']:<28} unavailable: {row['unavailable']}")
        else:
            lines.append(f"  {row['backend']:<12} {row['provider']:<28} max abs error {row['max_abs_error']:.2e}"
                         f"  {row['median_s'] * 1000:.1f} ms")
    print("\n".join(lines))


def _node_options(parser, defaults: bool) -> None:
    """The options every ``node`` verb shares. Given before the verb they carry defaults; after it
    they default to SUPPRESS, so ``node --timeout 60 list`` and ``node list --timeout 60`` agree."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--namespace", "-n", default=default(""), help="the node's namespace (default: none)")
    parser.add_argument("--node-name", default=default("personal_vlm"), help="the node's name (default: personal_vlm)")
    parser.add_argument("--timeout", type=float, default=default(NODE_TIMEOUT_S),
                        help=f"seconds to wait for the node to appear (default: {NODE_TIMEOUT_S:g})")
    # Always SUPPRESS: `personal-vlm --json node list` sets it too.
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print results as JSON")


def _add_node_parser(sub) -> None:
    """``node VERB``: a ROS client of a running node; parsing needs no ROS import."""
    node = sub.add_parser("node", help="talk to a running ROS node (needs rclpy, not the ros2 command)")
    _node_options(node, defaults=True)
    verbs = node.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    teach = verbs.add_parser("teach", help="teach a concept from pictures, or from the latest camera frame")
    teach.add_argument("name")
    teach.add_argument("images", nargs="*", help="picture files; none = the node's latest camera frame")
    teach.add_argument("--category", default="")
    teach.add_argument("--roi", default=None, help="x,y,w,h of the subject in pixels, for every picture")
    teach.add_argument("--overwrite", action="store_true")
    teach.add_argument("--add", action="store_true",
                       help="further views of an existing concept (e.g. the latest frame, once per side)")

    ask = verbs.add_parser("ask", help="ask a question about a picture or the latest camera frame")
    ask.add_argument("question")
    ask.add_argument("--image", default=None, help="picture file; default: the node's latest camera frame")
    ask.add_argument("--stream", action="store_true", help="print the answer while it is generated (ask action)")

    verbs.add_parser("list", help="list the node's concepts")
    forget = verbs.add_parser("forget", help="forget a concept")
    forget.add_argument("name")
    watch = verbs.add_parser("watch", help="print the node's detections")
    watch.add_argument("--count", type=int, default=0, help="stop after this many frames (default: never)")
    watch.add_argument("--seconds", type=float, default=0.0, help="stop after this many seconds (default: never)")
    for verb in (teach, ask, verbs.choices["list"], forget, watch):
        _node_options(verb, defaults=False)


def _cmd_node(args) -> None:
    from .ros import client

    client.run(args)


COMMANDS = {"teach": _cmd_teach, "ask": _cmd_ask, "recognize": _cmd_recognize, "list": _cmd_list,
            "forget": _cmd_forget, "calibrate": _cmd_calibrate, "bench": _cmd_bench,
            "detect": _cmd_detect, "eval": _cmd_eval, "export-encoder": _cmd_export,
            "node": _cmd_node, "store": cmd_store, "profile": _cmd_profile, "web": _cmd_web,
            "icpt-train": cmd_icpt_train}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.model = args.model or os.environ.get("PERSONAL_VLM_MODEL") or (
        None if args.command == "bench" else DEFAULT_MODEL)
    try:
        status = COMMANDS[args.command](args)
    except PersonalVLMError as exc:
        print(f"personal-vlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("personal-vlm: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
