"""Tracker: per-concept hysteresis and box smoothing, so detections don't flicker.

One track per concept name (a taught concept is one physical thing). Each processed frame either
observes the concept (a hit) or not (a miss); the track remembers the last n of them.

Hysteresis (symmetric, k of n):
  - a track that is not present becomes present when it was hit in >= k of its last n frames;
  - a present track stops being present when it was missed in >= k of its last n frames.
At most one of the two transitions happens per frame. With n = 3, k = 2 a single-frame flicker
never shows, [hit, miss, hit] shows on the third frame, and a present track survives one miss.
Frames before a track was created don't count (its history starts at its first hit).

A track unseen for more than `max_missed` frames is dropped; a later observation of the same
concept starts a new track with a new id. Ids come from a counter that only goes up, so an id is
never reused, and they start at 1 so that 0 can mean "no track" in messages.

Box smoothing: an exponential moving average of (x, y, w, h),
    box_t = ema * observed_box + (1 - ema) * box_{t-1}
applied on hits only; a present track that is missed keeps its last box.

Frame size: boxes are in the pixels of the frame they were seen on, so when `update` is given a
frame size other than the previous one (a folder of pictures of several sizes, a camera switched
to another resolution) every track starts afresh, and every returned box is clipped to the frame.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field, replace

from personal_vlm_node.errors import PersonalVLMError

Box = tuple[float, float, float, float]  # (x, y, w, h) in source-image pixels


@dataclass(frozen=True)
class Observation:
    """One concept accepted on one frame (by the matcher or the verifier)."""

    name: str
    score: float
    box: Box
    source: str  # "match" | "ego" | "r2p"


@dataclass
class Track:
    """The smoothed state of one concept across frames."""

    track_id: int
    name: str
    box: Box  # EMA-smoothed (x, y, w, h)
    score: float  # score of the latest hit
    source: str  # source of the latest hit
    hits: deque[bool] = field(default_factory=deque)  # last n frames, True = observed
    confirmed: bool = False  # present on the latest frame
    last_seen: int = 0  # index of the latest frame with a hit


class Tracker:
    """k-of-n hysteresis and EMA boxes over the frames given to `update`, one call per frame."""

    def __init__(self, k: int = 2, n: int = 3, ema: float = 0.5, max_missed: int = 5) -> None:
        if not isinstance(n, int) or not isinstance(k, int) or not 1 <= k <= n:
            raise PersonalVLMError(f"tracker needs integers 1 <= k <= n, got k={k!r}, n={n!r}")
        if not 0.0 < ema <= 1.0:
            raise PersonalVLMError(f"tracker ema must be in (0, 1], got {ema!r}")
        if not isinstance(max_missed, int) or max_missed < 0:
            raise PersonalVLMError(
                f"tracker max_missed must be an integer >= 0, got {max_missed!r}"
            )
        self.k = k
        self.n = n
        self.ema = ema
        self.max_missed = max_missed
        self._tracks: dict[str, Track] = {}
        self._frame = 0  # index of the latest processed frame
        self._frame_size: tuple[int, int] | None = None  # (width, height) of the latest frame
        self._next_id = 1
        # `update` runs on the frame worker, `forget` on a service thread.
        self._lock = threading.Lock()

    def update(self, observations: list[Observation],
               frame_size: tuple[int, int] | None = None) -> list[Track]:
        """Advance one frame with the concepts observed on it; return the present tracks.

        Several observations of one name on a frame are reduced to the highest-scoring one.
        The returned tracks are snapshots, ordered by track id. With ``frame_size`` (width,
        height), a size change resets the tracks and the boxes are clipped to the frame.
        """
        best: dict[str, Observation] = {}
        for obs in observations:
            if obs.name not in best or obs.score > best[obs.name].score:
                best[obs.name] = obs
        with self._lock:
            if frame_size is not None:
                frame_size = (int(frame_size[0]), int(frame_size[1]))
                if self._frame_size is not None and frame_size != self._frame_size:
                    self._tracks.clear()
                self._frame_size = frame_size
            self._frame += 1
            for name, obs in best.items():
                track = self._tracks.get(name)
                if track is None:
                    track = self._new_track(obs)
                    self._tracks[name] = track
                else:
                    track.box = self._smooth(track.box, obs.box)
                track.score = float(obs.score)
                track.source = obs.source
                track.last_seen = self._frame
            for name, track in list(self._tracks.items()):
                if self._frame - track.last_seen > self.max_missed:
                    del self._tracks[name]
                    continue
                track.hits.append(name in best)
                self._apply_hysteresis(track)
            present = sorted(
                (t for t in self._tracks.values() if t.confirmed), key=lambda t: t.track_id
            )
            return [self._clipped(self._snapshot(t), frame_size) for t in present]

    def forget(self, name: str) -> None:
        """Drop the concept's track now; it is absent from the next `update`."""
        with self._lock:
            self._tracks.pop(name, None)

    def reset(self) -> None:
        """Drop every track (e.g. the camera changed); ids keep counting up."""
        with self._lock:
            self._tracks.clear()

    @property
    def tracks(self) -> list[Track]:
        """Snapshots of every live track, present or not, ordered by track id."""
        with self._lock:
            live = sorted(self._tracks.values(), key=lambda t: t.track_id)
            return [self._snapshot(t) for t in live]

    def _snapshot(self, track: Track) -> Track:
        # A copy, so that callers on other threads never see a track change under them.
        return replace(track, hits=deque(track.hits, maxlen=self.n))

    @staticmethod
    def _clipped(track: Track, frame_size: tuple[int, int] | None) -> Track:
        if frame_size is None:
            return track
        width, height = frame_size
        x, y, w, h = track.box
        x0, y0 = min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))
        x1, y1 = min(max(x + w, 0.0), float(width)), min(max(y + h, 0.0), float(height))
        track.box = (x0, y0, x1 - x0, y1 - y0)
        return track

    def _new_track(self, obs: Observation) -> Track:
        track = Track(
            track_id=self._next_id,
            name=obs.name,
            box=tuple(float(v) for v in obs.box),
            score=float(obs.score),
            source=obs.source,
            hits=deque(maxlen=self.n),
            last_seen=self._frame,
        )
        self._next_id += 1
        return track

    def _smooth(self, old: Box, new: Box) -> Box:
        a = self.ema
        return tuple(a * float(o) + (1.0 - a) * p for o, p in zip(new, old))

    def _apply_hysteresis(self, track: Track) -> None:
        hits = sum(track.hits)
        misses = len(track.hits) - hits
        if track.confirmed:
            if misses >= self.k:
                track.confirmed = False
        elif hits >= self.k:
            track.confirmed = True
