"""Export D-FINE to ONNX with the official D-FINE signature (or the raw head).

Official layout (Peterande/D-FINE tools/deployment/export_onnx.py), postprocessing in the graph:
    in   images             float32 (N, 3, H, W)  RGB in [0, 1]
    in   orig_target_sizes  int64   (N, 2)        (width, height) of each original image
    out  labels             int64   (N, K)        class index 0..C-1
    out  boxes              float32 (N, K, 4)     x1, y1, x2, y2 in original pixels, not clipped
    out  scores             float32 (N, K)        sigmoid scores, sorted descending
Raw head (``--raw-head``):
    in   images             float32 (N, 3, H, W)
    out  logits             float32 (N, Q, C)
    out  pred_boxes         float32 (N, Q, 4)     cx, cy, w, h normalised to [0, 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import DFineForObjectDetection

from models.dfine import VARIANTS, build_model, load_model, model_labels

OPSET = 17  # keeps LayerNorm one op, which helps TensorRT's FP16 accuracy
TRACE_BATCH = 4  # > 1, so that no branch on the batch size is frozen at 1 by tracing


class OfficialLayout(nn.Module):
    """The model plus the official postprocessor: sigmoid, top-k over queries x classes."""

    def __init__(self, model: DFineForObjectDetection, top_k: int) -> None:
        super().__init__()
        self.model, self.top_k = model, top_k

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        output = self.model(pixel_values=images)
        logits, boxes = output.logits, output.pred_boxes
        num_classes = logits.shape[-1]
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        xyxy = xyxy * orig_target_sizes.repeat(1, 2).unsqueeze(1).to(xyxy.dtype)
        scores, index = torch.topk(logits.sigmoid().flatten(1), self.top_k, dim=-1)
        labels = index % num_classes
        query = index // num_classes
        picked = xyxy.gather(1, query.unsqueeze(-1).repeat(1, 1, 4))
        return labels, picked, scores


class RawHeadLayout(nn.Module):
    def __init__(self, model: DFineForObjectDetection) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(pixel_values=images)
        return output.logits, output.pred_boxes


def export(model: DFineForObjectDetection, out: Path, input_size: tuple[int, int],
           labels: list[str], raw_head: bool = False) -> Path:
    """Write ``out`` (ONNX, dynamic batch) with the ``dfine.*`` metadata; returns ``out``."""
    height, width = input_size
    model = model.eval()
    images = torch.rand(TRACE_BATCH, 3, height, width)
    sizes = torch.tensor([[width, height]] * TRACE_BATCH, dtype=torch.int64)
    batch = {0: "N"}
    wrapper: nn.Module
    if raw_head:
        wrapper = RawHeadLayout(model)
        args: tuple[torch.Tensor, ...] = (images,)
        names_in, names_out = ["images"], ["logits", "pred_boxes"]
    else:
        wrapper = OfficialLayout(model, top_k=min(300, model.config.num_queries * len(labels)))
        args = (images, sizes)
        names_in, names_out = ["images", "orig_target_sizes"], ["labels", "boxes", "scores"]
    # The exporter restores the wrapper's own training flag afterwards, recursively: a wrapper
    # left in training mode would switch the caller's model to training mode.
    wrapper.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper, args, str(out), input_names=names_in, output_names=names_out,
            dynamic_axes={name: batch for name in names_in + names_out},
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
    proto = onnx.load(str(out))
    metadata = {
        "dfine.labels": json.dumps(labels),
        "dfine.input_size": f"{width}x{height}",
        "dfine.resize": "stretch",
        "dfine.normalize": "none",
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "dfine-serve models.export"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


def resolve_checkpoint(path: Path) -> Path:
    """A transformers folder, or a training output folder holding ``final/``."""
    if (path / "config.json").exists():
        return path
    if (path / "final" / "config.json").exists():
        return path / "final"
    raise FileNotFoundError(f"{path} holds neither config.json nor final/config.json")


def read_labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def parse_size(text: str) -> tuple[int, int]:
    """'320' or '320x320' (width x height) -> (height, width)."""
    parts = [int(p) for p in text.lower().split("x")]
    width, height = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return height, width


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export D-FINE to ONNX (official D-FINE signature).")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="transformers folder or training output")
    source.add_argument("--hf-id", help="hub id, e.g. ustc-community/dfine-nano-coco")
    p.add_argument("--variant", choices=VARIANTS, default="n",
                   help="architecture when building untrained weights (no checkpoint)")
    p.add_argument("--input-size", default="640", help="e.g. 640 or 640x480 (width x height)")
    p.add_argument("--labels", type=Path, help="class names, one a line (overrides the model's)")
    p.add_argument("--raw-head", action="store_true", help="logits/pred_boxes, no postprocess")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    override = read_labels(args.labels) if args.labels else None
    if args.checkpoint or args.hf_id:
        model = load_model(resolve_checkpoint(args.checkpoint) if args.checkpoint else args.hf_id)
        labels = model_labels(model)
        if override is not None:
            if len(override) != len(labels):
                p.error(f"--labels has {len(override)} names, the model {len(labels)} classes")
            labels = override
    else:
        labels = override or ["object"]
        model = build_model(args.variant, labels)
    out = export(model, args.out, parse_size(args.input_size), labels, raw_head=args.raw_head)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(labels)} classes)")


if __name__ == "__main__":
    main()
