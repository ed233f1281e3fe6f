"""`personal-vlm bench` measures every figure it promises (on a tiny model: machinery, not speed)."""

from __future__ import annotations

import json

from personal_vlm_node import bench
from personal_vlm_node.cli import main


def test_bench_writes_every_figure_and_prints_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    code = main(["--device", "cpu", "bench", "--backends", "torch,tensorrt", "--repeats", "1",
                 "--frames", "3", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["random_weights"] is True and report["size"] == "tiny"
    assert set(report["introduction"]["median_seconds"]) >= {
        "encode", "describe", "attention", "store", "usable", "fingerprint", "fingerprint_complete"}
    for size in bench.FRAME_SIZES:
        assert report["encoder"]["torch"][str(size)]["median_s"] > 0
        assert report["encoder"]["torch_bfloat16"][str(size)]["median_s"] > 0
    assert "unavailable" in report["encoder"]["tensorrt"]          # no TensorRT on this machine
    assert sorted(int(c) for c in report["matcher"]) == list(bench.MATCHER_SIZES)
    assert report["matcher_10000_vs_fastest_encoder_448"] > 0
    # Every stored concept while they fit the context budget (20 tiny memories do).
    assert {int(c): e["concepts_in_context"] for c, e in report["ask"].items()} == {0: 0, 1: 1, 5: 5, 20: 20}
    assert report["tokens"]["per_concept_mean"] <= report["tokens"]["per_image_448"]
    assert report["verification"]["p95_ratio"] > 0 and report["verification"]["on"]["p95_s"] > 0
    assert report["verification"]["frame_period_s"] >= bench.NODE_PERIOD_S
    assert report["verification"]["on"]["verifications_per_s"] >= 0
    assert report["introduction"]["ego_vs_fingerprint"] > 0
    assert report["fastest_encoder_448"] in ("torch", "torch_bfloat16")
    fast = report.get("introduction_fastest_encoder")
    if report["fastest_encoder_448"] == "torch":                   # the series is the first one
        assert fast is None
    else:                                                         # teaching repeated through it
        assert fast["encoder"] == "torch_bfloat16" and fast["median_seconds"]["usable"] > 0
        assert fast["median_seconds"]["encode"] > 0 and len(fast["memory_tokens"]) == 1
    assert report["machine"]["cpu"]["capability"] and "warm-up" in report["method"]
    assert report["peak_memory"]["rss_mb"] > 0
    # ICPT: the projector's pass beside encoding when teaching, and one concept recognised each way.
    ip = report["icpt"]
    assert ip["projector"] == "untrained (timings only)" and 0 < ip["teach_median_s"]["icpt"] < ip["teach_median_s"]["usable"]
    assert all(4 <= t <= 16 for t in ip["prompt_tokens"]) and ip["memory_tokens"]
    assert ip["recognize_icpt_median_s"] > 0 and ip["recognize_ego_median_s"] > 0
    table = capsys.readouterr().out
    assert "ICPT teach: encode / prompt / usable" in table and "recognise one concept: ICPT / Ego" in table
    assert "matcher 10,000 concepts" in table and "frame p95, verification off / on" in table
    assert "teaching: Ego usable vs R2P fingerprint" in table and "verification throughput" in table


def test_bench_runs_unchanged_on_a_given_checkpoint_of_other_families(tiny_checkpoints, tmp_path):
    for family in ("internvl", "idefics3", "qwen3_vl", "smolvlm"):
        report = bench.run_bench(str(tiny_checkpoints[family]), device="cpu", dtype="float32",
                                 backends=("torch", "onnxruntime"), repeats=1, frames=2,
                                 cache_dir=tmp_path / family)
        assert report["random_weights"] is False and report["model"] == str(tiny_checkpoints[family])
        assert report["encoder"]["onnxruntime"]["provider"] == "CPUExecutionProvider"
        assert report["onnxruntime_speedup_448"] > 0
        assert report["ask"]["20"]["concepts_in_context"] == 20      # all fit the context budget
        assert report["icpt"]["recognize_icpt_median_s"] > 0        # every family takes ICPT's prompts


def test_bench_node_measures_the_frame_path_with_and_without_overlay_subscribers(tiny_checkpoints, tmp_path, capsys):
    import pytest

    pytest.importorskip("rclpy")
    from personal_vlm_node.ros import bench as bench_node

    out = tmp_path / "node.json"
    code = main(["--model", str(tiny_checkpoints["qwen2_5_vl"]), "--device", "cpu", "bench", "--node",
                 "--seconds", "3", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert list(report["sizes"]) == ["640x480", "1280x720"]
    # Fast DDS's default transport loses most large best-effort frames (docs/ros.md), so a short
    # phase may see none: the figures are checked where frames arrived, and some must have.
    overlays = 0
    for size in report["sizes"].values():
        assert set(size) == set(bench_node.PHASES) | {"raw_frame_bytes"}
        assert size["no overlay subscriber"]["overlay_bytes_per_frame"] is None
        raw = size["raw overlay subscriber"]["overlay_bytes_per_frame"]
        jpeg = size["JPEG overlay subscriber"]["overlay_bytes_per_frame"]
        assert raw in (None, size["raw_frame_bytes"])
        assert jpeg is None or 0 < jpeg < size["raw_frame_bytes"] / 5
        overlays += (raw is not None) + (jpeg is not None)
    assert sum(size[p]["detections_hz"] for size in report["sizes"].values() for p in bench_node.PHASES) > 0
    assert overlays > 0
    assert "JPEG overlay subscriber" in capsys.readouterr().out
