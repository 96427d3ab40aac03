"""System shared memory's regions (app.api.shm) on real /dev/shm segments: keys, bounds,
reads and writes within regions, a segment truncated under a registration, the registrations
shared by two front ends through their file; and tensors naming regions in the REST and gRPC
parsers."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2 as pb

from app.api.grpc_wire import parse_infer_request
from app.api.shm import (
    AlreadyExists,
    Regions,
    Segment,
    allowed_prefixes,
    segment_path,
)
from app.api.v2_codec import Limits, RegionData, parse_request
from app.config import Settings
from app.errors import Conflict, InvalidRequest, NotFound, Unsupported

PREFIX = f"p30unit-{os.getpid()}-"
LIMITS = Limits(max_images=4, max_image_bytes=1000, max_elements=4 * (3 * 4 * 4 + 2))


def settings(**changes: object) -> Settings:
    return Settings(**{"shm_key_prefixes": "/" + PREFIX, "max_shm_regions": 4,
                       "max_shm_bytes": 1 << 20, **changes})  # type: ignore[arg-type]


@pytest.fixture
def segment() -> Iterator[Callable[[str, bytes], str]]:
    """Segments in /dev/shm (what a client's shm_open makes), removed after the test."""
    made: list[Path] = []

    def make(name: str, data: bytes) -> str:
        path = Path("/dev/shm") / (PREFIX + name)
        path.write_bytes(data)
        made.append(path)
        return "/" + PREFIX + name

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def test_keys_are_one_name_under_an_allowed_prefix() -> None:
    prefixes = allowed_prefixes(" /a-, b- ,")
    assert prefixes == ["a-", "b-"]
    assert segment_path("//a-x", prefixes) == Path("/dev/shm/a-x")
    for bad in ("/", "/a-x/../y", "/..", "a-\0", "/a-" + "x" * 300):
        with pytest.raises(InvalidRequest, match="not a segment name"):
            segment_path(bad, prefixes)
    with pytest.raises(InvalidRequest, match="not allowed"):
        segment_path("/c-x", prefixes)


def test_off_without_prefixes(segment: Callable[[str, bytes], str]) -> None:
    regions = Regions(settings(shm_key_prefixes=""))
    with pytest.raises(Unsupported):
        regions.register("r", segment("off", b"x" * 8), 0, 8)
    regions.unregister("")  # nothing to do, no error


def test_register_checks_the_segment_and_the_bounds(segment: Callable[[str, bytes], str]
                                                    ) -> None:
    regions = Regions(settings(max_shm_bytes=3000))
    key = segment("a", bytes(1000))
    with pytest.raises(InvalidRequest, match="runs past the segment"):
        regions.register("r", key, 1, 1000)
    for offset, size in ((-1, 8), (0, True), (0, "8"), (0, 0)):
        with pytest.raises(InvalidRequest):
            regions.register("r", key, offset, size)
    link = Path("/dev/shm") / (PREFIX + "link")
    link.symlink_to(Path("/dev/shm") / (PREFIX + "a"))
    try:
        with pytest.raises(InvalidRequest, match="unable to open"):
            regions.register("r", "/" + PREFIX + "link", 0, 8)  # links are not followed
    finally:
        link.unlink()
    regions.register("r", key, 0, 1000)
    with pytest.raises(AlreadyExists):
        regions.register("r", key, 0, 8)
    regions.register("r2", key, 500, 8)  # the same segment: counted once
    with pytest.raises(Conflict, match="MAX_SHM_BYTES"):
        regions.register("big", segment("big", bytes(2500)), 0, 8)
    regions.register("r3", segment("c", bytes(8)), 0, 8)
    regions.register("r4", key, 0, 8)
    with pytest.raises(Conflict, match="MAX_SHM_REGIONS"):
        regions.register("r5", key, 0, 8)
    assert [r.status() for r in regions.status("r2")] == [
        {"name": "r2", "key": key, "offset": 500, "byte_size": 8}]
    regions.unregister("r2")
    regions.unregister("unknown")
    assert [r.name for r in regions.status("")] == ["r", "r3", "r4"]
    with pytest.raises(NotFound):
        regions.status("r2")
    regions.unregister("")
    assert regions.status("") == []


def test_reads_and_writes_stay_within_the_region(segment: Callable[[str, bytes], str]
                                                 ) -> None:
    regions = Regions(settings())
    key = segment("rw", bytes(range(100)))
    regions.register("r", key, 10, 50)
    assert bytes(regions.read("r", 5, 4)) == bytes([15, 16, 17, 18])
    with pytest.raises(InvalidRequest, match="Invalid offset for"):
        regions.check("r", 50, 1)
    with pytest.raises(InvalidRequest, match="Invalid offset \\+ byte size"):
        regions.read("r", 40, 11)
    with pytest.raises(NotFound):
        regions.read("nothing", 0, 1)
    regions.write("r", 2, b"\xff\xfe")
    assert Path("/dev/shm", key.lstrip("/")).read_bytes()[12:14] == b"\xff\xfe"
    # Truncated by its owner: a refusal, no SIGBUS, and no write growing it back.
    os.truncate(Path("/dev/shm", key.lstrip("/")), 20)
    with pytest.raises(InvalidRequest, match="truncated"):
        regions.read("r", 0, 50)
    with pytest.raises(InvalidRequest, match="truncated"):
        regions.write("r", 20, b"x")
    assert os.path.getsize(Path("/dev/shm", key.lstrip("/"))) == 20


def test_a_segment_closes_after_its_last_reader() -> None:
    read, write = os.pipe()
    os.close(write)
    shared = Segment(read, writable=False)
    entered, release = threading.Event(), threading.Event()

    def reader() -> None:
        with shared.use():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=reader)
    thread.start()
    entered.wait(10)
    shared.close()
    os.fstat(read)  # still open: a reader holds it
    with pytest.raises(NotFound), shared.use():
        pass
    release.set()
    thread.join(10)
    with pytest.raises(OSError):
        os.fstat(read)


