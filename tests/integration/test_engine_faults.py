"""Engine faults, injected by a test-only engine wrapper (a fake is needed to make a healthy
engine fail or hang on demand), in a real uvicorn server."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import numpy as np

from app.config import Settings
from app.engine.engine import Detections, OnnxEngine
from app.main import create_app
from tests.helpers import DEFAULT_MODEL, encode, render_scene, serve_in_thread, wait_until

FAIL_WIDTH, HANG_WIDTH = 1001, 1002  # images this wide trigger the fault


class FaultyEngine(OnnxEngine):
    """The real engine, except for images of the trigger widths (read from orig sizes)."""

    hang_released = threading.Event()

    def run(self, images: np.ndarray, sizes_wh: np.ndarray, may_use_all_cores: bool = True
            ) -> Detections:
        widths = set(sizes_wh[:, 0].tolist())
        if FAIL_WIDTH in widths:
            raise RuntimeError("injected engine failure /secret/path")
        if HANG_WIDTH in widths:
            self.hang_released.wait(30)
        return super().run(images, sizes_wh, may_use_all_cores)


def post(url: str, width: int) -> httpx.Response:
    image = np.zeros((300, width, 3), np.uint8) if width else render_scene(6)[0]
    return httpx.post(f"{url}/detect", content=encode(image), timeout=30,
                      headers={"Content-Type": "image/jpeg"})


def faulty_app(**overrides: Any) -> Any:
    settings = Settings(providers="cpu", grpc_port=0, **overrides)
    base = OnnxEngine.load(settings)
    engine = FaultyEngine(base.info, base.parallel, base.session, base.solo_session)
    return create_app(settings, engine=engine)


def test_a_failing_run_fails_only_its_batch_and_the_service_stays_ready() -> None:
    with serve_in_thread(faulty_app(model_path=DEFAULT_MODEL)) as url:
        failed = post(url, FAIL_WIDTH)
        assert failed.status_code == 500
        assert failed.json() == {"error": {"code": "internal", "message": "inference failed"}}
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert post(url, 0).status_code == 200


def test_a_hung_run_is_cut_off_with_504_and_readiness_reflects_it() -> None:
    FaultyEngine.hang_released.clear()
    # ENGINE_TIMEOUT_S well above a normal run even on a loaded machine (~25 ms idle), far
    # below the hang (30 s).
    with serve_in_thread(faulty_app(model_path=DEFAULT_MODEL, engine_timeout_s=2.0)) as url:
        hung = post(url, HANG_WIDTH)
        assert hung.status_code == 504 and hung.json()["error"]["code"] == "timeout"
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "engine_hung"
        assert post(url, 0).status_code == 200  # other requests are still served
        FaultyEngine.hang_released.set()
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30,
                   "/readyz 200 once the hung run returns")
        metrics = httpx.get(f"{url}/metrics").text
        assert 'dfine_errors_total{code="timeout"} 1.0' in metrics
