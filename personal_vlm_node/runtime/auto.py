"""``encoder_backend: auto``: the fastest frame-path encoder this machine offers, measured once.

The candidates are (backend, precision) pairs that can be fast here:

- ``torch/float32`` always (the reference);
- ``torch/bfloat16`` on a CPU with AMX or AVX512-BF16 (on others bf16 matmuls are emulated and
  slower), and on every GPU (plus ``torch/float16`` there);
- ``onnxruntime/fp32`` when onnxruntime is installed (it picks TensorRT EP → CUDA EP → CPU EP);
- ``tensorrt/fp16`` when TensorRT and a GPU are present.

Each candidate is built and timed on a 448 px picture (one warm-up run, then the median of a few);
the fastest wins. The choice and every timing are written next to the encoder exports, keyed by
the model fingerprint and the machine (CPU model and flags, GPU, library versions, threads), so a
later start reuses it without measuring; a candidate that fails to build is recorded with its
error and skipped.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import PersonalVLMError
from ..output import write_atomic

Candidate = tuple[str, str]                 # (backend, precision)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def candidates(device_type: str, flags: set[str], have_onnxruntime: bool, have_tensorrt: bool) -> list[Candidate]:
    """The pairs worth measuring on this machine, the reference first."""
    out: list[Candidate] = [("torch", "float32")]
    if device_type == "cuda":
        out += [("torch", "bfloat16"), ("torch", "float16")]
    elif flags & set(BF16_CPU_FLAGS):
        out.append(("torch", "bfloat16"))
    if have_onnxruntime:
        out.append(("onnxruntime", "fp32"))
    if have_tensorrt and device_type == "cuda":
        out.append(("tensorrt", "fp16"))
    return out


def machine_key(device: torch.device, flags: set[str]) -> str:
    """What a measured choice depends on besides the model."""
    parts = [platform.machine(), platform.processor(), ",".join(sorted(flags)), f"torch {torch.__version__}",
             f"threads {torch.get_num_threads()}", str(device)]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    try:
        import onnxruntime
        parts.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def choose(pairs: list[Candidate], build: Callable[[Candidate], object], measure: Callable[[object], float],
           cache_file: Path, key: str, say: Callable[[str], None] = lambda message: None):
    """The fastest of ``pairs``: (pair, its encoder, the record of every measurement).

    ``build(pair)`` makes the encoder (raising PersonalVLMError or ImportError when it can't);
    ``measure(encoder)`` returns its seconds per frame. A record in ``cache_file`` under ``key``
    whose choice is still among ``pairs`` is reused: only that pair is built, nothing is timed.
    """
    records = _read(cache_file)
    cached = records.get(key)
    if cached is not None and tuple(cached["choice"]) in pairs:
        pair = tuple(cached["choice"])
        say(f"encoder auto: {pair[0]} {pair[1]} (measured before, {cache_file})")
        return pair, build(pair), cached
    seconds: dict[str, float] = {}
    errors: dict[str, str] = {}
    built: dict[Candidate, object] = {}
    for pair in pairs:
        name = f"{pair[0]}/{pair[1]}"
        try:
            built[pair] = build(pair)
            seconds[name] = float(measure(built[pair]))
            say(f"encoder auto: {name} {seconds[name]:.3f} s per frame")
        except (PersonalVLMError, ImportError, RuntimeError) as exc:
            errors[name] = str(exc)
            built.pop(pair, None)
            say(f"encoder auto: {name} unavailable ({exc})")
    if not seconds:
        raise PersonalVLMError(f"no encoder backend works here: {errors}; use encoder_backend torch")
    best = min((p for p in pairs if f"{p[0]}/{p[1]}" in seconds), key=lambda p: seconds[f"{p[0]}/{p[1]}"])
    record = {"choice": list(best), "seconds": seconds, "errors": errors, "measured": time.time()}
    records[key] = record
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, json.dumps(records, indent=2, sort_keys=True))
    except OSError as exc:
        say(f"encoder auto: cannot cache the choice in {cache_file} ({exc}); it is measured again next time")
    say(f"encoder auto: chose {best[0]} {best[1]}")
    return best, built[best], record


def _read(cache_file: Path) -> dict:
    try:
        data = json.loads(Path(cache_file).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class TorchEncoder:
    """The model's own vision tower under autocast to ``dtype`` (weights stay as loaded)."""

    backend = "torch"

    def __init__(self, adapter, dtype: torch.dtype):
        self.adapter, self.dtype = adapter, dtype
        self.provider = f"torch {str(dtype).replace('torch.', '')}"

    def __call__(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        adapter = self.adapter
        with torch.inference_mode(), torch.autocast(adapter.device.type, dtype=self.dtype):
            return adapter.vision_forward(tensors).to(adapter.dtype)


def auto_encoder(adapter, cache_dir=None, progress=None, repeats: int = 3):
    """The fastest encoder for ``adapter`` here (None when that is its own torch tower)."""
    from .backends import default_cache_dir, export_key, make_encoder
    from .export import sample_image

    say = progress or (lambda message: None)
    device = adapter.device
    flags = cpu_flags()
    try:
        import onnxruntime  # noqa: F401
        have_ort = True
    except ImportError:
        have_ort = False
    try:
        import tensorrt  # noqa: F401
        have_trt = True
    except ImportError:
        have_trt = False

    def build(pair: Candidate):
        backend, precision = pair
        if backend == "torch":
            dtype = getattr(torch, precision)
            return None if dtype == adapter.dtype else TorchEncoder(adapter, dtype)
        return make_encoder(adapter, backend, cache_dir=cache_dir, progress=say,
                            precision="fp16" if precision == "fp16" else "fp32")

    picture = sample_image(448, 448)

    def measure(encoder) -> float:
        adapter.encode_image(picture, encoder=encoder)                   # warm-up, not timed
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            adapter.encode_image(picture, encoder=encoder)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache_file = root / f"{adapter.family}-{export_key(adapter.identity, None)}-auto.json"
    pairs = candidates(device.type, flags, have_ort, have_trt)
    _, encoder, _ = choose(pairs, build, measure, cache_file, machine_key(device, flags), say)
    return encoder
