"""InternVL: fixed-size tiles → InternViT → pixel shuffle → MLP projector, as one exportable graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..graph import GraphInput, TiledGraph, fixed_shape


class _InternVLVisionModule(nn.Module):
    def __init__(self, tower: nn.Module, projector: nn.Module, feature_layer: int, drop_cls: bool,
                 downsample_ratio: float):
        super().__init__()
        self.tower = tower
        self.projector = projector
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.ratio = downsample_ratio

    def forward(self, pixel_values):
        if self.feature_layer == -1:
            hidden = self.tower(pixel_values=pixel_values).last_hidden_state
        else:
            hidden = self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        if self.drop_cls:
            hidden = hidden[:, 1:, :]                                            # (P, S², C)
        tiles, seq, channels = hidden.shape
        side = math.isqrt(seq)
        out = int(side * self.ratio)
        # Pixel shuffle: each (1/r × 1/r) block of patches becomes one token of r⁻²·C channels.
        x = hidden.reshape(tiles, side, out, int(channels / self.ratio))          # (P, S, S·r, C/r)
        x = x.permute(0, 2, 1, 3).reshape(tiles, out, out, int(channels / self.ratio ** 2))
        x = x.permute(0, 2, 1, 3).reshape(tiles, out * out, -1)                  # (P, T, C/r²)
        tokens = self.projector(x)                                               # (P, T, D)
        return tokens.reshape(-1, tokens.shape[-1])                              # (P·T, D)


class InternVLVisionGraph(TiledGraph):
    family = "internvl"

    def __init__(self, adapter):
        super().__init__(adapter)
        size = adapter.image_processor.size
        self.tile = (int(size["height"]), int(size["width"]))

    def inputs(self):
        return [GraphInput("pixel_values", "float32", ("tiles", 3, *self.tile))]

    def feeds(self, tensors):
        return {"pixel_values": tensors["pixel_values"].detach().to("cpu", torch.float32).contiguous()}

    def dynamic_shapes(self, example):
        return {"pixel_values": {0: torch.export.Dim("tiles", min=1, max=64)}}

    def profile(self, example):
        processor = self.adapter.image_processor
        high = int(getattr(processor, "max_patches", 12) or 12) + 1               # tiles + thumbnail
        shape = fixed_shape(example["pixel_values"].shape)
        return {"pixel_values": {"min": [1, *shape[1:]], "opt": shape, "max": [max(high, shape[0]), *shape[1:]]}}

    def module(self):
        inner = self.adapter.model.model
        tower, projector = self._float32_cpu(inner.vision_tower, inner.multi_modal_projector)
        return _InternVLVisionModule(
            tower, projector, int(self.config.vision_feature_layer),
            self.config.vision_feature_select_strategy == "default",
            float(self.config.downsample_ratio)).eval()

