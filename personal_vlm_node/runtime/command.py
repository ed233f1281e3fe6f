"""``personal-vlm export-encoder``: export the vision encoder to a folder and check it on every backend.

Imports nothing heavy at module level: adding the command to the CLI parser stays free.
"""

from __future__ import annotations

import json
import time

DEFAULT_OPSET = 20   # kept equal to export.DEFAULT_OPSET without importing torch here


def add_export_parser(subparsers):
    """Add ``export-encoder --out DIR [--image-size S] [--opset N] [--backend-check]`` to ``subparsers``."""
    parser = subparsers.add_parser(
        "export-encoder", help="export the vision tower + projector to ONNX (checked against torch)",
        description="Export the model's vision tower + projector to DIR/encoder.onnx with DIR/encoder.json, "
                    "and check the graph against torch on onnxruntime CPU. The node exports on its own into "
                    "its cache; use this to prepare a folder for another machine or to see which backends work.")
    parser.add_argument("--out", required=True, help="folder to write encoder.onnx and encoder.json to")
    parser.add_argument("--image-size", type=int, default=None, metavar="S",
                        help="fix the graph to S×S px images (a static TensorRT engine); default: any size")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--backend-check", action="store_true",
                        help="also run the graph on every onnxruntime provider here and on TensorRT if installed, "
                             "and report each one's error against torch and its time")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                        help="TensorRT precision for --backend-check (default: %(default)s)")
    return parser


def _timed(fn, repeats: int = 3) -> tuple[object, float]:
    result = fn()                                                                # warm-up (engine builds, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, sorted(times)[len(times) // 2]


def check_backends(vlm, folder, meta: dict, precision: str = "fp16", progress=None) -> list[dict]:
    """Run the sample picture through torch and every backend available here; one row per backend."""
    import torch

    from ..errors import PersonalVLMError
    from ..vlm.base import prepare_image
    from . import backends
    from .export import SAMPLE_SIZE, sample_image

    size = meta.get("image_size") or SAMPLE_SIZE
    tensors = vlm.preprocess(prepare_image(sample_image(size, size))).tensors

    def torch_forward():
        with torch.inference_mode():
            return vlm.vision_forward(tensors)

    reference, torch_s = _timed(torch_forward)
    reference = reference.float().cpu()
    rows = [{"backend": "torch", "provider": f"torch {str(vlm.dtype).replace('torch.', '')} on {vlm.device}",
             "max_abs_error": 0.0, "median_s": round(torch_s, 4)}]

    def measure(backend: str, provider: str, make) -> dict:
        try:
            encoder = make()
            tokens, seconds = _timed(lambda: encoder(tensors))
        except (PersonalVLMError, ImportError) as exc:
            return {"backend": backend, "provider": provider, "unavailable": str(exc)}
        error = float((tokens.float().cpu() - reference).abs().max())
        return {"backend": backend, "provider": getattr(encoder, "provider", provider),
                "max_abs_error": error, "median_s": round(seconds, 4)}

    try:
        available = backends._import_onnxruntime().get_available_providers()
    except PersonalVLMError as exc:
        rows.append({"backend": "onnxruntime", "provider": "-", "unavailable": str(exc)})
        available = []
    for name, _ in backends.provider_chain(available, precision, folder / "onnxruntime-tensorrt"):
        rows.append(measure("onnxruntime", name, lambda name=name: backends.make_onnxruntime_encoder(
            vlm, folder, meta, precision, progress, only=name)))
    rows.append(measure("tensorrt", "TensorRT", lambda: backends.make_tensorrt_encoder(
        vlm, folder, meta, precision, progress)))
    return rows


def run_export(args) -> None:
    """The command: uses args.model / device / dtype / json from the global options."""
    from pathlib import Path

    from ..vlm import load_vlm
    from .export import export_encoder, read_metadata, say_to_stderr

    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    onnx_path = export_encoder(vlm, args.out, image_size=args.image_size, opset=args.opset,
                               progress=say_to_stderr)
    folder = Path(onnx_path).parent
    meta = read_metadata(folder)
    result = {"onnx": str(onnx_path), "metadata": str(folder / "encoder.json"), "family": meta["family"],
              "fingerprint": meta["fingerprint"], "image_size": meta["image_size"],
              "max_abs_error": meta["parity"]["max_abs_error"], "onnx_sha256": meta["onnx_sha256"],
              "bytes": sum(meta["file_sizes"].values())}
    if args.backend_check:
        result["backends"] = check_backends(vlm, folder, meta, getattr(args, "precision", "fp16"), say_to_stderr)
    if getattr(args, "json", False):
        print(json.dumps(result, ensure_ascii=False))
        return
    sizes = "any image size" if meta["image_size"] is None else f"{meta['image_size']} px images only"
    lines = [f"exported the {meta['family']} encoder ({sizes}, {result['bytes'] / 1e6:.1f} MB) to {onnx_path}; "
             f"max abs error vs torch {result['max_abs_error']:.2e}"]
    for row in result.get("backends", []):
        if "unavailable" in row:
            lines.append(f"  {row['backend']:<12} {row['provider']:<28} unavailable: {row['unavailable']}")
        else:
            lines.append(f"  {row['backend']:<12} {row['provider']:<28} max abs error {row['max_abs_error']:.2e}"
                         f"  {row['median_s'] * 1000:.1f} ms")
    print("\n".join(lines))
