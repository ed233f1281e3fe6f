"""Qwen2.5-VL (windowed attention) and Qwen2-VL (full attention): the exportable vision graph.

Dynamic resolution, 2×2 merger; see :mod:`personal_vlm_node.vlm.graph` for the contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PersonalVLMError
from ..graph import GraphInput, VisionGraph


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _QwenVisionModule(nn.Module):
    """Qwen2.5-VL / Qwen2-VL vision tower + merger for one image, the window layout given as inputs.

    The checkpoint's attention splits the sequence into windows with a Python loop over
    ``cu_seqlens``. Here the windows are gathered into one padded batch, (W, L) rows with L the
    longest window, and every windowed block runs ONE attention call over that batch with the padding
    masked out: the same computation as the loop, a graph without data-dependent shapes, and an
    attention cost of W·L² instead of the P² a block-diagonal mask over the whole image would pay
    (at 448 px: 16 windows of 64 patches against 1,024², a 16th). Without window inputs (Qwen2-VL)
    every block attends over the whole image.
    """

    def __init__(self, visual: nn.Module, unit: int, full_attention: set[int]):
        super().__init__()
        self.visual = visual
        self.unit = unit
        self.full_attention = full_attention

    def forward(self, pixel_values, position_ids, window_index=None, window_slots=None, window_unpad=None,
                reverse_index=None):
        v = self.visual
        x = v.patch_embed(pixel_values)                                          # (P, C)
        patches, channels = x.shape
        pos = position_ids
        windows = None
        if window_index is not None:
            # index_select exports to a plain Gather, which takes the int32 indices as they are.
            x = x.reshape(-1, self.unit, channels).index_select(0, window_index).reshape(patches, channels)
            pos = pos.reshape(-1, self.unit, 2).index_select(0, window_index).reshape(patches, 2)
            valid = window_slots >= 0                                             # (W, L)
            windows = (window_slots.clamp(min=0).reshape(-1), valid[:, None, None, :], window_unpad)

        # Axial rotary angles: h and w halves share the inverse frequencies.
        inv_freq = v.rotary_pos_emb.inv_freq.float()
        angles = pos.float()[:, :, None] * inv_freq                              # (P, 2, F)
        angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)                 # (P, 2F)
        angles = torch.cat([angles, angles], dim=-1)                             # (P, head_dim)
        scaling = float(getattr(v.rotary_pos_emb, "attention_scaling", 1.0))
        cos, sin = angles.cos() * scaling, angles.sin() * scaling

        for index, block in enumerate(v.blocks):
            layout = None if index in self.full_attention else windows
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, layout)
            x = x + block.mlp(block.norm2(x))

        merged = v.merger(x)                                                     # (P/unit, D)
        return merged if reverse_index is None else merged.index_select(0, reverse_index)

    @staticmethod
    def _attention(attn, x, cos, sin, windows):
        """One attention of a block; ``cos``/``sin`` (P, hd); ``windows`` None (the whole image) or
        (gather (W·L,), key mask (W, 1, 1, L), unpad (P,))."""
        patches = x.shape[0]
        qkv = attn.qkv(x).reshape(patches, 3, attn.num_heads, -1)                # (P, 3, H, hd)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                                 # (P, H, hd)
        cos, sin = cos[:, None], sin[:, None]                                     # (P, 1, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if windows is None:
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                 v.transpose(0, 1)[None], scale=attn.scaling)   # (1, H, P, hd)
            return attn.proj(out[0].transpose(0, 1).reshape(patches, -1))
        gather, mask, unpad = windows                   # (W·L,), (W, 1, 1, L), (P,)
        count, length = mask.shape[0], mask.shape[-1]

        def batched(t):                                                           # (P, H, hd) → (W, H, L, hd)
            return t.index_select(0, gather).reshape(count, length, t.shape[1], t.shape[2]).transpose(1, 2)

        out = F.scaled_dot_product_attention(batched(q), batched(k), batched(v), attn_mask=mask,
                                             scale=attn.scaling)                  # (W, H, L, hd)
        out = out.transpose(1, 2).reshape(count * length, -1).index_select(0, unpad)   # (P, H·hd)
        return attn.proj(out)


class QwenVisionGraph(VisionGraph):
    family = "qwen2_5_vl"

    def __init__(self, adapter):
        super().__init__(adapter)
        vision = self.config.vision_config
        self.merge = int(vision.spatial_merge_size)
        self.patch = int(vision.patch_size)
        self.unit = self.merge * self.merge
        channels = int(getattr(vision, "in_channels", 3))
        self.row_width = int(channels * vision.temporal_patch_size * self.patch * self.patch)
        # Qwen2.5-VL attends within windows except in its full-attention blocks; Qwen2-VL has no windows.
        full = getattr(vision, "fullatt_block_indexes", None)
        self.windowed = full is not None and getattr(vision, "window_size", None) is not None
        self.window = int(vision.window_size) if self.windowed else 0
        self.full_attention = set(int(i) for i in full) if self.windowed else set(range(int(vision.depth)))

    def inputs(self):
        specs = [GraphInput("pixel_values", "float32", ("patches", self.row_width)),
                 GraphInput("position_ids", "int32", ("patches", 2))]
        if self.windowed:
            specs += [GraphInput("window_index", "int32", ("tokens",)),
                      GraphInput("window_slots", "int32", ("windows", "window_len")),
                      GraphInput("window_unpad", "int32", ("patches",)),
                      GraphInput("reverse_index", "int32", ("tokens",))]
        return specs

    def grid_metadata(self, grid_thw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rotary positions and the window layout of one image's (t, h, w) patch grid.

        Patches arrive from the processor block-major: for each merged token (row-major over the
        h/m × w/m grid) its m×m patches row-major. Windows of ``window_size`` px tile the merged
        grid row-major; inside a window tokens keep row-major order.
        """
        if grid_thw.shape[0] != 1 or int(grid_thw[0, 0]) != 1:
            raise PersonalVLMError("the exported Qwen encoder takes one still image per call "
                                   f"(image_grid_thw {grid_thw.tolist()}); encode images one by one")
        _, h, w = (int(v) for v in grid_thw[0])
        m = self.merge
        rows, cols = h // m, w // m                                               # merged grid
        block_r, block_c, in_r, in_c = torch.meshgrid(
            torch.arange(rows), torch.arange(cols), torch.arange(m), torch.arange(m), indexing="ij")
        position_ids = torch.stack([(block_r * m + in_r).reshape(-1),
                                    (block_c * m + in_c).reshape(-1)], dim=1)       # (P, 2)
        if not self.windowed:
            return {"position_ids": position_ids.to(torch.int32).contiguous()}

        side = self.window_side
        token_r, token_c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        windows_per_row = -(-cols // side)
        window_of_token = ((token_r // side) * windows_per_row + token_c // side).reshape(-1)   # (T,)
        window_index = torch.argsort(window_of_token, stable=True)               # (T,) window order
        reverse_index = torch.argsort(window_index)                              # (T,)
        # The windows as a padded batch: row w lists the patches of window w (in window order), -1
        # pads it to the longest window; window_unpad is each patch's place in that batch.
        _, sizes = torch.unique_consecutive(window_of_token[window_index], return_counts=True)
        sizes = sizes * self.unit                                                 # (W,) patches per window
        length = int(sizes.max())
        starts = torch.cumsum(sizes, 0) - sizes                                   # (W,)
        offsets = torch.arange(length)                                            # (L,)
        window_slots = torch.where(offsets < sizes[:, None], starts[:, None] + offsets, -1)   # (W, L)
        window = torch.repeat_interleave(torch.arange(len(sizes)), sizes)         # (P,)
        window_unpad = window * length + (torch.arange(int(sizes.sum())) - starts[window])    # (P,)
        as_int32 = {"position_ids": position_ids, "window_index": window_index, "window_slots": window_slots,
                    "window_unpad": window_unpad, "reverse_index": reverse_index}
        return {k: v.to(torch.int32).contiguous() for k, v in as_int32.items()}

    @property
    def window_side(self) -> int:
        """Merged tokens along one side of an attention window."""
        return max(1, self.window // self.merge // self.patch)

    def feeds(self, tensors):
        pixels = tensors["pixel_values"].detach().to("cpu", torch.float32).contiguous()   # (P, C·T·p·p)
        return {"pixel_values": pixels, **self.grid_metadata(tensors["image_grid_thw"].cpu())}

    def dynamic_shapes(self, example):
        tokens = torch.export.Dim("tokens", min=1, max=1 << 20)
        dims = {"tokens": tokens, "patches": self.unit * tokens,
                "windows": torch.export.Dim("windows", min=1, max=1 << 20),
                "window_len": torch.export.Dim("window_len", min=1, max=self.unit * self.window_side ** 2)}
        return {spec.name: {axis: dims[name] for axis, name in enumerate(spec.shape) if isinstance(name, str)}
                for spec in self.inputs()}

    def profile(self, example):
        # The processor keeps images between its min and max pixel budgets; the TensorRT profile
        # spans that range, capped at 1280² px so the window mask (P² bytes) stays small.
        size = getattr(self.adapter.image_processor, "size", None) or {}
        area = self.patch * self.patch
        low = max(self.unit, int(size.get("shortest_edge", 56 * 56)) // area // self.unit * self.unit)
        high = int(size.get("longest_edge", 1280 * 1280))
        high = max(low, min(high, 1280 * 1280) // area // self.unit * self.unit)
        opt = int(example["pixel_values"].shape[0])
        low, high = min(low, opt), max(high, opt)
        longest = self.unit * self.window_side ** 2

        def sizes(p, windows, window_len):
            return {"patches": p, "tokens": p // self.unit, "windows": windows, "window_len": window_len}

        # Window count and length vary with the grid's shape, not only its area: span all of it.
        slots = example.get("window_slots")
        bounds = {"min": sizes(low, 1, self.unit),
                  "opt": sizes(opt, *(int(n) for n in slots.shape)) if slots is not None else sizes(opt, 1, longest),
                  "max": sizes(high, high // self.unit, longest)}
        return {spec.name: {key: [at[s] if isinstance(s, str) else s for s in spec.shape]
                            for key, at in bounds.items()}
                for spec in self.inputs()}

    def module(self):
        (visual,) = self._float32_cpu(self.adapter.model.model.visual)
        return _QwenVisionModule(visual, self.unit, self.full_attention).eval()

