"""ICPT: the projector's losses, its length rule, its file, its training and ``icpt-train``."""

from __future__ import annotations

import math

import pytest
import torch

from personal_vlm_node import cli, icpt
from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.icpt_training import (TrainOptions, checkpoint_path, encode_training_set, read_training_set,
                                             token_statistics, train_projector, training_loss)
from personal_vlm_node.testing.toy_world import write_dataset

FAMILY = "qwen2_5_vl"


# ---- the losses -------------------------------------------------------------------------------
def test_view_invariance_is_zero_for_identical_prompts_and_one_for_orthogonal_ones():
    a = torch.randn(5, 16)
    assert float(icpt.view_invariance_loss(a, a.clone())) == pytest.approx(0.0, abs=1e-6)
    e = torch.eye(4)
    assert float(icpt.view_invariance_loss(e[:2], e[2:])) == pytest.approx(1.0)


def test_separation_is_zero_for_orthogonal_prompts_and_counts_only_above_the_margin():
    e = torch.eye(3)
    none = torch.zeros(3, 3, dtype=torch.bool)
    assert float(icpt.separation_loss(e, none, margin=0.2)) == 0.0
    # cos = 0.6 for one pair of two: (0.6 − 0.2) / 1 pair
    pooled = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert float(icpt.separation_loss(pooled, torch.zeros(2, 2, dtype=torch.bool), margin=0.2)) == pytest.approx(0.4)
    # below the margin: nothing
    assert float(icpt.separation_loss(pooled, torch.zeros(2, 2, dtype=torch.bool), margin=0.7)) == 0.0


def test_lookalike_weight_multiplies_the_separation_of_lookalikes():
    pooled = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    plain = icpt.separation_loss(pooled, torch.zeros(2, 2, dtype=torch.bool), margin=0.2, lookalike_weight=3.0)
    twins = icpt.separation_loss(pooled, torch.ones(2, 2, dtype=torch.bool), margin=0.2, lookalike_weight=3.0)
    assert float(twins) == pytest.approx(3.0 * float(plain))


def test_background_loss_is_the_mean_squared_cosine():
    prompt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert float(icpt.background_loss(prompt, torch.tensor([[0.0, 0.0, 2.0]]))) == 0.0
    # token 1 along b (cos² 1), token 2 orthogonal (0): mean 0.5
    assert float(icpt.background_loss(prompt, torch.tensor([[3.0, 0.0, 0.0]]))) == pytest.approx(0.5)
    assert float(icpt.background_loss(prompt, torch.zeros(0, 3))) == 0.0


def test_task_loss_is_the_binary_cross_entropy_of_the_yes_no_pair():
    z = torch.tensor([0.0, math.log(3.0)])                    # p(yes) = 0.5 and 0.75
    present = torch.tensor([1.0, 0.0])
    expected = (math.log(2.0) - math.log(0.25)) / 2
    assert float(icpt.task_loss(z, present)) == pytest.approx(expected, rel=1e-5)
    weighted = icpt.task_loss(z, present, torch.tensor([1.0, 0.0]))
    assert float(weighted) == pytest.approx(math.log(2.0), rel=1e-5)


def test_object_attention_loss_is_zero_when_the_readout_reads_only_the_object():
    alpha = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    assert float(icpt.object_attention_loss(alpha, torch.tensor([True, True, False]))) == pytest.approx(0.0, abs=1e-6)
    assert float(icpt.object_attention_loss(alpha, torch.tensor([True, False, False]))) > 1.0


