"""The shared-memory extensions over gRPC (tritonclient.grpc's calls): each handler takes the
service's regions (app.api.shm; None where not built) and the request message, and answers the
response message, as the REST routes (app.api.shm_routes) answer. Apart from app.api.shm so
that a service without gRPC never imports the generated messages."""

from __future__ import annotations

import asyncio
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from app.api.shm import CUDA_UNSUPPORTED, OFF, Regions
from app.errors import InvalidRequest, NotFound, Unsupported


def _served(regions: Regions | None) -> Regions | None:
    return regions if regions is not None and regions.enabled else None


async def system_status(regions: Regions | None, request: Any) -> Any:
    served = _served(regions)
    if served is None:
        if request.name:
            raise NotFound(f"Unable to find system shared memory region: "
                           f"{request.name[:128]!r}")
        return pb.SystemSharedMemoryStatusResponse()
    found = await asyncio.to_thread(served.status, request.name)
    status = pb.SystemSharedMemoryStatusResponse.RegionStatus
    return pb.SystemSharedMemoryStatusResponse(regions={
        r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
        for r in found})


async def system_register(regions: Regions | None, request: Any) -> Any:
    served = _served(regions)
    if served is None:
        raise Unsupported(OFF)
    if not request.key:
        raise InvalidRequest("the register call needs a 'key'")
    await asyncio.to_thread(served.register, request.name, request.key, request.offset,
                            request.byte_size)
    return pb.SystemSharedMemoryRegisterResponse()


async def system_unregister(regions: Regions | None, request: Any) -> Any:
    served = _served(regions)
    if served is not None:
        await asyncio.to_thread(served.unregister, request.name)
    return pb.SystemSharedMemoryUnregisterResponse()


async def cuda_status(regions: Regions | None, request: Any) -> Any:
    if request.name:
        raise NotFound(f"Unable to find cuda shared memory region: {request.name[:128]!r}")
    return pb.CudaSharedMemoryStatusResponse()


async def cuda_register(regions: Regions | None, request: Any) -> Any:
    raise Unsupported(CUDA_UNSUPPORTED)


async def cuda_unregister(regions: Regions | None, request: Any) -> Any:
    return pb.CudaSharedMemoryUnregisterResponse()


# The methods (name, request message, handler), all of them control calls.
METHODS = (
    ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest, system_status),
    ("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest, system_register),
    ("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest,
     system_unregister),
    ("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest, cuda_status),
    ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest, cuda_register),
    ("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest, cuda_unregister),
)
