from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.engine.layouts import raw_head_to_official
from models.dfine import load_model
from models.export import OfficialLayout, export, main

INPUT = 320  # the smallest size whose feature maps hold D-FINE-N's 300 queries
CHECKPOINT = Path(__file__).parents[2] / "models" / "dfine_n_shapes"
LABELS = ["circle", "rectangle", "triangle"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """The default model's trained weights. An untrained D-FINE can't be used: its encoder
    scores all tie, so which queries it keeps is decided by float noise."""
    return load_model(CHECKPOINT).eval()


@pytest.fixture(scope="module")
def exported(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("onnx")
    official = export(model, out / "official.onnx", (INPUT, INPUT), LABELS)
    raw = export(model, out / "raw.onnx", (INPUT, INPUT), LABELS, raw_head=True)
    return official, raw


def _inputs(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    images = rng.random((n, 3, INPUT, INPUT), dtype=np.float32)
    sizes = np.asarray([[640 + 10 * i, 480 - 10 * i] for i in range(n)], np.int64)
    return images, sizes


def assert_same_detections(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...],
                           sizes: np.ndarray, atol: float = 1e-4) -> None:
    """Same (label, box, score) sets per image; ties may come in another order."""
    labels_a, boxes_a, scores_a = a
    labels_b, boxes_b, scores_b = b
    np.testing.assert_allclose(scores_a, scores_b, atol=atol)  # both sorted descending
    scale = np.concatenate([sizes, sizes], 1)[:, None, :].astype(np.float32)
    norm_a, norm_b = boxes_a / scale, boxes_b / scale
    for i in range(len(sizes)):
        for j in range(labels_a.shape[1]):
            match = (
                (labels_b[i] == labels_a[i, j])
                & (np.abs(scores_b[i] - scores_a[i, j]) <= atol)
                & (np.abs(norm_b[i] - norm_a[i, j]).max(-1) <= atol)
            )
            assert match.any(), f"image {i} detection {j} has no counterpart"


def test_official_signature_and_metadata(exported: tuple[Path, Path]) -> None:
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert inputs == {
        "images": ("tensor(float)", ["N", 3, INPUT, INPUT]),
        "orig_target_sizes": ("tensor(int64)", ["N", 2]),
    }
    outputs = {o.name: o.type for o in session.get_outputs()}
    assert outputs == {"labels": "tensor(int64)", "boxes": "tensor(float)",
                       "scores": "tensor(float)"}
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["dfine.labels"]) == LABELS
    assert meta["dfine.input_size"] == f"{INPUT}x{INPUT}"
    assert meta["dfine.resize"] == "stretch"
    assert meta["dfine.normalize"] == "none"


def test_onnx_equals_pytorch_with_reference_postprocess(
        model: torch.nn.Module, exported: tuple[Path, Path]) -> None:
    images, sizes = _inputs(2)
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    got = session.run(["labels", "boxes", "scores"],
                      {"images": images, "orig_target_sizes": sizes})
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images))
    reference = raw_head_to_official(out.logits.numpy(), out.pred_boxes.numpy(), sizes, 300)
    assert [g.shape for g in got] == [(2, 300), (2, 300, 4), (2, 300)]
    assert got[0].dtype == np.int64
    assert_same_detections(tuple(got), reference, sizes)
    # The graph's own postprocess, traced from torch, agrees as well.
    with torch.no_grad():
        traced = OfficialLayout(model, 300)(torch.from_numpy(images), torch.from_numpy(sizes))
    assert_same_detections(tuple(got), tuple(t.numpy() for t in traced), sizes)


def test_batch_of_four_equals_four_single_runs(exported: tuple[Path, Path]) -> None:
    images, sizes = _inputs(4)
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    batched = session.run(None, {"images": images, "orig_target_sizes": sizes})
    for i in range(4):
        single = session.run(None, {"images": images[i:i + 1],
                                    "orig_target_sizes": sizes[i:i + 1]})
        assert_same_detections(tuple(s for s in single),
                               tuple(b[i:i + 1] for b in batched), sizes[i:i + 1])


def test_raw_head_postprocessed_in_numpy_equals_official(exported: tuple[Path, Path]) -> None:
    images, sizes = _inputs(3)
    official = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    raw = ort.InferenceSession(str(exported[1]), providers=["CPUExecutionProvider"])
    assert [i.name for i in raw.get_inputs()] == ["images"]
    assert [o.name for o in raw.get_outputs()] == ["logits", "pred_boxes"]
    logits, boxes = raw.run(None, {"images": images})
    assert logits.shape == (3, 300, len(LABELS)) and boxes.shape == (3, 300, 4)
    expected = official.run(None, {"images": images, "orig_target_sizes": sizes})
    assert_same_detections(raw_head_to_official(logits, boxes, sizes, 300), tuple(expected),
                           sizes)


def test_cli_exports_a_saved_checkpoint_through_the_hub_code_path(tmp_path: Path) -> None:
    """--hf-id and --checkpoint share from_pretrained; a local folder stands in for the hub."""
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    out = tmp_path / "hub.onnx"
    main(["--hf-id", str(CHECKPOINT), "--input-size", str(INPUT), "--labels",
          str(tmp_path / "names.txt"), "--out", str(out)])
    meta = ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map
    assert json.loads(meta["dfine.labels"]) == ["a", "b", "c"]
    with pytest.raises(SystemExit):  # a labels file must name every class
        (tmp_path / "short.txt").write_text("a\n")
        main(["--checkpoint", str(CHECKPOINT), "--labels", str(tmp_path / "short.txt"),
              "--out", str(tmp_path / "x.onnx")])
