"""Shared fixtures: tiny random-weight checkpoints of every supported family, built once per run."""

from __future__ import annotations

import os

# DDS traffic must never leave this machine, whoever runs the tests.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from personal_vlm_node.testing.tiny_model import FAMILIES, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def adapters(tiny_checkpoints):
    from personal_vlm_node.vlm import load_vlm

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_vlm(str(tiny_checkpoints[family]), device="cpu", dtype="float32")
        return cache[family]

    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def toy_vlm():
    """The trained toy Qwen2.5-VL: trained once per machine (≈15 min on 2 cores), then cached
    under ~/.cache/personal_vlm/toy (or $PERSONAL_VLM_TOY_CACHE) and reused by every run."""
    from personal_vlm_node.testing.toy_vlm import ensure_toy_vlm

    return ensure_toy_vlm()


@pytest.fixture(scope="session")
def toy_clip():
    from personal_vlm_node.testing.toy_clip import ensure_toy_clip

    return ensure_toy_clip()
