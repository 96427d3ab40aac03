"""Domain errors. Raised below the HTTP layer; ``app.api.errors`` maps them to responses."""

from __future__ import annotations


class ServiceError(Exception):
    """An error with a stable code, an HTTP status and a message safe to show to clients."""

    code = "internal"
    status = 500
    message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message


class InvalidImage(ServiceError):
    code, status, message = "invalid_image", 400, "the data is not a decodable image"


class PayloadTooLarge(ServiceError):
    code, status, message = "payload_too_large", 413, "the upload is over the size limit"


class ImageTooLarge(ServiceError):
    code, status, message = "image_too_large", 413, "the image has too many pixels"


class ReadTimeout(ServiceError):
    code, status, message = "request_timeout", 408, "the upload was too slow"


class ClientClosed(ServiceError):
    """The client disconnected first; nobody reads this answer (nginx's 499), but the metrics
    and the access log count it."""

    code, status, message = "client_closed", 499, "client closed the request"


class UnsupportedMediaType(ServiceError):
    code, status = "unsupported_media_type", 415
    message = "send multipart/form-data, or an image/* or application/octet-stream body"


class UnsupportedImageFormat(ServiceError):
    code, status, message = "unsupported_media_type", 415, "the image format is not accepted"


class NotFound(ServiceError):
    code, status, message = "not_found", 404, "not found"


class InvalidRequest(ServiceError):
    code, status, message = "invalid_request", 422, "the request is invalid"


class TooManyTiles(InvalidRequest):
    """A tiled request whose image would become more tiles than MAX_TILES (or than the model
    admits at once), refused from the image's header before it is decoded."""

    code = "too_many_tiles"


class Unsupported(ServiceError):
    """A call this server does not serve (Triton's UNSUPPORTED: 501, gRPC UNIMPLEMENTED)."""

    code, status, message = "unsupported", 501, "not supported by this server"


class Conflict(ServiceError):
    """What was asked conflicts with the service's state or settings (a load past
    MAX_LOADED_MODELS, a load or unload that MODEL_CONTROL does not allow)."""

    code, status, message = "conflict", 409, "conflicts with the service's state"


class LoadFailed(ServiceError):
    """A model version asked for could not be loaded, warmed up or checked (Triton answers
    400 too); the versions serving before keep serving."""

    code, status, message = "load_failed", 400, "the model could not be loaded"


class Unauthorized(ServiceError):
    code, status, message = "unauthorized", 401, "unauthorized"


class Forbidden(ServiceError):
    """A valid key that does not open this call (the inference key on a control call)."""

    code, status, message = "forbidden", 403, "this key does not allow this call"


class Overloaded(ServiceError):
    code, status, message = "overloaded", 503, "the service is at capacity; retry later"

    def __init__(self, message: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(ServiceError):
    code, status, message = "not_ready", 503, "the model is not ready, or the service is stopping"


class DeadlineExceeded(ServiceError):
    code, status, message = "timeout", 504, "the request's deadline passed before it ran"


class EngineFailure(ServiceError):
    code, status, message = "internal", 500, "inference failed"


class ModelLoadError(Exception):
    """Startup cannot serve the configured model (missing, not ONNX, unknown layout, provider)."""
