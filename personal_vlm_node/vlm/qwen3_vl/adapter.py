"""Qwen3-VL: Qwen2.5-VL's layout (dynamic resolution, 2×2 merge, M-RoPE) with 16 px patches and DeepStack.

DeepStack: besides the visual tokens that replace the image slots of the prompt, the vision tower
gives one more (N, D) feature map per DeepStack layer; the language model adds map *i* to the
image rows of its hidden state after decoder layer *i*. The vision forward (torch or an exported
graph) returns all of them side by side, (N, (1+S)·D); :meth:`assemble` keeps the first block as
the visual tokens (what the matcher and the memories use) and the rest as the image's
``layer_features`` (N, S, D), and every prompt that holds the image passes them to the language
model. A memory keeps its tokens' layer features (``ego.build_memory``), so a memory spliced into
a prompt is seen as the model saw those tokens in their picture, DeepStack included.
"""

from __future__ import annotations

import torch

from ..qwen2_5_vl.adapter import Qwen25VLAdapter
from .graph import Qwen3VisionGraph


class Qwen3VLAdapter(Qwen25VLAdapter):
    family = "qwen3_vl"
    vision_graph = Qwen3VisionGraph
    model_types = ("qwen3_vl",)

    def vision_forward(self, tensors):
        out = self.model.model.get_image_features(tensors["pixel_values"], tensors["image_grid_thw"])
        return torch.cat([out.pooler_output[0], *(feature[0] for feature in out.deepstack_features)], dim=-1)

    def assemble(self, features, inputs, prepared):
        width = self.hidden_size
        tokens = super().assemble(features[:, :width], inputs, prepared)
        extra = features[:, width:]                                                # (N, S·D)
        tokens.layer_features = extra.reshape(extra.shape[0], -1, width).detach()   # (N, S, D)
        return tokens

    def _lm_inputs(self, length, images, image_positions, memories, memory_positions):
        rows, stacks = [], []
        for image, positions in zip(images, image_positions):
            rows.append(positions)
            stacks.append(image.layer_features)
        for memory, positions in zip(memories, memory_positions):
            if memory.has_layer_features:
                rows.append(positions)
                stacks.append(memory.layer_features)
        if not rows:
            return {}
        rows = torch.cat(rows)                                                     # (ΣN,)
        mask = torch.zeros(1, length, dtype=torch.bool, device=self.device)
        mask[0, rows.to(self.device)] = True
        # The model takes the features in row order; the blocks never overlap, so sorting is enough.
        order = torch.argsort(rows)
        stacks = torch.cat(stacks)[order].to(self.device, self.dtype).transpose(0, 1)   # (S, ΣN, D)
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": list(stacks)}
