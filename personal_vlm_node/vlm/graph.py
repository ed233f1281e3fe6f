"""The exportable vision graph every model family provides: tower + projector, with the grid metadata as inputs.

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
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
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


def fixed_shape(shape) -> list[int]:
    return [int(s) for s in shape]


class TiledGraph(VisionGraph):
    """A graph over a batch of image tiles: the tile axis is the dynamic one."""

    def trace_example(self, example):
        if next(iter(example.values())).shape[0] > 1:
            return example
        doubled = {name: torch.cat([value, value]) for name, value in example.items()}
        doubled["pixel_values"] = torch.cat([example["pixel_values"], example["pixel_values"].flip(-1)])
        return doubled




def graph_for(adapter) -> VisionGraph:
    """The exportable vision graph of the adapter's family (the class its adapter declares)."""
    cls = getattr(adapter, "vision_graph", None)
    if cls is None:
        raise PersonalVLMError(f"no exportable vision graph for model family {adapter.family!r}; "
                               "use encoder_backend torch")
    return cls(adapter)
