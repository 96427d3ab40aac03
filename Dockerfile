# syntax=docker/dockerfile:1
# dfine-serve. One Dockerfile, two variants chosen by a build argument:
#   docker build --build-arg VARIANT=cpu -t dfine-serve:cpu .
#   docker build --build-arg VARIANT=gpu -t dfine-serve:gpu .
#   docker build --build-arg VARIANT=gpu --build-arg WITH_TENSORRT=true -t dfine-serve:gpu-trt .
#
# GPU: python-slim plus the onnxruntime-gpu[cuda,cudnn] wheels, not an nvidia/cuda base. The
# wheels bring exactly the CUDA 13 and cuDNN 9 libraries that onnxruntime-gpu 1.31 links
# (libcudart.so.13), onnxruntime.preload_dlls() loads them from site-packages at startup, and
# the image stays a fraction of a cudnn-runtime base's size. Only the NVIDIA driver comes from
# the host (NVIDIA Container Toolkit).
ARG VARIANT=cpu

FROM python:3.12-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin dfine
WORKDIR /app
COPY docker/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt

FROM base AS deps-cpu
RUN pip install --no-cache-dir onnxruntime==1.32.0

FROM base AS deps-gpu
# TensorRT is off by default: its wheels come from NVIDIA's index at build time. The TensorRT
# provider of onnxruntime-gpu 1.31 links TensorRT 10 (libnvinfer.so.10), not 11.
ARG WITH_TENSORRT=false
# nvidia-ml-py reads the GPU memory each batch bucket costs (/model).
RUN pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]==1.31.1" nvidia-ml-py==13.615.71 \
 && if [ "$WITH_TENSORRT" = "true" ]; then \
      pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com \
        "tensorrt-cu13-libs>=10,<11"; \
    fi
ENV LD_LIBRARY_PATH=/usr/local/lib/python3.12/site-packages/tensorrt_libs

# hadolint ignore=DL3006
FROM deps-${VARIANT} AS runtime
COPY --chown=dfine:dfine app /app/app
COPY --chown=dfine:dfine models/dfine_n_shapes.onnx /app/models/dfine_n_shapes.onnx
COPY --chown=dfine:dfine docker/healthcheck.py /app/docker/healthcheck.py
# Settings (all DFINE_*; see the README): bind every interface inside the container, keep the
# TensorRT engine cache on a volume so a restart does not rebuild it.
ENV DFINE_HOST=0.0.0.0 \
    DFINE_PORT=8000 \
    DFINE_GRPC_PORT=8001 \
    DFINE_MODEL_PATH=/app/models/dfine_n_shapes.onnx \
    DFINE_TRT_CACHE_DIR=/cache/trt
RUN mkdir -p /cache/trt && chown dfine:dfine /cache/trt
VOLUME ["/cache/trt"]
USER 10001:10001
# HTTP (the API, the Open Inference Protocol's REST form, /metrics) and gRPC.
EXPOSE 8000 8001
# Warm-up (a TensorRT engine build, the first time) can take minutes: a long start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "/app/docker/healthcheck.py"]
CMD ["python", "-m", "app"]
