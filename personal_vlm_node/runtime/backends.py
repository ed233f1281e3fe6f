"""Vision-encoder backends behind one call: ``make_encoder(adapter, backend)``.

- ``torch``        returns None: the adapter runs its own vision tower.
- ``onnxruntime``  exports the tower once into the cache and runs it on the best execution provider
                   onnxruntime has here: TensorRT EP (fp16, engine cache) → CUDA EP → CPU EP.
- ``tensorrt``     builds a native TensorRT engine from the same ONNX file, cached under a key of
                   (ONNX hash, GPU, TensorRT version, precision), and runs it on torch's CUDA stream.

Every encoder is a callable ``encoder(tensors) -> (N, D)`` that takes the adapter's processor tensors
(as :meth:`VLMAdapter.vision_forward` does) and returns the visual tokens on the adapter's device and
dtype, so ``adapter.encode_image(image, encoder=encoder)`` is all a caller writes.

Cache layout (default ``$XDG_CACHE_HOME/personal_vlm/encoders``)::

    <family>-<hash of model fingerprint + image size>/
        encoder.onnx [encoder.onnx.data] encoder.json     one export, reused until the model changes
        onnxruntime-tensorrt/                              TensorRT EP engine + timing caches
        tensorrt/<key>.engine  tensorrt/<key>.json         native engines, one per key
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import torch

from ..errors import PersonalVLMError
from ..output import write_atomic
from .export import (FORMAT_VERSION, ONNX_NAME, Progress, _write_json_atomic, export_encoder, read_metadata,
                     say_to_stderr)
from ..vlm.base import to_device
from ..vlm.graph import VisionGraph, graph_for

from ..options import BACKENDS, PRECISIONS
TRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
TRT_INSTALL_HINT = ("the tensorrt backend needs TensorRT: pip install tensorrt (x86_64 with CUDA 12/13; "
                    "on Jetson it comes with JetPack: apt install python3-libnvinfer), "
                    "or use encoder_backend onnxruntime")


# ---- cache ---------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "personal_vlm" / "encoders"


def export_key(identity: str, image_size: int | None) -> str:
    """Cache folder name of one export: changes when the model (its identity), the size mode or the format does."""
    text = f"{identity}|size={image_size or 'any'}|format={FORMAT_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_export(adapter, cache_dir: Path | None = None, image_size: int | None = None,
                  progress: Progress | None = None) -> tuple[Path, dict]:
    """The cached export for ``adapter`` (exporting it on first use): its folder and encoder.json."""
    say = progress or say_to_stderr
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = root / f"{adapter.family}-{export_key(adapter.identity, image_size)}"
    meta = read_metadata(folder)
    if meta is not None and meta.get("fingerprint") == adapter.identity:
        say(f"reusing the exported encoder in {folder}")
        return folder, meta
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PersonalVLMError(f"cannot create the encoder cache {root}: {exc}; set a writable cache_dir") from exc
    # Export into a private folder and move it into place, so a crash or a second process exporting
    # at the same time never leaves a half-written export where the cache looks.
    scratch = root / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        export_encoder(adapter, scratch, image_size=image_size, progress=say)
        if folder.exists() and read_metadata(folder) is None:
            shutil.rmtree(folder, ignore_errors=True)                          # an unfinished export
        try:
            os.rename(scratch, folder)
        except OSError:
            if read_metadata(folder) is None:                                  # nobody else finished either
                raise
    except OSError as exc:
        raise PersonalVLMError(f"cannot write the encoder export to {root}: {exc}; free some disk space "
                               "or set another cache_dir") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    meta = read_metadata(folder)
    if meta is None:
        raise PersonalVLMError(f"the encoder export in {folder} is incomplete; delete the folder and retry")
    say(f"encoder cached in {folder}")
    return folder, meta


# ---- shared call path ------------------------------------------------------------------------

class _Encoder:
    """Turns the adapter's tensors into graph inputs and the graph output into visual tokens."""

    backend = ""

    def __init__(self, graph: VisionGraph, meta: dict, device: torch.device, dtype: torch.dtype):
        self.graph = graph
        self.meta = meta
        self.device = device
        self.dtype = dtype
        self.folder: Path | None = None
        self._fixed = {spec["name"]: spec["shape"] for spec in meta["inputs"]
                       if all(isinstance(s, int) for s in spec["shape"])}

    def _feeds(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = self.graph.feeds(tensors)
        for name, shape in self._fixed.items():
            if list(feeds[name].shape) != shape:
                raise PersonalVLMError(
                    f"this encoder was exported for {self.meta.get('image_size')} px images only ({name} "
                    f"{shape}), this image gives {list(feeds[name].shape)}; export it without --image-size "
                    "for a graph that takes any size")
        return feeds

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.graph.family} on {getattr(self, 'provider', '?')}>"


