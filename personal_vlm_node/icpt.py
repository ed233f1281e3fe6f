"""ICPT: a concept becomes a few continuous prompt tokens, made by a projector in one forward pass.

After "Personalize Your Large Vision-language Models With In-context Prompt Tuning". The paper's
equations were not available: the architecture, the losses and the length rule below are this
project's own design, written to the paper's description (a lightweight projector trained once per
backbone with the VLM frozen; adaptive prompt length; one regulariser that decouples identity from
the environment, one that separates concepts).

Symbols. F_r ∈ R^{N_r×D}: the frozen VLM's own visual tokens of reference view r (r = 1..R ≤ 8),
``vlm.encode_image(img).features``. s: the mean norm of visual tokens, μ ∈ R^D their mean, both
measured once on the training images and stored with the projector (visual tokens share a large
common direction: cos(F_j, μ) ≈ 0.8 on the toy, so every comparison below is made on F − μ).

Projector (a Perceiver-style resampler, width H, M learned queries, M = L_max):
    x_j = W_in (F_{r,j} − μ)/s + e_r                     # (N, H), N = Σ_r N_r; e_r: learned view embedding
    y⁰  = Q                                              # (M, H) learned queries
    yᵇ  = yᵇ⁻¹ + MHA(LN yᵇ⁻¹, LN [x; yᵇ⁻¹])              # b = 1..B (B = 2): the queries read the views and
    yᵇ  = yᵇ + MLP(LN yᵇ)                                #   each other (so they divide the work)
    α   = softmax_j(τ · cos(W_q y_i, W_k x_j))          # (M, N) readout attention; τ learned, starts at 10
    v_i = W_Δ y_i,  δ_i = ρ · v_i / max(1, ‖v_i‖)        # a correction of norm ≤ ρ = 0.25 (W_Δ starts at 0)
    u_i = Σ_j α_ij F_j / s + δ_i                         # (M, D)
    P_i = s · u_i / ‖u_i‖                                # (M, D) prompt tokens
Each prompt token starts as an attention-weighted average of the concept's own visual tokens — rows
the frozen VLM already reads (on the toy, the mean of the object's tokens as a 4-token memory already
recognises at 0.80 weighted accuracy) — and W_Δ learns what averaging loses. The correction is
bounded because an unbounded one is the easiest way to move the yes/no bias: it grew until it swamped
the pooled tokens and every concept got the same prompt. The cosine readout with a temperature lets
attention become sharp (a dot product of freshly initialised layers reads every token alike, i.e.
mostly background). The norm s keeps every token at the magnitude of a visual token. With
``name_tokens`` the name's token embeddings join x (own input layer and type embedding); off by
default: the name is an arbitrary label the prompt text already carries, and learning from it would
memorise the training concepts' names.

Prompt. "This is <name>: P_c[:L_c]\\n<query image>\\nIs <name> in this image? Answer Yes or No."
(``prompts.recognize`` with a layout-free :class:`Memory`, so the tokens are plain text rows), and
p(yes) = λ_yes/(λ_yes + λ_no) of the first answer token. Several concepts in one context:
``prompts.recognize_joint``.

Length rule (deterministic, no training signal of its own):
    w_j  = mean_i α_ij                                   # attention mass on visual token j
    fg   = the fewest tokens carrying ≥ 80 % of Σ_j w_j  # the foreground, as the projector sees it
    κ_c  = the fewest principal components of {(F_j − μ)/s : j ∈ fg} that explain ≥ 90 % of their variance
    L_c  = clamp(round(a · κ_c), L_min, M)               # a = 1, L_min = 4, M = 16
A plain one-coloured object varies along few directions and gets few tokens; a striped, two-coloured,
marked one needs more. Training uses nested truncation (a random prefix length each prompt), so every
prefix P_c[:ℓ] is a usable prompt and the rule only picks one.

Losses (z = λ_yes − λ_no of the frozen VLM, with gradients; y = 1 when the concept is in the image):
    L_task = BCE(σ(z), y)       on positives, plain negatives, look-alike negatives and joint prompts
    R1a    = mean_i (1 − cos(P^A_i − μ, P^B_i − μ))  P^A, P^B: prompts from two disjoint subsets of the views
    R1b    = mean_{i,k} cos²(P_i − μ, b_k − b̄)        b_k: mean visual token of image k's background,
                                                      b̄: the mean of all b_k
    R1c    = mean_i −log Σ_{j on the object} α_ij     the readout reads the object, not its surroundings
    R2     = mean_{a<b} w_ab · max(0, cos(p̄_a − μ, p̄_b − μ) − m)   p̄: mean prompt token; w = 3 for
                                                      look-alikes, else 1; m = 0.2
    L      = L_task + 0.5·R1a + 0.5·R1b + 0.5·R1c + R2
R1 decouples identity from the environment: a prompt must not depend on which views were shown
(pose, lighting: R1a), must not point along the directions in which backgrounds differ (R1b: b_k − b̄,
not b_k − μ, because objects and backgrounds share an image-wide component that is not
"environment"), and must be read from the object's tokens (R1c; without it the projector never found
the object on the toy in the steps it had). Masks and boxes are used in training only. R2 keeps
different concepts' prompts apart, look-alikes most. Every regulariser and the adaptive length can
be switched off (see :mod:`.icpt_training`) to measure what each one does.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import nn

from . import ego
from .errors import PersonalVLMError
from .vlm.base import ImageTokens, Memory, VLMAdapter

FORMAT = "personal_vlm.icpt/1"
MAX_VIEWS = 8            # the Assistant's limit of reference images per concept


@dataclass
class ProjectorConfig:
    """The projector's shape and its length rule (stored with its weights)."""

    width: int                        # D: the language model's input width
    hidden: int = 256                 # H
    queries: int = 16                 # M = L_max: prompt tokens the projector makes
    blocks: int = 2                   # B
    heads: int = 4
    max_views: int = MAX_VIEWS
    min_tokens: int = 4               # L_min
    slope: float = 1.0                # a in L_c = clamp(round(a·κ_c), L_min, M)
    attention_share: float = 0.8      # the share of readout attention that makes the foreground
    variance_share: float = 0.9       # the share of the foreground's variance κ_c components explain
    fixed_length: int | None = None   # every concept gets this many tokens (no adaptive length)
    name_tokens: bool = False         # condition on the name's token embeddings
    correction: float = 0.25          # ρ: the largest norm of W_Δ's correction, in units of s

    def check(self) -> ProjectorConfig:
        if self.hidden % self.heads:
            raise PersonalVLMError(f"the projector's width {self.hidden} is not a multiple of its {self.heads} heads")
        if not 1 <= self.min_tokens <= self.queries:
            raise PersonalVLMError(f"the minimum prompt length must lie in 1..{self.queries}")
        if self.fixed_length is not None and not 1 <= self.fixed_length <= self.queries:
            raise PersonalVLMError(f"--fixed-length must lie in 1..{self.queries}, got {self.fixed_length}")
        return self


