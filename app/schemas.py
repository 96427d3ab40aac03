"""Response bodies (DESIGN §2); their JSON Schemas document the API in /docs."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Box(BaseModel):
    """Corners in the original image's pixels, clipped to the image."""

    x1: float
    y1: float
    x2: float
    y2: float


class DetectionOut(BaseModel):
    label: str = Field(examples=["circle"])
    class_id: int = Field(ge=0, examples=[0])
    score: float = Field(ge=0, le=1, examples=[0.912])
    box: Box


class ImageSize(BaseModel):
    width: int = Field(examples=[1280])
    height: int = Field(examples=[720])


class Timing(BaseModel):
    """Milliseconds spent in each stage of this request."""

    queue: float
    preprocess: float
    inference: float
    total: float


class TileWindow(BaseModel):
    x: int
    y: int
    width: int
    height: int


class TilingOut(BaseModel):
    """What a request that asked for tiling became."""

    tile: int | None = Field(description="the tile size in the original's pixels; null: not "
                             "tiled (auto left an image near the model's input size whole)")
    overlap: float
    full_image: bool = Field(description="the whole image ran too, merged with the tiles")
    tiles: list[TileWindow] = Field(
        description="the windows, in the original (upright) image's pixels, as the boxes")
    engine_images: int = Field(description="images this one became for the engine")
    engine_runs: int = Field(description="engine runs they took")


class DetectResponse(BaseModel):
    model: str = Field(examples=["dfine_n_shapes"])
    version: int = Field(examples=[1], description="the model version that answered")
    image: ImageSize
    detections: list[DetectionOut] = Field(description="sorted by score, descending")
    timing_ms: Timing
    tiling: TilingOut | None = Field(
        None, description="present when the request asked for tiling (tile, or TILE)")


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str = Field(examples=["the data is not a decodable image"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BatchItemError(BaseModel):
    index: int = Field(description="the image's place in the request, from 0")
    error: ErrorDetail


class BatchResponse(BaseModel):
    model: str
    version: int
    results: list[DetectResponse | BatchItemError] = Field(
        description="one per image, in the order sent: its detections, or its own error")


class Status(BaseModel):
    status: str = Field(examples=["ok"])


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    instances: int
    request_timeout_s: float


class BucketInfo(BaseModel):
    size: int = Field(description="the batch size this bucket's sessions run at")
    sessions: int = Field(description="one per engine instance")
    cuda_graph: bool = Field(description="its runs replay a captured CUDA graph (checked at "
                             "warm-up against a plain run)")
    run_ms: float | None = Field(
        description="median run at warm-up; the batcher splits its queue by these")
    memory_mb: float | None = Field(
        description="what its sessions cost (GPU memory on a GPU, through NVML; else the "
        "process's resident memory); null where it can't be read")


class EngineInfo(BaseModel):
    providers_asked: list[str] = Field(
        description="execution providers asked for (PROVIDERS, auto resolved)")
    providers_running: list[str] = Field(
        description="those onnxruntime enabled; the plan (buckets, graphs) follows these")
    precision: str = Field(examples=["fp32"])
    instances: int
    intra_op_threads: int
    decode_workers: int
    memory_kind: str = Field(examples=["gpu"], description="gpu or host: what memory_mb counts")
    buckets: list[BucketInfo] = Field(
        description="empty: one session runs every batch size as it is (the CPU default)")
    instant: bool = Field(False, description="INSTANT_ENGINE (benchmarks only): no model runs")


class LoadedModel(BaseModel):
    name: str
    version: int
    default: bool = Field(description="requests that name no model go to this model")
    input_size: ImageSize
    classes: list[str] | None
    providers: list[str]


class ModelResponse(BaseModel):
    name: str
    version: int
    path: str = Field(description="the model file's name (not where it lies on the server)")
    format: str = Field(examples=["onnx"])
    layout: str = Field(examples=["official"], description="official or raw_head")
    providers: list[str] = Field(examples=[["CPUExecutionProvider"]])
    input_size: ImageSize
    fixed_batch: int | None = Field(description="the model's own batch size, if not dynamic")
    resize: str = Field(examples=["stretch"])
    classes: list[str] | None = Field(description="class names by class_id; null if unnamed")
    batching: BatchingInfo
    engine: EngineInfo
    models: list[LoadedModel] = Field(
        description="every model version loaded (newest version of a model: its default)")
