"""InternVL (native transformers class): InternViT + pixel-shuffle MLP projector + Qwen2/LLaMA LM.

Each 448² tile (the tiny test models use 224²) gives ``image_seq_length`` tokens on a square grid.
By default an image is one tile resized to the square (fast, fixed token count, what a robot wants
per frame); ``tiling=True`` uses the processor's tiles plus a thumbnail. 1-D RoPE: positions are
plain row indices. A memory laid out as an image is wrapped in ``<img>`` … ``</img>`` like one.
"""

from __future__ import annotations

import math

import torch

from ..base import EncoderInputs, ImageTokens, PreparedImage, VLMAdapter, grid_boxes, to_device
from .graph import InternVLVisionGraph


class InternVLAdapter(VLMAdapter):
    family = "internvl"
    vision_graph = InternVLVisionGraph
    model_types = ("internvl",)
    tiling = False

    @property
    def language_model(self):
        return self.model.model.language_model

    def _tile_layout(self, size: tuple[int, int], num_tiles: int) -> list[tuple[float, float, float, float]]:
        w, h = size
        if num_tiles == 1:
            return [(0.0, 0.0, float(w), float(h))]
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        tile = self.image_processor.size
        cols, rows = get_optimal_tiled_canvas(
            (h, w), (tile["height"], tile["width"]),
            self.image_processor.min_patches, self.image_processor.max_patches)
        cols, rows = (cols, rows) if cols * rows == num_tiles - 1 else (rows, cols)
        boxes = [(c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows)
                 for r in range(rows) for c in range(cols)]
        return boxes + [(0.0, 0.0, float(w), float(h))]                            # thumbnail last

    def memory_segment(self, k):
        start = self.tokenizer.convert_tokens_to_ids("<img>")
        end = self.tokenizer.convert_tokens_to_ids("</img>")
        return [start] + [self.config.image_token_id] * k + [end], list(range(1, k + 1))

    def preprocess(self, prepared: PreparedImage) -> EncoderInputs:
        inputs = self.image_processor(images=[prepared.image], crop_to_patches=self.tiling,
                                      return_tensors="pt")
        return EncoderInputs({"pixel_values": to_device(inputs["pixel_values"], self.device, self.dtype)})  # (P, 3, S, S)

    def vision_forward(self, tensors):
        out = self.model.model.get_image_features(
            tensors["pixel_values"], vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy)
        per_tile = out.pooler_output                                               # (P, T, D)
        return per_tile.reshape(-1, per_tile.shape[-1])                            # (N, D)

    def assemble(self, features, inputs, prepared) -> ImageTokens:
        num_tiles = inputs.tensors["pixel_values"].shape[0]
        per_tile = features.reshape(num_tiles, -1, features.shape[-1])             # (P, T, D)
        side = math.isqrt(per_tile.shape[1])
        tiles = self._tile_layout(prepared.image.size, per_tile.shape[0])
        boxes = torch.cat([grid_boxes(side, side, box) for box in tiles])          # (P·T, 4)
        n = features.shape[0]
        start = self.tokenizer.convert_tokens_to_ids("<img>")
        end = self.tokenizer.convert_tokens_to_ids("</img>")
        segment = [start] + [self.config.image_token_id] * n + [end]
        return ImageTokens(features.detach(), segment, list(range(1, n + 1)), prepared.to_source(boxes),
                           (side, side), prepared.source_size)
