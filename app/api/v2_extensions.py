"""What the server metadata says, over REST (``GET /v2``) and gRPC (ServerMetadata) alike."""

from __future__ import annotations

SERVER_NAME = "dfine-serve"
SERVER_VERSION = "0.1.0"

# The protocol's extensions this server serves, in Triton's order: only what a client can call
# now. (``model_repository(unload_dependents)`` is left out: no model here has dependents;
# ``cuda_shared_memory``: its calls answer, but a region can't be registered.)
EXTENSIONS: tuple[str, ...] = (
    "model_repository",
    "model_configuration",
    "system_shared_memory",
    "binary_tensor_data",
    "parameters",  # the request parameters of tiled inference
    "statistics",
    "trace",
    "logging",
)


def extensions(shared_memory: bool) -> list[str]:
    """The extensions served: system shared memory only while SHM_KEY_PREFIXES allows keys
    (off, its calls answer, but no region can be registered)."""
    return [e for e in EXTENSIONS if shared_memory or e != "system_shared_memory"]
