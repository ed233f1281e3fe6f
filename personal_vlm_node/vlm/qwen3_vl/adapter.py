"""Qwen3-VL: Qwen2.5-VL's layout (dynamic resolution, 2×2 merge, M-RoPE) with 16 px patches and DeepStack.

DeepStack: besides the visual tokens that replace the image slots of the prompt, the vision tower
gives one more (N, D) feature map per DeepStack layer; the language model adds map *i* to the
image rows of its hidden state after decoder layer *i*. The vision forward (torch or an exported
graph) returns all of them side by side, (N, (1+S)·D); :meth:`assemble` keeps the first block as
the visual tokens (what the matcher and the memories use) and the rest with the image, and every
prompt that holds the image passes them to the language model. Memories (spliced like Qwen2.5-VL's,
inside vision markers at their grid positions) get no DeepStack features.
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
        tokens.rope["deepstack"] = extra.reshape(extra.shape[0], -1, width).transpose(0, 1).detach()   # (S, N, D)
        return tokens

    def _lm_inputs(self, length, images, image_positions):
        if not images:
            return {}
        mask = torch.zeros(1, length, dtype=torch.bool, device=self.device)
        for rows in image_positions:
            mask[0, rows.to(self.device)] = True
        # The mask selects rows in sequence order; images never overlap, so sorting by row is enough.
        rows = torch.cat(image_positions)
        order = torch.argsort(rows)
        stacks = torch.cat([img.rope["deepstack"] for img in images], dim=1)[:, order]   # (S, ΣN, D)
        return {"visual_pos_masks": mask,
                "deepstack_visual_embeds": [layer.to(self.device, self.dtype) for layer in stacks]}