class _Block(nn.Module):
    """The queries attend to [views; queries], then an MLP; pre-norm, residual."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attend = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(torch.cat([x, y]))                                           # (N + M, H)
        y = y + self.attend(self.norm_q(y), kv, kv, need_weights=False)[0]
        return y + self.mlp(self.norm_mlp(y))


class Projector(nn.Module):
    """Reference views (+ optionally the name) → M prompt tokens in the LLM input space."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config.check()
        d, h = config.width, config.hidden
        self.register_buffer("scale", torch.ones(()))                                 # s
        self.register_buffer("mean", torch.zeros(d))                                   # μ (D,)
        self.inp = nn.Linear(d, h)
        self.view_embed = nn.Embedding(config.max_views, h)                            # e_r
        self.queries = nn.Parameter(torch.randn(config.queries, h) / math.sqrt(h))   # Q (M, H)
        self.blocks = nn.ModuleList(_Block(h, config.heads) for _ in range(config.blocks))
        self.read_q, self.read_k = nn.Linear(h, h), nn.Linear(h, h)
        self.read_temperature = nn.Parameter(torch.tensor(math.log(10.0)))          # log τ
        self.delta = nn.Linear(h, d)                                                   # W_Δ
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)
        nn.init.normal_(self.view_embed.weight, std=0.02)
        if config.name_tokens:
            self.name_inp = nn.Linear(d, h)
            self.name_type = nn.Parameter(torch.zeros(h))

    def set_statistics(self, scale: float, mean: torch.Tensor) -> None:
        """s and μ of the backbone's visual tokens (measured once, before training)."""
        self.scale.fill_(float(scale))
        self.mean.copy_(mean.to(self.mean))

    def centred(self, features: torch.Tensor) -> torch.Tensor:
        """(F − μ)/s: the space every regulariser and the length rule compare in."""
        return (features.to(self.mean) - self.mean) / self.scale

    def forward(self, views: list[torch.Tensor], name_embeds: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """P (M, D) and the readout attention α (M, N) over the concatenated views' tokens."""
        if not views or len(views) > self.config.max_views:
            raise PersonalVLMError(f"ICPT makes a prompt from 1 to {self.config.max_views} reference images, "
                                   f"got {len(views)}")
        features = torch.cat([v.to(self.mean) for v in views])                       # (N, D)
        x = torch.cat([self.inp(self.centred(v)) + self.view_embed.weight[r]
                       for r, v in enumerate(views)])                                  # (N, H)
        context = x
        if self.config.name_tokens and name_embeds is not None and name_embeds.shape[0]:
            names = nnf.normalize(name_embeds.to(self.mean), dim=-1)                   # (T, D)
            context = torch.cat([x, self.name_inp(names) + self.name_type])           # (N + T, H)
        y = self.queries                                                               # (M, H)
        for block in self.blocks:
            y = block(y, context)
        q, k = nnf.normalize(self.read_q(y), dim=-1), nnf.normalize(self.read_k(x), dim=-1)
        logits = self.read_temperature.exp() * (q @ k.T)                              # (M, N) τ·cos
        alpha = logits.softmax(dim=-1)                                                 # (M, N) α
        v = self.delta(y)                                                              # (M, D)
        correction = self.config.correction * v / v.norm(dim=-1, keepdim=True).clamp_min(1.0)
        u = alpha @ (features / self.scale) + correction                               # (M, D)
        prompt = self.scale * u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6)         # (M, D) P
        return prompt, alpha

    def length(self, views: list[torch.Tensor], alpha: torch.Tensor) -> int:
        """L_c for the views' tokens and the readout attention the projector gave them."""
        c = self.config
        if c.fixed_length is not None:
            return c.fixed_length
        tokens = torch.cat([self.centred(v) for v in views])                          # (N, D)
        return prompt_length(tokens, alpha.mean(0), c.min_tokens, c.queries, c.slope,
                             c.attention_share, c.variance_share)


