"""``personal-vlm bench``: the figures that matter on a robot, measured in one run.

Medians over repeats (p95 where a tail matters) of: concept introduction per step; the frame
path's encoder per backend (torch, onnxruntime, tensorrt where present) at 224 and 448 px, plus
torch bfloat16; the matcher at 10 / 100 / 1,000 / 10,000 concepts; ``ask`` with 0 / 1 / 5 / 20
concepts stored; memory tokens per concept vs visual tokens per image; frame-path p95 with and
without verification; peak memory. Prints a table and writes JSON.

Without ``--model`` it measures a random-weight model built offline: ``--size tiny`` (seconds,
checks the machinery) or ``--size realistic`` (Qwen2.5-VL-3B dimensions, shortened language model:
figures that mean something on a CPU). With ``--model`` it measures that checkpoint, unchanged,
on any device.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import PersonalVLMError
from .options import BACKENDS, AssistantOptions
from .output import stderr_progress

MATCHER_SIZES = (10, 100, 1_000, 10_000)
ASK_SIZES = (0, 1, 5, 20)
FRAME_SIZES = (224, 448)


_say = stderr_progress("bench")


def _picture(size: int, seed: int) -> Image.Image:
    """A structured test picture: smooth background with a few coloured shapes (not noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1 - x], axis=-1) * 160 + 40                     # (S, S, 3)
    for _ in range(4):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        disk = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        base[disk] = rng.integers(0, 255, 3)
    return Image.fromarray(base.astype(np.uint8))


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")


def _timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def synthetic_model(size: str, cache_dir: Path) -> Path:
    """Build (once) the random-weight qwen2_5_vl model of ``size`` in the cache."""
    from .testing.tiny_model import build_tiny_model

    folder = cache_dir / f"qwen2_5_vl-{size}"
    if not (folder / "config.json").is_file():
        _say(f"building a {size} qwen2_5_vl model with RANDOM weights in {folder} (once)…")
        build_tiny_model(folder, "qwen2_5_vl", size=size)
    return folder


def _peak_memory() -> dict:
    peak = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _plant(assistant, first: int, count: int, frame_tokens: torch.Tensor, k: int, seed: int) -> None:
    """Store ``count`` concepts whose memories are K-token subsets of real visual tokens."""
    from .store import ConceptRecord

    generator = torch.Generator().manual_seed(seed)
    picture = _picture(64, seed)
    for i in range(count):
        idx = torch.randperm(frame_tokens.shape[0], generator=generator)[:k].sort().values
        memory = {"memory": frame_tokens[idx].float().cpu(), "positions": idx}
        now = time.time()
        record = ConceptRecord(f"planted {first + i}", "", [], {}, None, k, assistant.vlm.identity, now, now, {})
        assistant.add_concept(record, memory, [picture], overwrite=True)


def bench_introduction(assistant, repeats: int) -> dict:
    """Teach ``repeats`` concepts after one untimed warm-up teach.

    ``ego_vs_fingerprint``: Ego's own steps (everything after the shared image encoding, until
    the concept is usable) over R2P's fingerprint generation for the same image, median of the
    per-repeat ratios.
    """
    steps: dict[str, list[float]] = {}
    tokens, ratios = [], []
    assistant.teach("bench warm-up", [_picture(448, 99)], overwrite=True).wait_fingerprint()
    for r in range(repeats):
        result = assistant.teach(f"bench concept {r}", [_picture(448, 100 + r)], overwrite=True)
        result.wait_fingerprint()
        for step, seconds in result.timings.items():
            steps.setdefault(step, []).append(seconds)
        tokens.append(result.memory_tokens)
        if result.timings.get("fingerprint"):
            ratios.append((result.timings["usable"] - result.timings.get("encode", 0.0))
                          / result.timings["fingerprint"])
    assistant.forget("bench warm-up")
    return {"median_seconds": {s: _median(v) for s, v in steps.items()}, "memory_tokens": tokens,
            "ego_vs_fingerprint": _median(ratios)}


