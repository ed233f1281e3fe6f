"""Every prompt the methods send to the VLM, in one place.

Prompts are lists of parts (text, encoded images, concept memories) rendered through the
checkpoint's own chat template by the adapter. Family-specific wording, when a family needs it,
goes into ``_FAMILY_OVERRIDES`` keyed by adapter family.
"""

from __future__ import annotations

from .vlm.base import ImageTokens, Memory, Part

# The answer schema names its slots and gives no plausible value a model could copy verbatim.
INTRODUCE = (
    "This photo shows {subject}. Give 3 to 6 short keywords that describe what it looks like "
    "(colour, material, shape, distinctive details), and estimate what percentage of the photo "
    "it covers. Answer only with JSON of the form "
    '{{"keywords": [<keyword>, <keyword>, ...], "area": <percent of the photo, 0 to 100>}}.'
)

FINGERPRINT = (
    "This photo shows {subject}. Describe its appearance so that it can be told apart from "
    "similar things. Answer only with JSON with the keys \"shape\", \"material\", \"color\", "
    "\"pattern\", \"distinct_features\", \"text_or_brand\" (short phrases, \"none\" if absent) and "
    "\"description\" (one sentence)."
)

RECOGNIZE = "Is {name} in this image? Answer Yes or No."
RECOGNIZE_JOINT_INTRO = "These are personal things, each shown by its name and its appearance:"

ASK_INTRO = "These are personal things you know, each shown by its name and its appearance:"
ASK_RULE = "Answer the question about the image. When one of these things is relevant, call it by its name."

# R2P: attribute-focused chain-of-thought, pairwise yes/no, attribute checks.
COT_PROMPT = (
    "These are personal things the user owns, each with the attributes that tell it apart from "
    "similar things:\n{candidates}\n"
    "Look at the image. For each of them, check its attributes one by one against what you see. "
    "Then say which one of them is in the image, or none. Answer only with JSON, reasoning first "
    "and the answer last: "
    '{{"seen_attributes": {{<name>: [<its attribute you see>, ...], ...}}, "reasoning": <short notes>, '
    '"answer": <name or none>}}.'
)
PAIRWISE_PROMPT = "Is this {name}? Answer Yes or No."
ATTRIBUTE_QUESTION = "Does the object in the image have this {label}: {value}? Answer Yes or No."
DESCRIPTION_QUESTION = "Does the object in the image match this description: {value}? Answer Yes or No."
ATTRIBUTE_TEXT = "a photo of {value}"        # what the contrastive model compares the image with

_FAMILY_OVERRIDES: dict[str, dict[str, str]] = {}


def _text(key: str, family: str, default: str) -> str:
    return _FAMILY_OVERRIDES.get(family, {}).get(key, default)


def subject(name: str, category: str) -> str:
    return f"{name} (a {category})" if category else name


def introduce(image: ImageTokens, name: str, category: str, family: str = "") -> list[Part]:
    return [image, "\n" + _text("introduce", family, INTRODUCE).format(subject=subject(name, category))]


def fingerprint(image: ImageTokens, name: str, category: str, family: str = "") -> list[Part]:
    return [image, "\n" + _text("fingerprint", family, FINGERPRINT).format(subject=subject(name, category))]


def recognize(memory: Memory, image: ImageTokens, family: str = "") -> list[Part]:
    return [f"This is {memory.name}: ", memory, "\n", image, "\n",
            _text("recognize", family, RECOGNIZE).format(name=memory.name)]


def recognize_joint(memories: list[Memory], image: ImageTokens, name: str, family: str = "") -> list[Part]:
    """Several memories in one prompt, then the question for one of them: the prompts for
    different names share everything up to the question."""
    parts: list[Part] = [_text("recognize_joint_intro", family, RECOGNIZE_JOINT_INTRO) + "\n"]
    for memory in memories:
        parts += [f"{memory.name}: ", memory, "\n"]
    return parts + [image, "\n" + _text("recognize", family, RECOGNIZE).format(name=name)]


def ask(memories: list[Memory], image: ImageTokens, question: str, family: str = "") -> list[Part]:
    parts: list[Part] = []
    if memories:
        parts.append(_text("ask_intro", family, ASK_INTRO) + "\n")
        for memory in memories:
            parts += [f"{memory.name}: ", memory, "\n"]
        parts.append(_text("ask_rule", family, ASK_RULE) + "\n")
    return parts + [image, "\n" + question]
