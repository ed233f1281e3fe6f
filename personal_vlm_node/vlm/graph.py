"""The exportable vision graph of each model family: tower + projector, with the grid metadata as inputs.

An exported encoder must serve any image the adapter's processor produces, so nothing that depends
on the image's *values* or on Python-side loops over its grid may live inside the graph. Each family
therefore splits its vision path in two:

- ``feeds(tensors)``  runs outside the graph, in eager torch: from the adapter's processor tensors it
  computes the graph inputs (pixels plus integer grid metadata: position ids, window order, masks);
- ``module()``        is the graph itself: one ``torch.nn.Module`` that reuses the checkpoint's own
  layers and only reshapes, gathers and masks with the metadata it is given.

Running ``module()(**feeds(tensors))`` in torch equals ``adapter.vision_forward(tensors)``; the
tests hold every family to that.

The graph always computes in float32 (exported from a CPU float32 copy of the tower when the model
runs in another dtype or on a GPU): the ONNX file is then portable (onnxruntime CPU, CUDA,
TensorRT), and TensorRT builds its fp16 engines from it.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PersonalVLMError


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str                      # numpy / onnx name: float32, int32, bool
    shape: tuple                    # ints for fixed axes, axis names (str) for dynamic ones


class VisionGraph(ABC):
    """One family's vision path, split into eager metadata (:meth:`feeds`) and a graph (:meth:`module`)."""

    family = ""
    output_name = "visual_tokens"
    shares_model = False              # set by module(): the graph uses the model's own parameters

    def __init__(self, adapter):
        self.adapter = adapter
        self.config = adapter.config

    # ---- what the graph takes --------------------------------------------------------------
    @abstractmethod
    def inputs(self) -> list[GraphInput]:
        """Name, dtype and shape (fixed or named dynamic axes) of every graph input."""

    @abstractmethod
    def feeds(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Graph inputs (CPU, contiguous) from the adapter's processor tensors for one image."""

    @abstractmethod
    def dynamic_shapes(self, example: dict[str, torch.Tensor]) -> dict | None:
        """``torch.export`` dynamic-shape spec for the inputs, or None for a graph of fixed size."""

    @abstractmethod
    def profile(self, example: dict[str, torch.Tensor]) -> dict[str, dict[str, list[int]]]:
        """min / opt / max shape of every input, for TensorRT optimisation profiles."""

    def trace_example(self, example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The example to trace a dynamic graph with.

        ``torch.export`` bakes in any axis whose example size is 1, so tiled graphs turn a one-tile
        example into two tiles (the second mirrored, so the tiles differ).
        """
        return example

    # ---- the graph ---------------------------------------------------------------------------
    @abstractmethod
    def module(self) -> nn.Module:
        """The traceable vision tower + projector, taking :meth:`feeds` and returning (N, D) tokens."""

    def _float32_cpu(self, *modules: nn.Module) -> list[nn.Module]:
        """The given submodules in float32 on the CPU: a copy unless they already are.

        Sets :attr:`shares_model` when no copy was made: tracing then swaps the model's own
        parameters for placeholders, so no forward of the model may run meanwhile.
        """
        first = next(modules[0].parameters())
        self.shares_model = first.dtype == torch.float32 and first.device.type == "cpu"
        if self.shares_model:
            return list(modules)
        return [copy.deepcopy(m).to("cpu", torch.float32).eval() for m in modules]

    def output_dim(self) -> int:
        return int(self.adapter.hidden_size)


def _fixed(shape) -> list[int]:
    return [int(s) for s in shape]


class _TiledGraph(VisionGraph):
    """A graph over a batch of image tiles: the tile axis is the dynamic one."""

    def trace_example(self, example):
        if next(iter(example.values())).shape[0] > 1:
            return example
        doubled = {name: torch.cat([value, value]) for name, value in example.items()}
        doubled["pixel_values"] = torch.cat([example["pixel_values"], example["pixel_values"].flip(-1)])
        return doubled


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL (windowed attention) and Qwen2-VL (full attention): dynamic resolution, 2×2 merger.
# ---------------------------------------------------------------------------------------------

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _QwenVisionModule(nn.Module):
    """Qwen2.5-VL / Qwen2-VL vision tower + merger for one image, the window layout given as inputs.

    The checkpoint's attention splits the sequence into windows with a Python loop over
    ``cu_seqlens``; here every windowed block runs ONE attention call under a block-diagonal mask
    (``window_ids[i] == window_ids[j]``), which is the same computation with a static graph.
    Without window inputs (Qwen2-VL) every block attends over the whole image.
    """

    def __init__(self, visual: nn.Module, unit: int, full_attention: set[int]):
        super().__init__()
        self.visual = visual
        self.unit = unit
        self.full_attention = full_attention

    def forward(self, pixel_values, position_ids, window_index=None, window_ids=None, reverse_index=None):
        v = self.visual
        x = v.patch_embed(pixel_values)                                          # (P, C)
        patches, channels = x.shape
        pos = position_ids
        window_mask = None
        if window_index is not None:
            # index_select exports to a plain Gather, which takes the int32 indices as they are.
            x = x.reshape(-1, self.unit, channels).index_select(0, window_index).reshape(patches, channels)
            pos = pos.reshape(-1, self.unit, 2).index_select(0, window_index).reshape(patches, 2)
            window_mask = (window_ids[:, None] == window_ids[None, :])[None, None]   # (1, 1, P, P)

        # Axial rotary angles: h and w halves share the inverse frequencies.
        inv_freq = v.rotary_pos_emb.inv_freq.float()
        angles = pos.float()[:, :, None] * inv_freq                              # (P, 2, F)
        angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)                 # (P, 2F)
        angles = torch.cat([angles, angles], dim=-1)                             # (P, head_dim)
        scaling = float(getattr(v.rotary_pos_emb, "attention_scaling", 1.0))
        cos, sin = angles.cos() * scaling, angles.sin() * scaling

        for index, block in enumerate(v.blocks):
            mask = None if index in self.full_attention else window_mask
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, mask)
            x = x + block.mlp(block.norm2(x))

        merged = v.merger(x)                                                     # (P/unit, D)
        return merged if reverse_index is None else merged.index_select(0, reverse_index)

    @staticmethod
    def _attention(attn, x, cos, sin, mask):
        patches = x.shape[0]
        qkv = attn.qkv(x).reshape(patches, 3, attn.num_heads, -1).permute(1, 2, 0, 3)   # (3, H, P, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                             scale=attn.scaling)                  # (1, H, P, hd)
        return attn.proj(out[0].transpose(0, 1).reshape(patches, -1))


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
                      GraphInput("window_ids", "int32", ("patches",)),
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

        side = max(1, self.window // m // self.patch)                            # merged tokens per window side
        token_r, token_c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        windows_per_row = -(-cols // side)
        window_of_token = ((token_r // side) * windows_per_row + token_c // side).reshape(-1)   # (T,)
        window_index = torch.argsort(window_of_token, stable=True)               # (T,) window order
        window_ids = window_of_token[window_index].repeat_interleave(self.unit)   # (P,)
        reverse_index = torch.argsort(window_index)                              # (T,)
        as_int32 = {"position_ids": position_ids, "window_index": window_index,
                    "window_ids": window_ids, "reverse_index": reverse_index}
        return {k: v.to(torch.int32).contiguous() for k, v in as_int32.items()}

    def feeds(self, tensors):
        pixels = tensors["pixel_values"].detach().to("cpu", torch.float32).contiguous()   # (P, C·T·p·p)
        return {"pixel_values": pixels, **self.grid_metadata(tensors["image_grid_thw"].cpu())}

    def dynamic_shapes(self, example):
        tokens = torch.export.Dim("tokens", min=1, max=1 << 20)
        patches = self.unit * tokens
        axes = {"patches": {0: patches}, "tokens": {0: tokens}}
        return {spec.name: axes[spec.shape[0]] for spec in self.inputs()}

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
        shapes = {}
        for spec in self.inputs():
            def at(p):
                return [p if s == "patches" else p // self.unit if s == "tokens" else s for s in spec.shape]
            shapes[spec.name] = {"min": at(low), "opt": at(opt), "max": at(high)}
        return shapes

    def module(self):
        (visual,) = self._float32_cpu(self.adapter.model.model.visual)
        return _QwenVisionModule(visual, self.unit, self.full_attention).eval()


# ---------------------------------------------------------------------------------------------
# InternVL: fixed-size tiles → InternViT → pixel shuffle → MLP projector.
# ---------------------------------------------------------------------------------------------

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


class InternVLVisionGraph(_TiledGraph):
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
        shape = _fixed(example["pixel_values"].shape)
        return {"pixel_values": {"min": [1, *shape[1:]], "opt": shape, "max": [max(high, shape[0]), *shape[1:]]}}

    def module(self):
        inner = self.adapter.model.model
        tower, projector = self._float32_cpu(inner.vision_tower, inner.multi_modal_projector)
        return _InternVLVisionModule(
            tower, projector, int(self.config.vision_feature_layer),
            self.config.vision_feature_select_strategy == "default",
            float(self.config.downsample_ratio)).eval()


# ---------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM: SigLIP per tile (NaViT positions) → pixel-shuffle connector.
# ---------------------------------------------------------------------------------------------

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


class Idefics3VisionGraph(_TiledGraph):
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
            shape = _fixed(value.shape)
            shapes[name] = {"min": [1, *shape[1:]], "opt": shape, "max": [max(high, shape[0]), *shape[1:]]}
        return shapes

    def module(self):
        inner = self.adapter.model.model
        vision_model, connector = self._float32_cpu(inner.vision_model, inner.connector)
        return _Idefics3VisionModule(vision_model, connector).eval()


GRAPHS: dict[str, type[VisionGraph]] = {
    "qwen2_5_vl": QwenVisionGraph,
    "internvl": InternVLVisionGraph,
    "idefics3": Idefics3VisionGraph,
}


def graph_for(adapter) -> VisionGraph:
    """The exportable vision graph of the adapter's family."""
    cls = GRAPHS.get(adapter.family)
    if cls is None:
        raise PersonalVLMError(f"no exportable vision graph for model family {adapter.family!r} "
                               f"(exportable: {', '.join(GRAPHS)}); use encoder_backend torch")
    return cls(adapter)
