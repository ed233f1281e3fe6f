"""``personal-vlm eval``: metrics, dataset layouts, the run's files, resuming."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from personal_vlm_node import cli, evaluation
from personal_vlm_node.assistant import Assistant
from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.evaluation import Counts, EvalOptions, load_dataset, recognition_metrics
from personal_vlm_node.profiles import ModelProfile
from personal_vlm_node.r2p import ImageTextSimilarity
from personal_vlm_node.store import ConceptStore
from personal_vlm_node.testing.kit import photo
from personal_vlm_node.testing.tiny_clip import build_tiny_clip
from personal_vlm_node.vlm import Memory


def _write(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(seed, 96, 64).save(path)
    return path


# ---- metrics -----------------------------------------------------------------------------
def test_metrics_match_a_hand_computed_case():
    m = recognition_metrics(Counts(tp=3, fp=1, tn=5, fn=1))
    assert m["positive_accuracy"] == 0.75
    assert m["negative_accuracy"] == pytest.approx(5 / 6)
    assert m["weighted_accuracy"] == pytest.approx((0.75 + 5 / 6) / 2)
    assert m["precision"] == 0.75 and m["recall"] == 0.75 and m["f1"] == pytest.approx(0.75)
    assert (m["positives"], m["negatives"]) == (4, 6)

    m = recognition_metrics(Counts(tp=2, fp=6, tn=2, fn=0))
    assert m["positive_accuracy"] == 1.0 and m["negative_accuracy"] == 0.25 and m["weighted_accuracy"] == 0.625
    assert m["precision"] == 0.25 and m["f1"] == pytest.approx(2 * 0.25 * 1.0 / 1.25)


def test_undefined_ratios_are_null_and_no_hit_gives_f1_zero():
    m = recognition_metrics(Counts(tn=4, fp=1))
    assert m["positive_accuracy"] is None and m["weighted_accuracy"] is None and m["precision"] == 0.0
    assert m["f1"] is None and m["negative_accuracy"] == 0.8
    assert recognition_metrics(Counts(fn=2, fp=1))["f1"] == 0.0
    assert recognition_metrics(Counts())["precision"] is None


def test_summaries_count_every_pair_per_concept_and_overall():
    def pair(concept, label, predicted, source="match"):
        return {"concept": concept, "label": label, "predicted": predicted, "score": 0.5, "source": source}

    records = [
        {"query": "a1", "pairs": [pair("a", True, True), pair("b", False, False)]},
        {"query": "b1", "pairs": [pair("a", False, True, "ego"), pair("b", True, False, "r2p")]},
        {"query": "broken", "error": "not a readable image"},
    ]
    summary = evaluation.summarize(records, ["a", "b"])
    assert summary["per_concept"]["a"]["tp"] == 1 and summary["per_concept"]["a"]["fp"] == 1
    assert summary["per_concept"]["b"]["fn"] == 1 and summary["per_concept"]["b"]["tn"] == 1
    overall = summary["overall"]
    assert (overall["tp"], overall["fp"], overall["tn"], overall["fn"]) == (1, 1, 1, 1)
    assert summary["macro_weighted_accuracy"] == pytest.approx((0.5 + 0.5) / 2)
    assert summary["decided_by"] == {"match": 2, "ego": 1, "r2p": 1}
    assert list(summary["stages"]) == ["match", "ego", "r2p"]
    assert summary["stages"]["match"] == {"decisions": 2, "accuracy": 1.0, "positives": 1, "negatives": 1,
                                         "weighted_accuracy": 1.0, "recall": 1.0, "precision": 1.0}


def test_the_per_stage_table_says_how_right_each_stage_is_and_ego_alone_on_the_same_pairs(tmp_path):
    from personal_vlm_node.evaluation.report import _stage_lines

    def pair(label, predicted, source, p_yes=None):
        return {"concept": "a", "label": label, "predicted": predicted, "score": 0.5, "source": source,
                "p_yes": p_yes}

    records = [{"query": "q", "pairs": [
        pair(True, True, "match"), pair(False, False, "match"), pair(False, False, "match"),
        pair(True, True, "ego", 0.9), pair(False, True, "ego", 0.7),
        # R2P right on both pairs it took from an unsure Ego, which was wrong on both of them.
        pair(True, True, "r2p", 0.55), pair(False, False, "r2p", 0.65)]}]
    stages = evaluation.summarize(records, ["a"], threshold=0.6)["stages"]
    assert [(s, row["decisions"], row["accuracy"]) for s, row in stages.items()] == \
        [("match", 3, 1.0), ("ego", 2, 0.5), ("r2p", 2, 1.0)]
    assert "ego_alone" not in stages["match"]                                  # Ego never ran on them
    assert stages["ego"]["ego_alone"]["accuracy"] == 0.5
    assert stages["r2p"]["ego_alone"] == {"decisions": 2, "accuracy": 0.0, "positives": 1, "negatives": 1,
                                          "weighted_accuracy": 0.0, "recall": 0.0, "precision": 0.0}
    table = "\n".join(_stage_lines(stages))
    assert "| r2p | 2 | 1.000 | 1 | 1.000 | 1.000 | 1.000 | 0.000 | 0.000 |" in table, table
    assert _stage_lines({"ego": stages["ego"]}) == []                          # one stage: nothing to compare


# ---- layouts -----------------------------------------------------------------------------
def _yollava(root, concepts=("bo", "mam"), train=2, test=2, copy_train_into_test=False):
    for c, name in enumerate(concepts):
        for i in range(train):
            _write(root / name / "train" / f"{i}.png", 100 * c + i)
        for i in range(test):
            if copy_train_into_test and i == 0:
                _write(root / name / "test" / f"{i}.png", 100 * c)        # the first reference again
            else:
                _write(root / name / "test" / f"{i}.png", 100 * c + 50 + i)
    return root


def test_yollava_layout_pairs_every_query_with_every_concept(tmp_path):
    root = _yollava(tmp_path / "yollava", train=3)
    _write(root / "bo" / "train" / "10.png", 7)                     # natural order: 0, 1, 2, 10
    assert evaluation.detect_layout(root) == "yollava"
    data = load_dataset(root, shots=2)
    assert data.layout == "yollava" and data.concepts == ["bo", "mam"]
    assert [p.name for p in data.references["bo"]] == ["0.png", "1.png"]
    assert [q.key for q in data.queries] == ["bo/test/0.png", "bo/test/1.png", "mam/test/0.png", "mam/test/1.png"]
    assert load_dataset(root, shots=8).references["bo"][-1].name == "10.png"   # fewer than asked: all of them
    labelled = evaluation.pairs(data)
    assert len(labelled) == 8 and sum(label for _, _, label in labelled) == 4
    assert all(label == (concept in query.key.split("/")[0]) for query, concept, label in labelled)


def test_perva_layout_keeps_categories_and_works_without_them(tmp_path):
    root = tmp_path / "perva"
    for split, seeds in (("train", (1, 2)), ("test", (3, 4, 5))):
        for s in seeds:
            _write(root / split / "mug" / "red mug" / f"{s}.jpg", s)
            _write(root / split / "cat" / "Fluffy" / f"{s}.png", 10 + s)
    assert evaluation.detect_layout(root) == "perva"
    data = load_dataset(root, shots=1)
    assert sorted(data.concepts) == ["Fluffy", "red mug"]
    assert data.categories == {"red mug": "mug", "Fluffy": "cat"}
    assert [p.name for p in data.references["red mug"]] == ["1.jpg"]
    assert len(data.queries) == 6 and {q.concepts for q in data.queries} == {("red mug",), ("Fluffy",)}

    flat = tmp_path / "flat"
    for split in ("train", "test"):
        _write(flat / split / "bo" / "0.png", 1)
    data = load_dataset(flat)
    assert data.concepts == ["bo"] and data.categories == {"bo": ""} and len(data.queries) == 1


def test_myvlm_layout_splits_by_file_list_or_by_the_last_images(tmp_path):
    root = tmp_path / "myvlm"
    for i in range(5):
        _write(root / "cat statue" / f"{i}.jpg", i)
        _write(root / "dog" / f"{i}.jpg", 10 + i)
    assert evaluation.detect_layout(root) == "myvlm"
    default = load_dataset(root, shots=2)
    assert [p.name for p in default.references["dog"]] == ["0.jpg", "1.jpg"]
    assert [q.key for q in default.queries if q.concepts == ("dog",)] == ["dog/2.jpg", "dog/3.jpg", "dog/4.jpg"]
    last = load_dataset(root, shots=1, test_last=2)
    assert [q.key for q in last.queries] == ["cat statue/3.jpg", "cat statue/4.jpg", "dog/3.jpg", "dog/4.jpg"]
    listing = tmp_path / "test.txt"
    listing.write_text("# queries\ncat statue/0.jpg\ndog/4.jpg  # the last one\n\n")
    listed = load_dataset(root, shots=1, test_list=listing)
    assert [q.key for q in listed.queries] == ["cat statue/0.jpg", "dog/4.jpg"]
    assert [p.name for p in listed.references["cat statue"]] == ["1.jpg"]
    with pytest.raises(PersonalVLMError, match="too few"):
        load_dataset(root, test_last=5)


def test_generic_layout_supports_multi_concept_and_empty_queries(tmp_path):
    root = tmp_path / "generic"
    _write(root / "concepts" / "my mug" / "a.jpg", 1)
    _write(root / "concepts" / "my mug" / "b.jpg", 2)
    _write(root / "concepts" / "Fluffy" / "a.jpg", 3)
    _write(root / "scenes" / "kitchen.png", 4)
    _write(root / "scenes" / "sofa.png", 5)
    _write(root / "scenes" / "empty.png", 6)
    (root / "queries.json").write_text(json.dumps([
        {"image": "scenes/kitchen.png", "concepts": ["my mug", "Fluffy"]},
        {"image": "scenes/sofa.png", "concepts": ["Fluffy"]},
        {"image": "scenes/empty.png", "concepts": []},
    ]))
    assert evaluation.detect_layout(root) == "generic"
    data = load_dataset(root, shots=1)
    assert sorted(data.concepts) == ["Fluffy", "my mug"] and [p.name for p in data.references["my mug"]] == ["a.jpg"]
    labels = {(q.key, c): label for q, c, label in evaluation.pairs(data)}
    assert labels[("scenes/kitchen.png", "my mug")] and labels[("scenes/kitchen.png", "Fluffy")]
    assert labels[("scenes/sofa.png", "Fluffy")] and not labels[("scenes/sofa.png", "my mug")]
    assert not any(label for (key, _), label in labels.items() if key == "scenes/empty.png")

    (root / "queries.json").write_text(json.dumps([{"image": "scenes/sofa.png", "concepts": ["Rex"]}]))
    with pytest.raises(PersonalVLMError, match="Rex"):
        load_dataset(root)


def test_unknown_layouts_and_bad_settings_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PersonalVLMError, match="matches no dataset layout"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(PersonalVLMError, match="not found"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(PersonalVLMError, match="--shots"):
        load_dataset(_yollava(tmp_path / "y"), shots=0)
    with pytest.raises(PersonalVLMError, match="method"):
        EvalOptions(method="magic").check()
    with pytest.raises(PersonalVLMError, match="--pairwise-reference must be one of image, memory"):
        EvalOptions(method="r2p", pairwise_reference="both").check()
    with pytest.raises(PersonalVLMError, match="--recognition must be one of per_concept, joint"):
        EvalOptions(method="ego", recognition="together").check()


# ---- a run on a tiny model ----------------------------------------------------------------
@pytest.fixture
def assistant(adapters, tmp_path):
    a = Assistant(adapters("qwen2_5_vl"), ConceptStore(tmp_path / "store"),
                  ModelProfile(max_memory_tokens=8, min_memory_tokens=2), progress=None, verification=False)
    yield a
    a.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return ImageTextSimilarity(str(build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")), device="cpu")


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_match_run_writes_json_markdown_and_both_plots(assistant, tmp_path):
    data = load_dataset(_yollava(tmp_path / "data", train=1, copy_train_into_test=True))
    messages = []
    results = evaluation.evaluate(assistant, data, tmp_path / "out", EvalOptions(method="match"),
                                  progress=messages.append)
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    overall = results["overall"]
    assert overall["positives"] == 4 and overall["negatives"] == 4
    assert overall["tp"] + overall["fn"] + overall["tn"] + overall["fp"] == 8
    records = evaluation.read_lines(out / "progress.jsonl")
    assert len(records) == 4 and results["decided_by"] == {"match": 8}
    # A query that is a reference picture itself matches its own memory exactly: s_c = 1 ≥ accept.
    own = next(p for p in records[0]["pairs"] if p["concept"] == "bo")
    assert records[0]["query"] == "bo/test/0.png" and own["score"] == pytest.approx(1.0, abs=1e-4) and own["predicted"]
    assert all(p["predicted"] == (p["score"] >= 0.8) for r in records for p in r["pairs"])
    assert messages[-1] == "4/4 queries" and any(m.startswith("teaching 1/2") for m in messages)
    assert results["timing"]["seconds_per_query"] > 0 and results["timing"]["seconds_per_concept_introduction"] > 0
    assert results["timing"]["seconds_per_fingerprint"] > 0
    markdown = (out / "results.md").read_text()
    assert "| concept | pos | neg | pos acc | neg acc | Wtd | precision | recall | F1 |" in markdown
    assert "| bo |" in markdown and "| mam |" in markdown and "| all pairs |" in markdown
    assert _png_size(out / "wtd_per_concept.png")[0] > 300 and _png_size(out / "score_histogram.png") == (640, 340)


def test_cascade_hands_what_ego_is_unsure_of_to_r2p(assistant, tmp_path, clip):
    data = load_dataset(_yollava(tmp_path / "data", train=1))
    # Every score falls in the matcher's uncertain band, and every p_yes within the margin: R2P decides.
    options = EvalOptions(method="cascade", accept=1.5, reject=-1.5, margin=0.5, top_k=2)
    results = evaluation.evaluate(assistant, data, tmp_path / "out", options, progress=None, text_similarity=clip)
    assert sum(results["decided_by"].values()) == 8 and set(results["decided_by"]) <= {"r2p", "r2p_pairwise_ego"}
    assert results["r2p"]["text_similarity"].startswith("clip:")
    ego_threshold, seen = results["thresholds"]["recognize"], set()
    for record in evaluation.read_lines(tmp_path / "out" / "progress.jsonl"):
        decision, stages = record["r2p"]["decision"], record["r2p"]["stages"]
        assert set(stages) >= {"retrieval", "reasoning", "verification"}
        assert all(0.0 < p["p_yes"] < 1.0 for p in record["pairs"])
        pairwise = (stages.get("pairwise") or {}).get("p", {})
        for p in record["pairs"]:
            seen.add(p["source"])
            if p["source"] == "r2p":          # R2P's reasoning settled it, or the concept was not a candidate
                assert p["predicted"] == (p["concept"] == decision)
            else:                             # R2P's pairwise step and Ego together: their evidence adds up
                evidence = (p["p_yes"] - ego_threshold) + (pairwise[p["concept"]] - 0.5)
                assert p["predicted"] == (evidence >= 0)
    assert "r2p_pairwise_ego" in seen         # the tiny model's reasoning never agrees with the attributes
    for name in ("results.json", "results.md", "wtd_per_concept.png", "score_histogram.png"):
        assert (tmp_path / "out" / name).is_file()

    # With no margin Ego's own answer stands.
    ego_only = evaluation.evaluate(assistant, data, tmp_path / "out2",
                                   EvalOptions(method="cascade", accept=1.5, reject=-1.5, margin=0.0, max_queries=1),
                                   progress=None)
    assert ego_only["decided_by"] == {"ego": 2}
    # Without a contrastive model R2P's scores are the VLM's own answers: the results say so.
    assert "model judging itself" in (tmp_path / "out2" / "results.md").read_text()
    assert "model judging itself" not in (tmp_path / "out" / "results.md").read_text()
    assert "beside the candidate's reference picture" in (tmp_path / "out" / "results.md").read_text()
    record = evaluation.read_lines(tmp_path / "out2" / "progress.jsonl")[0]
    assert "r2p" not in record and all(p["predicted"] == (p["p_yes"] >= 0.5) for p in record["pairs"])

    # R2P's pairwise step beside the candidate's memory instead of its picture: recorded, and a
    # rerun into the same folder with the other choice is refused rather than mixed.
    memory = EvalOptions(method="cascade", accept=1.5, reject=-1.5, margin=0.5, top_k=2, max_queries=1,
                         pairwise_reference="memory")
    results = evaluation.evaluate(assistant, data, tmp_path / "out3", memory, progress=None, text_similarity=clip)
    assert results["r2p"]["pairwise_reference"] == "memory" and sum(results["decided_by"].values()) == 2
    assert set(results["decided_by"]) <= {"r2p", "r2p_pairwise_ego"}
    for record in evaluation.read_lines(tmp_path / "out3" / "progress.jsonl"):
        assert record["r2p"]["stages"].get("pairwise", {"reference": "memory"})["reference"] == "memory"
    with pytest.raises(PersonalVLMError, match="pairwise_reference"):
        evaluation.evaluate(assistant, data, tmp_path / "out3",
                            EvalOptions(method="cascade", accept=1.5, reject=-1.5, margin=0.5, top_k=2, max_queries=1),
                            progress=None, text_similarity=clip)


def test_r2p_in_eval_gets_the_reference_pictures_and_their_contrastive_embeddings(assistant, tmp_path, clip):
    # As on the frame path: the pairwise step can show a candidate's reference picture, and s_VV
    # compares contrastive embeddings of the references (not the matcher's score).
    from personal_vlm_node.evaluation.run import _Methods
    from personal_vlm_node.images import load_image
    from personal_vlm_node.vlm import ImageTokens

    data = load_dataset(_yollava(tmp_path / "data", train=1))
    evaluation.evaluate(assistant, data, tmp_path / "out", EvalOptions(method="match", max_queries=1), progress=None)
    methods = _Methods(assistant, data, EvalOptions(method="r2p", r2p_pool=2), text_similarity=clip)
    seen = []
    methods.r2p.verify = lambda tokens, image, candidates: seen.extend(candidates)
    image = load_image(data.queries[0].image)
    tokens = assistant.vlm.encode_image(image)
    methods._run_r2p(tokens, image, {c: 0.5 for c in data.concepts})
    assert {c.name for c in seen} == set(data.concepts)
    for candidate in seen:
        assert isinstance(candidate.reference_tokens(), ImageTokens)
        assert candidate.reference_embeddings.shape[0] == 1             # one reference picture each
    methods.text_similarity = None
    seen.clear()
    methods._run_r2p(tokens, image, {c: 0.5 for c in data.concepts})
    assert all(c.reference_embeddings is None for c in seen)


@pytest.mark.parametrize("family", ["qwen3_vl", "smolvlm"])
def test_the_cascade_runs_on_the_newer_families(adapters, tmp_path, family):
    # Ego and R2P through the whole eval on Qwen3-VL (DeepStack) and SmolVLM2 checkpoints.
    data = load_dataset(_yollava(tmp_path / "data", train=1))
    with Assistant(adapters(family), ConceptStore(tmp_path / "store"),
                   ModelProfile(max_memory_tokens=8, min_memory_tokens=2), progress=None,
                   verification=False) as a:
        options = EvalOptions(method="cascade", accept=1.5, reject=-1.5, margin=0.5, top_k=2, max_queries=2)
        results = evaluation.evaluate(a, data, tmp_path / "out", options, progress=None)
        stored = a.stored_memory(data.concepts[0])
    if family == "qwen3_vl":      # the memory keeps its tokens' DeepStack features, one per stacked layer
        stacked = len(a.vlm.model.config.vision_config.deepstack_visual_indexes)
        assert stored["layer_features"].shape == (stored["memory"].shape[0], stacked, stored["memory"].shape[1])
    else:
        assert "layer_features" not in stored
    assert sum(results["decided_by"].values()) == 4 and set(results["decided_by"]) <= {"r2p", "r2p_pairwise_ego"}
    assert results["overall"]["positives"] + results["overall"]["negatives"] == 4
    assert all(0.0 < p["p_yes"] < 1.0 for r in evaluation.read_lines(tmp_path / "out" / "progress.jsonl")
               for p in r["pairs"])


def test_joint_recognition_asks_each_concept_beside_the_best_matching_others(assistant, tmp_path):
    from personal_vlm_node import ego
    from personal_vlm_node.images import load_image

    data = load_dataset(_yollava(tmp_path / "data", concepts=("bo", "mam", "ki"), train=1, test=1))
    assistant.profile.max_concepts_in_context = 2
    results = evaluation.evaluate(assistant, data, tmp_path / "out", EvalOptions(method="ego", recognition="joint"),
                                  progress=None)
    budget = assistant.profile.context_tokens
    assert results["ego"] == {"recognition": "joint", "memories_per_prompt": 2, "context_tokens": budget}
    assert ("joint recognition: each concept asked in one prompt with the other concepts while they fit "
            f"(at most 2 memories, {budget} memory tokens") in (tmp_path / "out" / "results.md").read_text()
    record = evaluation.read_lines(tmp_path / "out" / "progress.jsonl")[0]
    tokens = assistant.vlm.encode_image(load_image(tmp_path / "data" / record["query"]))
    scores = {m.name: m.score for m in assistant.matcher.score(tokens.features, tokens.token_boxes)}
    memory = lambda n: Memory.from_stored(assistant.stored_memory(n), n)
    for pair in record["pairs"]:        # the concept and the best-matching other one, in context order
        others = sorted((n for n in scores if n != pair["concept"]), key=lambda n: -scores[n])
        together = [memory(n) for n in ego.context_order([pair["concept"], others[0]])]
        expected = ego.recognize_joint(assistant.vlm, tokens, together, [pair["concept"]])[pair["concept"]]
        assert pair["score"] == pytest.approx(expected, abs=1e-5)
    # The profile's choice by default: one prompt per concept.
    per_concept = evaluation.evaluate(assistant, data, tmp_path / "out2", EvalOptions(method="ego", max_queries=1),
                                      progress=None)
    assert per_concept["ego"] == {"recognition": "per_concept", "memories_per_prompt": 1, "context_tokens": budget}


def test_a_rerun_skips_the_queries_already_done(assistant, tmp_path, monkeypatch):
    data = load_dataset(_yollava(tmp_path / "data", train=1))
    out = tmp_path / "out"
    evaluation.evaluate(assistant, data, out, EvalOptions(max_queries=2), progress=None)
    assert [r["query"] for r in evaluation.read_lines(out / "progress.jsonl")] == ["bo/test/0.png", "bo/test/1.png"]

    evaluated = []
    original = evaluation.run._Methods.evaluate
    monkeypatch.setattr(evaluation.run._Methods, "evaluate",
                        lambda self, query: evaluated.append(query.key) or original(self, query))
    taught = []
    monkeypatch.setattr(assistant, "teach", lambda *a, **k: taught.append(a) or pytest.fail("taught again"))
    with open(out / "progress.jsonl", "a") as f:
        f.write('{"query": "mam/test/0.png", "pai')            # a line cut short by Ctrl-C
    messages = []
    results = evaluation.evaluate(assistant, data, out, EvalOptions(), progress=messages.append)
    assert evaluated == ["mam/test/0.png", "mam/test/1.png"] and taught == []
    assert messages[0] == "2/4 queries already done, resuming" and messages[-1] == "4/4 queries"
    lines = (out / "progress.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    assert results["dataset"]["queries"] == 4

    with pytest.raises(PersonalVLMError, match="other settings.*method"):
        evaluation.evaluate(assistant, data, out, EvalOptions(method="ego"), progress=None)


def test_the_command_runs_from_parsed_arguments(tiny_checkpoints, tmp_path, capsys):
    data = _yollava(tmp_path / "data", concepts=("bo",), train=1, test=1)
    from personal_vlm_node.cli import main

    assert main(["--model", str(tiny_checkpoints["qwen2_5_vl"]), "--device", "cpu", "--dtype", "float32", "--json",
                 "eval", str(data), "--out", str(tmp_path / "out"), "--method", "match"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["method"] == "match" and printed["overall"]["positives"] == 1
    assert "[eval] 1/1 queries" in captured.err
    assert (tmp_path / "out" / "store" / "concepts.db").is_file()       # taught into the run's own store


def test_plots_are_drawn_for_any_names_and_degenerate_scores():
    chart = evaluation.bar_chart_png({"Grandpa's cane": 0.5, "猫": None, "x" * 80: 1.2}, "Wtd")
    assert Image.open(io.BytesIO(chart)).size[1] >= 34 + 3 * 18
    flat = evaluation.histogram_png([0.7, 0.7], [], "score", {"accept": 0.7})
    assert Image.open(io.BytesIO(flat)).format == "PNG"
    assert Image.open(io.BytesIO(evaluation.histogram_png([], [], "score"))).size == (640, 340)


# ---- the official Yo'LLaVA release, failed queries, settings checked first --------------------

def _yollava_release(root, concepts=("bo", "mam"), train=2, test=2, negatives=2):
    """{train,test}/<concept>/ with train/<concept>/negative_example/, as Yo'LLaVA is released."""
    for c, name in enumerate(concepts):
        for i in range(train):
            _write(root / "train" / name / f"{i}.png", 100 * c + i)
        for i in range(negatives):
            _write(root / "train" / name / "negative_example" / f"{i}.png", 100 * c + 80 + i)
        for i in range(test):
            _write(root / "test" / name / f"{i}.png", 100 * c + 50 + i)
    return root


