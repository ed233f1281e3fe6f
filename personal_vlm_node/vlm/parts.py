"""What a prompt is made of, and the image the vision tower sees.

A prompt part is text (``str``), an encoded image (:class:`ImageTokens`) or a concept memory
(:class:`Memory`, K soft tokens); :class:`Prompt` is the rendered sequence the language model
runs on and :class:`Generation` what came back. :func:`prepare_image` turns a user's picture into
the one the processor sees (:class:`PreparedImage`), keeping the way back to source pixels.
Every family's adapter (:mod:`.base`) and the encoder backends share these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from ..images import load_image

MAX_ASPECT = 20.0         # wider images are padded: vision towers refuse or degrade on slivers
MAX_SIDE = 4096           # larger images are downscaled before the processor sees them


@dataclass
class ImageTokens:
    """One image, encoded once by the vision tower + projector, reusable across prompts."""

    features: torch.Tensor        # (N, D) visual tokens in the LLM input space
    segment_ids: list[int]        # the image's prompt segment (wrappers + N image slots)
    slots: list[int]              # index in segment_ids of each visual token (len N)
    token_boxes: torch.Tensor     # (N, 4) float x0, y0, x1, y1 of each token in source pixels
    grid: tuple[int, int]         # (rows, cols) of the main token grid
    source_size: tuple[int, int]  # (width, height) of the image the user gave
    rope: dict = field(default_factory=dict)   # family data for positions and the LM (Qwen's grid_thw, …)
    # (N, S, D) per-token features the family's language model adds to these tokens' rows inside
    # its layers (Qwen3-VL's DeepStack: one per stacked layer); None for families without.
    layer_features: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]


@dataclass
class EncoderInputs:
    """What the vision tower takes for one image, and what is needed to map its tokens back."""

    tensors: dict[str, torch.Tensor]   # processor output, on the model's device and dtype
    layout: dict = field(default_factory=dict)


@dataclass
class Memory:
    """A concept memory spliced into a prompt as K soft tokens.

    With its layout (where each token sat in its reference image's token grid), the adapter can
    splice it the way the model saw those tokens: inside the family's vision markers, at their
    original grid positions (``memory_layout = "image"``). Without a layout, or with
    ``memory_layout = "text"``, the tokens become plain text rows with 1-D positions.
    """

    tokens: torch.Tensor                      # (K, D) in the LLM input space
    name: str = ""
    positions: torch.Tensor | None = None     # (K,) index of each token in its image's token list
    image_index: torch.Tensor | None = None   # (K,) which reference image each token came from
    grids: torch.Tensor | None = None         # (R, 2) rows, cols of each reference image's grid
    layer_features: torch.Tensor | None = None   # (K, S, D) the tokens' ImageTokens.layer_features

    @classmethod
    def from_stored(cls, stored: dict, name: str = "") -> Memory:
        """From a stored memory dict (``ego.build_memory``); records without a layout still load."""
        return cls(stored["memory"], name, stored.get("positions"), stored.get("image_index"),
                   stored.get("grids"), stored.get("layer_features"))

    @property
    def has_layer_features(self) -> bool:
        return self.layer_features is not None and self.layer_features.shape[0] == self.tokens.shape[0]

    @property
    def has_layout(self) -> bool:
        k = self.tokens.shape[0]
        return (self.positions is not None and self.image_index is not None and self.grids is not None
                and self.positions.shape[0] == k and self.image_index.shape[0] == k
                and k > 0 and int(self.image_index.max()) < self.grids.shape[0])

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """Per reference image: (indices into ``tokens`` (k,), (row, col) of each (k, 2), grid)."""
        out = []
        for r in sorted(set(self.image_index.tolist())):
            index = torch.nonzero(self.image_index == r).flatten()                  # (k,)
            rows, cols = (int(v) for v in self.grids[r])
            pos = self.positions[index].long() % max(1, rows * cols)
            coords = torch.stack([pos // max(1, cols), pos % max(1, cols)], dim=1)   # (k, 2)
            out.append((index, coords, (rows, cols)))
        return out


@dataclass
class VisionBlock:
    """Prompt rows that hold visual tokens laid out on a grid (an image, or a memory's image part)."""

    rows: torch.Tensor            # (n,) prompt rows, contiguous
    coords: torch.Tensor          # (n, 2) (row, col) of each token on the grid
    grid: tuple[int, int]         # (rows, cols) of the grid the coordinates live on


@dataclass
class Prompt:
    input_ids: torch.Tensor                   # (1, L)
    inputs_embeds: torch.Tensor               # (1, L, D)
    position_ids: torch.Tensor                # family shape: (1, L) or (3, 1, L)
    next_position: int                        # position of the first generated token
    image_positions: list[torch.Tensor]       # per image: (N_i,) rows holding its visual tokens
    memory_positions: list[torch.Tensor]      # per memory: (K_j,) rows holding its soft tokens
    answer_start: int | None = None           # first row of the answer text, when one was given
    answer_offsets: list[tuple[int, int]] | None = None   # char span of each answer token
    lm_inputs: dict = field(default_factory=dict)          # family extras of the prompt's forward


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt: Prompt
    # When asked for: {layer: (T', C)} head-averaged attention to the prompt's image rows (the
    # columns are ``cat(prompt.image_positions)``). Row i is the row that *produced* token i
    # (input: token i-1, or the prompt's last row for i = 0); row T exists when generation stopped
    # at an end-of-turn token, so row i+1 is token i's own row.
    attention: dict[int, torch.Tensor] | None = None
    raw_text: str = ""            # the decoded tokens, unstripped (token spans index into it)
    stopped: bool = False            # the on_text callback ended generation early


Part = str | ImageTokens | Memory


def grid_coords(n: int, grid: tuple[int, int]) -> torch.Tensor:
    """(n, 2) (row, col) of n row-major tokens on ``grid``; tiled images repeat the tile grid."""
    rows, cols = (max(1, int(v)) for v in grid)
    index = torch.arange(n) % (rows * cols)
    return torch.stack([index // cols, index % cols], dim=1)


def grid_boxes(rows: int, cols: int, box: tuple[float, float, float, float]) -> torch.Tensor:
    """Boxes of a rows×cols grid of tokens tiling ``box`` (x0, y0, x1, y1), row-major. (rows·cols, 4)"""
    x0, y0, x1, y1 = box
    xs = torch.linspace(x0, x1, cols + 1, dtype=torch.float64)
    ys = torch.linspace(y0, y1, rows + 1, dtype=torch.float64)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    return torch.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], dim=1).float()


@dataclass
class PreparedImage:
    """The image the processor sees, and how its pixels map back to the user's image."""

    image: Image.Image
    scale: float                  # processed = source · scale + offset
    offset: tuple[float, float]
    source_size: tuple[int, int]

    def to_source(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes in processed-image pixels → boxes in source pixels, clipped to the source."""
        ox, oy = self.offset
        out = boxes.clone()
        out[:, 0::2] = (out[:, 0::2] - ox) / self.scale
        out[:, 1::2] = (out[:, 1::2] - oy) / self.scale
        w, h = self.source_size
        out[:, 0::2] = out[:, 0::2].clamp(0, w)
        out[:, 1::2] = out[:, 1::2].clamp(0, h)
        return out


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Move a host tensor to ``device``: through pinned memory without blocking on CUDA (the copy
    is ordered on the current stream before any kernel that reads it), plainly elsewhere."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, dtype) if dtype is not None else tensor.to(device)


def prepare_image(source, max_pixels: int = 0) -> PreparedImage:
    """Load, downscale huge images (and any above ``max_pixels``), and pad extreme aspect ratios
    (keeping the mapping back)."""
    image = load_image(source)
    w, h = image.size
    scale = min(1.0, MAX_SIDE / max(w, h))
    if max_pixels > 0:
        scale = min(scale, (max_pixels / (w * h)) ** 0.5)
    if scale < 1.0:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    pw, ph = image.size
    tw = max(pw, int(ph / MAX_ASPECT + 0.999))
    th = max(ph, int(pw / MAX_ASPECT + 0.999))
    offset = (0.0, 0.0)
    if (tw, th) != (pw, ph):
        canvas = Image.new("RGB", (tw, th))
        offset = ((tw - pw) // 2, (th - ph) // 2)
        canvas.paste(image, offset)
        image = canvas
    return PreparedImage(image, scale, (float(offset[0]), float(offset[1])), (w, h))
