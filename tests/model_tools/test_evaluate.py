from __future__ import annotations

import json
from pathlib import Path

from models.evaluate import main

DEFAULT_MODEL = Path(__file__).parents[2] / "models" / "dfine_n_shapes.onnx"


def test_default_model_scores_well_through_onnxruntime(tiny_shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "ap.json"
    main(["--model", str(DEFAULT_MODEL), "--data", str(tiny_shapes), "--batch-size", "4",
          "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["images"] == 6
    assert result["AP50"] > 0.8 and result["AP"] > 0.5
