"""A fleet library larger than ``resident_concepts``: the bank holds at most that many memories, and
each frame's candidates come from the library's pgvector index, loaded on demand — on a real
PostgreSQL server, with the tiny random-weight Qwen2.5-VL."""

from __future__ import annotations

import torch

from personal_vlm_node.assistant import Assistant
from personal_vlm_node.matcher import region_queries
from personal_vlm_node.profiles import ModelProfile
from personal_vlm_node.store.postgres import PostgresLibrary
from personal_vlm_node.testing.kit import photo

PROFILE = {"max_memory_tokens": 8, "min_memory_tokens": 2, "accept_threshold": 0.999, "reject_threshold": 0.5}


def _assistant(adapters, library, **options):
    return Assistant(adapters("qwen2_5_vl"), library, ModelProfile(**PROFILE), progress=None, verification=False,
                     **options)


def test_region_queries_pool_tokens_by_cell_and_skip_empty_cells():
    features = torch.eye(4).repeat_interleave(2, dim=0)           # (8, 4): two tokens per direction
    boxes = torch.tensor([[x, y, x + 1, y + 1] for y in (0, 10) for x in (0, 1, 10, 11)], dtype=torch.float32)
    queries = region_queries(features, boxes, cells=2)            # (Q, 4)
    assert queries.shape == (4, 4)
    assert torch.allclose(queries.norm(dim=1), torch.ones(4))
    unboxed = region_queries(features, None, cells=2)
    assert torch.allclose(unboxed, torch.eye(4))                  # runs of two consecutive tokens


def test_a_library_larger_than_the_resident_limit_is_matched_from_its_index(adapters, library_url, tmp_path):
    library = PostgresLibrary(library_url, cache_dir=tmp_path / "a")
    teacher = _assistant(adapters, library)
    pictures = {f"thing {i}": photo(100 + i) for i in range(12)}
    try:
        for name, picture in pictures.items():
            teacher.teach(name, [picture])
    finally:
        teacher.close()
    library.close()

    robot_library = PostgresLibrary(library_url, cache_dir=tmp_path / "b")
    # The random-weight model's pooled vectors separate concepts poorly: the index's region prefilter
    # ranks a picture's own concept within the best 9 of these 12 (measured), so 9 may be resident.
    robot = _assistant(adapters, robot_library, resident_concepts=9)
    try:
        assert robot.bank.large and len(robot.matcher) == 9
        assert "thing 0" not in robot.matcher.names                # the 9 newest are resident at first
        assert robot.recognizable() == sorted(pictures)            # all of them, resident or not
        found = {}
        for name in ("thing 0", "thing 1", "thing 2"):            # none of them resident at the start
            robot.observe(pictures[name])
            found[name] = [d.name for d in robot.observe(pictures[name]).detections]
            assert len(robot.matcher) <= 9
        assert found == {"thing 0": ["thing 0"], "thing 1": ["thing 1"], "thing 2": ["thing 2"]}
        # A concept taught meanwhile elsewhere is loaded when the library says so.
        other = PostgresLibrary(library_url, cache_dir=tmp_path / "c")
        elsewhere = _assistant(adapters, other)
        try:
            elsewhere.teach("new thing", [photo(200)])
        finally:
            elsewhere.close()
            other.close()
        robot.refresh()
        assert "new thing" in robot.recognizable() and len(robot.matcher) <= 9
        robot.observe(photo(200))
        assert [d.name for d in robot.observe(photo(200)).detections] == ["new thing"]
    finally:
        robot.close()
        robot_library.close()
