from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.config import Settings
from app.engine.engine import OnnxEngine, run_with_binding
from app.engine.layouts import official_class_count
from app.errors import ModelLoadError
from app.labels import COCO_80
from tests import onnx_models
from tests.helpers import DEFAULT_MODEL


def load(path: Path, **settings: object) -> OnnxEngine:
    return OnnxEngine.load(Settings(model_path=path, providers="cpu", **settings))


def batch(n: int, size: int = onnx_models.INPUT) -> tuple[np.ndarray, np.ndarray]:
    return (np.zeros((n, 3, size, size), np.float32),
            np.asarray([[200, 100]] * n, np.int64))


def test_default_model_is_official_layout_with_size_and_names_from_metadata() -> None:
    info = load(DEFAULT_MODEL).info
    assert info.layout == "official" and info.fixed_batch is None
    assert (info.input_width, info.input_height) == (320, 320)
    assert info.labels == ["circle", "rectangle", "triangle"]
    assert info.providers == ["CPUExecutionProvider"]


def test_official_layout_runs_and_scales_boxes_by_width_height(tmp_path: Path) -> None:
    engine = load(onnx_models.official(tmp_path / "m.onnx"))
    out = engine.run(*batch(3))
    assert out.labels.shape == (3, 2) and out.boxes.shape == (3, 2, 4)
    assert out.boxes[0, 0].tolist() == pytest.approx([20, 20, 100, 60])


def test_an_80_class_model_without_names_gets_coco_names(tmp_path: Path) -> None:
    assert load(onnx_models.official(tmp_path / "m.onnx")).info.labels == list(COCO_80)


def test_labels_file_overrides_metadata(tmp_path: Path) -> None:
    path = onnx_models.official(tmp_path / "m.onnx", labels=["a", "b"])
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    assert load(path, labels_path=tmp_path / "names.txt").info.labels == ["cat", "dog"]


@pytest.mark.parametrize(("input_name", "logits_name"),
                         [("pixel_values", "logits"), ("images", "pred_logits")])
def test_raw_head_layout_is_postprocessed_like_the_official(
        tmp_path: Path, input_name: str, logits_name: str) -> None:
    engine = load(onnx_models.raw_head(tmp_path / "raw.onnx", input_name, logits_name))
    assert engine.info.layout == "raw_head" and engine.info.labels is None  # 2 classes, unnamed
    out = engine.run(*batch(2))
    assert out.labels[0, :2].tolist() == [1, 0]
    assert out.scores[0, 0] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert out.boxes[0, 0].tolist() == pytest.approx([20, 20, 100, 60])  # of 200x100


def test_fixed_batch_model_is_served_in_batches_of_one(tmp_path: Path) -> None:
    engine = load(onnx_models.official(tmp_path / "b1.onnx", batch=1))
    assert engine.info.fixed_batch == 1
    assert load(onnx_models.official(tmp_path / "b1.onnx", batch=1),
                max_batch_size=8).parallel.max_batch_size == 1
    assert engine.run(*batch(1)).labels.shape == (1, 2)


def test_a_labels_file_of_another_length_than_the_models_classes_is_a_startup_error(
        tmp_path: Path) -> None:
    three = onnx_models.official(tmp_path / "m.onnx", num_classes=3)
    assert official_class_count(three) == 3
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    with pytest.raises(ModelLoadError, match="names 2 classes; the model has 3"):
        load(three, labels_path=tmp_path / "two.txt")
    (tmp_path / "three.txt").write_text("cat\ndog\nbird\n")
    assert load(three, labels_path=tmp_path / "three.txt").run(*batch(1)).labels[0].tolist() == [
        1, 0]
    # Without a constant in the graph, the model's own metadata gives the count.
    named = onnx_models.official(tmp_path / "n.onnx", labels=["a", "b", "c"])
    with pytest.raises(ModelLoadError, match="names 2 classes"):
        load(named, labels_path=tmp_path / "two.txt")


def test_dynamic_size_reads_input_size_from_metadata(tmp_path: Path) -> None:
    path = onnx_models.official(tmp_path / "m.onnx", input_size="S",  # type: ignore[arg-type]
                                metadata={"dfine.input_size": "96x80"})
    info = load(path).info
    assert (info.input_width, info.input_height) == (96, 80)


@pytest.mark.parametrize("case", ["missing", "not_onnx", "empty", "unknown_layout"])
def test_unservable_models_are_clear_startup_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / "model.onnx"
    if case == "not_onnx":
        path.write_text("this is a text file, not a model")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "unknown_layout":
        onnx_models.unknown_layout(path)
    with pytest.raises(ModelLoadError) as error:
        load(path)
    expected = {"missing": "not found", "not_onnx": "not a valid ONNX model",
                "empty": "ONNX", "unknown_layout": "match no known layout"}[case]
    assert expected in str(error.value)


def test_a_missing_requested_provider_is_an_error_not_a_fallback() -> None:
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider"):
        OnnxEngine.load(Settings(model_path=DEFAULT_MODEL, providers="cuda"))


def test_io_binding_binds_outputs_by_name(tmp_path: Path) -> None:
    session = ort.InferenceSession(str(onnx_models.official(tmp_path / "m.onnx")),
                                   providers=["CPUExecutionProvider"])
    images, sizes = batch(2)
    feeds = {"images": images, "orig_target_sizes": sizes}
    # Asked in another order than the graph's: binding follows names, not positions.
    scores, labels = run_with_binding(session, feeds, ["scores", "labels"], "cpu")
    assert labels.dtype == np.int64 and scores.dtype == np.float32
    assert scores[0].tolist() == pytest.approx([0.9, 0.3])
