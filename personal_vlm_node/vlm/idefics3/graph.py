"""Idefics3 / SmolVLM: SigLIP per tile (NaViT positions) → pixel-shuffle connector, as one exportable graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..graph import GraphInput, TiledGraph, fixed_shape


class _Idefics3VisionModule(nn.Module):
    """SigLIP tower + connector over P tiles; positions and the patch mask come in as inputs."""

    def __init__(self, vision_model: nn.Module, connector: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.connector = connector

    def forward(self, pixel_values, position_ids, patch_mask):
        embeddings = self.vision_model.embeddings
        x = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)   # (P, n, C)
        x = x + embeddings.position_embedding(position_ids)
        mask = patch_mask[:, None, None, :]                                      # (P, 1, 1, n) keys to attend
        for layer in self.vision_model.encoder.layers:
            x = layer(x, mask)
        x = self.vision_model.post_layernorm(x)
        tokens = self.connector(x)                                               # (P, T, D)
        return tokens.reshape(-1, tokens.shape[-1])                              # (P·T, D)


class Idefics3VisionGraph(TiledGraph):
    family = "idefics3"

    def __init__(self, adapter):
        super().__init__(adapter)
        vision = self.config.vision_config
        self.patch = int(vision.patch_size)
        self.side = int(vision.image_size) // self.patch                          # position table side

    def inputs(self):
        size = self.side * self.patch
        n = self.side * self.side
        return [GraphInput("pixel_values", "float32", ("tiles", 3, size, size)),
                GraphInput("position_ids", "int32", ("tiles", n)),
                GraphInput("patch_mask", "bool", ("tiles", n))]

    def patch_layout(self, pixel_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids and valid-patch mask of each tile, from its pixel mask (P, H, W).

        A tile's valid patches (any valid pixel) are spread over the learned side×side position
        table by fractional coordinates, so a partly padded tile still spans the whole table.
        """
        p = self.patch
        tiles, height, width = pixel_attention_mask.shape
        grid = pixel_attention_mask.reshape(tiles, height // p, p, width // p, p).sum(dim=(2, 4)) > 0   # (P, h, w)
        rows = grid[:, :, 0].sum(dim=1).clamp(min=1)                              # (P,) valid patch rows
        cols = grid[:, 0, :].sum(dim=1).clamp(min=1)
        boundaries = torch.arange(1 / self.side, 1.0, 1 / self.side)
        frac_r = (torch.arange(grid.shape[1], dtype=torch.float32)[None] / rows[:, None]).clamp(max=1 - 1e-6)
        frac_c = (torch.arange(grid.shape[2], dtype=torch.float32)[None] / cols[:, None]).clamp(max=1 - 1e-6)
        bucket_r = torch.bucketize(frac_r, boundaries, right=True)                # (P, h)
        bucket_c = torch.bucketize(frac_c, boundaries, right=True)                # (P, w)
        ids = (bucket_r[:, :, None] * self.side + bucket_c[:, None, :]).reshape(tiles, -1)
        mask = grid.reshape(tiles, -1)                                            # (P, n)
        return torch.where(mask, ids, torch.zeros_like(ids)).to(torch.int32), mask

    def feeds(self, tensors):
        pixels = tensors["pixel_values"].detach().to("cpu", torch.float32)        # (1, P, 3, S, S)
        pixels = pixels.reshape(-1, *pixels.shape[2:])
        pixel_mask = tensors.get("pixel_attention_mask")
        if pixel_mask is None:
            pixel_mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool)
        else:
            pixel_mask = pixel_mask.detach().cpu().reshape(-1, *pixel_mask.shape[2:]).bool()
        real = (pixels != 0).flatten(1).any(dim=1)                                # all-zero tiles are batch padding
        pixels, pixel_mask = pixels[real].contiguous(), pixel_mask[real]
        position_ids, patch_mask = self.patch_layout(pixel_mask)
        return {"pixel_values": pixels, "position_ids": position_ids.contiguous(),
                "patch_mask": patch_mask.contiguous()}

    def dynamic_shapes(self, example):
        tiles = torch.export.Dim("tiles", min=1, max=256)
        return {"pixel_values": {0: tiles}, "position_ids": {0: tiles}, "patch_mask": {0: tiles}}

    def profile(self, example):
        processor = self.adapter.image_processor
        longest = int((getattr(processor, "size", None) or {}).get("longest_edge", 4 * 364))
        tile = int((getattr(processor, "max_image_size", None) or {}).get("longest_edge", 364))
        high = math.ceil(longest / tile) ** 2 + 1                                 # tiles + global image
        shapes = {}
        for name, value in example.items():
            shape = fixed_shape(value.shape)
            shapes[name] = {"min": [1, *shape[1:]], "opt": shape, "max": [max(high, shape[0]), *shape[1:]]}
        return shapes

    def module(self):
        inner = self.adapter.model.model
        vision_model, connector = self._float32_cpu(inner.vision_model, inner.connector)
        return _Idefics3VisionModule(vision_model, connector).eval()