# ---- the length rule ----------------------------------------------------------------------------
def _planted(directions: int, n_fg: int = 60, n_bg: int = 24, d: int = 64, seed: int = 0):
    """Foreground tokens spanning ``directions`` orthogonal directions, background noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.eye(d)[:directions]                                              # (k, D)
    fg = torch.randn(n_fg, directions, generator=g) @ basis                         # (n_fg, D)
    bg = torch.randn(n_bg, d, generator=g)                                          # (n_bg, D)
    weights = torch.cat([torch.full((n_fg,), 1.0), torch.full((n_bg,), 1e-4)])      # the readout reads fg
    return torch.cat([fg, bg]), weights


def test_prompt_length_grows_with_the_foregrounds_complexity_and_is_clamped():
    lengths = {k: icpt.prompt_length(*_planted(k), min_tokens=4, max_tokens=16) for k in (1, 6, 10, 40)}
    assert lengths[1] == 4                                  # one direction: clamped up to L_min
    assert 4 < lengths[6] <= 6 < lengths[10] <= 10          # κ ≤ the directions planted, and grows with them
    assert lengths[40] == 16                                # clamped down to L_max
    assert icpt.prompt_length(*_planted(6), min_tokens=4, max_tokens=16, slope=2.0) > lengths[6]


def test_the_foreground_is_the_fewest_tokens_carrying_the_share_ties_lower_index_first():
    weights = torch.tensor([0.1, 0.4, 0.1, 0.4])
    assert icpt.foreground(weights, 0.8).tolist() == [1, 3]
    assert icpt.foreground(weights, 0.85).tolist() == [1, 3, 0]
    assert icpt.components_for(torch.ones(5, 3), 0.9) == 1          # no variance: one component


# ---- teaching, recognition, the file ------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training steps are many small kernels: on a busy 2-core machine two threads fight each other
    (tens of times slower); one thread keeps the training tests short."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vlm(adapters):
    return adapters(FAMILY)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("icpt_world") / "w", seed=7, concepts=4, layout="yollava",
                         references=2, tests=2)


def _projector(vlm, seed: int = 0, **config) -> icpt.Projector:
    torch.manual_seed(seed)
    projector = icpt.Projector(icpt.ProjectorConfig(vlm.hidden_size, hidden=32, queries=8, **config))
    projector.set_statistics(3.0, torch.randn(vlm.hidden_size))
    return projector.eval()


def _views(vlm, world, name: str):
    return [vlm.encode_image(p) for p in sorted((world / name / "train").iterdir())]


def test_make_prompt_gives_a_layout_free_memory_at_the_visual_tokens_norm(vlm, world):
    projector = _projector(vlm)
    memory = icpt.make_prompt(vlm, projector, _views(vlm, world, _names(world)[0]), "my hat")
    assert memory.name == "my hat" and not memory.has_layout
    assert 4 <= memory.tokens.shape[0] <= 8 and memory.tokens.shape[1] == vlm.hidden_size
    assert torch.allclose(memory.tokens.norm(dim=-1), torch.full((memory.tokens.shape[0],), 3.0), atol=1e-4)
    fixed = _projector(vlm, fixed_length=5)
    assert icpt.make_prompt(vlm, fixed, _views(vlm, world, _names(world)[0]), "x").tokens.shape[0] == 5
    with pytest.raises(PersonalVLMError, match="1 to 8 reference images"):
        icpt.make_prompt(vlm, projector, [], "x")


def _names(world):
    return sorted(p.name for p in world.iterdir() if p.is_dir())


def test_recognize_asks_each_concept_and_the_joint_prompt_shares_its_prefix(vlm, world):
    from personal_vlm_node import prompts

    projector = _projector(vlm)
    names = _names(world)[:3]
    memories = [icpt.make_prompt(vlm, projector, _views(vlm, world, n), n) for n in names]
    query = vlm.encode_image(next((world / names[0] / "test").iterdir()))
    single = icpt.recognize(vlm, query, memories)
    assert list(single) == names and all(0.0 < p < 1.0 for p in single.values())
    assert single[names[1]] == pytest.approx(vlm.yes_probability(prompts.recognize(memories[1], query, vlm.family)))
    joint = icpt.recognize_joint(vlm, query, memories, [names[2], names[0]])
    assert list(joint) == [names[2], names[0]]
    alone = vlm.yes_probability(prompts.recognize_joint(memories, query, names[0], vlm.family))
    assert joint[names[0]] == pytest.approx(alone, abs=1e-4)


def test_a_saved_projector_loads_back_and_makes_the_same_prompt(vlm, world, tmp_path):
    projector = _projector(vlm, seed=3)
    path = tmp_path / "p.safetensors"
    icpt.save_projector(path, projector, icpt.backbone_fingerprint(vlm), {"note": 1})
    loaded = icpt.load_projector(path, vlm)
    views = _views(vlm, world, _names(world)[1])
    a, b = icpt.make_prompt(vlm, projector, views, "x"), icpt.make_prompt(vlm, loaded, views, "x")
    assert torch.equal(a.tokens, b.tokens)
    assert loaded.config == projector.config and float(loaded.scale) == 3.0


def test_a_projector_of_another_backbone_is_refused_with_one_line(vlm, tmp_path):
    path = tmp_path / "p.safetensors"
    icpt.save_projector(path, _projector(vlm), "other_family/d999/0123456789abcdef")
    with pytest.raises(PersonalVLMError) as refused:
        icpt.load_projector(path, vlm)
    message = str(refused.value)
    assert "was trained for backbone other_family/d999/0123456789abcdef" in message
    assert f"this model is {icpt.backbone_fingerprint(vlm)}" in message and "icpt-train" in message
    assert "\n" not in message


def test_a_missing_or_damaged_projector_file_is_refused_with_one_line(vlm, tmp_path):
    with pytest.raises(PersonalVLMError, match="not found"):
        icpt.load_projector(tmp_path / "none.safetensors", vlm)
    path = tmp_path / "p.safetensors"
    icpt.save_projector(path, _projector(vlm), icpt.backbone_fingerprint(vlm))
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"\x00" * 64, b"not a projector"):
        path.write_bytes(damaged)
        with pytest.raises(PersonalVLMError, match="not a readable ICPT projector") as refused:
            icpt.load_projector(path, vlm)
        assert "\n" not in str(refused.value)


def test_the_fingerprint_is_the_same_for_a_second_load_of_one_checkpoint(vlm, tiny_checkpoints):
    from personal_vlm_node.vlm import load_vlm

    again = load_vlm(str(tiny_checkpoints[FAMILY]), device="cpu", dtype="float32")
    assert icpt.backbone_fingerprint(again) == icpt.backbone_fingerprint(vlm)
    assert icpt.backbone_fingerprint(vlm).startswith(f"{FAMILY}/d{vlm.hidden_size}/")


# ---- training ---------------------------------------------------------------------------------------
def _options(**kw) -> TrainOptions:
    return TrainOptions(**{"steps": 20, "hidden": 32, "queries": 8, "group": 3, "checkpoint_every": 10, **kw})


@pytest.fixture(scope="module")
def training_set(vlm, world):
    data = read_training_set([world])
    encode_training_set(vlm, data)
    return data


def test_the_training_set_knows_positives_lookalikes_and_backgrounds(training_set):
    assert len(training_set.concepts) == 4
    first = training_set.concepts[0]
    assert len(first.references) == 2 and len(first.positives) == 2
    # The toy world makes its concepts in look-alike pairs: one twin each, both ways.
    assert all(len(c.lookalikes) == 1 for c in training_set.concepts)
    assert all(training_set.concepts[c.lookalikes[0]].lookalikes == [i] for i, c in enumerate(training_set.concepts))
    assert first.lookalike_negatives                                   # from toy_world.json
    assert set(training_set.backgrounds) == set(training_set.images)   # every toy image has boxes


def test_training_lowers_the_loss_and_resumes_at_the_saved_step(vlm, world, training_set, tmp_path):
    out = tmp_path / "a" / "p.safetensors"
    figures = train_projector(vlm, [], out, _options(), data=training_set)
    assert figures["loss_end"] < figures["loss_start"]
    assert figures["task_end"] < figures["task_start"]
    whole = icpt.read_projector(out)[0].state_dict()

    # The same run, cut off at step 15: its checkpoint is step 10, and the next call continues there.
    cut = tmp_path / "b" / "p.safetensors"

    def stop_at_15(line):
        if "(15/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_projector(vlm, [], cut, _options(), data=training_set, progress=stop_at_15)
    assert torch.load(checkpoint_path(cut), weights_only=True)["step"] == 10
    lines = []
    resumed = train_projector(vlm, [], cut, _options(), data=training_set, progress=lines.append)
    assert resumed["resumed_from"] == 10 and any("resuming" in line and "step 10" in line for line in lines)
    assert lines[1].startswith("training (11/20)")
    again = icpt.read_projector(cut)[0].state_dict()
    assert all(torch.allclose(whole[k], again[k], atol=1e-5) for k in whole)

    with pytest.raises(PersonalVLMError, match="other settings"):
        train_projector(vlm, [], cut, _options(seed=1), data=training_set)
    restarted = train_projector(vlm, [], cut, _options(steps=2, seed=1), data=training_set, restart=True)
    assert restarted["resumed_from"] == 0


def test_each_regulariser_and_the_adaptive_length_can_be_switched_off(vlm, training_set, tmp_path):
    projector = _projector(vlm)
    projector.set_statistics(*token_statistics(training_set))
    _, every = training_loss(vlm, projector, training_set, _options(), 0)
    assert {"invariance", "background", "object", "separation"} <= set(every)
    _, bare = training_loss(vlm, projector, training_set, _options(r1=False, r2=False), 0)
    assert not {"invariance", "background", "object", "separation"} & set(bare)
    figures = train_projector(vlm, [], tmp_path / "f.safetensors", _options(steps=2, fixed_length=3),
                              data=training_set)
    assert icpt.read_projector(figures["out"])[0].config.fixed_length == 3


# ---- the command ----------------------------------------------------------------------------------
def _run_cli(capsys, *args):
    code = cli.main(list(args))
    return code, capsys.readouterr()


def test_icpt_train_refuses_bad_datasets_with_exit_2_and_one_line(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    empty = tmp_path / "empty"
    (empty / "concepts").mkdir(parents=True)
    (empty / "queries.json").write_text("[]")
    one = write_dataset(tmp_path / "one", seed=3, concepts=1, layout="yollava", references=1, tests=1)
    for folder, message in ((tmp_path / "nothing", "matches no dataset layout"),
                            (empty, "no concepts found"), (one, "at least 2 concepts"),
                            (tmp_path / "missing", "not found")):
        code, out = _run_cli(capsys, "--model", str(tmp_path / "no-model"), "icpt-train", str(folder),
                             "--out", str(tmp_path / "p.safetensors"))
        assert code == 2, out.err
        assert len(out.err.strip().splitlines()) == 1 and message in out.err, out.err
    with pytest.raises(SystemExit) as exited:
        cli.main(["icpt-train", str(one), "--out", "p", "--layout", "nonsense"])
    assert exited.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_icpt_train_writes_a_projector_the_model_loads(tiny_checkpoints, vlm, world, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    code, printed = _run_cli(capsys, "--model", str(tiny_checkpoints[FAMILY]), "--device", "cpu", "--dtype",
                             "float32", "icpt-train", str(world), "--out", str(out), "--steps", "2", "--no-r2")
    assert code == 0, printed.err
    assert "trained the ICPT projector on 4 concepts" in printed.out
    assert icpt.load_projector(out, vlm).config.queries == 16