def test_the_official_yollava_release_layout_is_read_with_its_negatives(tmp_path):
    root = _yollava_release(tmp_path / "yollava")
    assert evaluation.detect_layout(root) == "yollava"
    data = load_dataset(root, shots=2)
    assert data.concepts == ["bo", "mam"]
    assert [p.name for p in data.references["bo"]] == ["0.png", "1.png"]
    keys = [q.key for q in data.queries]
    assert keys[:4] == ["test/bo/0.png", "test/bo/1.png", "test/mam/0.png", "test/mam/1.png"]
    assert "train/bo/negative_example/0.png" in keys
    labelled = evaluation.pairs(data)
    negatives = [(q.key, c, label) for q, c, label in labelled if "negative_example" in q.key]
    # A concept's negative examples are negatives for that concept only.
    assert sorted(negatives) == [("train/bo/negative_example/0.png", "bo", False),
                                 ("train/bo/negative_example/1.png", "bo", False),
                                 ("train/mam/negative_example/0.png", "mam", False),
                                 ("train/mam/negative_example/1.png", "mam", False)]
    assert len(labelled) == 8 + 4


def test_failed_queries_are_reported_and_retried_on_a_rerun(assistant, tmp_path, monkeypatch):
    data = load_dataset(_yollava(tmp_path / "data", train=1))
    out = tmp_path / "out"
    original = evaluation.run._Methods.evaluate

    def flaky(self, query):
        if query.key == "bo/test/1.png":
            raise PersonalVLMError("the picture could not be read")
        return original(self, query)

    monkeypatch.setattr(evaluation.run._Methods, "evaluate", flaky)
    messages = []
    results = evaluation.evaluate(assistant, data, out, EvalOptions(), progress=messages.append)
    assert results["dataset"]["queries"] == 3 and results["dataset"]["failed"] == 1
    assert results["errors"] == [{"query": "bo/test/1.png", "error": "the picture could not be read"}]
    assert any("bo/test/1.png failed" in m for m in messages)
    assert "3 of 4 queries" in (out / "results.md").read_text()

    monkeypatch.setattr(evaluation.run._Methods, "evaluate", original)
    evaluated = []
    monkeypatch.setattr(evaluation.run._Methods, "evaluate",
                        lambda self, query: evaluated.append(query.key) or original(self, query))
    again = evaluation.evaluate(assistant, data, out, EvalOptions(), progress=None)
    assert evaluated == ["bo/test/1.png"]
    assert again["dataset"]["queries"] == 4 and again["dataset"]["failed"] == 0 and again["errors"] == []
    assert again["overall"]["positives"] + again["overall"]["negatives"] == 8


def test_a_run_with_another_model_is_refused_before_anything_is_rebuilt(tiny_checkpoints, tmp_path, capsys):
    data = _yollava(tmp_path / "data", concepts=("bo",), train=1, test=1)

    def run(family):
        return cli.main(["--model", str(tiny_checkpoints[family]), "--device", "cpu", "--dtype", "float32",
                         "eval", str(data), "--out", str(tmp_path / "out"), "--method", "match"])

    assert run("qwen2_5_vl") == 0
    store = ConceptStore(tmp_path / "out" / "store")
    assert run("internvl") == 2
    assert "other settings" in capsys.readouterr().err
    from personal_vlm_node.vlm import load_vlm

    intern = load_vlm(str(tiny_checkpoints["internvl"]), device="cpu", dtype="float32")
    assert store.memory_versions(intern.identity) == {}                # nothing rebuilt for it
