"""VLM adapters: one folder per model family behind the protocol in :mod:`.base`.

``vlm/<family>/`` holds the family's adapter (``adapter.py``, exported as ``ADAPTER``), its
exportable vision graph (``graph.py``, on the shared base in :mod:`.graph`) and its tiny
random-weight test kits (``tiny.py``). :data:`FAMILIES` below is the one registry: adding a family
is adding its folder and its name there.

``load_vlm(model)`` accepts a Hugging Face id or a local checkpoint folder and returns the adapter
for the checkpoint's ``model_type``.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from ..errors import PersonalVLMError
from ..options import DTYPES
from .base import Generation, ImageTokens, Memory, Prompt, VLMAdapter, read_chat_template

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "internvl", "idefics3")
ADAPTERS: tuple[type[VLMAdapter], ...] = tuple(
    importlib.import_module(f".{family}", __name__).ADAPTER for family in FAMILIES)

__all__ = ["ADAPTERS", "DTYPES", "FAMILIES", "Generation", "ImageTokens", "Memory", "Prompt", "VLMAdapter",
           "adapter_for", "load_vlm", "resolve_checkpoint"]


def adapter_for(model_type: str) -> type[VLMAdapter]:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    known = ", ".join(t for cls in ADAPTERS for t in cls.model_types)
    raise PersonalVLMError(f"model type {model_type!r} is not supported; supported: {known}")


def resolve_checkpoint(model: str, setting: str = "model") -> Path:
    """A local folder holding the checkpoint: ``model`` itself, or the Hugging Face cache / hub.
    ``setting``: the parameter the user gave it in, named by the error messages."""
    if not model or not model.strip():
        raise PersonalVLMError(f"no model given; set `{setting}` to a Hugging Face id or a local folder")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PersonalVLMError(f"{path} has no config.json; point `{setting}` at a checkpoint folder")
        return path
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise PersonalVLMError(f"model folder not found: {model}")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]
    try:
        return Path(snapshot_download(model, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(model, allow_patterns=patterns))
        except Exception as exc:  # network down, gated repo, unknown id …
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    raise PersonalVLMError(
        f"the weights of {model!r} are not in the Hugging Face cache and could not be downloaded "
        f"({reason}). Run `hf download {model}` on a machine with network and copy "
        f"~/.cache/huggingface over, or set `{setting}` to a local checkpoint folder.")


def _pick_device(device: str):
    import torch

    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise PersonalVLMError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PersonalVLMError(f"device {device!r} asked for but torch sees no CUDA GPU; use device:=cpu "
                               "or install a CUDA build of torch")
    return dev


def _pick_dtype(dtype: str, device):
    import torch

    if dtype not in DTYPES:
        raise PersonalVLMError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if bfloat16_is_fast(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def bfloat16_is_fast(device) -> bool:
    """Whether bf16 pays off on ``device``: CUDA GPUs with bf16 support, CPUs with AVX512-BF16/AMX.

    On CPUs without them (e.g. AVX2-only) bf16 runs in emulation, several times slower than fp32.
    """
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def load_vlm(model: str, device: str = "auto", dtype: str = "auto") -> VLMAdapter:
    """Load a checkpoint (HF id or folder) and wrap it in its family's adapter."""
    folder = resolve_checkpoint(model)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PersonalVLMError(f"{folder / 'config.json'} is unreadable: {exc}") from exc
    cls = adapter_for(config.get("model_type", "?"))
    dev = _pick_device(device)
    torch_dtype = _pick_dtype(dtype, dev)
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    vlm = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype, attn_implementation="sdpa")
    vlm.to(dev)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = AutoImageProcessor.from_pretrained(folder)
    adapter = cls(vlm, tokenizer, image_processor, read_chat_template(folder, tokenizer), model)
    adapter.checkpoint_folder = folder
    return adapter
