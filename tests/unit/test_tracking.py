"""The streams' tracker on the real library (ByteTrack from trackers), with synthetic boxes
moving on known paths."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable

import pytest

from app.postprocess import Detection
from app.streams.tracking import MIN_LOST_FRAMES, Tracker
from tests.helpers import ROOT

Box = tuple[float, float, float, float]
Path = Callable[[int], Box]  # frame -> box


def square(x: float, y: float, size: float = 60.0) -> Box:
    return (x, y, x + size, y + size)


# Three objects on straight, non-crossing paths in a 640x480 frame, 6-8 px a frame.
PATHS: dict[str, tuple[int, Path]] = {
    "left-to-right": (0, lambda f: square(10 + 8 * f, 40)),
    "right-to-left": (1, lambda f: square(560 - 8 * f, 200)),
    "downwards": (2, lambda f: square(300, 10 + 6 * f, 40)),
}


def frame(f: int, names: list[str], score: float = 0.9) -> list[tuple[str, Detection]]:
    return [(name, Detection(PATHS[name][0], name, score, PATHS[name][1](f))) for name in names]


def run(tracker: Tracker, frames: list[list[tuple[str, Detection]]]
        ) -> list[dict[str, int | None]]:
    """Each frame's ids by object name."""
    out = []
    for detections in frames:
        ids = tracker.update([d for _, d in detections])
        assert len(ids) == len(detections)
        out.append({name: i for (name, _), i in zip(detections, ids)})
    return out


def ids_of(seen: list[dict[str, int | None]], name: str) -> list[int | None]:
    return [ids[name] for ids in seen if name in ids]


def test_objects_on_known_paths_keep_one_id_each() -> None:
    names = list(PATHS)
    seen = run(Tracker(fps=10, score_threshold=0.5), [frame(f, names) for f in range(60)])
    # An id from the second frame an object is seen in, then the same one to the end.
    assert seen[0] == dict.fromkeys(names)
    ids = {name: set(ids_of(seen[1:], name)) for name in names}
    assert all(len(one) == 1 for one in ids.values()), ids
    assert {i for one in ids.values() for i in one} == {1, 2, 3}  # ints from 1, one each


def test_ids_survive_a_few_missed_frames() -> None:
    frames = [frame(f, list(PATHS)) for f in range(40)]
    for f in (20, 21, 22):  # the moving left-to-right object is not detected for 3 frames
        frames[f] = [pair for pair in frames[f] if pair[0] != "left-to-right"]
    frames[30] = []  # and one frame with nothing at all
    seen = run(Tracker(fps=10, score_threshold=0.5), frames)
    for name in PATHS:
        assert len(set(ids_of(seen[1:], name))) == 1, (name, ids_of(seen, name))


def test_lost_tracks_expire_after_their_time_in_frames() -> None:
    # 10 fps: a track waits 1 s (10 frames); at 30 fps the same 12 missed frames are 0.4 s.
    def gap(fps: float, missed: int) -> list[int | None]:
        frames = [frame(f, ["left-to-right"]) for f in range(10)]
        frames += [[] for _ in range(missed)]
        frames += [frame(f, ["left-to-right"]) for f in range(10 + missed, 14 + missed)]
        return ids_of(run(Tracker(fps=fps, score_threshold=0.5), frames), "left-to-right")

    assert Tracker(fps=10, score_threshold=0.5).lost_frames == 10
    assert Tracker(fps=1, score_threshold=0.5).lost_frames == MIN_LOST_FRAMES
    assert set(gap(30, 12)[1:]) == {1}
    assert set(gap(10, 10)[1:]) == {1}
    after = gap(10, 12)
    assert set(after[1:10]) == {1}
    # Gone for longer than its time: a new track, with a new id from its second frame.
    assert after[10:] == [None, 2, 2, 2]


def test_a_new_object_gets_a_new_id() -> None:
    frames = [frame(f, ["left-to-right", "right-to-left"]) for f in range(20)]
    frames += [frame(f, list(PATHS)) for f in range(20, 40)]
    seen = run(Tracker(fps=10, score_threshold=0.5), frames)
    old = set(ids_of(seen[1:], "left-to-right")) | set(ids_of(seen[1:], "right-to-left"))
    new = ids_of(seen, "downwards")
    assert new[0] is None
    assert len(set(new[1:])) == 1 and new[1] not in old and new[1] == 3


def test_shuffled_input_gets_each_detection_its_own_id() -> None:
    rng = random.Random(27)
    # Two objects of the same class on parallel paths, so only the boxes tell them apart.
    paths: dict[str, Path] = {
        "upper": lambda f: square(10 + 7 * f, 40),
        "middle": lambda f: square(10 + 7 * f, 180),
        "lower": lambda f: square(10 + 7 * f, 320),
    }
    frames = []
    for f in range(60):
        detections = [(name, Detection(0, "circle", 0.6 + 0.1 * i, path(f)))
                      for i, (name, path) in enumerate(paths.items())]
        rng.shuffle(detections)
        frames.append(detections)
    seen = run(Tracker(fps=10, score_threshold=0.5), frames)
    ids = {name: set(ids_of(seen[1:], name)) for name in paths}
    assert all(len(one) == 1 for one in ids.values()), ids
    assert len(set.union(*ids.values())) == 3


