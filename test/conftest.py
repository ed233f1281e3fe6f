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


# ---- the trained toys -----------------------------------------------------------------------
# Tests that need the trained toy VLM or toy CLIP run with PERSONAL_VLM_TOY_TESTS=1, and last. When
# a toy is not cached yet, it starts training in a background process as soon as the tests are
# collected, so it trains while the rest of the suite runs (which leaves much of the CPU idle),
# once per machine. Not by default: the first run trains for about 30 min on 2 cores, and whether
# the toy learns its two-image yes/no, which the recognition floors need, has been seen to depend
# on the CPU (see README, "The toy world").
TOY_FIXTURES = ("toy_vlm", "toy_clip")
TOY_TESTS_ENV = "PERSONAL_VLM_TOY_TESTS"
_background = {}


def _toy_tests_on() -> bool:
    return os.environ.get(TOY_TESTS_ENV) == "1"


def _uses_toy(item) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in TOY_FIXTURES)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_uses_toy)                  # stable: only the toy tests move, to the end
    if not _toy_tests_on():
        skip = pytest.mark.skip(reason=f"needs the trained toys (~30 min on 2 cores the first time); "
                                       f"set {TOY_TESTS_ENV}=1")
        for item in items:
            if _uses_toy(item):
                item.add_marker(skip)


def pytest_collection_finish(session):
    config = session.config
    if config.option.collectonly or not _toy_tests_on() or not any(_uses_toy(i) for i in session.items):
        return
    from personal_vlm_node.testing import toy_background

    started = toy_background.start()
    if started is not None:
        _background["process"], _background["log"] = started
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"toys not cached yet: training them in the background while the other tests "
                                f"run (once per machine; log: {started[1]})")


def pytest_unconfigure(config):
    process = _background.pop("process", None)
    if process is not None:
        from personal_vlm_node.testing import toy_background

        toy_background.stop(process)           # a run cut short (-x, Ctrl-C) leaves no trainer behind


def _toy(request, name: str):
    """Toy ``name`` once the background training (if any) has cached it; the test fails with the
    log's tail when that training failed, rather than training again in this process."""
    from personal_vlm_node.testing import toy_background

    process = _background.get("process")
    if process is not None and process.poll() is None and not toy_background.ready(name):
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\nwaiting for the background training of {name} (log: {_background['log']})")
    problem = toy_background.wait(process, name, _background.get("log"))
    if problem:
        pytest.fail(problem, pytrace=False)
    return toy_background.ensure(name)


@pytest.fixture(scope="session")
def toy_vlm(request):
    """The trained toy Qwen2.5-VL: trained once per machine (≈20 min on 2 cores), then cached
    under ~/.cache/personal_vlm/toy (or $PERSONAL_VLM_TOY_CACHE) and reused by every run."""
    return _toy(request, "toy_vlm")


@pytest.fixture(scope="session")
def toy_clip(request):
    """The trained toy CLIP (R2P's image-text scores), cached like the toy VLM."""
    return _toy(request, "toy_clip")