# ---- onnxruntime ---------------------------------------------------------------------------------

def _shape_list(profile: dict, which: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


def provider_chain(available: list[str], precision: str, engine_cache: Path, profile: dict | None = None,
                   device_id: int = 0) -> list[tuple[str, dict]]:
    """Execution providers to try, best first, with their options: only those ``available`` lists."""
    chain: list[tuple[str, dict]] = []
    if TRT_EP in available:
        options = {"device_id": device_id, "trt_fp16_enable": precision == "fp16",
                   "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache),
                   "trt_timing_cache_enable": True, "trt_timing_cache_path": str(engine_cache)}
        if profile:
            # Without explicit profiles the EP rebuilds its engine whenever a new shape arrives.
            options.update(trt_profile_min_shapes=_shape_list(profile, "min"),
                           trt_profile_opt_shapes=_shape_list(profile, "opt"),
                           trt_profile_max_shapes=_shape_list(profile, "max"))
        chain.append((TRT_EP, options))
    if CUDA_EP in available:
        chain.append((CUDA_EP, {"device_id": device_id}))
    chain.append((CPU_EP, {}))
    return chain


class OnnxRuntimeEncoder(_Encoder):
    backend = "onnxruntime"

    def __init__(self, session, graph, meta, device, dtype):
        super().__init__(graph, meta, device, dtype)
        self.session = session
        self.provider = session.get_providers()[0]
        self._output = session.get_outputs()[0].name

    def __call__(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: _host_array(value) for name, value in self._feeds(tensors).items()}
        (tokens,) = self.session.run([self._output], feeds)                        # (N, D) float32
        return to_device(torch.from_numpy(tokens), self.device, self.dtype)


def _host_array(value: torch.Tensor):
    """A graph input as numpy: on the CPU, float32 for floating tensors (the graph is float32;
    numpy has no bfloat16). Tensors of a GPU model come back to the host here, and onnxruntime's
    GPU providers copy them again (binding device memory directly is not done yet)."""
    value = value.detach()
    if value.is_floating_point() and value.dtype != torch.float32:
        value = value.float()
    return value.cpu().numpy()



def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise PersonalVLMError("the onnxruntime backend needs onnxruntime: pip install onnxruntime "
                               "(onnxruntime-gpu for CUDA / TensorRT), or use encoder_backend torch") from exc
    return onnxruntime


def _device_id(adapter) -> int:
    device = getattr(adapter, "device", None)
    return int(device.index or 0) if isinstance(device, torch.device) and device.type == "cuda" else 0


def make_onnxruntime_encoder(adapter, folder: Path, meta: dict, precision: str = "fp16",
                             progress: Progress | None = None, only: str | None = None) -> OnnxRuntimeEncoder:
    """An onnxruntime session on the export in ``folder``; ``only`` restricts it to one provider."""
    say = progress or say_to_stderr
    ort = _import_onnxruntime()
    available = ort.get_available_providers()
    engine_cache = folder / "onnxruntime-tensorrt"
    chain = provider_chain(available, precision, engine_cache, meta.get("profile"), _device_id(adapter))
    if only is not None:
        chain = [(name, opts) for name, opts in chain if name == only]
        if not chain:
            raise PersonalVLMError(f"onnxruntime has no {only} here (available: {', '.join(available)})")
    if chain[0][0] == TRT_EP:
        engine_cache.mkdir(parents=True, exist_ok=True)
        say(f"onnxruntime TensorRT EP ({precision}): the first run builds an engine (minutes), "
            f"cached in {engine_cache}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(folder / ONNX_NAME), options,
                                       providers=[name for name, _ in chain],
                                       provider_options=[opts for _, opts in chain])
    except Exception as exc:   # onnxruntime raises its own exception types for bad files
        raise PersonalVLMError(f"onnxruntime cannot load {folder / ONNX_NAME}: {exc}; delete {folder} "
                               "to export it again") from exc
    encoder = OnnxRuntimeEncoder(session, graph_for(adapter), meta, adapter.device, adapter.dtype)
    encoder.folder = folder
    if encoder.provider == TRT_EP:
        t0 = time.perf_counter()
        encoder(_warmup_tensors(adapter, meta.get("image_size")))                # build the engine now
        say(f"TensorRT EP engine ready in {time.perf_counter() - t0:.1f}s")
    say(f"onnxruntime encoder runs on {encoder.provider} (available: {', '.join(available)})")
    return encoder


def _warmup_tensors(adapter, image_size: int | None) -> dict[str, torch.Tensor]:
    from ..vlm.base import prepare_image
    from .export import SAMPLE_SIZE, sample_image

    size = image_size or SAMPLE_SIZE
    return adapter.preprocess(prepare_image(sample_image(size, size))).tensors


# ---- TensorRT ------------------------------------------------------------------------------

def engine_cache_key(onnx_sha256: str, gpu_name: str, trt_version: str, precision: str) -> str:
    """Key of a TensorRT engine: an engine is only valid for this graph, GPU, TensorRT and precision."""
    fields = {"onnx_sha256": onnx_sha256, "gpu": gpu_name, "tensorrt": trt_version, "precision": precision}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def engine_paths(engine_dir: Path, key: str) -> tuple[Path, Path]:
    """The engine file of ``key`` and the JSON that records what it was built from."""
    return Path(engine_dir) / f"{key[:32]}.engine", Path(engine_dir) / f"{key[:32]}.json"


def needs_rebuild(engine_dir: Path, key: str) -> bool:
    """True unless a complete engine built for exactly ``key`` is in ``engine_dir``."""
    engine, record = engine_paths(engine_dir, key)
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError):
        return True
    return (recorded.get("key") != key or not engine.is_file()
            or engine.stat().st_size != recorded.get("engine_bytes"))