def test_two_front_ends_share_the_registrations(tmp_path: Path,
                                                segment: Callable[[str, bytes], str]) -> None:
    one = Regions(settings(), tmp_path / "shm-regions.json")
    other = Regions(settings(), tmp_path / "shm-regions.json")
    key = segment("fe", bytes(range(64)))
    one.register("r", key, 0, 64)
    assert bytes(other.read("r", 1, 2)) == b"\x01\x02"  # opened there, the same segment
    with pytest.raises(AlreadyExists):
        other.register("r", key, 0, 8)
    other.register("s", key, 8, 8)
    assert [r.name for r in one.status("")] == ["r", "s"]
    other.unregister("r")
    with pytest.raises(NotFound):
        one.read("r", 0, 1)
    # A segment replaced after its registration is refused where it was not open yet.
    one.register("t", segment("t", bytes(16)), 0, 16)
    Path("/dev/shm", PREFIX + "t").unlink()
    segment("t", bytes(16))
    with pytest.raises(InvalidRequest, match="register it again"):
        other.read("t", 0, 1)
    assert one.read("t", 0, 1) == b"\0"  # the registering front end holds the first
    one.close()
    other.close()


def _rest(inputs: list[dict[str, object]], outputs: object = None) -> bytes:
    return orjson.dumps({"inputs": inputs, **({"outputs": outputs} if outputs else {})})


def test_rest_inputs_and_outputs_in_regions(segment: Callable[[str, bytes], str]) -> None:
    regions = Regions(settings())
    regions.register("r", segment("codec", bytes(4096)), 0, 4096)
    shm = {"shared_memory_region": "r", "shared_memory_byte_size": 4 * 3 * 4 * 4,
           "shared_memory_offset": 64}
    spec = {"name": "images", "datatype": "FP32", "shape": [1, 3, 4, 4], "parameters": shm}
    out = [{"name": "boxes", "parameters": {"shared_memory_region": "r",
                                            "shared_memory_byte_size": 100}}]
    parsed = parse_request(_rest([spec], out), None, LIMITS, regions)
    assert parsed.inputs["images"].value == RegionData(regions, "r", 64, 192)
    assert parsed.regions["boxes"] == RegionData(regions, "r", 0, 100)
    with pytest.raises(Unsupported):
        parse_request(_rest([spec]), None, LIMITS, None)
    for changed, words in (({"shared_memory_byte_size": 8}, "is not the 192 bytes"),
                           ({"shared_memory_offset": 4000}, "byte size"),
                           ({"shared_memory_offset": -1}, "unsigned integer"),
                           ({"shared_memory_region": 3}, "region's name")):
        with pytest.raises(InvalidRequest, match=words):
            parse_request(_rest([{**spec, "parameters": {**shm, **changed}}]), None, LIMITS,
                          regions)
    with pytest.raises(InvalidRequest, match="give one of"):
        parse_request(_rest([{**spec, "data": [0.0] * 48}]), None, LIMITS, regions)
    with pytest.raises(InvalidRequest, match="cannot be binary"):
        parse_request(_rest([spec], [{"name": "boxes", "parameters": {
            **out[0]["parameters"], "binary_data": True}}]), None, LIMITS, regions)
    regions.close()


