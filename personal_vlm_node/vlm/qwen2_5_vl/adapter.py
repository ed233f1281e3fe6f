"""Qwen2.5-VL / Qwen2-VL: dynamic resolution, 14 px patches merged 2×2, M-RoPE positions.

The processor resizes the whole image (no crop) to a multiple of 28 px, so visual tokens tile the
image uniformly, row-major. Memories are spliced as *text* rows (token type 0): they get 1-D
positions, the image gets its 3-D (t, h, w) positions from ``get_rope_index``. We always pass these
positions explicitly — with ``inputs_embeds`` alone the model would silently give the image 1-D
positions and reuse a stale ``rope_deltas``.
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

    def _positions(self, input_ids, images, image_positions):
        token_type = torch.zeros_like(input_ids, dtype=torch.int32)               # (1, L)
        for rows in image_positions:
            token_type[0, rows.to(input_ids.device)] = 1
        grid_thw = (torch.cat([img.rope["image_grid_thw"] for img in images]).to(self.device)
                    if images else None)
        if grid_thw is None:
            length = input_ids.shape[1]
            return torch.arange(length, device=self.device).view(1, 1, -1).expand(3, 1, -1), length
        self.model.model.rope_deltas = None
        position_ids, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=token_type, image_grid_thw=grid_thw)        # (3, 1, L)
        return position_ids, int(position_ids.max()) + 1

    def _step_position(self, position: int) -> torch.Tensor:
        return torch.full((3, 1, 1), position, device=self.device, dtype=torch.long)
