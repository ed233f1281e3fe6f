"""Training the toy from scratch: the vision tower alone first, then every task through the prompts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ...profiles import PROFILE_HINT
from .. import toy_world as tw
from .batching import Encoder, forward_loss, patchify
from .data import make_sample, mask_cover, model_image
from .model import CHAT_TEMPLATE, build_model, build_tokenizer
from .recipe import PROFILE_NAME, Recipe, _say


# ---- training ---------------------------------------------------------------------------------
def _lr(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    start = int(recipe.decay_from * recipe.steps)
    if step < start:
        return recipe.lr
    return recipe.lr * max(0.05, 1.0 - (step - start) / max(1, recipe.steps - start))


def _step_batches(recipe: Recipe, enc: Encoder, step: int):
    rng = np.random.default_rng([recipe.seed, 11, step])
    tokens_per_image = (recipe.image_size // 28) ** 2
    out = []
    first = int(recipe.first_share * recipe.steps)
    difficulty = min(1.0, max(0, step - first) / max(1.0, recipe.curriculum * recipe.steps))
    for task, count, weight, follow_ups in (recipe.first_tasks if step < first else recipe.tasks):
        if count:
            samples = [make_sample(task, rng, recipe.world_size, follow_ups, difficulty) for _ in range(count)]
            out.append((task, weight, enc.batch_lists(samples, tokens_per_image)))
    return out


_HEADS = (("color", list(tw.COLORS)), ("category", list(tw.CATEGORIES)), ("pattern", list(tw.PATTERNS)),
          ("color2", [""] + list(tw.COLORS)), ("mark", list(tw.MARKS)))


def _vision_batch(recipe: Recipe, step: int):
    """Stage 1: scenes and, per merged visual token, the attributes of the object covering most of
    it (class 0 = background): dense labels, the way a vision encoder is pretrained before a VLM."""
    rng = np.random.default_rng([recipe.seed, 31, step])
    cell = 28
    images, labels = [], []
    for _ in range(recipe.vision_batch):
        looks = [tw.random_look(rng) for _ in range(int(rng.integers(1, 4)))]
        r = tw.render(tw.scene(rng, looks, size_range=(52, 124), image_size=recipe.world_size))
        g = recipe.image_size // cell
        cover = np.stack([mask_cover(m, recipe.image_size, cell) for m in r.masks])   # (O, g, g)
        best = cover.argmax(0)
        on = cover.max(0) >= 0.25
        lab = np.zeros((g * g, len(_HEADS)), dtype=np.int64)
        for k, (attr, values) in enumerate(_HEADS):
            per_object = np.array([values.index(getattr(l, attr)) + 1 for l in looks])
            lab[:, k] = np.where(on, per_object[best], 0).reshape(-1)
        images.append(model_image(r.image, recipe.image_size))
        labels.append(lab)
    return images, np.concatenate(labels)


def _producer(recipe: Recipe, enc: Encoder, queue, stop) -> None:
    """Draws and renders every step's samples in a second process (the world is numpy + PIL)."""
    for step in range(recipe.vision_steps):
        if stop.is_set():
            return
        queue.put((("vision", step), _vision_batch(recipe, step)))
    for step in range(recipe.steps):
        if stop.is_set():
            return
        queue.put((("chat", step), _step_batches(recipe, enc, step)))


def training_threads() -> int:
    """One thread for the model, the other core renders samples; ``$PERSONAL_VLM_TOY_THREADS`` overrides."""
    return int(os.environ.get("PERSONAL_VLM_TOY_THREADS", "1"))


