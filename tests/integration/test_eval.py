"""`dfine-serve eval`: the default model's AP through the service equals its model card's, and
--compare runs two targets side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main
from models.synthetic import write_split
from tests.helpers import DEFAULT_MODEL, Server

MODEL_CARD_AP = 0.752  # models/README.md, held-out split of 500 images, seed 0


@pytest.fixture(scope="module")
def val_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_split(root, "val", 500, seed=0, workers=2)  # the model card's held-out split
    return root / "val"


def test_service_keeps_the_model_cards_accuracy_and_compare_matches(
        server: Server, val_split: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    main(["eval", "--data", str(val_split), "--url", server.url, "--compare-model",
          str(DEFAULT_MODEL), "--compare-providers", "cpu", "--out", str(out)])
    report = json.loads(out.read_text())
    service, in_process = report["results"]
    assert service["images"] == 500 and service["images_per_s"] > 0
    assert abs(service["AP"] - MODEL_CARD_AP) <= 0.005, service
    assert service["AP50"] >= 0.90
    assert set(report["difference"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert abs(report["difference"]["AP"]) <= 0.002  # same code, same numbers, no HTTP
    assert in_process["target"] == "dfine_n_shapes.onnx:cpu:fp32"


def test_compare_precision_reports_the_fp16_models_ap_change(val_split: Path, tmp_path: Path
                                                             ) -> None:
    # On the CPU, onnxruntime runs most fp16 nodes through casts: this measures the rounding
    # of the converted model, not GPU fp16 arithmetic (the GPU check measures that).
    out = tmp_path / "eval.json"
    main(["eval", "--data", str(val_split), "--model", str(DEFAULT_MODEL), "--providers",
          "cpu", "--compare-precision", "fp16", "--limit", "100", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["target"] for r in report["results"]] == [
        "dfine_n_shapes.onnx:cpu:fp32", "dfine_n_shapes.onnx:cpu:fp16"]
    assert abs(report["difference"]["AP"]) <= 0.005, report["difference"]


def test_compare_set_reports_both_preprocessing_modes(val_split: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    main(["eval", "--data", str(val_split), "--model", str(DEFAULT_MODEL), "--providers",
          "cpu", "--set", "preprocess=fast", "--compare-set", "preprocess=exact", "--limit",
          "60", "--out", str(out)])
    report = json.loads(out.read_text())
    fast, exact = report["results"]
    assert fast["target"].endswith("preprocess=fast") and exact["target"].endswith(
        "preprocess=exact")
    assert fast["images_per_s"] > 0 and exact["images_per_s"] > 0
    assert abs(report["difference"]["AP"]) <= 0.01  # near each other, not equal
