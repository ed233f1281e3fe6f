"""Samples become token ids, labels and pixel patches; the loss runs through the adapter's splice path."""

from __future__ import annotations

import math
import re

import numpy as np

from .data import Sample, model_image, rendered_kind
from .model import CHAT_TEMPLATE


# ---- batching ---------------------------------------------------------------------------------
class Encoder:
    """Sample → token ids / labels / images, rendered exactly as the adapters render prompts."""

    def __init__(self, tokenizer, processor, model_config):
        self.tok, self.processor = tokenizer, processor
        self.side = int(round(math.sqrt(processor.size["longest_edge"])))     # square images of this side
        self.image_id = model_config.image_token_id
        self.start_id, self.end_id = model_config.vision_start_token_id, model_config.vision_end_token_id
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
        return self._cache[text]

    def encode(self, sample: Sample, tokens_per_image: int):
        """Token ids, labels (answer tokens and their end-of-turn) and images of a chat whose first
        user turn is exactly what the adapter renders for ``sample.parts``; follow-up turns (more
        questions about more images) continue the same chat."""
        images, image_parts = [], []

        def text_of(parts):
            out = []
            for part in parts:
                if isinstance(part, str):
                    out.append(part)
                else:
                    out.append(f"\ue000{len(images)}\ue001")
                    images.append(part.image)
                    image_parts.append(part)
            return "".join(out)

        turns = [(sample.parts, sample.answer)] + list(sample.follow_ups)
        messages = []
        for k, (parts, _) in enumerate(turns):
            messages.append({"role": "user", "content": [{"type": "text", "text": text_of(parts)}]})
            if k + 1 < len(turns):
                messages.append({"role": "assistant", "content": [{"type": "text", "text": f"\ue002{k}\ue003"}]})
        rendered = self.tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True) + f"\ue002{len(turns) - 1}\ue003"
        ids: list[int] = []
        labels: list[int] = []
        aux: list[int] = []
        pending_end = False
        for i, piece in enumerate(re.split("[\ue000-\ue003]", rendered)):
            kind = i % 2
            if kind and rendered_kind(rendered, i) == "image":
                ids += [self.start_id] + [self.image_id] * tokens_per_image + [self.end_id]
                labels += [-100] * (tokens_per_image + 2)
                target = image_parts[int(piece)].token_labels
                target = target(self.side) if callable(target) else target
                aux += [-100] + (list(map(int, target)) if target is not None else [-100] * tokens_per_image) + [-100]
            elif kind:
                answer = self._ids(turns[int(piece)][1])
                ids += answer
                labels += answer
                aux += [-100] * len(answer)
                pending_end = True
            else:
                chunk = self._ids(piece)
                ids += chunk
                labels += [-100] * len(chunk)
                aux += [-100] * len(chunk)
                if pending_end and chunk:
                    if chunk[0] == self.im_end:
                        labels[len(labels) - len(chunk)] = self.im_end
                    pending_end = False
        if pending_end:
            ids.append(self.im_end)
            labels.append(self.im_end)
            aux.append(-100)
        return ids, labels, images, aux

    def batch_lists(self, samples: list[Sample], tokens_per_image: int):
        """Plain lists and uint8 arrays (cheap to send between processes)."""
        rows = [self.encode(s, tokens_per_image) for s in samples]
        images = [model_image(im, self.side) for r in rows for im in r[2]]
        return [r[0] for r in rows], [r[1] for r in rows], images, [r[3] for r in rows]

    def tensors(self, ids_list, labels_list, images, aux_list=None, patch: int = 14, merge: int = 2):
        import torch

        length = max(len(i) for i in ids_list)
        ids = torch.full((len(ids_list), length), self.pad, dtype=torch.long)
        labels = torch.full((len(ids_list), length), -100, dtype=torch.long)
        aux = torch.full((len(ids_list), length), -100, dtype=torch.long)
        mask = torch.zeros((len(ids_list), length), dtype=torch.long)
        for b, (i, l) in enumerate(zip(ids_list, labels_list)):
            ids[b, :len(i)] = torch.tensor(i)
            labels[b, :len(l)] = torch.tensor(l)
            mask[b, :len(i)] = 1
            if aux_list is not None:
                aux[b, :len(aux_list[b])] = torch.tensor(aux_list[b])
        pixels, grids = zip(*(patchify(im, self.processor, patch, merge) for im in images))
        return ids, labels, mask, torch.cat(pixels), torch.stack(grids), aux

    def batch(self, samples: list[Sample], tokens_per_image: int):
        return self.tensors(*self.batch_lists(samples, tokens_per_image))


def patchify(image: np.ndarray, processor, patch: int = 14, merge: int = 2):
    """Qwen2-VL's pixel patches of an (H, W, 3) uint8 image whose sides are multiples of
    patch·merge and within the processor's pixel budget (no resize): what the processor computes."""
    import torch

    h, w, _ = image.shape
    mean = np.asarray(processor.image_mean, np.float32)
    std = np.asarray(processor.image_std, np.float32)
    x = (image.astype(np.float32) * np.float32(processor.rescale_factor) - mean) / std        # (H, W, C)
    x = np.repeat(x.transpose(2, 0, 1)[None], 2, axis=0)                                     # (T, C, H, W)
    gh, gw = h // patch, w // patch
    x = x.reshape(1, 2, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, 3 * 2 * patch * patch)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor([1, gh, gw])


def forward_loss(model, ids, labels, mask, pixel_values, grid_thw, aux=None, aux_head=None):
    """Mean cross-entropy of the answer tokens, through the same splice + M-RoPE path as the adapter.

    With ``aux_head``: also the dense auxiliary loss — at every query-image token the last hidden
    state predicts whether the token shows the object of the reference image (binary cross-entropy)."""
    import torch
    import torch.nn.functional as F

    inner = model.model
    embeds = inner.language_model.get_input_embeddings()(ids)
    feats = torch.cat(list(inner.get_image_features(pixel_values, grid_thw).pooler_output))
    image_rows = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(image_rows[..., None].expand_as(embeds), feats.to(embeds.dtype))
    inner.rope_deltas = None
    positions, _ = inner.get_rope_index(ids, mm_token_type_ids=image_rows.int(), image_grid_thw=grid_thw,
                                        attention_mask=mask)
    out = inner.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False)
    target = labels[:, 1:]
    answer = target != -100                      # only the rows that predict an answer token
    logits = model.lm_head(out.last_hidden_state[:, :-1][answer])
    loss = F.cross_entropy(logits.float(), target[answer])
    if aux_head is None or aux is None or not (aux >= 0).any():
        return loss, None
    where = aux >= 0
    aux_logits = aux_head(out.last_hidden_state[where]).squeeze(-1)
    return loss, F.binary_cross_entropy_with_logits(aux_logits.float(), aux[where].float())
