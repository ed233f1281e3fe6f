"""Qwen3-VL: the exportable vision graph (tower + merger + DeepStack mergers).

Qwen2.5-VL's graph without windows, plus the two things Qwen3-VL adds: a learned position table
resampled bilinearly to each image's grid (the gather indices and weights are graph inputs,
computed outside like every other piece of grid metadata), and the DeepStack mergers, whose
outputs are concatenated to the visual tokens: one output of (N, (1+S)·D).
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph import GraphInput
from ..qwen2_5_vl.graph import QwenVisionGraph, _QwenVisionModule


class _Qwen3VisionModule(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.deepstack = [int(i) for i in visual.deepstack_visual_indexes]

    def forward(self, pixel_values, position_ids, interp_indices, interp_weights):
        v = self.visual
        x = v.patch_embed(pixel_values)                                          # (P, C)
        x = x + (v.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)
        inv_freq = v.rotary_pos_emb.inv_freq.float()
        angles = position_ids.float()[:, :, None] * inv_freq                     # (P, 2, F)
        angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)                             # (P, head_dim)
        scaling = float(getattr(v.rotary_pos_emb, "attention_scaling", 1.0))
        cos, sin = angles.cos() * scaling, angles.sin() * scaling
        stacks = []
        for index, block in enumerate(v.blocks):
            x = x + _QwenVisionModule._attention(block.attn, block.norm1(x), cos, sin, None)
            x = x + block.mlp(block.norm2(x))
            if index in self.deepstack:
                stacks.append(v.deepstack_merger_list[self.deepstack.index(index)](x))
        return torch.cat([v.merger(x), *stacks], dim=-1)                         # (P/unit, (1+S)·D)


class Qwen3VisionGraph(QwenVisionGraph):
    family = "qwen3_vl"

    def __init__(self, adapter):
        super().__init__(adapter)
        vision = self.config.vision_config
        self.side = int(int(vision.num_position_embeddings) ** 0.5)              # learned table side
        self.stacks = len(vision.deepstack_visual_indexes)

    def inputs(self):
        return [GraphInput("pixel_values", "float32", ("patches", self.row_width)),
                GraphInput("position_ids", "int32", ("patches", 2)),
                GraphInput("interp_indices", "int32", ("patches", 4)),
                GraphInput("interp_weights", "float32", ("patches", 4))]

    def grid_metadata(self, grid_thw):
        meta = super().grid_metadata(grid_thw)                                   # windowed is False
        rows, cols = meta["position_ids"].long().unbind(1)
        _, h, w = (int(v) for v in grid_thw[0])
        r0, r1, wr = self._taps(rows, h)
        c0, c1, wc = self._taps(cols, w)
        side = self.side
        meta["interp_indices"] = torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1],
                                             dim=1).to(torch.int32).contiguous()
        meta["interp_weights"] = torch.stack([(1 - wr) * (1 - wc), (1 - wr) * wc, wr * (1 - wc), wr * wc],
                                             dim=1).float().contiguous()
        return meta

    def _taps(self, index: torch.Tensor, length: int):
        """Bilinear taps (align_corners) of grid index ``index`` of ``length`` in the side×side table."""
        scale = (self.side - 1) / (length - 1) if length > 1 else 0.0
        coord = index.double() * scale
        low = coord.floor().long().clamp(0, self.side - 1)
        high = (low + 1).clamp(max=self.side - 1)
        return low, high, (coord - low.double())

    def output_dim(self):
        return int(self.adapter.hidden_size) * (1 + self.stacks)

    def module(self):
        (visual,) = self._float32_cpu(self.adapter.model.model.visual)
        return _Qwen3VisionModule(visual).eval()
