"""The plain peer: what a user would write by hand to serve the same model.

FastAPI, one onnxruntime session (CPU, or CUDA with its default options), the work in
``run_in_threadpool``, no batching. The bench measures it beside the service. Run it alone with:
    python -m app.bench.peer --model models/dfine_n_shapes.onnx --port 8001
"""

from __future__ import annotations

import argparse
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def create_peer(model_path: str, providers: str = "cpu") -> FastAPI:
    if providers != "cpu" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # onnxruntime-gpu's CUDA libraries come as wheels
    session = ort.InferenceSession(model_path, providers=PROVIDERS[providers])
    _, _, height, width = session.get_inputs()[0].shape
    app = FastAPI()

    def infer(data: bytes) -> list[dict[str, Any]]:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise HTTPException(400, "invalid image")
        h, w = image.shape[:2]
        rgb = cv2.cvtColor(cv2.resize(image, (width, height)), cv2.COLOR_BGR2RGB)
        pixels = rgb.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        labels, boxes, scores = session.run(
            None, {"images": pixels, "orig_target_sizes": np.asarray([[w, h]], np.int64)})
        keep = scores[0] > 0.5
        return [{"class_id": int(c), "score": float(s), "box": [float(v) for v in b]}
                for c, b, s in zip(labels[0][keep], boxes[0][keep], scores[0][keep])]

    @app.post("/detect")
    async def detect(request: Request) -> dict[str, Any]:
        return {"detections": await run_in_threadpool(infer, await request.body())}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="The plain peer server of the bench.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--providers", choices=sorted(PROVIDERS), default="cpu",
                        help="onnxruntime's default options for these, as a user would write")
    args = parser.parse_args()
    uvicorn.run(create_peer(args.model, args.providers), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
