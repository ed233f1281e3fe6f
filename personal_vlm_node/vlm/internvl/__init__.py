"""InternVL: the adapter (``adapter.py``), its exportable vision graph (``graph.py``) and its
tiny random-weight test kit (``tiny.py``)."""

from .adapter import InternVLAdapter as ADAPTER

__all__ = ["ADAPTER"]
