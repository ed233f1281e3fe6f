"""Export a model's vision tower + projector to ONNX, check it against torch, describe it in JSON.

An export folder holds:

- ``encoder.onnx``       the graph (float32), plus ``encoder.onnx.data`` when the weights are too big
                         for one protobuf (> 1.5 GB, e.g. Qwen2.5-VL-3B's 2.7 GB tower);
- ``encoder.json``       what a runtime needs without torch: family, model fingerprint, inputs with
                         their dynamic axes, TensorRT shape profile, the ONNX hash, measured parity.

``encoder.json`` is written last: a folder without it is an unfinished export and is never used.

    personal-vlm --model Qwen/Qwen2.5-VL-3B-Instruct export-encoder --out encoders/qwen3b
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import PersonalVLMError
from ..options import EXPORT_OPSET
from ..output import stderr_progress, write_atomic
from ..vlm.graph import VisionGraph, graph_for

FORMAT_VERSION = 2      # 2: Qwen windows as a padded batch (window_slots, window_unpad)
DEFAULT_OPSET = EXPORT_OPSET
EXTERNAL_DATA_BYTES = int(1.5e9)  # protobuf files stop at 2 GB; leave room for the graph itself
DEFAULT_TOLERANCE = 1e-3         # max |onnx − torch| allowed, relative to max(1, max |torch|)
SAMPLE_SIZE = 448
ONNX_NAME = "encoder.onnx"
META_NAME = "encoder.json"

Progress = Callable[[str], None]


say_to_stderr = stderr_progress()


def sample_image(width: int, height: int, seed: int = 0):
    """A deterministic picture with gradients, blocks and noise: every patch differs."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([255 * x / max(1, width - 1), 255 * y / max(1, height - 1),
                    127 + 120 * np.sin((x + y) / 23.0)], axis=-1)                 # (H, W, 3)
    for _ in range(6):
        x0, y0 = rng.randint(0, max(1, width - 8)), rng.randint(0, max(1, height - 8))
        rgb[y0:y0 + height // 4, x0:x0 + width // 4] = rng.randint(0, 256, 3)
    rgb += rng.normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def files_sha256(paths: list[Path]) -> str:
    """sha256 over the files' bytes, in the given order (the graph, then its external data)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def onnx_files(folder: Path) -> list[Path]:
    """The export's ONNX graph and, when present, its external data file."""
    graph = Path(folder) / ONNX_NAME
    data = graph.with_name(ONNX_NAME + ".data")
    return [graph, data] if data.exists() else [graph]


def read_metadata(folder: Path) -> dict | None:
    """encoder.json of a finished export, or None when absent, unreadable or its files changed size."""
    path = Path(folder) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT_VERSION:
        return None
    sizes = meta.get("file_sizes", {})
    for name, size in sizes.items():
        file = Path(folder) / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return meta if sizes else None


def _write_json_atomic(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2))


def _require_export_tools() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise PersonalVLMError(f"exporting the encoder needs {', '.join(missing)}: pip install {' '.join(missing)} "
                               "(onnxruntime-gpu instead of onnxruntime on a CUDA machine)")


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints its steps to stdout and warns about unused names; keep stdout for results."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _model_lock(adapter, graph: VisionGraph):
    """The adapter's forward lock when the graph shares its modules, else nothing to wait for."""
    if graph.shares_model:
        return getattr(adapter, "_lock", None) or contextlib.nullcontext()
    return contextlib.nullcontext()