def test_empty_frames() -> None:
    tracker = Tracker(fps=10, score_threshold=0.5)
    assert tracker.update([]) == []
    assert tracker.update([]) == []
    seen = run(tracker, [frame(f, ["downwards"]) for f in range(3)])
    assert ids_of(seen, "downwards") == [None, 1, 1]
    assert tracker.update([]) == []


def test_classes_at_the_same_place_get_their_own_ids() -> None:
    # The model can give one box under two labels; neither may take the other's id.
    box = square(100, 100)
    tracker = Tracker(fps=10, score_threshold=0.5)
    answers = [tracker.update([Detection(0, "circle", 0.9, box),
                               Detection(1, "rectangle", 0.8, box)]) for _ in range(10)]
    assert answers[0] == [None, None]
    assert all(a == answers[1] for a in answers[1:]) and sorted(answers[1]) == [1, 2]  # type: ignore[type-var]
    circle = answers[1][0]

    # The circle goes; a triangle appears where it was: a new id, not the circle's.
    later = [tracker.update([Detection(2, "triangle", 0.9, box),
                             Detection(1, "rectangle", 0.8, box)]) for _ in range(5)]
    assert later[0] == [None, answers[1][1]]
    assert all(a == later[1] for a in later[1:])
    assert later[1][0] not in (None, circle, answers[1][1])


def test_only_detections_at_the_threshold_start_tracks() -> None:
    tracker = Tracker(fps=10, score_threshold=0.5)
    # 0.5 as select rounds it (5 decimals) is at the threshold; 0.4 is below.
    answers = [tracker.update([Detection(0, "circle", 0.5, square(10, 10)),
                               Detection(1, "rectangle", 0.4, square(200, 200))])
               for _ in range(5)]
    assert [a[0] for a in answers] == [None, 1, 1, 1, 1]
    assert [a[1] for a in answers] == [None] * 5

    # A raw score just at a threshold with more decimals reads a hair below it once rounded.
    rounded = Tracker(fps=10, score_threshold=0.700004)
    answers = [rounded.update([Detection(0, "circle", round(0.7000041, 5), square(10, 10))])
               for _ in range(3)]
    assert answers == [[None], [1], [1]]

    tracker.set_score_threshold(0.3)  # a client lowered it: the rectangle starts a track
    answers = [tracker.update([Detection(0, "circle", 0.5, square(10, 10)),
                               Detection(1, "rectangle", 0.4, square(200, 200))])
               for _ in range(3)]
    assert answers == [[1, None], [1, 2], [1, 2]]


def test_streams_number_their_own_ids_from_one() -> None:
    # The library's ids come from a counter shared by the process: each stream has its own.
    first, second = Tracker(fps=10, score_threshold=0.5), Tracker(fps=25, score_threshold=0.5)
    for f in range(4):
        a = first.update([d for _, d in frame(f, ["left-to-right", "downwards"])])
        b = second.update([d for _, d in frame(f, ["downwards"])])
    assert sorted(a) == [1, 2] and b == [1]  # type: ignore[type-var]


def test_tracks_of_gone_objects_are_forgotten() -> None:
    # A long stream: one object stays; 300 others of its class and 4 more, each seen for
    # 3 frames, then gone.
    tracker = Tracker(fps=10, score_threshold=0.5)
    stays = Detection(0, "x", 0.9, square(500, 400))
    for n in range(300):
        for f in range(3):
            tracker.update([stays, Detection(n % 5, "x", 0.9, square(10 + 2 * f, 10))])
        assert tracker.tracks == 2 + min(n, tracker.lost_frames // 3)
        assert sum(len(ids) for ids in tracker._ids.values()) <= tracker.tracks
    for _ in range(tracker.lost_frames + 1):
        assert tracker.update([stays]) == [1]
    assert tracker.tracks == 1
    assert list(tracker._by_class) == [0] and list(tracker._ids[0].values()) == [1]


@pytest.mark.parametrize("fps", [0.0, -5.0, float("nan"), float("inf")])
def test_a_rate_that_is_not_one_is_refused(fps: float) -> None:
    with pytest.raises(ValueError, match="fps"):
        Tracker(fps=fps, score_threshold=0.5)


def test_importing_the_module_does_not_import_the_library() -> None:
    # supervision and trackers cost about 0.4 s at import: paid only when a stream tracks.
    code = ("import sys, app.streams.tracking as t; "
            "assert 'supervision' not in sys.modules and 'trackers' not in sys.modules; "
            "t.Tracker(10, 0.5); assert 'trackers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
