"""The synthetic world: deterministic, exact masks, look-alikes, and the layouts eval reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from personal_vlm_node.evaluation import load_dataset
from personal_vlm_node.testing import toy_world as tw


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    a = tw.write_dataset(tmp_path / "a", seed=3, concepts=2, layout="generic", references=1, tests=2)
    b = tw.write_dataset(tmp_path / "b", seed=3, concepts=2, layout="generic", references=1, tests=2)
    c = tw.write_dataset(tmp_path / "c", seed=4, concepts=2, layout="generic", references=1, tests=2)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)


def test_each_mask_is_exactly_the_pixels_its_object_changes():
    rng = np.random.default_rng(5)
    looks = [tw.random_look(rng) for _ in range(3)]
    spec = tw.scene(rng, looks, occlusion=1.0)
    full = tw.render(spec)
    for i in range(len(looks)):
        without = tw.SceneSpec(**{**spec.__dict__, "objects": [p for j, p in enumerate(spec.objects) if j != i]})
        changed = np.any(np.asarray(full.image) != np.asarray(tw.render(without).image), axis=-1)
        # Objects drawn later cover this one: remove it and those pixels show what lies below.
        assert np.array_equal(changed, full.masks[i])
        if full.boxes[i] is not None:
            ys, xs = np.nonzero(full.masks[i])
            assert full.boxes[i] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert all(not (full.masks[i] & full.masks[j]).any() for i in range(3) for j in range(i + 1, 3))


def test_an_occluder_takes_pixels_out_of_the_mask():
    rng = np.random.default_rng(1)
    look = tw.random_look(rng)
    spec = tw.scene(rng, [look], occlusion=1.0)
    clear = tw.SceneSpec(**{**spec.__dict__, "occluders": []})
    assert tw.render(spec).masks[0].sum() < tw.render(clear).masks[0].sum()


def test_lookalikes_share_category_and_colour_but_differ():
    rng = np.random.default_rng(0)
    for _ in range(50):
        look = tw.random_look(rng)
        twin = tw.lookalike(rng, look)
        assert twin.is_lookalike_of(look)
        assert (twin.pattern, twin.color2, twin.mark) != (look.pattern, look.color2, look.mark)


@pytest.mark.parametrize("layout", ["yollava", "perva", "generic"])
def test_every_layout_loads_in_eval_with_its_lookalike_negatives_listed(tmp_path, layout):
    root = tw.write_dataset(tmp_path / layout, seed=2, concepts=4, layout=layout, references=2, tests=3)
    data = load_dataset(root, "auto", shots=2)
    meta = json.loads((root / "toy_world.json").read_text())
    assert data.layout == layout
    assert sorted(data.concepts) == sorted(meta["concepts"])
    queries = {q.key for q in data.queries}
    assert meta["lookalike_pairs"], "concepts come in look-alike pairs"
    for image, concept in meta["lookalike_pairs"]:
        assert image in queries
        assert concept not in next(q.concepts for q in data.queries if q.key == image)
    if layout == "generic":
        assert any(len(q.concepts) >= 2 for q in data.queries)
        assert any(not q.concepts for q in data.queries)


def test_calibrate_layout_pairs_each_image_with_its_subject_mask(tmp_path):
    from PIL import Image

    root = tw.write_dataset(tmp_path / "cal", seed=1, concepts=1, layout="calibrate")
    images = sorted((root / "images").glob("*.png"))
    assert len(images) == 4
    meta = json.loads((root / "toy_world.json").read_text())
    for image in images:
        mask = np.asarray(Image.open(root / "masks" / image.name)) > 127
        x0, y0, x1, y1 = meta["images"][f"images/{image.name}"][0]["box"]
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_the_command_line_writes_a_dataset_and_refuses_bad_input(tmp_path, capsys):
    assert tw.main([str(tmp_path / "w"), "--seed", "1", "--concepts", "2", "--layout", "yollava",
                    "--tests", "1", "--references", "1"]) == 0
    assert "look-alike negative pairs" in capsys.readouterr().out
    assert tw.main([str(tmp_path / "x"), "--concepts", "0"]) == 2


def test_the_toy_report_splits_lookalikes_by_what_tells_them_apart(tmp_path):
    from personal_vlm_node.evaluation import PROGRESS_FILE
    from personal_vlm_node.testing.toy_report import lookalike_kinds, split_figures

    world = tw.write_dataset(tmp_path / "w", seed=11, concepts=6, layout="yollava", references=1, tests=4)
    meta = json.loads((world / "toy_world.json").read_text())
    kinds = lookalike_kinds(meta)
    assert set(kinds.values()) <= {"pattern", "sticker"} and len(kinds) == len(meta["lookalike_pairs"])
    for (query, concept), kind in kinds.items():
        look = meta["concepts"][concept]
        twins = [o for o in meta["images"][query] if o["category"] == look["category"] and o["color"] == look["color"]]
        if kind == "sticker":
            assert all(o["pattern"] == look["pattern"] and o["color2"] == look["color2"] for o in twins)
    # A run that says yes to every look-alike: the look-alike splits lose exactly their negatives.
    hard = {tuple(p) for p in meta["lookalike_pairs"]}
    run = tmp_path / "run"
    run.mkdir()
    with open(run / PROGRESS_FILE, "w") as f:
        for query in sorted({q for q, _ in hard}):
            pairs = [{"concept": c, "label": False, "predicted": True} for q, c in sorted(hard) if q == query]
            f.write(json.dumps({"query": query, "concepts": [], "pairs": pairs}) + "\n")
    figures = split_figures(world, run)
    counted = sum(figures[f"lookalike_{k}"]["negatives"] for k in ("pattern", "sticker") if f"lookalike_{k}" in figures)
    assert counted == len(hard) and figures["lookalike"]["negative_accuracy"] == 0.0
