"""What a user asks of a stream (POST /streams, the STREAMS setting) and what they see of it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

StreamState = Literal["connecting", "running", "reconnecting", "ended", "failed", "stopped"]
ENDED_STATES = frozenset({"ended", "failed", "stopped"})
TRACKING_DEDUPE_IOU = 0.7


class StreamRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=1, max_length=4096,
        description="rtsp:// or rtsps:// URL, http(s):// URL of an MJPEG stream or a video, or "
                    "a file's path under VIDEO_DIR; allowed by STREAM_SOURCES",
        examples=["rtsp://cam1.lan:554/sub"])
    name: str | None = Field(None, max_length=128, description="a label of your own")
    fps: float | None = Field(
        None, gt=0, le=240, description="frames processed per second of the source's time, at "
                                        "most; default: every frame the service keeps up with")
    model: str | None = Field(None, max_length=128, description="default: the default model")
    version: int | None = Field(None, ge=1, description="default: the newest ready version")
    score_threshold: float | None = Field(None, ge=0, le=1)
    max_detections: int | None = Field(None, ge=1, le=300)
    classes: list[str | int] | None = Field(
        None, max_length=1000, description="class names or ids to keep")
    tracking: bool = Field(True, description="give each detection a track id (ByteTrack)")
    dedupe_iou: float | None = Field(
        None, ge=0, le=1, description="drop a detection that a higher-scored one of its class "
        "overlaps by this IoU (as /detect's); default: 0.7 with tracking (a box the model "
        "repeats would take a second track id), else the model's setting")

    def dedupe(self) -> float | None:
        return TRACKING_DEDUPE_IOU if self.dedupe_iou is None and self.tracking \
            else self.dedupe_iou

    def classes_text(self) -> str | None:
        return None if self.classes is None else ",".join(str(c) for c in self.classes)


DECLARED = TypeAdapter(list[StreamRequest])


class StreamStatus(BaseModel):
    id: str
    name: str | None
    source: str = Field(description="the source, without credentials")
    kind: Literal["live", "file"] | None = Field(
        description="live: the newest frame wins; file: every frame (or fps-capped), then "
                    "ended; null until known")
    state: StreamState
    reason: str | None = Field(description="why it failed, reconnects, or why frames fail")
    model: str | None
    version: int | None
    tracking: bool
    fps: float | None
    fps_in: float = Field(description="frames a second from the source, last 5 s")
    fps_out: float = Field(description="frames a second published, last 5 s")
    frames_in: int
    frames_processed: int
    frames_dropped: int = Field(description="not processed: a newer frame won, or it failed")
    frames_skipped: int = Field(description="left out by the fps cap")
    lag_s: float | None = Field(description="the last published frame's, from its decode")
    reconnects: int
    created_at: float = Field(description="Unix time")


class StreamList(BaseModel):
    streams: list[StreamStatus]