def _timing_projector(vlm, cache_dir: Path) -> Path:
    """An untrained ICPT projector for this model, of the default size: its timings are a trained
    one's (the same layers), its answers mean nothing."""
    from . import icpt

    path = cache_dir / f"icpt-untrained-{icpt.backbone_fingerprint(vlm).replace('/', '-')}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        projector = icpt.Projector(icpt.ProjectorConfig(vlm.hidden_size))
        tokens = vlm.encode_image(_picture(448, 3)).features.float()          # (N, D)
        projector.set_statistics(float(tokens.norm(dim=-1).mean()), tokens.mean(0))
        icpt.save_projector(path, projector.eval(), icpt.backbone_fingerprint(vlm))
    return path


def bench_icpt(vlm, store_dir: Path, repeats: int, cache_dir: Path, projector: str | None = None) -> dict:
    """ICPT's teach (the projector's pass beside encoding) and recognise times, beside Ego's."""
    from . import ego, icpt
    from .assistant import Assistant
    from .store import ConceptStore
    from .vlm import Memory

    path = Path(projector) if projector else _timing_projector(vlm, cache_dir)
    options = AssistantOptions(verification=False, verifier_model=None, icpt_projector=str(path),
                               recognition_method="icpt")
    with Assistant(vlm, ConceptStore(store_dir), progress=None, options=options) as assistant:
        if assistant.icpt_prompts is None:
            return {"unavailable": assistant.icpt_problem}
        teach = bench_introduction(assistant, repeats)          # the same series, with the projector's step
        names = [f"bench concept {r}" for r in range(repeats)]
        frame = vlm.encode_image(_picture(448, 448))
        prompt = assistant.icpt_prompt(names[0])
        memory = Memory.from_stored(assistant.stored_memory(names[0]), names[0])
        return {"projector": str(path) if projector else "untrained (timings only)",
                "teach_median_s": {s: teach["median_seconds"][s] for s in ("encode", "icpt", "usable")},
                "prompt_tokens": [assistant.icpt_prompt(n).tokens.shape[0] for n in names],
                "memory_tokens": [assistant.store.get(n).memory_tokens for n in names],
                "recognize_icpt_median_s": _median(_timed(lambda: icpt.recognize(vlm, frame, [prompt]), repeats)),
                "recognize_ego_median_s": _median(_timed(lambda: ego.recognize(vlm, frame, [memory]), repeats))}


def bench_encoders(vlm, backends: list[str], repeats: int, cache_dir: Path) -> tuple[dict, dict]:
    """Each backend at every frame size, and torch bfloat16 when the model is float32 (the vision
    tower under autocast, as ``encoder_backend: auto`` runs it). Also returns the encoders built
    (name → callable, None for the model's own tower), so later series can reuse them."""
    from .runtime.auto import TorchEncoder

    out: dict[str, dict] = {}
    built: dict[str, object] = {}
    series = list(backends)
    if vlm.dtype == torch.float32 and "torch" in backends:
        series.append("torch_bfloat16")
    for backend in series:
        entry: dict = {}
        try:
            encoder = None
            if backend == "torch_bfloat16":
                encoder = TorchEncoder(vlm, torch.bfloat16)
            elif backend != "torch":
                from .runtime.backends import make_encoder

                encoder = make_encoder(vlm, backend, cache_dir=cache_dir / "encoders", progress=_say)
            entry["provider"] = getattr(encoder, "provider", "torch")
            for size in FRAME_SIZES:
                picture = _picture(size, size)
                times = _timed(lambda: vlm.encode_image(picture, encoder=encoder), repeats)
                entry[str(size)] = {"median_s": _median(times), "p95_s": _p95(times),
                                    "visual_tokens": vlm.encode_image(picture, encoder=encoder).num_tokens}
                _say(f"encoder {backend} {size}px: {_median(times):.3f}s")
            built[backend] = encoder
        except (PersonalVLMError, ImportError) as exc:
            entry = {"unavailable": str(exc)}
            _say(f"encoder {backend}: unavailable ({exc})")
        out[backend] = entry
    return out, built


