"""Qwen2.5-VL / Qwen2-VL: dynamic resolution, 14 px patches merged 2×2, M-RoPE positions.

The processor resizes the whole image (no crop) to a multiple of 28 px, so visual tokens tile the
image uniformly, row-major. M-RoPE positions: a text row gets (p, p, p) and advances p by one; a
block of visual tokens starting at p gets (p, p + row, p + col) for the token at (row, col) of its
merged grid, and the text after it continues at p + max(rows, cols) — the scheme of the model's own
``get_rope_index`` (a test pins the equality). We compute them ourselves so that a memory, spliced
between ``<|vision_start|>`` … ``<|vision_end|>``, keeps the grid positions its tokens had in the
reference image (``memory_layout: image``); as plain text rows it gets 1-D positions
(``memory_layout: text``). Positions are always passed explicitly — with ``inputs_embeds`` alone
the model would silently give the image 1-D positions and reuse a stale ``rope_deltas``.
"""

from __future__ import annotations

import torch

from ..base import EncoderInputs, ImageTokens, PreparedImage, VLMAdapter, grid_boxes, to_device
from .graph import QwenVisionGraph


class Qwen25VLAdapter(VLMAdapter):
    family = "qwen2_5_vl"
    vision_graph = QwenVisionGraph
    model_types = ("qwen2_5_vl", "qwen2_vl")

    @property
    def language_model(self):
        return self.model.model.language_model

    def preprocess(self, prepared: PreparedImage) -> EncoderInputs:
        inputs = self.image_processor(images=[prepared.image], return_tensors="pt")
        return EncoderInputs({
            "pixel_values": to_device(inputs["pixel_values"], self.device, self.dtype),   # (P, C·T·p·p)
            "image_grid_thw": inputs["image_grid_thw"].to(self.device),           # (1, 3)
        })

    def vision_forward(self, tensors):
        out = self.model.model.get_image_features(tensors["pixel_values"], tensors["image_grid_thw"])
        return out.pooler_output[0]                                                # (N, D)

    def assemble(self, features, inputs, prepared) -> ImageTokens:
        grid_thw = inputs.tensors["image_grid_thw"].cpu()
        merge = self.config.vision_config.spatial_merge_size
        patch = self.config.vision_config.patch_size
        _, h, w = (int(v) for v in grid_thw[0])
        rows, cols = h // merge, w // merge
        boxes = grid_boxes(rows, cols, (0.0, 0.0, w * patch, h * patch))         # resized pixels
        iw, ih = prepared.image.size
        boxes[:, 0::2] *= iw / (w * patch)                                         # → processed image
        boxes[:, 1::2] *= ih / (h * patch)
        n = features.shape[0]
        segment = ([self.config.vision_start_token_id] + [self.config.image_token_id] * n
                   + [self.config.vision_end_token_id])
        return ImageTokens(features.detach(), segment, list(range(1, n + 1)), prepared.to_source(boxes),
                           (rows, cols), prepared.source_size, rope={"image_grid_thw": grid_thw})

    def memory_segment(self, k):
        segment = ([self.config.vision_start_token_id] + [self.config.image_token_id] * k
                   + [self.config.vision_end_token_id])
        return segment, list(range(1, k + 1))

    def _positions(self, input_ids, blocks):
        length = input_ids.shape[1]
        position_ids = torch.zeros(3, 1, length, dtype=torch.long)               # (3, 1, L)
        starts = {int(block.rows[0]): block for block in blocks if len(block.rows)}
        p = i = 0
        while i < length:
            block = starts.get(i)
            if block is None:
                position_ids[:, 0, i] = p
                p, i = p + 1, i + 1
                continue
            rows = block.rows
            position_ids[0, 0, rows] = p
            position_ids[1, 0, rows] = p + block.coords[:, 0]
            position_ids[2, 0, rows] = p + block.coords[:, 1]
            p, i = p + max(block.grid), i + len(rows)
        return position_ids.to(self.device), p

    def _step_position(self, position: int) -> torch.Tensor:
        return torch.full((3, 1, 1), position, device=self.device, dtype=torch.long)
