"""Checking an exported encoder on every backend this machine has (``personal-vlm export-encoder --backend-check``).

The command's arguments and output live in :mod:`personal_vlm_node.cli`; this is the work.
"""

from __future__ import annotations

import time


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
