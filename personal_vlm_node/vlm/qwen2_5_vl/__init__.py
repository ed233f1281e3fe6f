"""Qwen2.5-VL / Qwen2-VL: the adapter (``adapter.py``), its exportable vision graph (``graph.py``) and its
tiny random-weight test kit (``tiny.py``)."""

from .adapter import Qwen25VLAdapter as ADAPTER

__all__ = ["ADAPTER"]
