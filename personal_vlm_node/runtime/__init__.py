"""Vision-encoder runtimes: ONNX export, onnxruntime (TensorRT / CUDA / CPU providers), native TensorRT.

Family-independent: each family's exportable graph lives in its folder under ``vlm/``.

    from personal_vlm_node.runtime import make_encoder
    encoder = make_encoder(vlm, "onnxruntime")          # exports once, cached by model fingerprint
    tokens = vlm.encode_image(frame, encoder=encoder)

Names are loaded on first use, so importing this package (e.g. to add the CLI command) costs nothing.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "make_encoder": "backends", "default_cache_dir": "backends", "engine_cache_key": "backends",
    "needs_rebuild": "backends", "provider_chain": "backends", "cached_export": "backends",
    "BACKENDS": "backends", "PRECISIONS": "backends",
    "export_encoder": "export", "read_metadata": "export",
    "check_backends": "command",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
