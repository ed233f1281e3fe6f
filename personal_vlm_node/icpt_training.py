"""Training the ICPT projector once per backbone (the method and its losses: :mod:`.icpt`).

The VLM stays frozen. Every image of the training datasets is encoded once and its visual tokens are
kept, so a step costs the projector's forward passes and the language model's forward and backward
passes over a few short prompts. A step takes one dataset and a group of G concepts from it (a
concept and, where it has one, a look-alike of it first), and makes:

- for every concept a prompt from a random subset of its views (all of them half of the time), cut
  to a random prefix length ℓ ∈ [L_min, M] (nested truncation), asked about one image it is in and
  one it is not in (a look-alike negative half of the time, when the dataset has any): L_task;
- one joint prompt with the group's prompts, asked about a concept that is in the image and one that
  is not;
- R1a from two disjoint halves of each concept's views, R1b against the backgrounds of the step's
  images, R2 over the group's pooled prompts.

Look-alikes. The toy world's metadata (toy_world.json) names look-alike negative images and the
looks of the concepts (same category and main colour = look-alikes); a Yo'LLaVA layout's
negative_example/ images are look-alike negatives. Other datasets: each concept's look-alike is
the concept whose mean reference token lies nearest.

Backgrounds (R1b). A token is background when its centre lies outside every object: the objects
come from a mask file (``masks/<image's path>`` under the dataset root, white = object) or from the
toy world's boxes; images with neither give no background direction, and a dataset without any
trains without R1b.

Sampling is seeded by (seed, step), so a run resumed from a checkpoint takes the same steps as one
that never stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import prompts
from .errors import PersonalVLMError
from .icpt import (MAX_VIEWS, Projector, ProjectorConfig, background_loss, backbone_fingerprint, name_embeddings,
                   object_attention_loss, save_projector, separation_loss, task_loss, view_invariance_loss)
from .vlm.base import ImageTokens, Memory, VLMAdapter


@dataclass
class TrainOptions:
    """One training run; everything but ``checkpoint_every`` decides whether a checkpoint resumes."""

    steps: int = 1200
    seed: int = 0
    lr: float = 3e-3
    warmup: int = 50
    group: int = 4                      # G: concepts per step
    joint: bool = True                  # joint prompts in L_task
    r1: bool = True                     # R1a + R1b
    r2: bool = True
    invariance_weight: float = 0.5
    background_weight: float = 0.5
    object_weight: float = 0.5
    separation_weight: float = 1.0
    margin: float = 0.2                 # m
    lookalike_weight: float = 3.0
    hidden: int = 256                   # the projector's H
    queries: int = 16                   # M
    fixed_length: int | None = None     # no adaptive length: every prompt this long, in training too
    name_tokens: bool = False
    layout: str = "auto"
    checkpoint_every: int = 100

    def check(self) -> TrainOptions:
        if self.steps < 1:
            raise PersonalVLMError(f"--steps must be at least 1, got {self.steps}")
        if self.group < 2:
            raise PersonalVLMError("a training step needs at least 2 concepts")
        if self.checkpoint_every < 1:
            raise PersonalVLMError("checkpoints need a period of at least 1 step")
        return self

    def projector_config(self, width: int) -> ProjectorConfig:
        return ProjectorConfig(width, hidden=self.hidden, queries=self.queries, fixed_length=self.fixed_length,
                               name_tokens=self.name_tokens,
                               min_tokens=min(4, self.queries)).check()


@dataclass
class TrainingConcept:
    dataset: int
    name: str
    references: list[Path]
    positives: list[Path]                  # images it is in
    negatives: list[Path]                  # images it is not in
    lookalike_negatives: list[Path] = field(default_factory=list)
    lookalikes: list[int] = field(default_factory=list)   # indices of its look-alike concepts


@dataclass
class TrainingSet:
    """What the datasets give training: concepts, the images and where their objects are."""

    roots: list[Path]
    concepts: list[TrainingConcept]
    objects: dict[Path, list[tuple[float, float, float, float]] | Path]   # boxes (x0, y0, x1, y1) or a mask
    contains: dict[Path, set[str]]            # image → the concepts in it, by "<dataset>:<name>"
    images: dict[Path, ImageTokens] = field(default_factory=dict)
    backgrounds: dict[Path, torch.Tensor] = field(default_factory=dict)    # (D,) mean background token
    on_object: dict[Path, torch.Tensor] = field(default_factory=dict)      # (N,) bool: token on an object
    mean_background: torch.Tensor | None = None                            # b̄ (D,): their mean

    def of_dataset(self, d: int) -> list[int]:
        return [i for i, c in enumerate(self.concepts) if c.dataset == d]


# ---- reading the datasets -----------------------------------------------------------------------
def read_training_set(datasets: list[Path], layout: str = "auto") -> TrainingSet:
    """Concepts, positives, negatives and look-alikes of every dataset (no model needed)."""
    from .evaluation.datasets import load_dataset

    if not datasets:
        raise PersonalVLMError("give at least one training dataset")
    roots, concepts, objects, contains = [], [], {}, {}
    for d, path in enumerate(datasets):
        dataset = load_dataset(path, layout, shots=MAX_VIEWS)
        if len(dataset.concepts) < 2:
            raise PersonalVLMError(f"{dataset.root} has {len(dataset.concepts)} concept; ICPT trains on datasets "
                                   "of at least 2 concepts (they are each other's negatives)")
        roots.append(dataset.root)
        meta = _toy_metadata(dataset.root)
        objects.update(_objects(dataset.root, meta))
        images = {q.image: set(q.concepts) for q in dataset.queries}
        for name, refs in dataset.references.items():
            for ref in refs:
                images.setdefault(ref, {name})
        for image, present in images.items():
            contains[image] = {f"{d}:{n}" for n in present}
        lookalike_images: dict[str, set[Path]] = {n: set() for n in dataset.concepts}
        for rel, name in meta.get("lookalike_pairs", []):
            if name in lookalike_images:
                lookalike_images[name].add((dataset.root / rel).resolve())
        for q in dataset.queries:
            if q.negative_for in lookalike_images:
                lookalike_images[q.negative_for].add(q.image)
        start = len(concepts)
        for name, refs in dataset.references.items():
            positives = [q.image for q in dataset.queries if name in q.concepts]
            negatives = [q.image for q in dataset.queries if name not in q.concepts and q.negative_for is None]
            concepts.append(TrainingConcept(d, name, list(refs), positives, negatives,
                                            sorted(lookalike_images[name])))
        looks = meta.get("concepts", {})
        for i in range(start, len(concepts)):
            a = looks.get(concepts[i].name)
            concepts[i].lookalikes = [j for j in range(start, len(concepts)) if j != i and a is not None
                                      and _same_look(a, looks.get(concepts[j].name))]
    return TrainingSet(roots, concepts, objects, contains)


def _same_look(a: dict, b: dict | None) -> bool:
    """The toy world's look-alike: same category and main colour."""
    return b is not None and a.get("category") == b.get("category") and a.get("color") == b.get("color")


