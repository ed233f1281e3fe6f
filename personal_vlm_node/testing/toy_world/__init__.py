"""A synthetic world of personal objects, deterministic from a seed, with exact masks and boxes.

Objects have a category drawn as a distinct silhouette (mug, ball, bag, toy, bottle, hat), one or
two colours, a pattern (plain, stripes, dots, checks) and a small distinctive mark (a sticker).
Scenes place one or several objects at varied position, scale, rotation, lighting and partial
occlusion on cluttered, low-saturation backgrounds. Every object gets an exact mask (the pixels
it finally covers, after occlusion) and a box.

Personal concepts come in look-alike pairs: the same category and colour, a different pattern or
mark — the hard negatives personalization is about. Datasets are written in the layouts
``personal-vlm eval`` reads, plus image/mask pairs for ``personal-vlm calibrate``:

    python -m personal_vlm_node.testing.toy_world OUT --seed S --concepts N --layout yollava|perva|generic|calibrate

Every dataset also gets ``toy_world.json``: the concepts' attributes, every image's objects, and
``lookalike_pairs`` — the (query, concept) negatives whose query shows a look-alike of the concept
(see :func:`lookalike_pairs`), so figures can be split into easy and hard negatives.

The same seed gives the same bytes (PNG files written by the same Pillow version).
"""

from .dataset import Concept, lookalike_pairs, main, make_concepts, write_dataset
from .looks import (CATEGORIES, COLORS, IMAGE_SIZE, LAYOUTS, MARKS, PATTERN_WORDS, PATTERNS, SYLLABLES, ObjectLook,
                    lookalike, random_look, random_name)
from .scenes import Placed, Rendered, SceneSpec, distractor, reference_scene, render, scene

__all__ = ["CATEGORIES", "COLORS", "IMAGE_SIZE", "LAYOUTS", "MARKS", "PATTERN_WORDS", "PATTERNS", "SYLLABLES",
           "Concept", "ObjectLook", "Placed", "Rendered", "SceneSpec", "distractor", "lookalike", "lookalike_pairs",
           "main", "make_concepts", "random_look", "random_name", "reference_scene", "render", "scene",
           "write_dataset"]