# ---- the length rule ----------------------------------------------------------------------------
def foreground(weights: torch.Tensor, share: float) -> torch.Tensor:
    """Indices of the fewest tokens whose weights reach ``share`` of the total (ties: lower index first)."""
    order = torch.sort(weights.double(), descending=True, stable=True).indices       # (N,)
    cumulative = weights.double()[order].cumsum(0)
    count = int((cumulative < share * cumulative[-1]).sum()) + 1
    return order[: min(count, weights.numel())]


def components_for(tokens: torch.Tensor, share: float) -> int:
    """κ: the fewest principal components that explain ``share`` of the tokens' variance (≥ 1)."""
    if tokens.shape[0] < 2:
        return 1
    centred = tokens.double() - tokens.double().mean(0)
    variance = torch.linalg.svdvals(centred) ** 2                                    # (min(n, D),)
    total = float(variance.sum())
    if total <= 1e-12:
        return 1
    return int((variance.cumsum(0) < share * total).sum()) + 1


def prompt_length(tokens: torch.Tensor, weights: torch.Tensor, min_tokens: int, max_tokens: int,
                  slope: float = 1.0, attention_share: float = 0.8, variance_share: float = 0.9) -> int:
    """L_c = clamp(round(a·κ_c), L_min, L_max), κ_c of the foreground tokens (module docstring).

    ``tokens`` (N, D): the views' tokens in the centred space; ``weights`` (N,): attention mass."""
    fg = foreground(weights, attention_share)
    kappa = components_for(tokens[fg], variance_share)
    return int(min(max_tokens, max(min_tokens, round(slope * kappa))))