def _example(adapter, graph: VisionGraph, width: int, height: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from ..vlm.base import prepare_image

    return graph.feeds(adapter.preprocess(prepare_image(sample_image(width, height, seed))).tensors)


def _ort_cpu_session(onnx_path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _to_numpy(feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in feeds.items()}


def verify_parity(module: torch.nn.Module, onnx_path: Path, examples: list[dict[str, torch.Tensor]],
                  tolerance: float = DEFAULT_TOLERANCE, lock=None) -> list[dict]:
    """Run each example through torch and onnxruntime CPU; raise when they disagree.

    Returns one record per example: input shapes, max abs error, both run times.
    """
    session = _ort_cpu_session(onnx_path)
    records = []
    for feeds in examples:
        with lock or contextlib.nullcontext(), torch.inference_mode():
            t0 = time.perf_counter()
            reference = module(**feeds).float()                                  # (N, D)
            torch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        (output,) = session.run(None, _to_numpy(feeds))
        ort_s = time.perf_counter() - t0
        if tuple(output.shape) != tuple(reference.shape):
            raise PersonalVLMError(f"the exported encoder returned shape {tuple(output.shape)} where torch "
                                   f"returns {tuple(reference.shape)}; use encoder_backend torch and report this")
        error = float(np.abs(output - reference.numpy()).max()) if output.size else 0.0
        scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
        record = {"inputs": {n: list(v.shape) for n, v in feeds.items()}, "output_shape": list(output.shape),
                  "max_abs_error": error,
                  "reference_scale": scale, "torch_s": round(torch_s, 4), "onnxruntime_cpu_s": round(ort_s, 4)}
        records.append(record)
        if not error <= tolerance * scale:
            raise PersonalVLMError(
                f"the exported encoder differs from torch by {error:.3g} (allowed {tolerance * scale:.3g}) on "
                f"inputs {record['inputs']}; use encoder_backend torch and report this")
    return records


def export_encoder(adapter, out_dir, image_size: int | None = None, opset: int = DEFAULT_OPSET,
                   tolerance: float = DEFAULT_TOLERANCE, progress: Progress | None = None) -> Path:
    """Export ``adapter``'s vision tower + projector to ``out_dir/encoder.onnx``; returns its path.

    ``image_size=None`` gives one graph for every image size the processor produces (dynamic patch
    or tile axis); an integer fixes the graph to the inputs of an S×S image (a static TensorRT
    engine, at the price of refusing other sizes). The graph is checked against torch on
    onnxruntime CPU right after export: two image sizes for a dynamic graph.
    """
    say = progress or say_to_stderr
    _require_export_tools()
    if image_size is not None and not 28 <= int(image_size) <= 4096:
        raise PersonalVLMError(f"image size {image_size} is out of range; use 28..4096 px, or none for any size")
    if opset < 18:
        raise PersonalVLMError(f"opset {opset} is too old for the exporter; use 18 or newer")
    graph = graph_for(adapter)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)          # an old description must not outlive its graph
    for stale in onnx_files(out):
        stale.unlink(missing_ok=True)

    size = int(image_size or SAMPLE_SIZE)
    dynamic = image_size is None
    example = _example(adapter, graph, size, size)
    module = graph.module()
    trace = graph.trace_example(example) if dynamic else example
    params = sum(p.numel() for p in module.parameters())
    model_type = getattr(adapter.config, "model_type", adapter.family)
    say(f"exporting the {model_type} vision tower + projector ({params / 1e6:.1f} M parameters, "
        f"{'any image size' if dynamic else f'{size}×{size} px only'}) to ONNX opset {opset}…")
    t0 = time.perf_counter()
    external = params * 4 > EXTERNAL_DATA_BYTES
    onnx_path = out / ONNX_NAME
    try:
        with _model_lock(adapter, graph), _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, (), kwargs=trace, dynamo=True, opset_version=opset,
                dynamic_shapes=graph.dynamic_shapes(trace) if dynamic else None,
                input_names=list(trace), output_names=[graph.output_name], verbose=False)
        with _quiet_exporter():
            program.save(str(onnx_path), external_data=external)
    except Exception as exc:  # the exporter raises many types; none is the caller's bug to trace
        raise PersonalVLMError(f"exporting the {model_type} vision encoder to ONNX failed ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); "
                               "use encoder_backend torch") from exc
    del program
    say(f"exported in {time.perf_counter() - t0:.1f}s to {onnx_path}"
        f"{' (+ external data)' if external else ''}; checking it against torch on onnxruntime CPU…")

    examples = [example]
    if dynamic:
        if trace is not example:
            examples.append(trace)
        # A wide picture: another patch grid (Qwen) or tile count (Idefics3) than the square one.
        examples.append(_example(adapter, graph, max(56, size * 3 // 4), max(56, size // 3), seed=1))
    records = verify_parity(module, onnx_path, examples, tolerance, lock=_model_lock(adapter, graph))
    worst = max(r["max_abs_error"] for r in records)
    say(f"parity ok: max abs error {worst:.2e} over {len(records)} input size(s) "
        f"(torch {records[0]['torch_s']:.3f}s, onnxruntime CPU {records[0]['onnxruntime_cpu_s']:.3f}s)")

    files = onnx_files(out)
    inputs = graph.inputs()
    meta = {
        "format": FORMAT_VERSION,
        "family": adapter.family,
        "model_id": adapter.model_id,
        "fingerprint": adapter.identity,
        "model_dtype": str(adapter.dtype).replace("torch.", ""),
        "dtype": "float32",
        "opset": opset,
        "image_size": None if dynamic else size,
        "inputs": [{"name": spec.name, "dtype": spec.dtype,
                    "shape": list(spec.shape) if dynamic else list(example[spec.name].shape)}
                   for spec in inputs],
        "outputs": [{"name": graph.output_name, "dtype": "float32",
                     "shape": ["tokens", graph.output_dim()] if dynamic else records[0]["output_shape"]}],
        "dynamic_axes": ({spec.name: {str(i): s for i, s in enumerate(spec.shape) if isinstance(s, str)}
                          for spec in inputs} if dynamic else {}),
        "profile": graph.profile(example) if dynamic else {
            name: {"min": list(v.shape), "opt": list(v.shape), "max": list(v.shape)} for name, v in example.items()},
        "external_data": external,
        "file_sizes": {f.name: f.stat().st_size for f in files},
        "onnx_sha256": files_sha256(files),
        "parity": {"tolerance": tolerance, "max_abs_error": worst, "samples": records},
        "versions": _versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json_atomic(out / META_NAME, meta)
    return onnx_path


def export_model_encoder(model: str, out_dir, *, device: str = "auto", dtype: str = "auto",
                         image_size: int | None = None, opset: int = DEFAULT_OPSET, backend_check: bool = False,
                         precision: str = "fp16", progress: Progress | None = None) -> dict:
    """Load ``model`` (HF id or folder), export its encoder to ``out_dir`` (:func:`export_encoder`)
    and describe the result: paths, family, fingerprint, image size, parity, size; with
    ``backend_check`` also one row per backend here (:func:`.command.check_backends`)."""
    from ..vlm import load_vlm
    from .command import check_backends

    say = progress or say_to_stderr
    vlm = load_vlm(model, device=device, dtype=dtype)
    onnx_path = export_encoder(vlm, out_dir, image_size=image_size, opset=opset, progress=say)
    folder = Path(onnx_path).parent
    meta = read_metadata(folder)
    result = {"onnx": str(onnx_path), "metadata": str(folder / META_NAME), "family": meta["family"],
              "fingerprint": meta["fingerprint"], "image_size": meta["image_size"],
              "max_abs_error": meta["parity"]["max_abs_error"], "onnx_sha256": meta["onnx_sha256"],
              "bytes": sum(meta["file_sizes"].values())}
    if backend_check:
        result["backends"] = check_backends(vlm, folder, meta, precision, say)
    return result


def _versions() -> dict[str, str]:
    found = {"torch": torch.__version__}
    for name in ("transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    return found
