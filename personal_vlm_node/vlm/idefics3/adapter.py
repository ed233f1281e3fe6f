"""Idefics3 / SmolVLM: SigLIP tiles + global image, pixel-shuffle connector, LLaMA-style LM.

The image processor resizes the image, splits it into rows×cols tiles and appends a downscaled
global image; each gives ``image_seq_len`` tokens on a square grid. The prompt segment interleaves
``<fake_token_around_image>``, ``<row_r_col_c>`` / ``<global-img>`` markers with the image slots,
as the checkpoint was trained. 1-D RoPE: positions are plain row indices. A memory laid out as an
image is one "global image": ``<fake_token_around_image><global-img>`` + its tokens +
``<fake_token_around_image>``.
"""

from __future__ import annotations

import math

import torch

from ..base import EncoderInputs, ImageTokens, PreparedImage, VLMAdapter, grid_boxes, to_device
from .graph import Idefics3VisionGraph


class Idefics3Adapter(VLMAdapter):
    family = "idefics3"
    vision_graph = Idefics3VisionGraph
    model_types = ("idefics3", "smolvlm")

    @property
    def language_model(self):
        return self.model.model.text_model

    def _segment(self, rows: int, cols: int, seq_len: int) -> tuple[list[int], list[int]]:
        tid = self.tokenizer.convert_tokens_to_ids
        fake, image, glob = tid("<fake_token_around_image>"), self.config.image_token_id, tid("<global-img>")
        newline = self._text_ids("\n")
        ids: list[int] = []
        slots: list[int] = []

        def add_tile(marker: int) -> None:
            ids.extend([fake, marker])
            slots.extend(range(len(ids), len(ids) + seq_len))
            ids.extend([image] * seq_len)

        for r in range(rows):
            for c in range(cols):
                add_tile(tid(f"<row_{r + 1}_col_{c + 1}>"))
            ids.extend(newline)
        if rows:
            ids.extend(newline)
        add_tile(glob)
        ids.append(fake)
        return ids, slots

    def memory_segment(self, k):
        tid = self.tokenizer.convert_tokens_to_ids
        fake = tid("<fake_token_around_image>")
        return [fake, tid("<global-img>")] + [self.config.image_token_id] * k + [fake], list(range(2, k + 2))

    def preprocess(self, prepared: PreparedImage) -> EncoderInputs:
        inputs = self.image_processor(images=[[prepared.image]], return_row_col_info=True,
                                      return_tensors="pt")
        tensors = {"pixel_values": to_device(inputs["pixel_values"], self.device, self.dtype)}  # (1, P, 3, S, S)
        if inputs.get("pixel_attention_mask") is not None:
            tensors["pixel_attention_mask"] = inputs["pixel_attention_mask"].to(self.device)
        return EncoderInputs(tensors, {"rows": int(inputs["rows"][0][0]), "cols": int(inputs["cols"][0][0])})

    def vision_forward(self, tensors):
        out = self.model.model.get_image_features(tensors["pixel_values"], tensors.get("pixel_attention_mask"))
        return out.pooler_output[0]                                                # (P·T, D)

    def assemble(self, features, inputs, prepared) -> ImageTokens:
        rows, cols = inputs.layout["rows"], inputs.layout["cols"]
        seq_len = features.shape[0] // (rows * cols + 1)
        side = math.isqrt(seq_len)
        w, h = prepared.image.size
        tiles = [(c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows)
                 for r in range(rows) for c in range(cols)] + [(0.0, 0.0, float(w), float(h))]
        boxes = torch.cat([grid_boxes(side, side, box) for box in tiles])
        segment, slots = self._segment(rows, cols, seq_len)
        return ImageTokens(features.detach(), segment, slots, prepared.to_source(boxes),
                           (side, side), prepared.source_size)