# ---- the losses (pure functions) ---------------------------------------------------------------
def task_loss(z: torch.Tensor, present: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_task: the BCE of σ(z), z = λ_yes − λ_no (B,), against ``present`` (B,) in {0, 1}; weighted mean."""
    loss = nnf.binary_cross_entropy_with_logits(z.float(), present.float(), reduction="none")   # (B,)
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


def view_invariance_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R1a: mean_i (1 − cos(a_i, b_i)) of two prompts (L, D) of one concept from disjoint views."""
    return (1.0 - nnf.cosine_similarity(a, b, dim=-1)).mean()


def background_loss(prompt: torch.Tensor, backgrounds: torch.Tensor) -> torch.Tensor:
    """R1b: mean_{i,k} cos²(P_i, b_k) of prompt tokens (L, D) and background directions (K, D)."""
    if backgrounds.shape[0] == 0:
        return prompt.new_zeros(())
    cosine = nnf.normalize(prompt, dim=-1) @ nnf.normalize(backgrounds, dim=-1).T   # (L, K)
    return (cosine ** 2).mean()


def object_attention_loss(alpha: torch.Tensor, on_object: torch.Tensor) -> torch.Tensor:
    """R1c: mean_i −log Σ_{j on the object} α_ij — the readout (M, N) reads the object's tokens
    (``on_object`` (N,) bool), not its surroundings."""
    mass = (alpha * on_object.to(alpha)).sum(-1)                                    # (M,)
    return -(mass.clamp_min(1e-6)).log().mean()


def separation_loss(pooled: torch.Tensor, lookalike: torch.Tensor, margin: float = 0.2,
                    lookalike_weight: float = 3.0) -> torch.Tensor:
    """R2: mean over pairs a < b of w_ab · max(0, cos(p̄_a, p̄_b) − m); ``pooled`` (C, D),
    ``lookalike`` (C, C) bool (w_ab = ``lookalike_weight`` where True, else 1)."""
    c = pooled.shape[0]
    if c < 2:
        return pooled.new_zeros(())
    unit = nnf.normalize(pooled, dim=-1)
    cosine = unit @ unit.T                                                          # (C, C)
    a, b = torch.triu_indices(c, c, offset=1)
    weight = torch.where(lookalike[a, b].to(pooled.device), lookalike_weight, 1.0)   # (C(C−1)/2,)
    return (weight * (cosine[a, b] - margin).clamp_min(0.0)).mean()


# ---- teaching and recognition -------------------------------------------------------------------
def name_embeddings(vlm: VLMAdapter, name: str) -> torch.Tensor:
    """The name's token embeddings (T, D), for a projector with ``name_tokens``."""
    ids = torch.tensor(vlm._text_ids(name) or [vlm._placeholder_id], device=vlm.device)
    return vlm.language_model.get_input_embeddings()(ids).detach()


def make_prompt(vlm: VLMAdapter, projector: Projector, images: list[ImageTokens], name: str) -> Memory:
    """Teach a concept: one forward pass of the projector → P_c[:L_c] as a layout-free memory."""
    with torch.inference_mode():
        views = [img.features for img in images]
        names = name_embeddings(vlm, name) if projector.config.name_tokens else None
        prompt, alpha = projector(views, names)                                     # (M, D), (M, N)
        length = projector.length(views, alpha)
    return Memory(prompt[:length].float().cpu().clone(), name)                      # (L_c, D)


# ICPT's prompts are layout-free memories, asked exactly as Ego's are (one prompt per concept, or
# every prompt in one context with the shared prefix run once): Ego's functions serve both.
recognize = ego.recognize
recognize_joint = ego.recognize_joint


# ---- the file ------------------------------------------------------------------------------------
def backbone_fingerprint(vlm: VLMAdapter) -> str:
    """What a projector is bound to: family, width and a hash of the first rows of the input
    embeddings and the LM head (bf16-rounded, so a bf16 and an fp32 load of one checkpoint agree;
    the folder's path and the dtype, which ``vlm.identity`` holds, do not matter here)."""
    digest = hashlib.sha256()
    head = getattr(vlm.model, "lm_head", None)
    for weight in (vlm.language_model.get_input_embeddings().weight, getattr(head, "weight", None)):
        if weight is not None:
            rows = weight[:64].detach().to("cpu", torch.bfloat16).float().contiguous()
            digest.update(rows.numpy().tobytes())
    return f"{vlm.family}/d{vlm.hidden_size}/{digest.hexdigest()[:16]}"


def save_projector(path: str | Path, projector: Projector, fingerprint: str, extra: dict | None = None) -> None:
    """The projector as safetensors: weights + s, μ; metadata: format, backbone, config, ``extra``."""
    from safetensors.torch import save

    from .output import write_atomic

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()}
    metadata = {"format": FORMAT, "backbone": fingerprint, "config": json.dumps(asdict(projector.config)),
                "scale": repr(float(projector.scale)), "extra": json.dumps(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(tensors, metadata))


def read_projector(path: str | Path) -> tuple[Projector, dict[str, str]]:
    """The projector in ``path`` (on the CPU) and its metadata, whatever backbone it was made for."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PersonalVLMError(f"ICPT projector not found: {path}; train one with personal-vlm icpt-train")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        projector = Projector(ProjectorConfig(**json.loads(metadata["config"])))
        projector.load_state_dict(tensors)
    except PersonalVLMError:
        raise
    except Exception as exc:    # safetensors, json and torch each raise their own kinds for a bad file
        raise PersonalVLMError(f"{path} is not a readable ICPT projector ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'damaged'}); train one again with "
                               "personal-vlm icpt-train") from exc
    return projector.eval(), metadata


def load_projector(path: str | Path, vlm: VLMAdapter) -> Projector:
    """The projector in ``path``, on the model's device, refused when made for another backbone."""
    projector, metadata = read_projector(path)
    made_for, this = metadata.get("backbone", "?"), backbone_fingerprint(vlm)
    if made_for != this:
        raise PersonalVLMError(f"{path} was trained for backbone {made_for}, this model is {this}; train one "
                               "with personal-vlm icpt-train")
    return projector.to(vlm.device)
