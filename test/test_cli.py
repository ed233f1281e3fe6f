"""The ``personal-vlm`` command, run as a user runs it: a separate process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from personal_vlm_node.store import ConceptStore
from personal_vlm_node.testing.kit import photo_file


@pytest.fixture
def cli(tiny_checkpoints, tmp_path):
    store = tmp_path / "store"

    def run(*args, family="qwen2_5_vl", check=True):
        cmd = [sys.executable, "-m", "personal_vlm_node.cli", "--model", str(tiny_checkpoints[family]),
               "--store", str(store), "--device", "cpu", "--dtype", "float32", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if check and done.returncode != 0:
            raise AssertionError(f"exit {done.returncode}: {done.stderr}")
        return done

    run.store = store
    return run


def test_teach_list_ask_recognize_forget_with_json(cli, tmp_path):
    mug = photo_file(tmp_path / "mug.png", 1, 240, 160)
    cat = photo_file(tmp_path / "cat.png", 2, 240, 160)
    taught = json.loads(cli("--json", "teach", "my mug", mug, "--category", "mug").stdout)
    assert set(taught) >= {"name", "memory_tokens", "keywords", "attributes", "seconds"}
    assert taught["name"] == "my mug" and taught["memory_tokens"] > 0
    json.loads(cli("--json", "teach", "Fluffy", cat, mug, "--roi", "0,0,120,80").stdout)

    listed = json.loads(cli("--json", "list").stdout)["concepts"]
    assert [c["name"] for c in listed] == ["Fluffy", "my mug"]
    assert set(listed[0]) == {"name", "category", "memory_tokens", "keywords", "created", "damaged"}
    assert listed[0]["damaged"] is None
    assert listed[1]["category"] == "mug"

    asked = json.loads(cli("--json", "ask", "Where is my mug?", "--image", mug).stdout)
    assert set(asked) == {"answer", "concepts", "seconds"} and "my mug" in asked["concepts"]

    recognized = json.loads(cli("--json", "recognize", cat).stdout)["concepts"]
    assert {r["name"] for r in recognized} == {"Fluffy", "my mug"}
    assert all(0 <= r["p_yes"] <= 1 and isinstance(r["present"], bool) for r in recognized)

    assert json.loads(cli("--json", "forget", "my mug").stdout) == {"forgotten": "my mug", "left_behind": []}
    assert [c["name"] for c in json.loads(cli("--json", "list").stdout)["concepts"]] == ["Fluffy"]


@pytest.mark.parametrize("args, message", [
    (["teach", "a/b", "IMG"], "name"),
    (["teach", "ok", "missing.png"], "not found"),
    (["forget", "nobody"], "no concept"),
    (["ask", "", "--image", "IMG"], "empty"),
    (["teach", "ok", "IMG", "--roi", "1,2,3"], "--roi"),
])
def test_user_errors_exit_2_with_one_line_and_no_traceback(cli, tmp_path, args, message):
    img = photo_file(tmp_path / "img.png", 3, 240, 160)
    done = cli(*[img if a == "IMG" else a for a in args], check=False)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_weights_exit_2_with_how_to_get_them(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    img = photo_file(tmp_path / "img.png", 4, 240, 160)
    done = subprocess.run([sys.executable, "-m", "personal_vlm_node.cli", "--store", str(tmp_path / "s"),
                           "teach", "x", img], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert "`hf download " in done.stderr and "Traceback" not in done.stderr


def test_calibrate_writes_a_profile_with_the_best_layers(cli, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(2):
        photo_file(images / f"s{i}.png", 10 + i, 240, 160)
        mask = np.zeros((160, 240), np.uint8)
        mask[40:120, 60:180] = 255
        Image.fromarray(mask).save(masks / f"s{i}.png")
    out = tmp_path / "profile.yaml"
    result = json.loads(cli("--json", "calibrate", "--images", str(images), "--masks", str(masks),
                            "--keep", "2", "--out", str(out)).stdout)
    assert len(result["layers"]) == 2
    rates = {int(k): v for k, v in result["mask_hit_rate"].items()}
    assert sorted(rates) == [0, 1, 2, 3] and all(0 <= v <= 1 for v in rates.values())
    best = sorted(rates, key=lambda l: -rates[l])[:2]
    assert sorted(best) == result["layers"]
    assert "layers:" in out.read_text()


def test_killed_teach_leaves_every_concept_whole(cli, tiny_checkpoints, tmp_path, family):
    img = photo_file(tmp_path / "img.png", 5, 240, 160)
    cli("teach", "base", img, family=family)
    rng = random.Random(0)
    for attempt in range(3):
        cmd = [sys.executable, "-m", "personal_vlm_node.cli", "--model", str(tiny_checkpoints[family]),
               "--store", str(cli.store), "--device", "cpu", "--dtype", "float32",
               "teach", f"c{attempt % 2}", img, img, "--overwrite"]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 9.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
        store = ConceptStore(cli.store)
        for record in store.list():
            memory = store.load_memory(record.name)
            assert memory["memory"].shape[0] == record.memory_tokens
            assert len(store.load_images(record.name)) == (1 if record.name == "base" else 2)
        assert "base" in store
        assert not any((cli.store / "tmp").iterdir()) if (cli.store / "tmp").exists() else True


def test_detect_finds_a_taught_concept_on_every_family(cli, tmp_path, family):
    mug = photo_file(tmp_path / "mug.png", 22, 240, 160)
    cli("teach", "my mug", mug, family=family)
    [detection] = json.loads(cli("--json", "detect", mug, family=family).stdout)["detections"]
    assert detection["name"] == "my mug" and detection["score"] == pytest.approx(1.0, abs=1e-3)
    onnx = json.loads(cli("--json", "detect", mug, "--backend", "onnxruntime", "--engine-cache",
                          str(tmp_path / "engines"), family=family).stdout)
    assert [d["name"] for d in onnx["detections"]] == ["my mug"]
    assert onnx["detections"][0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_detect_finds_a_taught_concept_on_an_image_a_folder_and_a_gif(cli, tmp_path):
    mug = photo_file(tmp_path / "mug.png", 21, 240, 160)
    cli("teach", "my mug", mug)
    single = json.loads(cli("--json", "detect", mug).stdout)
    assert single["frame"] == "mug.png"
    [detection] = single["detections"]
    assert detection["name"] == "my mug" and detection["source"] == "match"
    assert detection["score"] == pytest.approx(1.0, abs=1e-3)
    x, y, w, h = detection["box"]
    assert w > 0 and h > 0 and x + w <= 240.5 and y + h <= 160.5

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.open(mug).save(frames / f"{i:03d}.png")
    rows = [json.loads(line) for line in cli("--json", "detect", str(frames)).stdout.splitlines()]
    assert [r["frame"] for r in rows] == ["000.png", "001.png", "002.png"]
    assert [len(r["detections"]) for r in rows] == [0, 1, 1]      # k=2 of n=3 over a sequence
    assert rows[1]["detections"][0]["track_id"] == rows[2]["detections"][0]["track_id"]

    gif = tmp_path / "clip.gif"
    pictures = [Image.open(photo_file(tmp_path / f"g{i}.png", 30 + i, 240, 160)).convert("RGB") for i in range(3)]
    pictures[0].save(gif, save_all=True, append_images=pictures[1:])
    rows = [json.loads(line) for line in cli("--json", "detect", str(gif)).stdout.splitlines()]
    assert len(rows) == 3 and rows[0]["frame"] == "clip.gif#0"

    missing = cli("detect", str(tmp_path / "nowhere.png"), check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_export_encoder_writes_an_onnx_graph_that_matches_torch(cli, tmp_path):
    out = tmp_path / "encoder"
    done = cli("--json", "export-encoder", "--out", str(out), family="internvl")
    assert (out / "encoder.onnx").is_file() and (out / "encoder.json").is_file()
    report = json.loads(done.stdout)
    assert report["max_abs_error"] < 1e-4


def _no_model(tmp_path, *args):
    """The command against a model that does not exist: only checks made before loading can answer."""
    cmd = [sys.executable, "-m", "personal_vlm_node.cli", "--model", str(tmp_path / "no-such-model"),
           "--store", str(tmp_path / "store"), "--device", "cpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["teach", "a/b", "IMG"], "must not contain '/'"),
    (["teach", "ok", "missing.png"], "not found"),
    (["teach", "ok", "IMG", "--roi", "0,0,nan,10"], "finite"),
    (["teach", "ok", "IMG", "--roi", "500,500,5,5"], "outside"),
    (["teach", "ok", "IMG", "IMG", "--roi", "0,0,5,5", "--roi", "0,0,5,5", "--roi", "0,0,5,5"], "regions of interest"),
    (["teach", "ok", "IMG", "--category", "mug\x1b[31m"], "category"),
    (["teach", "\u200d", "IMG"], "invisible"),
    (["ask", "what?", "--image", "missing.png"], "not found"),
    (["recognize", "missing.png"], "not found"),
    (["recognize", "IMG", "--concept", "never taught"], "no concept named 'never taught'"),
    (["detect", "missing.gif"], "not found"),
    (["detect", "missing.mp4"], "not found"),
])
def test_name_path_and_roi_errors_are_reported_before_the_model_loads(tmp_path, args, message):
    img = photo_file(tmp_path / "img.png", 3, 240, 160)
    done = _no_model(tmp_path, *[img if a == "IMG" else a for a in args])
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "model folder not found" not in done.stderr
    assert "Traceback" not in done.stderr and "loading" not in done.stderr


def test_list_escapes_control_characters_stored_by_older_versions(cli, tmp_path):
    import sqlite3

    mug = photo_file(tmp_path / "mug.png", 5, 240, 160)
    cli("teach", "mug", mug, "--no-wait")
    with sqlite3.connect(cli.store / "concepts.db") as db:
        db.execute("UPDATE concepts SET category=? WHERE name='mug'", ("cup\x1b[2J",))
    listed = cli("list").stdout
    assert "\x1b" not in listed and "cup" in listed


def test_list_prints_a_joined_emoji_name_as_typed_and_forget_takes_it_back(tmp_path):
    import torch

    from personal_vlm_node.store import ConceptRecord

    name = "\U0001F469\u200d\U0001F52C kit"                 # 👩‍🔬 kit: woman + ZWJ + microscope
    store = ConceptStore(tmp_path / "store")
    store.add(ConceptRecord(name=name, category="lab", keywords=["white\u202e"], fingerprint={},
                            fingerprint_complete=None, memory_tokens=4, model_identity="tiny"),
              {"tokens": torch.zeros(4, 8)}, [Image.new("RGB", (6, 5))])   # (K_c, D)
    listed = _no_model(tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.rstrip("\n").split("\t") == [name, "lab", "4 tokens", "white\\u202e"]  # override escaped
    as_json = _no_model(tmp_path, "--json", "list")
    assert json.loads(as_json.stdout)["concepts"][0]["name"] == name
    assert "\\u200d" not in as_json.stdout                           # real characters, not JSON escapes

    forgotten = _no_model(tmp_path, "forget", listed.stdout.split("\t")[0])
    assert forgotten.returncode == 0, forgotten.stderr
    assert forgotten.stdout.strip() == f"forgot '{name}'"
    assert ConceptStore(tmp_path / "store").names() == []


def test_detect_reads_frames_in_natural_order_and_skips_an_unreadable_one(cli, tmp_path):
    mug = photo_file(tmp_path / "mug.png", 21, 240, 160)
    cli("teach", "my mug", mug, "--no-wait")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in (1, 2, 10):
        Image.open(mug).save(frames / f"frame{i}.png")
    (frames / "frame3.png").write_bytes(b"not a picture")
    done = cli("--json", "detect", str(frames))
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["frame"] for r in rows] == ["frame1.png", "frame2.png", "frame10.png"]
    assert "frame3.png" in done.stderr and "skipped" in done.stderr


def test_detect_on_a_truncated_gif_exits_2_with_a_message(cli, tmp_path):
    gif = tmp_path / "clip.gif"
    pictures = [Image.open(photo_file(tmp_path / f"g{i}.png", 30 + i, 240, 160)).convert("RGB") for i in range(3)]
    pictures[0].save(gif, save_all=True, append_images=pictures[1:])
    gif.write_bytes(gif.read_bytes()[:200])
    done = cli("detect", str(gif), check=False)
    assert done.returncode == 2, done.stderr
    assert "clip.gif" in done.stderr and "Traceback" not in done.stderr


def test_recognize_says_how_many_of_the_concepts_it_checked(cli, tmp_path):
    pictures = [photo_file(tmp_path / f"p{i}.png", 40 + i, 240, 160) for i in range(7)]
    for i, picture in enumerate(pictures):
        cli("teach", f"thing {i}", picture, "--no-wait")
    # Every concept while they fit in one prompt (the default budget holds all 7) …
    payload = json.loads(cli("--json", "recognize", pictures[0]).stdout)
    assert payload["taught"] == payload["checked"] == len(payload["concepts"]) == 7
    # … and the best-matching ones beyond that.
    profile = tmp_path / "profile.yaml"
    profile.write_text("max_concepts_in_context: 3\n")
    done = cli("--profile", str(profile), "recognize", pictures[0])
    assert "checked the 3 best-matching of 7 concepts" in done.stdout + done.stderr
    payload = json.loads(cli("--profile", str(profile), "--json", "recognize", pictures[0]).stdout)
    assert payload["taught"] == 7 and payload["checked"] == len(payload["concepts"]) == 3
    everything = json.loads(cli("--json", "recognize", pictures[0], "--all").stdout)
    assert everything["checked"] == 7


def test_teach_no_wait_returns_without_a_fingerprint(cli, tmp_path):
    mug = photo_file(tmp_path / "mug.png", 6, 240, 160)
    taught = json.loads(cli("--json", "teach", "mug", mug, "--no-wait").stdout)
    assert taught["attributes"] == {}
    assert ConceptStore(cli.store).get("mug").fingerprint_complete is None


def test_detect_on_one_picture_with_verify_waits_for_the_verdicts(cli, tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text("max_memory_tokens: 8\nmin_memory_tokens: 2\naccept_threshold: 0.999\n"
                       "reject_threshold: 0.0\n")
    cli("--profile", str(profile), "teach", "mug", photo_file(tmp_path / "mug.png", 7, 240, 160), "--no-wait")
    other = photo_file(tmp_path / "other.png", 8, 240, 160)           # scores between the thresholds: uncertain
    [row] = [json.loads(line) for line in
             cli("--profile", str(profile), "--json", "detect", other, "--verify").stdout.splitlines()]
    assert row["unverified"] == []
    assert all(d["source"] in ("ego", "r2p") for d in row["detections"])


def test_node_options_are_accepted_before_and_after_the_verb():
    from personal_vlm_node.cli import NODE_TIMEOUT_S, build_parser

    parse = build_parser().parse_args
    for argv in (["node", "--timeout", "60", "-n", "robot1", "list"], ["node", "list", "--timeout", "60", "-n", "robot1"],
                 ["node", "--namespace", "robot1", "ask", "where?", "--timeout", "60"]):
        args = parse(argv)
        assert (args.timeout, args.namespace, args.node_name) == (60.0, "robot1", "personal_vlm"), argv
    args = parse(["node", "--timeout", "5", "forget", "mug", "--node-name", "vlm"])
    assert (args.timeout, args.namespace, args.node_name) == (5.0, "", "vlm")
    args = parse(["node", "watch"])
    assert (args.timeout, args.namespace, getattr(args, "json", False)) == (NODE_TIMEOUT_S, "", False)
    assert parse(["node", "list", "--json"]).json and parse(["--json", "node", "list"]).json
