"""Tracker: k-of-n hysteresis, EMA boxes, stable ids, forgetting."""

import pytest

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.tracker import Observation, Tracker


def mug(box=(0.0, 0.0, 10.0, 10.0), score=0.9, source="match"):
    return Observation("mug", score, box, source)


def run(tracker, pattern, name="mug"):
    """Feed a hit/miss pattern; return, per frame, whether `name` was present."""
    present = []
    for hit in pattern:
        obs = [Observation(name, 0.9, (0.0, 0.0, 10.0, 10.0), "match")] if hit else []
        present.append(any(t.name == name for t in tracker.update(obs)))
    return present


def test_hit_miss_hit_becomes_present_on_third_frame():
    assert run(Tracker(k=2, n=3), [True, False, True]) == [False, False, True]


def test_single_frame_flicker_never_confirms():
    pattern = [True, False, False, True, False, False, True, False]
    assert run(Tracker(k=2, n=3), pattern) == [False] * 8


def test_two_consecutive_hits_confirm_on_second_frame():
    assert run(Tracker(k=2, n=3), [True, True]) == [False, True]


def test_present_track_survives_one_miss_and_goes_after_two():
    # Windows: [T] [T,T] [T,T,F] [T,F,T] [F,T,F]: the second miss in the window ends it.
    pattern = [True, True, False, True, False]
    assert run(Tracker(k=2, n=3), pattern) == [False, True, True, True, False]


def test_hysteresis_with_wider_window():
    # k=2, n=4: on after 2 hits in the last 4, off after 2 misses in the last 4.
    pattern = [True, False, False, True, True, False, True, False]
    tracker = Tracker(k=2, n=4, max_missed=10)
    got = run(tracker, pattern)
    # frame 4: hits {T,F,F,T} = 2 -> on. frame 5: {F,F,T,T} misses 2 -> off.
    # frame 6: {F,T,T,F} hits 2 -> on. frame 7: {T,T,F,T} misses 1 -> stays.
    # frame 8: {T,F,T,F} misses 2 -> off.
    assert got == [False, False, False, True, False, True, True, False]


def test_k_equal_one_confirms_immediately():
    assert run(Tracker(k=1, n=1), [True, False, True]) == [True, False, True]


def test_box_is_exponential_moving_average():
    tracker = Tracker(k=1, n=1, ema=0.25)
    (t,) = tracker.update([mug(box=(0.0, 0.0, 8.0, 8.0))])
    assert t.box == (0.0, 0.0, 8.0, 8.0)
    (t,) = tracker.update([mug(box=(4.0, 8.0, 16.0, 0.0))])
    # 0.25 * obs + 0.75 * old
    assert t.box == pytest.approx((1.0, 2.0, 10.0, 6.0))
    (t,) = tracker.update([mug(box=(1.0, 2.0, 10.0, 6.0))])
    assert t.box == pytest.approx((1.0, 2.0, 10.0, 6.0))
    (t,) = tracker.update([mug(box=(5.0, 6.0, 14.0, 10.0))])
    assert t.box == pytest.approx((2.0, 3.0, 11.0, 7.0))


def test_missed_present_track_keeps_last_box_and_score():
    tracker = Tracker(k=2, n=3, ema=0.5)
    tracker.update([mug(box=(0.0, 0.0, 10.0, 10.0), score=0.7)])
    tracker.update([mug(box=(10.0, 10.0, 20.0, 20.0), score=0.8, source="ego")])
    (t,) = tracker.update([])
    assert t.box == pytest.approx((5.0, 5.0, 15.0, 15.0))
    assert t.score == pytest.approx(0.8)
    assert t.source == "ego"
    assert list(t.hits) == [True, True, False]
    assert t.last_seen == 2


def test_highest_scoring_observation_of_a_name_wins():
    tracker = Tracker(k=1, n=1)
    (t,) = tracker.update([mug(score=0.4, box=(1, 1, 1, 1)), mug(score=0.9, box=(2, 2, 2, 2))])
    assert t.score == pytest.approx(0.9)
    assert t.box == (2.0, 2.0, 2.0, 2.0)


def test_ids_are_stable_while_track_lives():
    tracker = Tracker(k=1, n=3, max_missed=2)
    ids = set()
    for hit in [True, True, False, True, False, False, True]:
        for t in tracker.update([mug()] if hit else []):
            ids.add(t.track_id)
    assert ids == {1}


def test_dropped_track_id_is_not_reused():
    tracker = Tracker(k=1, n=1, max_missed=1)
    (first,) = tracker.update([mug()])
    tracker.update([])
    tracker.update([])  # unseen for 2 > max_missed frames: dropped
    assert tracker.tracks == []
    (second,) = tracker.update([mug()])
    assert (first.track_id, second.track_id) == (1, 2)


def test_each_concept_gets_its_own_track():
    tracker = Tracker(k=1, n=1)
    tracks = tracker.update([mug(), Observation("cat", 0.8, (5, 5, 5, 5), "r2p")])
    assert [(t.track_id, t.name) for t in tracks] == [(1, "mug"), (2, "cat")]


def test_forgotten_concept_disappears_on_next_frame():
    tracker = Tracker(k=2, n=3)
    tracker.update([mug()])
    assert [t.name for t in tracker.update([mug()])] == ["mug"]
    tracker.forget("mug")
    assert tracker.update([]) == []
    # Seen again (e.g. an in-flight frame): a new, unconfirmed track with a new id.
    assert tracker.update([mug()]) == []
    assert [t.track_id for t in tracker.tracks] == [2]


def test_forget_unknown_name_is_harmless():
    tracker = Tracker()
    tracker.forget("nothing")
    assert tracker.update([]) == []


def test_returned_tracks_are_snapshots():
    tracker = Tracker(k=1, n=2)
    (t,) = tracker.update([mug()])
    t.hits.append(False)
    t.box = (9.0, 9.0, 9.0, 9.0)
    (again,) = tracker.update([mug(box=(0.0, 0.0, 10.0, 10.0))])
    assert list(again.hits) == [True, True]
    assert again.box == (0.0, 0.0, 10.0, 10.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 0, "n": 3},
        {"k": 4, "n": 3},
        {"ema": 0.0},
        {"ema": 1.5},
        {"max_missed": -1},
    ],
)
def test_invalid_parameters_are_refused(kwargs):
    with pytest.raises(PersonalVLMError):
        Tracker(**kwargs)


def test_a_new_frame_size_starts_every_track_afresh():
    tracker = Tracker(k=1, n=1)
    tracker.update([mug((700.0, 400.0, 500.0, 600.0))], frame_size=(1280, 1024))
    present = tracker.update([mug((80.0, 20.0, 100.0, 100.0))], frame_size=(803, 452))
    assert [t.box for t in present] == [(80.0, 20.0, 100.0, 100.0)]    # not smoothed across sizes


def test_a_stale_box_kept_on_a_miss_is_cleared_when_the_frame_size_changes():
    tracker = Tracker(k=2, n=3)
    for _ in range(2):
        tracker.update([mug((700.0, 400.0, 500.0, 600.0))], frame_size=(1280, 1024))
    assert tracker.update([], frame_size=(803, 452)) == []


def test_every_returned_box_lies_inside_the_frame():
    tracker = Tracker(k=1, n=1)
    (track,) = tracker.update([mug((-10.0, 380.0, 200.0, 200.0))], frame_size=(640, 480))
    x, y, w, h = track.box
    assert (x, y) == (0.0, 380.0) and (x + w, y + h) == (190.0, 480.0)