def test_grpc_raw_contents_pair_with_the_inputs_not_in_regions(
        segment: Callable[[str, bytes], str]) -> None:
    regions = Regions(settings())
    regions.register("r", segment("wire", bytes(4096)), 0, 4096)
    request = pb.ModelInferRequest(model_name="m")
    images = request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 4, 4])
    images.parameters["shared_memory_region"].string_param = "r"
    images.parameters["shared_memory_byte_size"].int64_param = 192
    request.inputs.add(name="orig_target_sizes", datatype="INT64", shape=[1, 2])
    request.raw_input_contents.append(np.array([[8, 6]], np.int64).tobytes())
    scores = request.outputs.add(name="scores")
    scores.parameters["shared_memory_region"].string_param = "r"
    scores.parameters["shared_memory_byte_size"].int64_param = 1200
    scores.parameters["shared_memory_offset"].int64_param = 192
    parsed, _ = parse_infer_request(request.SerializeToString(), LIMITS, regions)
    assert parsed.inputs["images"].value == RegionData(regions, "r", 0, 192)
    assert np.asarray(parsed.inputs["orig_target_sizes"].value).tolist() == [[8, 6]]
    assert parsed.regions["scores"] == RegionData(regions, "r", 192, 1200)
    request.raw_input_contents.append(b"\0" * 192)  # one too many
    with pytest.raises(InvalidRequest, match="one entry per input"):
        parse_infer_request(request.SerializeToString(), LIMITS, regions)
    del request.raw_input_contents[1]
    images.parameters["shared_memory_byte_size"].string_param = "192"
    with pytest.raises(InvalidRequest, match="unsigned integer"):
        parse_infer_request(request.SerializeToString(), LIMITS, regions)
    regions.close()


def test_a_segment_grown_after_registration_is_unregistered(
        segment: Callable[[str, bytes], str]) -> None:
    """Its open descriptor keeps all of it alive, even unlinked: grown past what MAX_SHM_BYTES
    counted, it is let go, at its next use or the next registration."""
    regions = Regions(settings(max_shm_bytes=1 << 16))
    key = segment("grow", bytes(1024))
    regions.register("g", key, 0, 1024)
    path = Path("/dev/shm") / (PREFIX + "grow")
    os.truncate(path, 1 << 20)  # the owner grows it to 1 MiB
    path.unlink()
    with pytest.raises(InvalidRequest, match="grew after it was registered"):
        regions.read("g", 0, 8)
    assert regions.status("") == []
    # Grown and never used again: the next registration drops it before counting.
    key = segment("grow2", bytes(1024))
    regions.register("h", key, 0, 1024)
    os.truncate(Path("/dev/shm") / (PREFIX + "grow2"), 1 << 20)
    regions.register("i", segment("third", bytes(1 << 15)), 0, 1 << 15)
    assert [r.name for r in regions.status("")] == ["i"]
    regions.close()


def test_a_damaged_registrations_file_is_started_over(
        tmp_path: Path, segment: Callable[[str, bytes], str]) -> None:
    store = tmp_path / "shm-regions.json"
    regions = Regions(settings(), store)
    regions.register("r", segment("d", bytes(64)), 0, 64)
    store.write_bytes(b"%020d\n[{\"name\": " % 7)  # a front end killed mid-write
    other = Regions(settings(), store)
    assert other.status("") == []  # not a 500 on every call until a restart
    other.register("r", segment("d2", bytes(64)), 0, 64)
    assert [r.name for r in regions.status("")] == ["r"]
    regions.close()
    other.close()
