"""What a family folder's ``tiny.py`` declares: the recipe of a tiny random-weight checkpoint.

Each family folder lists its kits in ``KITS`` (name → :class:`TinyKit`);
:mod:`personal_vlm_node.testing.tiny_model` trains the tokenizer, calls ``build`` and writes the
folder. Nothing here imports transformers until a kit is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

VOCAB_SIZE = 512  # the model's embedding rows; the tokenizer is trained to stay below it

# A ChatML template; ``{{ image_placeholder }}`` is replaced by each family's image marker.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ image_placeholder }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


@dataclass(frozen=True)
class TinyKit:
    """A tiny checkpoint of one family: tokenizer specials, chat template, model + image processor.

    ``build(tokenizer, size)`` returns ``(model, image_processor)``; the first special token is
    bos/pad/unk, the third eos. ``tokenizer_attributes`` are set on the tokenizer before saving
    (processors read some markers from there).
    """

    special_tokens: list[str]
    chat_template: str
    build: Callable
    sizes: tuple[str, ...] = ("tiny",)
    tokenizer_attributes: dict = field(default_factory=dict)
