"""Metrics in single-process mode (FRONTENDS=1): each app owns its registry, and an unloaded
version's gauges and info go while its counters stay. Multiprocess mode:
tests/integration/test_metrics_multiprocess.py."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Metrics

V1 = {"model": "shapes", "version": "1"}


def test_each_metrics_owns_its_registry() -> None:
    first, second = Metrics(), Metrics()
    first.requests.labels("/detect", "200", "shapes", "1").inc()
    assert first.multiprocess_dir is None
    labels = {"endpoint": "/detect", "status": "200", **V1}
    assert first.registry.get_sample_value("dfine_requests_total", labels) == 1
    assert second.registry.get_sample_value("dfine_requests_total", labels) is None


def test_a_versions_gauges_exist_from_the_start() -> None:
    metrics = Metrics()
    metrics.for_version("shapes", 1)
    for name in ("dfine_queue_depth", "dfine_queue_capacity", "dfine_inflight_batches"):
        assert metrics.registry.get_sample_value(name, V1) == 0, name


def test_unload_drops_gauges_and_info_and_keeps_counters() -> None:
    metrics = Metrics()
    version = metrics.for_version("shapes", 1)
    version.info({"format": "onnx", "layout": "nchw"})
    version.info({"format": "onnx", "layout": "nhwc"})  # replaces the first
    version.queue_capacity.set(64)
    version.queue_changed(3)
    version.batch_started(2, [0.01, 0.02])
    text = metrics.exposition().decode()
    info = [s for f in text_string_to_metric_families(text) if f.name == "dfine_model_info"
            for s in f.samples]
    assert [(s.labels, s.value) for s in info] == [({**V1, "format": "onnx", "layout": "nhwc"},
                                                    1.0)]
    assert metrics.registry.get_sample_value("dfine_queue_depth", V1) == 3

    version.close()
    for name in ("dfine_queue_depth", "dfine_queue_capacity", "dfine_inflight_batches"):
        assert metrics.registry.get_sample_value(name, V1) is None, name
    assert "dfine_model_info{" not in metrics.exposition().decode()
    assert metrics.registry.get_sample_value("dfine_images_total", V1) == 2
    version.close()  # twice: no error
