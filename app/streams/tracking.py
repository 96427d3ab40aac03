"""Track ids for a stream's detections: ByteTrack from Roboflow's trackers (2.1), one per class.

What the library's ``ByteTrackTracker.update`` does, and what this module makes of it:

- It returns copies of the input detections (their own boxes, not the Kalman filter's), in
  its own order: matched ones first, then unmatched low scores, then new tracks. Unmatched
  detections above the high-score line but below the activation threshold are left out. The
  input's positions travel in ``data["index"]``, so each id goes back to its own detection.
- A new track's detection comes back with -1; the track's id comes when it is matched again
  with ``minimum_consecutive_frames`` (2) updates: an object has an id from the second frame
  it is seen in. A one-frame false detection never gets one, and its track is dropped at
  once if the next frame does not confirm it (a track younger than that is kept only while
  it is matched).
- It matches boxes by IoU only, whatever their class: one tracker per class here, so a track
  never changes class and the same box under two labels (``select`` without dedupe) gives
  two tracks instead of two detections fighting over one.
- Its ids come from one counter shared by every tracker in the process (a class attribute,
  read and increased without a lock, and reset by ``reset()``, never called here). Each
  ``Tracker`` numbers its own tracks from 1 (the library's start at 0, and across streams),
  and updates hold one lock, so two streams' updates cannot interleave on that counter.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np

from app.postprocess import Detection

LOST_SECONDS = 1.0  # how long a track waits for its object, as the library's default at 30 fps
MIN_LOST_FRAMES = 5  # at low frame rates, still a few missed frames
# Detection scores are rounded to 5 decimals after the threshold was applied to the raw ones:
# a score at the threshold may read a hair below it.
_SCORE_SLACK = 1e-5

_library_lock = threading.Lock()


class Tracker:
    """Track ids for one stream's detections (ByteTrack)."""

    def __init__(self, fps: float, score_threshold: float) -> None:
        """``fps``: the rate at which ``update`` is called (the frames tracked, after any
        drops), which turns ``LOST_SECONDS`` into frames. ``score_threshold``: the stream's;
        a detection at or above it starts a track."""
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, not {fps!r}")
        # Imported here: supervision and trackers take about 0.4 s to import (matplotlib,
        # scipy.interpolate), which a service without tracked streams should not pay.
        import supervision
        from trackers import ByteTrackTracker  # type: ignore[import-untyped]

        self._detections_type: Any = supervision.Detections
        self._library_type: Any = ByteTrackTracker
        # Frames in a row a track may go unmatched and keep its id.
        self.lost_frames = max(MIN_LOST_FRAMES, math.ceil(fps * LOST_SECONDS))
        self._threshold = max(0.0, score_threshold - _SCORE_SLACK)
        self._by_class: dict[int, Any] = {}  # class id -> ByteTrackTracker
        self._ids: dict[int, dict[int, int]] = {}  # class id -> library's id -> ours
        self._next_id = 1

    @property
    def tracks(self) -> int:
        """Tracks held (live, or waiting for their objects): what this tracker's memory grows
        with."""
        return sum(len(tracker.tracks) for tracker in self._by_class.values())

    def set_score_threshold(self, score_threshold: float) -> None:
        """A new threshold for new tracks (a client changed it); tracks and ids are kept."""
        with _library_lock:
            self._threshold = max(0.0, score_threshold - _SCORE_SLACK)
            for tracker in self._by_class.values():
                tracker.track_activation_threshold = self._threshold
                tracker.high_conf_det_threshold = self._threshold

    def update(self, detections: list[Detection]) -> list[int | None]:
        """The track id of each detection, in the order given (None: not tracked yet)."""
        ids: list[int | None] = [None] * len(detections)
        positions: dict[int, list[int]] = {}
        for position, detection in enumerate(detections):
            positions.setdefault(detection.class_id, []).append(position)
        with _library_lock:
            # Every class with live tracks is updated, with no detections if need be, so that
            # its tracks age and expire.
            for class_id in sorted(positions.keys() | self._by_class.keys()):
                tracker = self._by_class.get(class_id)
                if tracker is None:
                    tracker = self._by_class[class_id] = self._new_library_tracker()
                self._update_class(class_id, tracker, detections, positions.get(class_id, []),
                                   ids)
        return ids

    def _update_class(self, class_id: int, tracker: Any, detections: list[Detection],
                      positions: list[int], ids: list[int | None]) -> None:
        out = tracker.update(self._as_library_detections(detections, positions))
        known = self._ids.setdefault(class_id, {})
        for position, library_id in zip(out.data.get("index", ()), out.tracker_id):
            library_id = int(library_id)
            if library_id < 0:
                continue
            ours = known.get(library_id)
            if ours is None:
                ours = known[library_id] = self._next_id
                self._next_id += 1
            ids[int(position)] = ours
        # Forget the ids of tracks the library dropped, and trackers with no tracks left:
        # a long stream's memory stays bounded by its live tracks.
        alive = {track.tracker_id for track in tracker.tracks}
        for library_id in known.keys() - alive:
            del known[library_id]
        if not tracker.tracks:
            del self._by_class[class_id]
            self._ids.pop(class_id, None)

    def _as_library_detections(self, detections: list[Detection], positions: list[int]) -> Any:
        if not positions:
            return self._detections_type.empty()
        return self._detections_type(
            xyxy=np.array([detections[p].box for p in positions], np.float64),
            confidence=np.array([detections[p].score for p in positions], np.float64),
            class_id=np.array([detections[p].class_id for p in positions], np.int64),
            data={"index": np.array(positions, np.int64)},
        )

    def _new_library_tracker(self) -> Any:
        # frame_rate 30 makes lost_track_buffer a number of frames: the library keeps a track
        # while frames since its last match < int(frame_rate / 30 * lost_track_buffer).
        # Both score lines at the stream's threshold: the detections given are already cut
        # there, and one below the high line could only continue a track, never start one.
        return self._library_type(
            lost_track_buffer=self.lost_frames + 1,
            frame_rate=30.0,
            track_activation_threshold=self._threshold,
            minimum_consecutive_frames=2,
            high_conf_det_threshold=self._threshold,
        )


_missing_logged = False


def tracker_or_none(fps: float, score_threshold: float) -> Tracker | None:
    """A ``Tracker``, or None where the tracking libraries are not installed (the stream then
    goes on without track ids; said once in the log)."""
    global _missing_logged
    try:
        return Tracker(fps, score_threshold)
    except ImportError as exc:
        if not _missing_logged:
            _missing_logged = True
            logging.getLogger("dfine.streams").warning(
                "tracking is off: %s is not installed (track ids stay null)", exc.name or exc)
        return None