def bench_matcher(dim: int, frame_tokens: torch.Tensor, repeats: int, k: int = 32) -> dict:
    from .matcher import Matcher

    out = {}
    generator = torch.Generator().manual_seed(0)
    for count in MATCHER_SIZES:
        matcher = Matcher()
        bank = {f"c{i}": torch.randn(k, dim, generator=generator) for i in range(count)}
        matcher.set_concepts(bank)
        del bank
        times = _timed(lambda: matcher.score(frame_tokens), repeats)
        out[str(count)] = {"median_s": _median(times), "p95_s": _p95(times)}
        _say(f"matcher {count} concepts: {_median(times) * 1000:.1f} ms")
        del matcher
    return out


def bench_ask(assistant, frame_tokens: torch.Tensor, repeats: int, k: int) -> dict:
    out = {}
    picture = _picture(448, 7)
    for record in assistant.concepts():       # start from an empty library
        assistant.forget(record.name)
    stored = 0
    for count in ASK_SIZES:
        if count > stored:
            _plant(assistant, stored, count - stored, frame_tokens, k, seed=count)
            stored = count
        results = []
        times = _timed(lambda: results.append(assistant.ask("What is in this picture?", picture)), repeats, 0)
        out[str(count)] = {"median_s": _median(times), "concepts_in_context": len(results[-1].concepts)}
        _say(f"ask with {count} concepts stored: {_median(times):.2f}s")
    return out


NODE_PERIOD_S = 0.5          # the node's default process_rate_hz (2) as a period


def bench_verification(vlm, store, frames: int) -> dict:
    """Frame-path latency with every score uncertain, verification on vs off, default budget.

    Frames come at a camera period, as in the node: the node's default rate (2 Hz) or, when the
    frame path is slower, twice its median time without verification (the frame path half
    busy), so verification has the idle time the node leaves it. Two untimed warm-up frames
    precede each series. Throughput: verdicts delivered per second of the series.
    """
    from .assistant import Assistant

    out: dict = {}
    period = None
    for enabled in (False, True):
        # Thresholds outside the score range: every concept is "uncertain" on every frame.
        # No contrastive model: the random-weight VLM is measured, not a 1.7 GB CLIP fetched for it.
        options = AssistantOptions(accept_threshold=2.0, reject_threshold=-2.0, verification=enabled,
                                   verifier_model=None)
        with Assistant(vlm, store, progress=None, rebuild=False, options=options) as assistant:
            warm = [assistant.observe(_picture(224, 290 + i)).timings["total"] for i in range(2)]
            if period is None:
                period = max(NODE_PERIOD_S, 2.0 * _median(warm))
            assistant.verifier.stats.update(verified=0, busy_seconds=0.0)
            times = []
            start = time.perf_counter()
            for i in range(frames):
                due = start + i * period
                time.sleep(max(0.0, due - time.perf_counter()))
                times.append(assistant.observe(_picture(224, 300 + i)).timings["total"])
            elapsed = time.perf_counter() - start
            entry = {"median_s": _median(times), "p95_s": _p95(times)}
            if enabled:
                stats = assistant.verifier.stats
                entry.update(verified=stats["verified"], verifications_per_s=stats["verified"] / elapsed,
                             busy_fraction=stats["busy_seconds"] / elapsed, yields=stats["yields"],
                             budget=f"{options.verifications_per_second:g}/s, busy ≤ "
                                    f"{options.verification_busy_fraction:.0%}")
            out["on" if enabled else "off"] = entry
    out["frame_period_s"] = period
    out["warmup_frames"] = 2
    out["p95_ratio"] = out["on"]["p95_s"] / out["off"]["p95_s"]
    return out


