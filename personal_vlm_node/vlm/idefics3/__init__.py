"""Idefics3 / SmolVLM / SmolVLM2: the adapter (``adapter.py``), its exportable vision graph (``graph.py``) and its
tiny random-weight test kit (``tiny.py``)."""

from .adapter import Idefics3Adapter as ADAPTER

__all__ = ["ADAPTER"]
