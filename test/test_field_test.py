"""The field test's pieces (the whole run takes minutes: ``python -m personal_vlm_node.testing.field_test``)."""

from __future__ import annotations

import numpy as np
import pytest

from personal_vlm_node.testing.field_test import (
    SCALES, Report, World, killed_writers, read_journal, summary_text,
)


def test_a_journal_tells_acknowledged_operations_from_the_one_in_flight(tmp_path):
    journal = tmp_path / "writer.tsv"
    journal.write_text("DO\tadd\tmug\t7\t64\nACK\tadd\tmug\t7\t64\nDO\tforget\tmug\t8\t70\n", encoding="utf-8")
    assert read_journal(journal) == ([("add", "mug", 7)], ("forget", "mug", 8))
    journal.write_text("DO\tadd\tネコ\t9\t64\nACK\tadd\tネコ\t9\t64\n", encoding="utf-8")
    assert read_journal(journal) == ([("add", "ネコ", 9)], None)


def test_killed_store_writers_lose_no_acknowledged_operation(tmp_path):
    report = Report()
    killed_writers(report, World(tmp_path, seed=3, build_models=False), count=4)
    figures = report.figures["killed_writers"]
    assert report.failures == []
    assert figures["writers_killed"] == 4
    assert figures["operations_acknowledged"] > 0
    assert figures["acknowledged_lost"] == 0 and figures["damaged_concepts"] == 0


def test_the_summary_lists_every_failed_check():
    report = Report()
    assert report.check(True, "fine")
    assert not report.check(False, "3 requests never answered")
    report.scenario("fuzz").update(requests_sent=10, requests_lost=3)
    text = summary_text(report, {"command": "field_test out", "scale": "small", "seed": 0, "minutes": 0.5,
                                 "seconds": 12.0})
    assert "requests_lost: 3" in text
    assert "FAILED 1 of 2 checks:\n  - 3 requests never answered" in text


def test_the_small_scale_is_smaller_than_the_full_one_in_every_figure():
    small, full = SCALES["small"], SCALES["full"]
    assert all(getattr(small, f) < getattr(full, f) for f in small.__dataclass_fields__)


def test_fuzzed_images_are_refused_or_read_as_the_node_reads_them():
    pytest.importorskip("rclpy")
    import random

    from personal_vlm_node.errors import PersonalVLMError
    from personal_vlm_node.ros.convert import image_msg_to_array
    from personal_vlm_node.testing.field_test import HEIGHT, WIDTH, bad_images, odd_images

    rng = random.Random(0)
    for what, msg in bad_images(rng):
        with pytest.raises(PersonalVLMError):
            image_msg_to_array(msg)
    for what, msg in odd_images(rng):
        array = image_msg_to_array(msg)
        assert array.shape == (HEIGHT, WIDTH, 3) and array.dtype == np.uint8, what


def test_fuzz_cases_cover_every_service_and_repeat_with_the_seed():
    pytest.importorskip("rclpy")
    import random

    from personal_vlm_node.testing.field_test import fuzz_cases

    def cases(seed):
        return [(service, expect, what) for service, _request, expect, what in fuzz_cases(random.Random(seed), 300)]

    first = cases(5)
    assert first == cases(5)
    assert {service for service, _e, _w in first} == {"teach_concept", "ask", "list_concepts", "forget_concept"}
    assert {expect for _s, expect, _w in first} >= {"fail", "ok"}


def test_writers_on_a_library_whose_server_is_killed_lose_no_acknowledged_operation(tmp_path, postgres_server):
    from personal_vlm_node.testing.field_test.fleet import _killed_server

    report = Report()
    _killed_server(report, World(tmp_path, seed=5, build_models=False), postgres_server, kills=3)
    figures = report.figures["fleet_server_killed"]
    assert report.failures == []
    assert figures["kills"] == 3 and figures["operations_acknowledged"] > 0
    assert figures["acknowledged_lost"] == 0 and figures["damaged"] == []