def _toy_metadata(root: Path) -> dict:
    path = root / "toy_world.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PersonalVLMError(f"{path} is not readable JSON: {exc}") from exc


def _objects(root: Path, meta: dict) -> dict:
    """image → its objects' boxes (toy world) or its mask file."""
    found = {}
    for rel, records in meta.get("images", {}).items():
        boxes = [tuple(float(v) for v in o["box"]) for o in records if o.get("box")]
        found[(root / rel).resolve()] = boxes
    masks = root / "masks"
    if masks.is_dir():
        for mask in masks.rglob("*"):
            if mask.is_file():
                found[(root / mask.relative_to(masks)).resolve()] = mask
    return found


# ---- the cached visual tokens --------------------------------------------------------------------
def object_tokens(tokens: ImageTokens, objects) -> torch.Tensor:
    """(N,) bool: the tokens whose centres lie on an object (inside a box, or white in the mask)."""
    boxes = tokens.token_boxes.float()                                           # (N, 4)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    if isinstance(objects, Path):
        from .images import load_image

        mask = torch.from_numpy(np.asarray(load_image(objects).convert("L"))) > 127   # (H, W)
        h, w = mask.shape
        inside = mask[cy.long().clamp(0, h - 1), cx.long().clamp(0, w - 1)]     # (N,)
    else:
        inside = torch.zeros(boxes.shape[0], dtype=torch.bool)
        for x0, y0, x1, y1 in objects:
            inside |= (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
    return inside


def background_direction(tokens: ImageTokens, inside: torch.Tensor) -> torch.Tensor | None:
    """The mean visual token (D,) of the tokens off every object; None when objects cover them all."""
    if bool(inside.all()):
        return None
    return tokens.features[~inside.to(tokens.features.device)].float().mean(0)   # (D,)


def encode_training_set(vlm: VLMAdapter, data: TrainingSet, progress=None) -> None:
    """Encode every image once (the VLM is frozen); background directions; look-alikes where the
    datasets name none (each concept's nearest by mean reference token)."""
    paths = sorted({p for c in data.concepts for p in c.references + c.positives + c.negatives
                    + c.lookalike_negatives})
    for i, path in enumerate(paths):
        if progress and (i % 20 == 0 or i + 1 == len(paths)):
            progress(f"encoding images ({i + 1}/{len(paths)})")
        tokens = vlm.encode_image(path)
        data.images[path] = tokens
        if path in data.objects:
            data.on_object[path] = object_tokens(tokens, data.objects[path])
            direction = background_direction(tokens, data.on_object[path])
            if direction is not None:
                data.backgrounds[path] = direction
    if data.backgrounds:
        data.mean_background = torch.stack([b.float() for _, b in sorted(data.backgrounds.items())]).mean(0)
    for d in range(len(data.roots)):
        members = data.of_dataset(d)
        if any(data.concepts[i].lookalikes for i in members):
            continue
        means = torch.stack([torch.cat([data.images[p].features.float() for p in data.concepts[i].references]).mean(0)
                             for i in members])                                  # (C, D)
        means = means - means.mean(0)
        cosine = torch.nn.functional.normalize(means, dim=-1) @ torch.nn.functional.normalize(means, dim=-1).T
        cosine.fill_diagonal_(-2.0)
        for row, i in enumerate(members):
            data.concepts[i].lookalikes = [members[int(cosine[row].argmax())]]


def token_statistics(data: TrainingSet) -> tuple[float, torch.Tensor]:
    """s (mean norm) and μ (D,) of every cached visual token."""
    features = torch.cat([t.features.float().cpu() for _, t in sorted(data.images.items())])   # (ΣN, D)
    return float(features.norm(dim=-1).mean()), features.mean(0)


# ---- one step --------------------------------------------------------------------------------------
def _yes_no_logit(vlm: VLMAdapter, parts: list, yes: int, no: int) -> torch.Tensor:
    """z = λ_yes − λ_no of the prompt's first answer token, with gradients to its memories. ()"""
    prompt = vlm.build(parts)
    logits, _ = vlm._run(prompt.inputs_embeds, prompt.position_ids, **prompt.lm_inputs)   # (1, V), with grads
    return logits[0, yes] - logits[0, no]


def training_loss(vlm: VLMAdapter, projector: Projector, data: TrainingSet, options: TrainOptions,
                  step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_task + weighted R1a, R1b, R2 of step ``step`` (seeded by (seed, step))."""
    rng = random.Random(f"{options.seed}:{step}")
    c = projector.config
    d = rng.choices(range(len(data.roots)), weights=[len(data.of_dataset(i)) for i in range(len(data.roots))])[0]
    pool = data.of_dataset(d)
    group = [rng.choice(pool)]
    partners = [j for j in data.concepts[group[0]].lookalikes if j in pool]
    if partners:
        group.append(rng.choice(partners))
    others = [j for j in pool if j not in group]
    rng.shuffle(others)
    group += others[: max(0, options.group - len(group))]

    def feats(paths):
        return [data.images[p].features for p in paths]

    def length():
        return c.fixed_length if c.fixed_length is not None else rng.randint(c.min_tokens, c.queries)

    full, zs, ys, invariance, reading, used = {}, [], [], [], [], set()
    for j in group:
        concept = data.concepts[j]
        refs = concept.references
        count = len(refs) if rng.random() < 0.5 else rng.randint(1, len(refs))
        views = rng.sample(refs, count)
        names = name_embeddings(vlm, concept.name) if c.name_tokens else None
        full[j], alpha = projector(feats(views), names)                         # (M, D), (M, N)
        used.update(views)
        if options.r1 and all(v in data.on_object for v in views):
            on_object = torch.cat([data.on_object[v] for v in views])            # (N,)
            if bool(on_object.any()):
                reading.append(object_attention_loss(alpha, on_object))
        if options.r1 and len(refs) >= 2:
            shuffled = rng.sample(refs, len(refs))
            half = len(shuffled) // 2
            a, _ = projector(feats(shuffled[:half]), names)
            b, _ = projector(feats(shuffled[half:]), names)
            invariance.append(view_invariance_loss(projector.centred(a), projector.centred(b)))
    yes, no = vlm.yes_no_ids()
    for j in group:
        concept = data.concepts[j]
        memory = Memory(full[j][: length()], concept.name)
        asked = []
        if concept.positives:
            asked.append((rng.choice(concept.positives), 1.0))
        lookalike = concept.lookalike_negatives + [p for k in concept.lookalikes for p in data.concepts[k].positives
                                                   if f"{d}:{concept.name}" not in data.contains.get(p, set())]
        if lookalike and rng.random() < 0.5:
            asked.append((rng.choice(lookalike), 0.0))
        elif concept.negatives:
            asked.append((rng.choice(concept.negatives), 0.0))
        for image, present in asked:
            used.add(image)
            zs.append(_yes_no_logit(vlm, prompts.recognize(memory, data.images[image], vlm.family), yes, no))
            ys.append(present)
    if options.joint:
        order = rng.sample(group, len(group))
        memories = [Memory(full[j][: length()], data.concepts[j].name) for j in order]
        shown = rng.choice([j for j in group if data.concepts[j].positives] or group)
        image = rng.choice(data.concepts[shown].positives or data.concepts[shown].references)
        present = data.contains.get(image, set())
        absent = [j for j in group if f"{d}:{data.concepts[j].name}" not in present]
        questions = [(shown, 1.0)] + ([(rng.choice(absent), 0.0)] if absent else [])
        for j, label in questions:
            parts = prompts.recognize_joint(memories, data.images[image], data.concepts[j].name, vlm.family)
            zs.append(_yes_no_logit(vlm, parts, yes, no))
            ys.append(label)
    z = torch.stack(zs)                                                          # (B,)
    target = torch.tensor(ys, device=z.device)                                   # (B,)
    loss_task = task_loss(z, target)
    terms = {"task": float(loss_task.detach()), "accuracy": float(((z.detach() > 0).float() == target).float().mean())}
    loss = loss_task
    if options.r1:
        r1a = torch.stack(invariance).mean() if invariance else loss.new_zeros(())
        directions = [data.backgrounds[p] for p in sorted(used) if p in data.backgrounds]
        r1b = loss.new_zeros(())
        if directions:
            # How backgrounds differ from the average background: what the environment changes.
            centred_bg = torch.stack(directions) - data.mean_background.to(full[group[0]])   # (K, D)
            r1b = torch.stack([background_loss(projector.centred(full[j]), centred_bg) for j in group]).mean()
        r1c = torch.stack(reading).mean() if reading else loss.new_zeros(())
        loss = loss + options.invariance_weight * r1a + options.background_weight * r1b + options.object_weight * r1c
        terms.update(invariance=float(r1a.detach()), background=float(r1b.detach()), object=float(r1c.detach()))
    if options.r2:
        pooled = torch.stack([projector.centred(full[j]).mean(0) for j in group])            # (G, D)
        lookalike = torch.tensor([[k in data.concepts[j].lookalikes or j in data.concepts[k].lookalikes
                                   for k in group] for j in group])                          # (G, G)
        r2 = separation_loss(pooled, lookalike, options.margin, options.lookalike_weight)
        loss = loss + options.separation_weight * r2
        terms["separation"] = float(r2.detach())
    terms["loss"] = float(loss.detach())
    return loss, terms


# ---- the run -----------------------------------------------------------------------------------------
def settings_key(data: TrainingSet, options: TrainOptions, fingerprint: str) -> str:
    """What a checkpoint must match to be resumed: the datasets, the options, the backbone."""
    chosen = {k: v for k, v in asdict(options).items() if k != "checkpoint_every"}
    text = json.dumps({"datasets": [str(r) for r in data.roots], "options": chosen, "backbone": fingerprint},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def _learning_rate(options: TrainOptions, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < options.warmup:
        return options.lr * (step + 1) / options.warmup
    t = (step - options.warmup) / max(1, options.steps - options.warmup)
    return options.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _save_checkpoint(path: Path, key: str, step: int, projector: Projector, optimizer, history: list) -> None:
    from .output import write_atomic

    buffer = io.BytesIO()
    torch.save({"key": key, "step": step, "projector": projector.state_dict(), "optimizer": optimizer.state_dict(),
                "history": history}, buffer)
    write_atomic(path, buffer.getvalue())


def _load_checkpoint(path: Path, key: str) -> dict | None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # a cut-off or foreign file: torch and pickle raise many kinds
        raise PersonalVLMError(f"the checkpoint {path} cannot be read ({type(exc).__name__}); give --restart to "
                               "train from the start") from exc
    if saved.get("key") != key:
        raise PersonalVLMError(f"the checkpoint {path} is of a run with other settings (datasets, options or "
                               "model); give --restart to discard it, or another --out")
    return saved


def train_projector(vlm: VLMAdapter, datasets: list[Path], out: Path, options: TrainOptions | None = None,
                    progress=None, restart: bool = False, data: TrainingSet | None = None) -> dict:
    """Train a projector for ``vlm`` on ``datasets`` and save it to ``out`` (safetensors).

    Checkpoints (every ``options.checkpoint_every`` steps, with the optimizer state) go to
    ``<out>.ckpt``; the same call again resumes from it, ``restart`` discards it. ``progress(line)``
    gets lines with "(done/total)". Returns the run's figures."""
    options = (options or TrainOptions()).check()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda line: None)
    data = data or read_training_set([Path(p) for p in datasets], options.layout)
    started = time.perf_counter()
    if not data.images:
        encode_training_set(vlm, data, say)
    encoded = time.perf_counter() - started
    fingerprint = backbone_fingerprint(vlm)
    key = settings_key(data, options, fingerprint)
    torch.manual_seed(options.seed)
    projector = Projector(options.projector_config(vlm.hidden_size))
    projector.set_statistics(*token_statistics(data))
    projector.to(vlm.device).train()
    parameters = [p for p in projector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, weight_decay=0.01)
    ckpt = checkpoint_path(out)
    step, history = 0, []
    if ckpt.is_file() and not restart:
        saved = _load_checkpoint(ckpt, key)
        projector.load_state_dict(saved["projector"])
        optimizer.load_state_dict(saved["optimizer"])
        step, history = int(saved["step"]), list(saved["history"])
        say(f"resuming from {ckpt} at step {step}")
    resumed_from = step
    with vlm._lock:
        while step < options.steps:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(options, step)
            loss, terms = training_loss(vlm, projector, data, options, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=parameters)       # the VLM's own weights get no gradients
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            step += 1
            history.append({"step": step, **{k: round(v, 5) for k, v in terms.items()}})
            recent = statistics.fmean(h["loss"] for h in history[-50:])
            say(f"training ({step}/{options.steps}) loss {recent:.3f}")
            if step % options.checkpoint_every == 0 or step == options.steps:
                _save_checkpoint(ckpt, key, step, projector, optimizer, history)
    projector.eval()
    window = max(1, min(50, len(history) // 4))
    figures = {
        "out": str(out), "steps": options.steps, "resumed_from": resumed_from,
        "seconds": round(time.perf_counter() - started, 1), "encoding_seconds": round(encoded, 1),
        "concepts": len(data.concepts), "images": len(data.images), "backbone": fingerprint,
        "loss_start": round(statistics.fmean(h["loss"] for h in history[:window]), 4),
        "loss_end": round(statistics.fmean(h["loss"] for h in history[-window:]), 4),
        "task_start": round(statistics.fmean(h["task"] for h in history[:window]), 4),
        "task_end": round(statistics.fmean(h["task"] for h in history[-window:]), 4),
    }
    save_projector(out, projector, fingerprint, {"training": {k: v for k, v in figures.items() if k != "out"},
                                                 "options": asdict(options)})
    return figures