def train(recipe: Recipe, out: Path, progress=_say) -> dict:
    """Train the toy from scratch and write the checkpoint to ``out``; returns timing figures.

    Samples are drawn from a per-step seed, so the data do not depend on timing; a second process
    renders them while the model trains.
    """
    import multiprocessing

    import torch
    import torch.nn.functional as F

    progress = progress or (lambda message: None)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer(recipe.vocab_size)
    for word in ("Yes", "No"):
        if len(tokenizer(word, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"the toy tokenizer splits {word!r}; yes/no readout needs one token")
    model, processor = build_model(recipe, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    threads_before = torch.get_num_threads()
    torch.set_num_threads(training_threads())
    progress(f"training a {params / 1e6:.2f} M-parameter Qwen2.5-VL for {recipe.steps} steps "
             f"({sum(n for _, n, _, _ in recipe.tasks)} chats per step, {torch.get_num_threads()} thread(s) "
             "+ one rendering process)")
    enc = Encoder(tokenizer, processor, model.config)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    model.train()
    ctx = multiprocessing.get_context("fork")
    queue, stop = ctx.Queue(maxsize=6), ctx.Event()
    worker = ctx.Process(target=_producer, args=(recipe, enc, queue, stop), daemon=True)
    worker.start()
    t0 = time.perf_counter()
    wait_s = 0.0
    running: dict[str, float] = {}
    try:
        heads = torch.nn.Linear(recipe.text_hidden, sum(len(v) + 1 for _, v in _HEADS))
        vopt = torch.optim.AdamW(list(model.model.visual.parameters()) + list(heads.parameters()),
                                 lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
        sizes = [len(v) + 1 for _, v in _HEADS]
        for step in range(recipe.vision_steps):
            w0 = time.perf_counter()
            got, (images, labels) = queue.get(timeout=600)
            wait_s += time.perf_counter() - w0
            assert got == ("vision", step)
            for g in vopt.param_groups:
                g["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup)
            pixels, grids = zip(*(patchify(im, processor) for im in images))
            feats = torch.cat(list(model.model.get_image_features(torch.cat(pixels), torch.stack(grids)).pooler_output))
            logits = heads(feats).split(sizes, dim=-1)
            target = torch.from_numpy(labels)
            loss = sum(F.cross_entropy(l, target[:, k]) for k, l in enumerate(logits)) / len(sizes)
            vopt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.model.visual.parameters(), 1.0)
            vopt.step()
            running["vision"] = 0.9 * running.get("vision", float(loss.detach())) + 0.1 * float(loss.detach())
            if (step + 1) % 50 == 0:
                per = (time.perf_counter() - t0) / (step + 1)
                progress(f"vision step {step + 1}/{recipe.vision_steps}  {per:.2f} s/step  loss {running['vision']:.3f}")
        del vopt, heads
        if recipe.feature_norm:
            # The projector's outputs land ~500× larger than the text embeddings; scale its last
            # layer so visual tokens enter the language model at a comparable norm.
            with torch.no_grad():
                images, _ = _vision_batch(recipe, recipe.vision_steps)
                pixels, grids = zip(*(patchify(im, processor) for im in images[:8]))
                feats = torch.cat(list(model.model.get_image_features(torch.cat(pixels), torch.stack(grids)).pooler_output))
                scale = recipe.feature_norm / float(feats.norm(dim=-1).mean())
                last = [m for m in model.model.visual.merger.modules() if isinstance(m, torch.nn.Linear)][-1]
                last.weight.mul_(scale)
                last.bias.mul_(scale)
            progress(f"visual tokens scaled by {scale:.4f} to a mean norm of {recipe.feature_norm}")
        t1 = time.perf_counter()
        aux_head = torch.nn.Linear(recipe.text_hidden, 1) if recipe.match_weight else None
        if aux_head is not None:
            opt.add_param_group({"params": list(aux_head.parameters()), "weight_decay": 0.0})
        for step in range(recipe.steps):
            w0 = time.perf_counter()
            got, batches = queue.get(timeout=600)
            wait_s += time.perf_counter() - w0
            assert got == ("chat", step)
            for g in opt.param_groups:
                g["lr"] = _lr(recipe, step)
            opt.zero_grad(set_to_none=True)
            for task, weight, lists in batches:
                loss, aux_loss = forward_loss(model, *enc.tensors(*lists), aux_head=aux_head)
                total = loss * weight
                if aux_loss is not None:
                    total = total + recipe.match_weight * aux_loss
                    running["match"] = 0.9 * running.get("match", float(aux_loss.detach())) + 0.1 * float(aux_loss.detach())
                total.backward()
                running[task] = 0.9 * running.get(task, float(loss.detach())) + 0.1 * float(loss.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if (step + 1) % 25 == 0 or step == 0:
                spent = time.perf_counter() - t1
                per = spent / (step + 1)
                losses = " ".join(f"{k} {v:.3f}" for k, v in running.items())
                progress(f"step {step + 1}/{recipe.steps}  {per:.2f} s/step  eta {per * (recipe.steps - step - 1) / 60:.1f} min"
                         f"  loss: {losses}")
    finally:
        stop.set()
        while worker.is_alive():
            try:
                queue.get(timeout=0.1)
            except Exception:
                pass
            worker.join(timeout=0.1)
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / PROFILE_HINT).write_text(json.dumps({"profile": PROFILE_NAME}) + "\n")
    return {"parameters": params, "steps": recipe.steps, "vision_steps": recipe.vision_steps,
            "train_seconds": round(seconds, 1), "vision_seconds": round(t1 - t0, 1),
            "seconds_per_step": round((seconds - (t1 - t0)) / recipe.steps, 3),
            "waiting_for_samples_share": round(wait_s / seconds, 3), "threads": training_threads(),
            "final_losses": {k: round(v, 4) for k, v in running.items()}}
