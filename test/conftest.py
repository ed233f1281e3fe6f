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
