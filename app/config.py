"""Settings: the one place that reads the environment (``DFINE_*``), and the command-line flags
that mirror every field (``settings_from_args``), for the service and its tools alike."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.engine.buckets import parse_buckets
from app.orientation import OrientationMode
from app.tiling import (
    DEFAULT_MERGE,
    DEFAULT_MERGE_METRIC,
    DEFAULT_MERGE_THRESHOLD,
    DEFAULT_OVERLAP,
    MatchMetric,
    MergeMethod,
    Tiling,
    parse_tile,
)

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "dfine_n_shapes.onnx"
PROVIDER_NAMES = ("auto", "tensorrt", "cuda", "cpu")

Precision = Literal["fp32", "fp16"]
PreprocessMode = Literal["exact", "fast"]
CudaGraphMode = Literal["auto", "on", "off"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LogFormat = Literal["text", "json"]
ModelControl = Literal["none", "poll", "explicit"]


class Settings(BaseSettings):
    """Every setting of the service. Units are in the names."""

    # Empty variables count as unset: compose passes "${DFINE_LABELS_PATH:-}" as "".
    model_config = SettingsConfigDict(env_prefix="DFINE_", frozen=True, extra="forbid",
                                      env_ignore_empty=True)

    model_path: Path = Field(
        DEFAULT_MODEL_PATH, description="ONNX model to serve (one model, named by the file's "
        "stem, version 1); ignored with MODEL_REPOSITORY")
    model_repository: Path | None = Field(
        None, description="a model repository, DIR/<name>/<version>/model.onnx (Triton's "
        "layout): every model in it is served (see Models and versions)")
    model_control: ModelControl = Field(
        "none", description="none: the repository is read at start only; poll: rescanned "
        "every REPOSITORY_POLL_S, new versions rolled in live; explicit: changed only by "
        "POST /v2/repository/models/<name>/load and /unload")
    repository_poll_s: float = Field(
        5.0, gt=0, le=3600, description="MODEL_CONTROL=poll: seconds between rescans")
    default_model: str | None = Field(
        None, description="the model a request without `model` goes to; default: the only "
        "one")
    max_loaded_models: int = Field(
        8, ge=1, le=256, description="model versions loaded at once, at most (one being "
        "rolled in beside the version it replaces counts once); a load past it is refused")
    input_size: str | None = Field(
        None, description="WxH (or one number) for an export whose height and width are "
        "dynamic; default: its dfine.input_size metadata, else 640")
    labels_path: Path | None = Field(None, description="class names, one a line")
    providers: str = Field(
        "auto", description="auto, tensorrt, cuda, cpu, or a comma list in priority order")
    trt_fp16: bool = Field(True, description="TensorRT: build FP16 engines")
    trt_cache_dir: Path = Field(Path("/tmp/dfine-trt-cache"),
                                description="TensorRT engine and timing cache")
    preprocess: PreprocessMode = Field(
        "exact", description="exact: the official pipeline bit for bit (PIL decode, pixels as "
        "stored, PIL bilinear resize, /255); fast: OpenCV, large JPEGs decoded at reduced "
        "scale")
    orientation: OrientationMode = Field(
        "exif", description="exif: turn photos as their EXIF orientation says (as viewers do), "
        "sizes and boxes in that frame; stored: pixels as stored, as the official pipeline")
    precision: Precision = Field(
        "fp32", description="fp16: convert the model at load for the CUDA provider (inputs, "
        "outputs, LayerNorm and the score/box tail stay fp32); TensorRT uses TRT_FP16")
    intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime threads per run; 0: auto (cores / instances on CPU, "
        "1 on GPU)")
    max_batch_size: int = Field(
        0, ge=0, le=256, description="images per engine run, at most; 0: auto (1 on CPU, 8 on "
        "GPU)")
    batch_buckets: str = Field(
        "auto", description="batch sizes the engine runs at, each in a session of its own "
        "that sees only that shape (a batch is padded to the next); auto: 1,2,4,8,16,32 up to "
        "MAX_BATCH_SIZE with the CUDA provider, none on CPU or TensorRT")
    cuda_graph: CudaGraphMode = Field(
        "auto", description="CUDA provider with buckets: replay each bucket's run as a CUDA "
        "graph; auto falls back (logged) where a model can't be captured, on refuses to start")
    max_delay_ms: float = Field(
        5.0, ge=0, le=10_000,
        description="how long a batch may wait to fill while the engine is busy")
    max_queue: int = Field(32, ge=1, description="images waiting for the engine, at most")
    instances: int = Field(
        0, ge=0, le=16, description="engine runs in flight at once; 0: auto (one per core on "
        "CPU, 1 on GPU)")
    frontends: int = Field(
        0, ge=0, le=64, description="front-end processes (HTTP, gRPC, decoding) feeding one "
        "engine process that batches for all of them; 1: one process, as without; 0: auto (1 "
        "when the engine runs on the CPU, which needs the cores; on a GPU one per 4 cores, 2 "
        "to 8)")
    decode_workers: int = Field(
        0, ge=0, description="decode/resize threads; 0: one per core (at most 4 on CPU, "
        "where the engine needs the cores)")
    admission_wait_ms: float = Field(
        100.0, ge=0, le=10_000,
        description="when full, how long a request may wait for room before its 503")
    engine_timeout_s: float = Field(
        60.0, gt=0, description="an engine run taking longer is cut off: its requests get 504 "
        "and /readyz 503 until it returns")
    request_timeout_s: float = Field(10.0, gt=0, description="deadline to start a request's batch")
    score_threshold: float = Field(0.5, ge=0, le=1, description="default score threshold")
    max_detections: int = Field(100, ge=1, le=300, description="default detections per image")
    clip_boxes: bool = Field(
        True, description="clip boxes to the image by default (query clip=false: the official "
        "pipeline's unclipped boxes)")
    dedupe_iou: float = Field(
        0.0, ge=0, le=1, description="default class-aware duplicate removal: drop a detection "
        "that a higher-scored one of its class overlaps by this IoU; 0: off, the model's answer")
    tile: str = Field(
        "none", description="tiled inference by default (query tile overrides): none, auto (tiles "
        "only images much larger than the model's input), or a tile size in the original "
        "image's pixels; an image's tiles run as one batch, their boxes merged")
    tile_overlap: float = Field(
        DEFAULT_OVERLAP, ge=0, le=0.9, description="default overlap of neighbouring tiles, a "
        "fraction of the tile")
    tile_merge: MergeMethod = Field(
        DEFAULT_MERGE, description="default merging of the tiles' detections: nms (the best "
        "of matching boxes), greedy_nmm (SAHI's greedy non-max merge: a box cut by a tile "
        "border grows back to the whole object), none")
    tile_merge_threshold: float = Field(
        DEFAULT_MERGE_THRESHOLD, gt=0, le=1, description="default overlap at which two "
        "detections are merged")
    tile_merge_metric: MatchMetric = Field(
        DEFAULT_MERGE_METRIC, description="default overlap measure for merging: ios "
        "(intersection over the smaller box) or iou")
    tile_full_image: bool = Field(
        True, description="tiled requests also run the whole image by default (its large "
        "objects), merged with the tiles'")
    max_tiles: int = Field(
        16, ge=1, le=256, description="tiles one image may become, at most (whole-image pass "
        "not counted); a request asking for more is refused (422) before its image is decoded")
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="request body limit")
    max_pixels: int = Field(25_000_000, ge=1, description="decoded width x height limit")
    max_batch_images: int = Field(16, ge=1, description="images in one /detect/batch request")
    api_key: str | None = Field(None, description="require this key (Bearer or X-API-Key)")
    control_api_key: str | None = Field(
        None, description="the key of the calls that change what is served (repository load "
        "and unload; Bearer or X-API-Key); unset: those calls are refused (403) when API_KEY "
        "is set, open when no key is")
    open_paths: str = Field(
        "/healthz,/readyz,/metrics",
        description="paths served without the API key, comma-separated")
    cors_origins: str = Field(
        "", description="origins allowed by CORS, comma-separated ('*' for any); empty: off")
    read_timeout_s: float = Field(
        10.0, gt=0, description="longest wait for the next chunk of an upload (then 408)")
    upload_timeout_s: float = Field(
        30.0, gt=0, description="the whole upload must arrive within this (then 408)")
    upload_hold_ms: float = Field(
        1000.0, ge=0, description="an admitted request whose upload is still arriving after "
        "this gives its place back, and takes one again when its body is complete")
    max_slow_uploads: int = Field(
        16, ge=0, description="uploads still arriving without a place, at most (more get 408)")
    header_timeout_s: float = Field(
        10.0, gt=0, description="request line and headers must arrive within this (then 408 "
        "and the connection is closed)")
    max_header_bytes: int = Field(
        16384, ge=1024, description="request line and headers, at most (then 431)")
    max_connections: int = Field(
        1000, ge=1, description="open connections, at most; more are refused with 503")
    write_timeout_s: float = Field(
        30.0, gt=0, description="a response the client does not read within this is dropped "
        "and its connection closed")
    min_send_rate: int = Field(
        512 * 1024, ge=1024, description="bytes/s: a response the client falls behind on must "
        "be all sent within WRITE_TIMEOUT_S + its size at this rate (a 27 MB PNG: 30 + 52 s), "
        "else it is dropped and its connection closed (and a render's place freed)")
    max_renders: int = Field(
        2, ge=1, description="/detect/render requests in flight (decoding, drawing, sending), "
        "at most; more get 503")
    video_dir: Path | None = Field(
        None, description="video files a stream may read (POST /streams with a path under "
        "it); unset: no file sources")
    stream_sources: str = Field(
        "", description="what a stream may fetch, comma-separated: URL prefixes "
        "(rtsp://cam1.lan/, http://10.0.0.5:8080/) and networks (10.0.0.0/8, 192.168.1.7); "
        "schemes rtsp, rtsps, http, https; empty: none (a stream is a fetch made by the server)")
    streams: str = Field(
        "", description="streams watched from the start: a JSON list of POST /streams bodies, "
        "e.g. [{\"source\": \"rtsp://cam1.lan/sub\", \"fps\": 5}]")
    max_streams: int = Field(8, ge=0, le=256, description="server-side streams at once, at most")
    max_client_streams: int = Field(
        16, ge=0, le=1024, description="clients sending frames over WebSocket "
        "(/streams/client) at once, at most")
    stream_frames_in_flight: int = Field(
        1, ge=1, le=16, description="a stream's frames decoding, queued or running at once, at "
        "most: what bounds the share of the batcher one stream takes, and the lag when the "
        "engine is behind (about streams x this / frames a second); 2 overlaps a file's "
        "decoding with its runs on a GPU")
    stream_max_pixels: int = Field(
        1920 * 1080, ge=1, description="a stream's frame width x height, at most (larger: "
        "failed)")
    stream_max_frame_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="a frame's encoded size, at most: a client's "
        "WebSocket message, an MJPEG part, the bytes read from an HTTP source for one frame")
    stream_open_timeout_s: float = Field(
        10.0, gt=0, description="a source must answer and send its first frame within this, "
        "else the stream fails (on its first connection) or reconnects")
    stream_read_timeout_s: float = Field(
        10.0, gt=0, description="a running source silent this long is lost: it reconnects")
    stream_reconnect_max_s: float = Field(
        30.0, gt=0, description="a lost live source reconnects with backoff from 0.5 s up to "
        "this, without end (a file source ends)")
    shm_key_prefixes: str = Field(
        "", description="Open Inference Protocol system shared memory: the keys a same-host "
        "client may register, comma-separated prefixes (e.g. /dfine-); empty: off (a key "
        "names any /dev/shm segment the service's user can open)")
    max_shm_regions: int = Field(
        16, ge=0, le=1024, description="system shared-memory regions registered at once, at "
        "most")
    max_shm_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="the registered regions' sizes together, at most "
        "(mapped by the service: counted in its memory bound)")
    trace_level: Literal["off", "timestamps"] = Field(
        "off", description="traces at start (changed at run time by /v2/trace/setting): off, "
        "or timestamps (a span per request, with decode, queue, engine run and postprocess)")
    trace_rate: int = Field(
        1000, ge=1, description="trace one request in this many")
    trace_count: int = Field(
        -1, ge=-1, description="stop tracing after this many traces; -1: no limit")
    otlp_endpoint: str = Field(
        "", description="where traces go: an OTLP/HTTP traces URL, e.g. "
        "http://otel-collector:4318/v1/traces; empty: traces are not exported")
    instant_engine: bool = Field(
        False, description="benchmarks only: an engine that answers at once with no "
        "detections, to measure what the front end (HTTP, decode, batching) carries alone")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="the Open Inference Protocol over gRPC (and the "
        "gRPC health service) on this port; 0: off")
    grpc_max_inflight: int = Field(
        64, ge=1, le=1024, description="gRPC calls running at once (their message received), "
        "at most; more get RESOURCE_EXHAUSTED. Calls waiting for or receiving their message are "
        "bounded by GRPC_MAX_RECEIVING, the streams per connection and their deadline")
    grpc_max_message_bytes: int = Field(
        0, ge=0, description="the largest gRPC request message, refused by its length prefix "
        "before it is read (RESOURCE_EXHAUSTED); 0: what a call of the most images carries, "
        "MAX_BATCH_IMAGES files of MAX_UPLOAD_BYTES and 64 KiB of names and shapes, up to 80 "
        "MiB (a FP32 batch of 16 images at 640x640 fits)")
    grpc_max_receiving: int = Field(
        4, ge=1, le=1024, description="gRPC calls receiving their request message at once, at "
        "most, half of them from one connection (each may hold up to GRPC_MAX_MESSAGE_BYTES "
        "until its message is whole); a turn is held UPLOAD_HOLD_MS, then only by one of half "
        "of them kept for slow senders (one per connection); the others wait their turn, "
        "holding 4 KiB each")
    grpc_max_connections: int = Field(
        256, ge=1, description="gRPC connections open at once, at most (more are closed as "
        "they come); apart from MAX_CONNECTIONS, so that HTTP always has its own")
    grpc_max_streams_per_connection: int = Field(
        128, ge=1, le=1024, description="gRPC calls at once on one connection, at most (HTTP/2 "
        "MAX_CONCURRENT_STREAMS; keep it above what one client sends at once: gRPC core "
        "refuses a stream at the bound before the client has seen the last one end)")
    grpc_idle_timeout_s: float = Field(
        60.0, gt=0, description="a gRPC connection with no call for this long is closed")
    grpc_compression: bool = Field(
        False, description="accept gzip- and deflate-compressed gRPC requests (16 KB of gzip "
        "can expand to 16 MiB, up to GRPC_MAX_MESSAGE_BYTES); off: such calls get "
        "UNIMPLEMENTED")
    log_level: LogLevel = Field("info", description="log level")
    log_format: LogFormat = Field(
        "text", description="text, or json: one JSON object a line, access log included")

    @field_validator("streams")
    @classmethod
    def _valid_streams(cls, value: str) -> str:
        if value.strip():
            from app.streams.spec import DECLARED

            DECLARED.validate_json(value)  # its ValidationError says which stream and field
        return value

    @field_validator("stream_sources")
    @classmethod
    def _valid_stream_sources(cls, value: str) -> str:
        import ipaddress

        for item in (part.strip() for part in value.split(",")):
            if item and "://" not in item:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is neither a URL prefix (scheme://host/...) "
                                     "nor a network (10.0.0.0/8, 192.168.1.7)") from None
        return value

    @field_validator("tile")
    @classmethod
    def _valid_tile(cls, value: str) -> str:
        parse_tile(value)
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: str) -> str:
        names = [p.strip().lower() for p in value.split(",") if p.strip()]
        unknown = [n for n in names if n not in PROVIDER_NAMES]
        if not names or unknown:
            raise ValueError(f"unknown provider(s) {unknown or value!r}; use {PROVIDER_NAMES}")
        if "auto" in names and len(names) > 1:
            raise ValueError("'auto' cannot be combined with other providers")
        return ",".join(names)

    @field_validator("batch_buckets")
    @classmethod
    def _valid_buckets(cls, value: str) -> str:
        parse_buckets(value)
        return value

    @field_validator("input_size")
    @classmethod
    def _valid_input_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_input_size(value)
        return value

    @property
    def input_size_wh(self) -> tuple[int, int] | None:
        return None if self.input_size is None else parse_input_size(self.input_size)

    @property
    def bucket_sizes(self) -> tuple[int, ...] | None:
        """The buckets asked for; None: auto."""
        return parse_buckets(self.batch_buckets)

    @property
    def tiling(self) -> Tiling | None:
        """The tiling a request gets when it says nothing of it (None: untiled)."""
        tile = parse_tile(self.tile)
        if tile is None:
            return None
        return Tiling(tile, self.tile_overlap, self.tile_merge, self.tile_merge_threshold,
                      self.tile_merge_metric, self.tile_full_image)

    @property
    def provider_list(self) -> list[str]:
        return self.providers.split(",")

    @property
    def open_path_set(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.open_paths.split(",") if p.strip())

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


def parse_input_size(text: str) -> tuple[int, int]:
    """'640', '640x480' (width x height) -> (width, height); each a multiple of 32."""
    width, _, height = text.strip().lower().partition("x")
    try:
        size = int(width), int(height or width)
    except ValueError:
        raise ValueError(f"input size {text!r}: WxH or one number, e.g. 640x480") from None
    if not all(32 <= side <= 4096 and side % 32 == 0 for side in size):
        raise ValueError(f"input size {text!r}: each side a multiple of 32 from 32 to 4096")
    return size


def _default_text(value: Any) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path):
        root = DEFAULT_MODEL_PATH.parent.parent
        return str(value.relative_to(root)) if value.is_relative_to(root) else str(value)
    return str(value)


def settings_markdown() -> str:
    """The settings table (environment variable, flag, default, meaning), made from the
    Settings class itself, so that the documentation cannot drift from it (docs/hooks.py)."""
    rows = ["| environment | flag | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|").replace(
            "<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `DFINE_{name.upper()}` | `{flag_of(name)}` | "
                    f"`{_default_text(field.default)}` | {meaning} |")
    return "\n".join(rows)


class SettingsError(ValueError):
    """A bad setting, said in one line per problem: its flag, its variable, what is wrong."""


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


TOOLS_EPILOG = """tools:
  dfine-serve bench ...   load test: the service beside a plain server and its own ceilings
                          (dfine-serve bench --help)
  dfine-serve bench-swap  a new model version rolled in under load: errors, time to serve
                          it, p99 during the swap (dfine-serve bench-swap --help)
  dfine-serve bench-streams
                          live camera streams: how many the model keeps up with, lag,
                          CPU per frame (dfine-serve bench-streams --help)
  dfine-serve bench-tiling
                          what tiling costs: images/s, latency, tiles and engine runs
                          per image (dfine-serve bench-tiling --help)
  dfine-serve eval ...    COCO AP of a running service or of a model in-process
                          (dfine-serve eval --help)
  dfine-serve inspect ... what the engine hands onnxruntime for a bucket, and what it makes
                          of it (dfine-serve inspect --help)
  dfine-serve quantize .. static INT8 quantization of a model (dfine-serve quantize --help)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfine-serve", epilog=TOOLS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a D-FINE ONNX model over HTTP. Every flag has an environment "
                    "variable DFINE_<NAME>; flags win.")
    for name, field in Settings.model_fields.items():
        kwargs: dict[str, Any] = {"dest": name, "default": None,
                                  "help": f"{field.description} (default: {field.default})"}
        annotation = field.annotation
        choices = get_args(annotation) if getattr(annotation, "__origin__", None) is None \
            and get_args(annotation) and all(isinstance(a, str) for a in get_args(annotation)) \
            else None
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices:
            kwargs["choices"] = choices
        parser.add_argument(flag_of(name), **kwargs)
    return parser


def settings_from_args(argv: list[str] | None) -> Settings:
    """Settings from flags over the environment; SettingsError names each bad one."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error.get("loc") else ""
            where = (f"{flag_of(name)} / DFINE_{name.upper()}" if name in Settings.model_fields
                     else name or "settings")
            given = f" (got {error['input']!r})" if "input" in error and name else ""
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            lines.append(f"{where}: {message}{given}")
        raise SettingsError("\n".join(lines)) from None