def _import_tensorrt():
    try:
        import tensorrt
        tensorrt.Builder                                                         # the PyPI stub has none
    except Exception as exc:  # ImportError, or a broken install raising anything while loading libs
        raise PersonalVLMError(f"{TRT_INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc
    return tensorrt


def _require_cuda(adapter) -> torch.device:
    if not torch.cuda.is_available():
        raise PersonalVLMError("the tensorrt backend needs a CUDA GPU visible to torch (torch.cuda.is_available() "
                               "is False): install a CUDA build of torch (on Jetson, NVIDIA's JetPack wheel), "
                               "or use encoder_backend onnxruntime")
    device = getattr(adapter, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cuda", device.index or 0)
    return torch.device("cuda", torch.cuda.current_device())


def gpu_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


def _weak_fp16_available(trt) -> bool:
    # TensorRT ≥ 11 builds only in the network's own types (no FP16 builder flag).
    return hasattr(trt, "BuilderFlag") and hasattr(trt.BuilderFlag, "FP16")


class _Heartbeat:
    """Prints elapsed time while a long native call (an engine build) holds the thread."""

    def __init__(self, say: Progress, what: str, every_s: float = 30.0):
        self.say, self.what, self.every_s = say, what, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.perf_counter()
        while not self._stop.wait(self.every_s):
            self.say(f"{self.what}: {time.perf_counter() - t0:.0f}s so far")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _progress_monitor(trt, say: Progress):
    """A TensorRT progress monitor that reports build phases (TensorRT ≥ 10), or None."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                say(f"TensorRT: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True                                                           # never cancel

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_engine(onnx_path: Path, meta: dict, precision: str, engine_path: Path, record_path: Path,
                 key: str, key_fields: dict, progress: Progress | None = None) -> None:
    """Build a serialized TensorRT engine from the ONNX graph and write it with its record, atomically."""
    say = progress or say_to_stderr
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PersonalVLMError(f"TensorRT cannot parse {onnx_path}: {errors}; use encoder_backend onnxruntime")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, shapes in meta["profile"].items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    monitor = _progress_monitor(trt, say)
    if monitor is not None:
        config.progress_monitor = monitor
    say(f"building a TensorRT {trt.__version__} {precision} engine from {onnx_path.name} "
        "(first use on this GPU; this takes minutes)…")
    t0 = time.perf_counter()
    with _Heartbeat(say, "TensorRT engine build"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PersonalVLMError("TensorRT could not build the engine (see its log above); try precision fp32 "
                               "or encoder_backend onnxruntime")
    data = bytes(serialized)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(engine_path, data)
    _write_json_atomic(record_path, {"key": key, **key_fields, "engine_bytes": len(data),
                                     "build_s": round(time.perf_counter() - t0, 1),
                                     "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    say(f"TensorRT engine built in {time.perf_counter() - t0:.0f}s: {engine_path}")


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


class TensorRTEncoder(_Encoder):
    """A native TensorRT engine; buffers are torch CUDA tensors, run on torch's current stream."""

    backend = "tensorrt"
    provider = "TensorRT"

    def __init__(self, trt, engine_bytes: bytes, graph, meta, cuda: torch.device, device, dtype):
        super().__init__(graph, meta, device, dtype)
        self.cuda = cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise PersonalVLMError("TensorRT cannot load the cached engine (built by another TensorRT?); "
                                   "delete the tensorrt/ folder of the encoder cache to rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        self._lock = threading.Lock()                                            # one context, one call at a time

    def __call__(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = self._feeds(tensors)
        with self._lock, torch.cuda.device(self.cuda):
            buffers = {}
            for name in self.inputs:
                buffer = feeds[name].to(self.cuda, self._dtypes[name]).contiguous()
                if not self.context.set_input_shape(name, tuple(buffer.shape)):
                    profile = self.meta["profile"].get(name, {})
                    raise PersonalVLMError(
                        f"input {name} of shape {list(buffer.shape)} is outside the engine's profile "
                        f"(min {profile.get('min')}, max {profile.get('max')}); use a smaller image or "
                        "encoder_backend onnxruntime")
                self.context.set_tensor_address(name, buffer.data_ptr())
                buffers[name] = buffer
            out_name = self.outputs[0]
            out = torch.empty(tuple(self.context.get_tensor_shape(out_name)), dtype=self._dtypes[out_name],
                              device=self.cuda)                                  # (N, D)
            self.context.set_tensor_address(out_name, out.data_ptr())
            stream = torch.cuda.current_stream(self.cuda)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise PersonalVLMError("TensorRT failed to run the encoder engine; use encoder_backend onnxruntime")
            stream.synchronize()
        return out.to(self.device, self.dtype)


def make_tensorrt_encoder(adapter, folder: Path, meta: dict, precision: str = "fp16",
                          progress: Progress | None = None) -> TensorRTEncoder:
    say = progress or say_to_stderr
    trt = _import_tensorrt()
    cuda = _require_cuda(adapter)
    effective = precision
    if precision == "fp16" and not _weak_fp16_available(trt):
        say(f"TensorRT {trt.__version__} builds in the graph's own types and this graph is float32: "
            "the engine runs in fp32 (a mixed-precision ONNX from ModelOpt AutoCast would run in fp16)")
        effective = "fp32"
    fields = {"onnx_sha256": meta["onnx_sha256"], "gpu": gpu_name(cuda), "tensorrt": trt.__version__,
              "precision": effective}
    key = engine_cache_key(fields["onnx_sha256"], fields["gpu"], fields["tensorrt"], fields["precision"])
    engine_dir = folder / "tensorrt"
    engine_path, record_path = engine_paths(engine_dir, key)
    if needs_rebuild(engine_dir, key):
        build_engine(folder / ONNX_NAME, meta, effective, engine_path, record_path, key, fields, say)
    else:
        say(f"reusing the TensorRT engine {engine_path}")
    encoder = TensorRTEncoder(trt, engine_path.read_bytes(), graph_for(adapter), meta, cuda,
                              adapter.device, adapter.dtype)
    encoder.folder = folder
    encoder.precision = effective
    encoder.key = key
    return encoder


# ---- the one entry point ---------------------------------------------------------------------------

def make_encoder(adapter, backend: str, cache_dir: str | Path | None = None, precision: str = "fp16",
                 progress: Progress | None = None, image_size: int | None = None):
    """An encoder callable for ``adapter.encode_image(image, encoder=...)``, or None for ``torch``.

    The ONNX export happens on first use and is cached under ``cache_dir`` by the model fingerprint;
    later calls (and later processes) reuse it. ``precision`` applies to TensorRT (EP and native);
    the CUDA and CPU providers run the float32 graph.
    """
    if backend not in BACKENDS:
        raise PersonalVLMError(f"unknown encoder backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise PersonalVLMError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if backend == "torch":
        return None
    if backend == "onnxruntime":
        _import_onnxruntime()
        folder, meta = cached_export(adapter, cache_dir, image_size, progress)
        return make_onnxruntime_encoder(adapter, folder, meta, precision, progress)
    _import_tensorrt()                     # fail before a long export when TensorRT can't run anyway
    _require_cuda(adapter)
    folder, meta = cached_export(adapter, cache_dir, image_size, progress)
    return make_tensorrt_encoder(adapter, folder, meta, precision, progress)


__all__ = ["BACKENDS", "PRECISIONS", "OnnxRuntimeEncoder", "TensorRTEncoder", "cached_export",
           "default_cache_dir", "engine_cache_key", "engine_paths", "make_encoder", "needs_rebuild",
           "provider_chain"]