def cpu_info() -> dict:
    """The CPU model and flags (Linux /proc/cpuinfo), and what torch dispatches to."""
    info: dict = {"capability": torch.backends.cpu.get_cpu_capability()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and "model" not in info:
            info["model"] = value.strip()
        elif key == "flags" and "flags" not in info:
            info["flags"] = value.split()
    flags = set(info.get("flags", ()))
    info["matmul_flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                        "amx_tile", "amx_bf16", "amx_int8") if f in flags]
    return info


def run_bench(model: str | None, size: str = "tiny", device: str = "auto", dtype: str = "float32",
              backends: tuple[str, ...] = BACKENDS, repeats: int = 3,
              frames: int = 10, cache_dir: Path | None = None, icpt_projector: str | None = None) -> dict:
    from .assistant import Assistant
    from .store import ConceptStore
    from .vlm import load_vlm

    cache_dir = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                     / "personal_vlm" / "bench")
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = model or str(synthetic_model(size, cache_dir))
    t0 = time.perf_counter()
    vlm = load_vlm(source, device=device, dtype=dtype)
    report = {
        "model": model or f"random-weight qwen2_5_vl ({size})",
        "random_weights": model is None, "size": None if model else size,
        "device": str(vlm.device), "dtype": str(vlm.dtype).replace("torch.", ""),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "cpu": cpu_info()},
        "repeats": repeats,
        "method": ("medians over the repeats (p95 where stated); one untimed warm-up run precedes every "
                   "timed series (teach, each encoder size, matcher; not ask); verification: two warm-up "
                   "frames, then frames at a camera period"), "load_seconds": time.perf_counter() - t0,
    }
    with tempfile.TemporaryDirectory(prefix="bench-store-") as store_dir:
        store = ConceptStore(store_dir)
        assistant = Assistant(vlm, store, progress=None, options=AssistantOptions(verification=False, verifier_model=None))
        try:
            _say("concept introduction…")
            report["introduction"] = bench_introduction(assistant, repeats)
            _say("ICPT teach and recognise…")
            report["icpt"] = bench_icpt(vlm, Path(store_dir) / "icpt", repeats, cache_dir, icpt_projector)
            _say("encoders…")
            report["encoder"], encoders = bench_encoders(vlm, list(backends), repeats, cache_dir)
            at_448 = {name: e["448"]["median_s"] for name, e in report["encoder"].items() if "448" in e}
            if at_448:
                report["fastest_encoder_448"] = min(at_448, key=at_448.get)   # what encoder_backend auto picks
            fastest = encoders.get(report.get("fastest_encoder_448"))
            if fastest is not None:
                # Teaching goes through the frame path's encoder: the same series with the fastest one.
                _say(f"concept introduction through the {report['fastest_encoder_448']} encoder…")
                with Assistant(vlm, ConceptStore(Path(store_dir) / "fastest"), progress=None, encoder=fastest,
                               options=AssistantOptions(verification=False, verifier_model=None)) as through:
                    report["introduction_fastest_encoder"] = {
                        "encoder": report["fastest_encoder_448"], **bench_introduction(through, repeats)}
            frame = vlm.encode_image(_picture(448, 448))
            report["tokens"] = {
                "per_image_448": frame.num_tokens,
                "per_concept_mean": float(np.mean(report["introduction"]["memory_tokens"])),
            }
            _say("matcher…")
            report["matcher"] = bench_matcher(vlm.hidden_size, frame.features.float(), repeats)
            encoder_448 = [e["448"]["median_s"] for e in report["encoder"].values() if "448" in e]
            if encoder_448:
                report["matcher_10000_vs_fastest_encoder_448"] = (
                    report["matcher"]["10000"]["median_s"] / min(encoder_448))
            _say("ask…")
            report["ask"] = bench_ask(assistant, frame.features, max(1, repeats // 2),
                                      assistant.profile.max_memory_tokens)
            _say("verification on the frame path…")
            report["verification"] = bench_verification(vlm, store, frames)
        finally:
            assistant.close()
    torch_448 = report["encoder"].get("torch", {}).get("448", {}).get("median_s")
    ort_448 = report["encoder"].get("onnxruntime", {}).get("448", {}).get("median_s")
    if torch_448 and ort_448:
        report["onnxruntime_speedup_448"] = torch_448 / ort_448
    report["peak_memory"] = _peak_memory()
    report["seconds"] = time.perf_counter() - t0
    return report


def format_table(report: dict) -> str:
    rows = [("model", report["model"]), ("device / dtype", f"{report['device']} / {report['dtype']}")]
    cpu = report["machine"].get("cpu", {})
    rows.append(("cpu", f"{cpu.get('model', '?')} ({report['machine']['cpu_count']} cores; "
                        f"{' '.join(cpu.get('matmul_flags', [])) or 'no flags read'})"))
    rows.append(("method", f"median of {report['repeats']} after 1 warm-up run"))
    for step, seconds in report["introduction"]["median_seconds"].items():
        rows.append((f"teach: {step}", f"{seconds:.3f} s"))
    intro = report["introduction"]
    rows.append(("teaching: Ego usable vs R2P fingerprint", f"{intro['ego_vs_fingerprint']:.2f}"))
    fast = report.get("introduction_fastest_encoder")
    if fast:
        usable, base = fast["median_seconds"]["usable"], intro["median_seconds"]["usable"]
        rows.append((f"teach through {fast['encoder']}: encode / usable",
                     f"{fast['median_seconds']['encode']:.3f} s / {usable:.3f} s ({usable / base:.2f}× of torch)"))
    ip = report.get("icpt") or {}
    if "teach_median_s" in ip:
        t = ip["teach_median_s"]
        rows.append(("ICPT teach: encode / prompt / usable", f"{t['encode']:.3f} s / {t['icpt'] * 1000:.1f} ms / "
                                                            f"{t['usable']:.3f} s ({ip['projector']})"))
        rows.append(("ICPT prompt / Ego memory tokens", f"{np.mean(ip['prompt_tokens']):.1f} / "
                                                        f"{np.mean(ip['memory_tokens']):.1f}"))
        rows.append(("recognise one concept: ICPT / Ego", f"{ip['recognize_icpt_median_s']:.3f} s / "
                                                          f"{ip['recognize_ego_median_s']:.3f} s"))
    elif ip:
        rows.append(("ICPT", f"unavailable: {ip['unavailable']}"))
    for backend, entry in report["encoder"].items():
        if "unavailable" in entry:
            rows.append((f"encoder {backend}", "unavailable"))
            continue
        for size in FRAME_SIZES:
            if str(size) in entry:
                rows.append((f"encoder {backend} {size}px", f"{entry[str(size)]['median_s']:.3f} s"))
    if "onnxruntime_speedup_448" in report:
        rows.append(("onnxruntime vs torch fp32, 448px", f"{report['onnxruntime_speedup_448']:.2f}×"))
    if "fastest_encoder_448" in report:
        rows.append(("fastest encoder here, 448px", report["fastest_encoder_448"]))
    for count, entry in report["matcher"].items():
        rows.append((f"matcher {int(count):,} concepts", f"{entry['median_s'] * 1000:.1f} ms"))
    if "matcher_10000_vs_fastest_encoder_448" in report:
        rows.append(("matcher 10k / encoder 448px", f"{report['matcher_10000_vs_fastest_encoder_448']:.1%}"))
    for count, entry in report["ask"].items():
        rows.append((f"ask, {count} stored ({entry['concepts_in_context']} in context)",
                     f"{entry['median_s']:.2f} s"))
    tokens = report["tokens"]
    rows.append(("tokens per concept / per image", f"{tokens['per_concept_mean']:.1f} / {tokens['per_image_448']}"))
    v = report["verification"]
    rows.append(("frame p95, verification off / on",
                 f"{v['off']['p95_s']:.3f} s / {v['on']['p95_s']:.3f} s ({v['p95_ratio']:.2f}×), "
                 f"a frame every {v['frame_period_s']:.2f} s"))
    rows.append(("verification throughput",
                 f"{v['on']['verifications_per_s']:.2f} /s ({v['on']['verified']} verdicts, "
                 f"busy {v['on']['busy_fraction']:.0%}, {v['on']['budget']})"))
    rows.append(("peak RSS", f"{report['peak_memory']['rss_mb']:.0f} MB"))
    if "cuda_allocated_mb" in report["peak_memory"]:
        rows.append(("peak CUDA memory", f"{report['peak_memory']['cuda_allocated_mb']:.0f} MB"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
