"""The adapter protocol every model family implements, and the mechanics they share.

A prompt is a list of parts: text (``str``), an encoded image (:class:`ImageTokens`) or a concept
memory (:class:`Memory`, K soft tokens), all defined in :mod:`.parts`. The adapter renders the
parts through the checkpoint's own chat template, splices the image features and memories into the
LLM's input embeddings, gives every row its position (M-RoPE for Qwen), and runs the language
model directly:

- ``generate``        greedy decoding with a KV cache, returning text;
- ``yes_probability`` λ_yes / (λ_yes + λ_no) from one forward pass;
- ``attention_to_images`` attention of chosen answer tokens to each image's visual tokens at
  chosen layers only (see :mod:`.attention`).

Family quirks (how an image becomes tokens, where the language model lives, positions) live in
``vlm/<family>/adapter.py``.
"""

from __future__ import annotations

import contextlib
import re
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..errors import PersonalVLMError
from . import attention
# The adapters and backends import the prompt parts from here, beside the protocol that uses them.
from .parts import (EncoderInputs, Generation, ImageTokens, Memory, Part, PreparedImage, Prompt,  # noqa: F401
                    VisionBlock, grid_boxes, grid_coords, prepare_image, to_device)

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class VLMAdapter(ABC):
    """Common mechanics; subclasses set the family hooks marked below."""

    family: str = ""
    model_types: tuple[str, ...] = ()        # config.model_type values this adapter handles
    memory_layout: str = "image"             # "image" | "text": how memories are spliced (profile)
    # One resolution policy for reference pictures and frames (profile), so a memory's tokens and
    # a frame's tokens cover the same scale; 0 = the image processor's own limits.
    max_image_pixels: int = 0
    vision_graph: type | None = None         # the family's exportable graph (a vlm.graph.VisionGraph)
    checkpoint_folder = None                  # the folder it was loaded from (load_vlm sets it)

    def __init__(self, model, tokenizer, image_processor, chat_template: str, model_id: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.model_id = model_id
        self.config = model.config
        self.text_config = model.config.get_text_config()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # One language-model call at a time per model; the vision tower holds no state and runs
        # without it, so the frame path never waits for a long /ask.
        self._lock = threading.RLock()
        self._interrupted = threading.Event()
        model.set_attn_implementation({"text_config": attention.register()})
        self._placeholder_id = self._pick_placeholder_id()
        self._stop_ids = self._collect_stop_ids()
        self._yes_no: dict[str, tuple[int, int]] = {}

    # ---- family hooks ------------------------------------------------------------------
    @property
    @abstractmethod
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings + layers + final norm) without the LM head."""

    @abstractmethod
    def preprocess(self, prepared: PreparedImage) -> EncoderInputs:
        """The image processor's tensors for the vision tower, and the layout to map tokens back."""

    @abstractmethod
    def vision_forward(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Vision tower + projector in torch: the visual tokens (N, D). Exported backends replace it."""

    @abstractmethod
    def assemble(self, features: torch.Tensor, inputs: EncoderInputs, prepared: PreparedImage) -> ImageTokens:
        """Wrap the visual tokens with their prompt segment and their boxes in source pixels."""

    def _positions(self, input_ids: torch.Tensor, blocks: list[VisionBlock]) -> tuple[torch.Tensor, int]:
        """Position ids for the prompt and the position of the first generated token (1-D RoPE)."""
        length = input_ids.shape[1]
        return torch.arange(length, device=self.device)[None], length

    def memory_segment(self, k: int) -> tuple[list[int], list[int]]:
        """The prompt segment for k memory tokens laid out as an image, and the index of each slot
        in it: the family's vision markers around k image slots. Families override it."""
        return [self._placeholder_id] * k, list(range(k))

    def _step_position(self, position: int) -> torch.Tensor:
        return torch.tensor([[position]], device=self.device)

    def _lm_inputs(self, length: int, images: list[ImageTokens], image_positions: list[torch.Tensor],
                   memories: list[Memory], memory_positions: list[torch.Tensor]) -> dict:
        """Extra keyword inputs of the language model for the prompt (e.g. Qwen3-VL's DeepStack,
        for the images' rows and for the rows of memories that kept their tokens' layer features)."""
        return {}

    # ---- description ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def identity(self) -> str:
        """Identifies the feature space memories live in: a change means memories must be rebuilt."""
        revision = getattr(self.config, "_commit_hash", None) or "local"
        return f"{self.family}|{self.model_id}|{revision}|{str(self.dtype).replace('torch.', '')}|d{self.hidden_size}"

    # ---- images --------------------------------------------------------------------------
    def encode_image(self, image, encoder=None) -> ImageTokens:
        """Visual tokens of ``image`` in the LLM input space, with their boxes in source pixels.

        ``encoder`` (a callable like :meth:`vision_forward`, e.g. an onnxruntime or TensorRT
        session) replaces the torch vision tower; it needs no lock on the model.
        """
        prepared = prepare_image(image, self.max_image_pixels)
        inputs = self.preprocess(prepared)
        if encoder is None:
            with torch.inference_mode():
                features = self.vision_forward(inputs.tensors)
        else:
            features = encoder(inputs.tensors)
        return self.assemble(features.detach(), inputs, prepared)

    # ---- prompts -------------------------------------------------------------------------
    def _pick_placeholder_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.unk_token_id,
                          self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def _collect_stop_ids(self) -> set[int]:
        ids = set()
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (eos, self.text_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        for token in ("<|im_end|>", "<end_of_utterance>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return ids

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def render(self, parts: list[Part], system: str | None = None) -> list[Part]:
        """The chat-templated user turn (+ generation prompt) as parts; text merged around sentinels."""
        objects: list[ImageTokens | Memory] = []
        text = []
        for part in parts:
            if isinstance(part, str):
                text.append(part)
            elif isinstance(part, (ImageTokens, Memory)):
                text.append(f"\ue000{len(objects)}\ue001")
                objects.append(part)
            else:
                raise TypeError(f"prompt part of type {type(part).__name__}")
        messages = []
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": "".join(text)}]})
        rendered = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)
        pieces = _SENTINEL.split(rendered)
        out: list[Part] = []
        for i, piece in enumerate(pieces):
            out.append(objects[int(piece)] if i % 2 else piece)
        return [p for p in out if not (isinstance(p, str) and p == "")]

    def build(self, parts: list[Part], answer: str | None = None, system: str | None = None,
              answer_ids: list[int] | None = None) -> Prompt:
        """Token ids, spliced embeddings and positions of the templated prompt (+ the answer, as
        text or as the token ids the model generated)."""
        ids: list[int] = []
        images: list[ImageTokens] = []
        image_positions: list[torch.Tensor] = []
        memories: list[Memory] = []
        memory_positions: list[torch.Tensor] = []
        blocks: list[VisionBlock] = []
        for part in self.render(parts, system):
            if isinstance(part, str):
                ids.extend(self._text_ids(part))
            elif isinstance(part, ImageTokens):
                start = len(ids)
                ids.extend(part.segment_ids)
                images.append(part)
                rows = torch.tensor(part.slots, dtype=torch.long) + start
                image_positions.append(rows)
                blocks.append(VisionBlock(rows, grid_coords(part.num_tokens, part.grid), part.grid))
            elif self.memory_layout == "image" and part.has_layout:
                rows = torch.empty(part.tokens.shape[0], dtype=torch.long)       # (K,)
                for index, coords, grid in part.blocks():
                    segment, slots = self.memory_segment(len(index))
                    start = len(ids)
                    ids.extend(segment)
                    block_rows = torch.tensor(slots, dtype=torch.long) + start
                    rows[index] = block_rows
                    blocks.append(VisionBlock(block_rows, coords, grid))
                memories.append(part)
                memory_positions.append(rows)
            else:
                start = len(ids)
                ids.extend([self._placeholder_id] * part.tokens.shape[0])
                memories.append(part)
                memory_positions.append(torch.arange(start, start + part.tokens.shape[0]))
        answer_start = answer_offsets = None
        if answer_ids:
            answer_start = len(ids)
            ids.extend(int(t) for t in answer_ids)
        elif answer:
            enc = self.tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
            answer_start = len(ids)
            ids.extend(enc["input_ids"])
            answer_offsets = [tuple(o) for o in enc["offset_mapping"]]
        input_ids = torch.tensor([ids], device=self.device)                     # (1, L)
        embeds = self.language_model.get_input_embeddings()(input_ids).clone()  # (1, L, D)
        for tokens, rows in zip(images, image_positions):
            embeds[0, rows.to(self.device)] = tokens.features.to(self.device, embeds.dtype)
        for memory, rows in zip(memories, memory_positions):
            if memory.tokens.shape[-1] != embeds.shape[-1]:
                raise PersonalVLMError(
                    f"memory of concept {memory.name!r} has width {memory.tokens.shape[-1]} but this model "
                    f"expects {embeds.shape[-1]}: it was built with another model; re-teach it")
            embeds[0, rows.to(self.device)] = memory.tokens.to(self.device, embeds.dtype)
        position_ids, next_position = self._positions(input_ids, blocks)
        return Prompt(input_ids, embeds, position_ids, next_position, image_positions,
                      memory_positions, answer_start, answer_offsets,
                      self._lm_inputs(len(ids), images, image_positions, memories, memory_positions))

    # ---- running the language model ------------------------------------------------------
    def _run(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache=None, **lm_inputs):
        out = self.language_model(inputs_embeds=embeds, position_ids=position_ids,
                                  past_key_values=cache, use_cache=True, **lm_inputs)
        logits = self.model.lm_head(out.last_hidden_state[:, -1])               # (1, V)
        return logits.float(), out.past_key_values

    def generate(self, parts: list[Part], max_new_tokens: int = 64, system: str | None = None,
                 attention_layers: list[int] | None = None, on_text=None) -> Generation:
        """Greedy decoding from the templated prompt; stops at the model's end-of-turn tokens.

        With ``attention_layers``, the attention that every generated token's producing row pays
        to the prompt's images is captured during the same pass (see :class:`Generation`).
        ``on_text(text_so_far)`` is called after every generated token with the decoded answer so
        far; returning False stops generation there (``Generation.stopped``), e.g. on a cancel.
        """
        if attention_layers is not None:
            self._check_layers(attention_layers)
        stopped = False
        with self._lock, torch.inference_mode():
            prompt = self.build(parts, system=system)
            columns = (torch.cat(prompt.image_positions) if prompt.image_positions
                       else torch.zeros(0, dtype=torch.long))                     # (C,)
            capturing = (attention.capture(attention_layers, None, columns) if attention_layers
                         else contextlib.nullcontext())
            with capturing as request:
                logits, cache = self._run(prompt.inputs_embeds, prompt.position_ids, **prompt.lm_inputs)
                generated: list[int] = []
                embed = self.language_model.get_input_embeddings()
                for step in range(max_new_tokens):
                    if self._interrupted.is_set():
                        raise PersonalVLMError("generation interrupted: the model is shutting down")
                    token = int(logits.argmax(-1))
                    if token in self._stop_ids:
                        break
                    generated.append(token)
                    if on_text is not None and on_text(
                            self.tokenizer.decode(generated, skip_special_tokens=True).strip()) is False:
                        stopped = True
                        break
                    if step + 1 == max_new_tokens:
                        break
                    step_embeds = embed(torch.tensor([[token]], device=self.device))
                    logits, cache = self._run(step_embeds, self._step_position(prompt.next_position + step), cache)
        raw = self.tokenizer.decode(generated, skip_special_tokens=True)
        captured = None
        if attention_layers:
            _check_captured(request.steps, attention_layers)
            captured = {layer: torch.stack(request.steps[layer])[: len(generated) + 1].mean(dim=1).cpu()
                        for layer in attention_layers}                            # (T', C)
        return Generation(raw.strip(), generated, prompt, captured, raw, stopped)

    def answer_attention(self, parts: list[Part], answer_ids: list[int], layers: list[int],
                         system: str | None = None) -> dict[int, torch.Tensor]:
        """The attention :meth:`generate` captures, from a second, teacher-forced forward pass over
        prompt + ``answer_ids``: ``{layer: (T+1, C)}``, row i producing token i."""
        self._check_layers(layers)
        if not answer_ids:
            raise PersonalVLMError("attention needs a non-empty answer")
        with self._lock, torch.inference_mode():
            prompt = self.build(parts, answer_ids=answer_ids, system=system)
            rows = torch.arange(prompt.answer_start - 1, prompt.answer_start + len(answer_ids))   # (T+1,)
            columns = torch.cat(prompt.image_positions)
            with attention.capture(layers, rows, columns) as request:
                self._run(prompt.inputs_embeds, prompt.position_ids, **prompt.lm_inputs)
        _check_captured(request.captured, layers)
        return {layer: request.captured[layer].mean(dim=0).cpu() for layer in layers}

    def _check_layers(self, layers) -> None:
        bad = [l for l in layers if not 0 <= l < self.num_layers]
        if bad:
            raise PersonalVLMError(f"layers {bad} do not exist; this model has {self.num_layers} layers")

    def interrupt(self) -> None:
        """Make running and future generations stop at their next token (used at shutdown)."""
        self._interrupted.set()

    def call_before_every_layer(self, callback) -> list:
        """Call ``callback()`` before every linear layer of the language model and its head; the
        hook handles (``.remove()`` them). The verifier's yield point goes here, so a verification
        pauses within milliseconds when a frame starts encoding."""
        modules = [m for m in self.language_model.modules() if isinstance(m, torch.nn.Linear)]
        head = getattr(self.model, "lm_head", None)
        if isinstance(head, torch.nn.Linear):
            modules.append(head)
        return [m.register_forward_pre_hook(lambda module, args: callback()) for m in modules]

    def yes_no_ids(self, system: str | None = None) -> tuple[int, int]:
        """The first token ids of "Yes" and "No" as the checkpoint's template writes an answer.

        The chat template renders a finished assistant turn "Yes"; the first id that differs from
        the generation prompt's ids is the answer's first token. Templates that end the prompt in
        "Assistant:" give " Yes" (leading space), ChatML ones give "Yes".
        """
        key = system or ""
        if key not in self._yes_no:
            self._yes_no[key] = tuple(self._answer_first_id(word, system) for word in ("Yes", "No"))
        return self._yes_no[key]

    def _answer_first_id(self, word: str, system: str | None) -> int:
        messages = []
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": "?"}]})
        prompt = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)
        try:
            finished = self.tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": [{"type": "text", "text": word}]}],
                chat_template=self.chat_template, tokenize=False)
        except Exception:  # a template that refuses assistant turns: fall back to the spacing rule
            finished = ""
        if not finished.startswith(prompt) or word not in finished[len(prompt):]:
            finished = prompt + ("" if prompt[-1:].isspace() else " ") + word
        before, after = self._text_ids(prompt), self._text_ids(finished)
        for i, token in enumerate(after):
            if i >= len(before) or before[i] != token:
                return int(token)
        raise PersonalVLMError(f"the tokenizer cannot encode {word!r}")

    def yes_probability(self, parts: list[Part], system: str | None = None) -> float:
        """p = λ_yes / (λ_yes + λ_no): the Yes/No softmax of the first answer token."""
        yes, no = self.yes_no_ids(system)
        with self._lock, torch.inference_mode():
            prompt = self.build(parts, system=system)
            logits, _ = self._run(prompt.inputs_embeds, prompt.position_ids, **prompt.lm_inputs)
        pair = torch.stack([logits[0, yes], logits[0, no]])
        return float(torch.softmax(pair, dim=0)[0])

    def yes_probabilities(self, prompts: list[list[Part]], system: str | None = None) -> list[float]:
        """:meth:`yes_probability` of several prompts that share a beginning (e.g. the same memories
        and image, then one question per name): the shared rows run once, then each prompt's own
        rows run on that cache."""
        if not prompts:
            return []
        yes, no = self.yes_no_ids(system)
        out = []
        with self._lock, torch.inference_mode():
            built = [self.build(parts, system=system) for parts in prompts]
            shared = min(b.input_ids.shape[1] for b in built) - 1
            if any(b.lm_inputs for b in built):
                shared = 0          # per-row extra inputs (e.g. DeepStack) are not split here
            first = built[0]
            for b in built[1:] if shared > 0 else []:
                same = (b.input_ids[0, :shared] == first.input_ids[0, :shared]) & \
                    (b.inputs_embeds[0, :shared] == first.inputs_embeds[0, :shared]).all(-1) & \
                    (b.position_ids[..., :shared] == first.position_ids[..., :shared]).reshape(-1, shared).all(0)
                shared = int(same.long().cumprod(0).sum())
            cache = None
            if shared > 0:
                _, cache = self._run(first.inputs_embeds[:, :shared], first.position_ids[..., :shared])
            for b in built:
                extra = b.lm_inputs if shared == 0 else {}
                logits, cache = self._run(b.inputs_embeds[:, shared:], b.position_ids[..., shared:], cache, **extra)
                if shared > 0:
                    cache.crop(shared - b.input_ids.shape[1])       # back to the shared rows
                else:
                    cache = None
                pair = torch.stack([logits[0, yes], logits[0, no]])
                out.append(float(torch.softmax(pair, dim=0)[0]))
        return out

    def attention_to_images(self, parts: list[Part], answer: str, spans: list[tuple[int, int]],
                            layers: list[int], system: str | None = None) -> dict[int, list[torch.Tensor]]:
        """Attention paid to each image's visual tokens while the model produced ``answer``'s ``spans``.

        One forward pass over prompt + answer. For every answer token overlapping a character span
        we take the row that *produced* it (row i-1 for token i), at each requested layer, average
        over heads and those rows, and split the columns per image: ``{layer: [(N_i,), ...]}``.
        """
        self._check_layers(layers)
        with self._lock, torch.inference_mode():
            prompt = self.build(parts, answer=answer, system=system)
            if prompt.answer_start is None:
                raise PersonalVLMError("attention needs a non-empty answer text")
            rows = [prompt.answer_start + i - 1 for i, (s, e) in enumerate(prompt.answer_offsets)
                    if any(s < span_end and e > span_start for span_start, span_end in spans)]
            if not rows:
                raise PersonalVLMError("none of the requested answer spans maps to a token")
            with attention.capture(layers, torch.tensor(rows)) as request:
                self._run(prompt.inputs_embeds, prompt.position_ids, **prompt.lm_inputs)
        _check_captured(request.captured, layers)
        result = {}
        for layer in layers:
            probs = request.captured[layer].mean(dim=(0, 1))                     # (S,)
            result[layer] = [probs[pos.to(probs.device)].cpu() for pos in prompt.image_positions]
        return result


def _check_captured(captured: dict, layers) -> None:
    """Refuse a forward pass in which the attention of ``layers`` was not seen (the language model
    no longer runs the project's attention function: another attn_implementation was set on it)."""
    missing = [l for l in layers if l not in captured]
    if missing:
        raise PersonalVLMError(
            f"the attention of layers {missing} could not be captured: this model's language model does not run "
            f"the {attention.ATTENTION_NAME!r} attention (another attn_implementation was set on it); Ego "
            "cannot pick memories with it")


def read_chat_template(folder: Path, tokenizer) -> str:
    """The checkpoint's chat template: chat_template.jinja / .json, else the tokenizer's own."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = folder / "chat_template.json"
    if js.is_file():
        import json

        return json.loads(js.read_text())["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise PersonalVLMError(f"{folder} has no chat template; this checkpoint is not an instruction-tuned VLM")
