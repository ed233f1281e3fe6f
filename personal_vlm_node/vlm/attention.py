"""Capture the attention of chosen query rows at chosen layers, without ``output_attentions``.

Eager attention with ``output_attentions=True`` materialises every layer's full (H, L, L) map.
Ego needs only the rows of a few keyword tokens at a few layers. We register one attention
function that runs SDPA for the real output and, at the requested layers, also computes
``softmax(q·kᵀ·scale + mask)`` for the requested rows only. The request travels in a context
variable, so concurrent calls from different threads don't see each other's requests.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

ATTENTION_NAME = "personal_vlm_capture"

_request: contextvars.ContextVar[CaptureRequest | None] = contextvars.ContextVar(
    "personal_vlm_capture_request", default=None)


@dataclass
class CaptureRequest:
    layers: frozenset[int]
    rows: torch.Tensor | None               # (R,) query positions in the full sequence; None: the
                                            # last query row of every forward call (generation)
    columns: torch.Tensor | None = None     # (C,) key positions kept; None: all
    captured: dict[int, torch.Tensor] = field(default_factory=dict)   # layer → (H, R, S or C)
    steps: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer → [(H, C)] per call


def _capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                       is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, is_causal=is_causal, **kwargs)
    request = _request.get()
    layer = getattr(module, "layer_idx", None)
    if request is not None and layer in request.layers:
        rows = request.rows if request.rows is not None else torch.tensor([key.shape[2] - 1])
        probs = _rows_softmax(module, query, key, attention_mask, scaling, rows)   # (H, R, S)
        if request.columns is not None:
            probs = probs[:, :, request.columns.to(probs.device)]
        if request.rows is None:
            request.steps.setdefault(layer, []).append(probs[:, 0])
        else:
            request.captured[layer] = probs
    return output


def _rows_softmax(module, query, key, attention_mask, scaling, rows):
    # query (B, H, Lq, d); key (B, H_kv, S, d); rows index the full sequence of length S.
    q_len, kv_len = query.shape[2], key.shape[2]
    offset = kv_len - q_len                     # > 0 when a cache holds earlier tokens
    local = rows.to(query.device) - offset      # (R,) rows within this call's queries
    if (local < 0).any() or (local >= q_len).any():
        raise ValueError("requested attention rows are not in this forward pass")
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key          # (B, H, S, d)
    q = query[:, :, local, :].float()                                         # (B, H, R, d)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.float().transpose(-1, -2)) * scale            # (B, H, R, S)
    if attention_mask is None:
        allowed = torch.arange(kv_len, device=q.device)[None, :] <= rows.to(q.device)[:, None]  # (R, S)
        scores = scores.masked_fill(~allowed[None, None], float("-inf"))
    else:
        mask = attention_mask[:, :, local, :kv_len]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    return torch.softmax(scores, dim=-1)[0].detach()                         # (H, R, S)


_registered = False


def register() -> str:
    """Register the capture function and its mask under :data:`ATTENTION_NAME` (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, _capture_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _registered = True
    return ATTENTION_NAME


@contextlib.contextmanager
def capture(layers, rows: torch.Tensor | None, columns: torch.Tensor | None = None):
    """Within the block, forward passes record attention of ``rows`` at ``layers`` (``None``: the
    last row of every call, as a generation produces them), keeping only ``columns``."""
    request = CaptureRequest(frozenset(int(i) for i in layers), None if rows is None else rows.long(),
                             None if columns is None else columns.long())
    token = _request.set(request)
    try:
        yield request
    finally:
        _request.reset(token)
