"""Train D-FINE (transformers' model and loss) on a COCO-format folder.

Output folder:
    last.pt     resumable checkpoint (model, EMA, optimiser, step, elapsed time)
    final/      the EMA weights as a transformers folder (config.json, model.safetensors),
                which ``python -m models.export --checkpoint`` reads; rewritten at every save
    log.jsonl   one line per logging interval

The learning rate follows a warm-up then a cosine decay over ``progress``, the larger of
step/steps and elapsed/max-minutes, so a run limited by time still ends on a low learning rate.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.data import load_coco, load_resized, normalized_cxcywh
from models.dfine import VARIANTS, build_model


class ModelEma:
    """Exponential moving average of the weights, with the official D-FINE warm-up."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup_steps: int) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup_steps, self.updates = decay, warmup_steps, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.warmup_steps))
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[name].detach(), alpha=1 - d)
            else:
                value.copy_(source[name])


class BatchSampler:
    """Random batches from images held in memory, with flips; targets in transformers' format."""

    def __init__(self, images: np.ndarray, targets: list[tuple[np.ndarray, np.ndarray]],
                 device: torch.device, seed: int) -> None:
        self.pixels = torch.from_numpy(images).to(device)  # (n, s, s, 3) uint8 RGB
        self.targets = [(torch.from_numpy(c).to(device), torch.from_numpy(b).to(device))
                        for c, b in targets]
        self.generator = np.random.default_rng(seed)
        self.device = device

    def sample(self, batch_size: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        index = self.generator.integers(0, len(self.targets), batch_size)
        pixels = self.pixels[torch.from_numpy(index).to(self.device)]
        pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        labels = []
        for row, i in enumerate(index):
            class_ids, boxes = self.targets[i]
            boxes = boxes.clone()
            if self.generator.random() < 0.5:  # horizontal flip
                pixels[row] = pixels[row].flip(-1)
                boxes[:, 0] = 1 - boxes[:, 0]
            if self.generator.random() < 0.5:  # vertical flip: shapes have no "up"
                pixels[row] = pixels[row].flip(-2)
                boxes[:, 1] = 1 - boxes[:, 1]
            labels.append({"class_labels": class_ids, "boxes": boxes})
        return pixels, labels


def learning_rate(base: float, step: int, warmup: int, progress: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save(out: Path, model: torch.nn.Module, ema: ModelEma, optimizer: torch.optim.Optimizer,
         step: int, elapsed_s: float, args: argparse.Namespace) -> None:
    state = {
        "model": model.state_dict(), "ema": ema.module.state_dict(), "ema_updates": ema.updates,
        "optimizer": optimizer.state_dict(), "step": step, "elapsed_s": elapsed_s,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    tmp = out / "last.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out / "last.pt")  # never leave a half-written checkpoint behind
    ema.module.save_pretrained(out / "final")  # type: ignore[operator]


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(args.threads or torch.get_num_threads())
    dataset = load_coco(args.data)
    if args.limit:
        dataset.images = dataset.images[: args.limit]
    print(f"{len(dataset.images)} images, classes {dataset.labels}, device {device}")
    t0 = time.perf_counter()
    pixels = load_resized(dataset.images, args.input_size, workers=args.workers)
    targets = [(np.asarray(im.class_ids, np.int64), normalized_cxcywh(im))
               for im in dataset.images]
    print(f"decoded and resized in {time.perf_counter() - t0:.1f} s")
    sampler = BatchSampler(pixels, targets, device, args.seed)

    model = build_model(args.variant, dataset.labels).to(device).train()
    ema = ModelEma(model, args.ema_decay, args.ema_warmup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    args.out.mkdir(parents=True, exist_ok=True)
    step, elapsed_before = 0, 0.0
    checkpoint = args.out / "last.pt"
    if args.resume and checkpoint.exists():
        state: dict[str, Any] = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before = state["step"], state["elapsed_s"]
        print(f"resumed at step {step} ({elapsed_before / 60:.1f} min trained)")

    budget_s = args.max_minutes * 60 if args.max_minutes else math.inf
    started = time.perf_counter()
    last_save = started
    log = (args.out / "log.jsonl").open("a")
    bar = tqdm(total=args.steps, initial=step, unit="step", dynamic_ncols=True)
    loss_avg = None
    while step < args.steps:
        elapsed = elapsed_before + time.perf_counter() - started
        if elapsed >= budget_s:
            break
        progress = max(step / args.steps, elapsed / budget_s)
        lr = learning_rate(args.lr, step, args.warmup, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = sampler.sample(args.batch_size)
        output = model(pixel_values=images, labels=labels)
        loss = output.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        ema.update(model)
        step += 1
        value = loss.item()
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr:.2e}")
        if step % args.log_every == 0:
            log.write(json.dumps({"step": step, "loss": round(loss_avg, 4), "lr": lr,
                                  "elapsed_s": round(elapsed, 1)}) + "\n")
            log.flush()
        if time.perf_counter() - last_save > args.save_every_s:
            save(args.out, model, ema, optimizer, step,
                 elapsed_before + time.perf_counter() - started, args)
            last_save = time.perf_counter()
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - started
    save(args.out, model, ema, optimizer, step, elapsed, args)
    summary = {"step": step, "loss": loss_avg, "elapsed_s": round(elapsed, 1),
               "device": str(device), "final": str(args.out / "final")}
    log.write(json.dumps({"done": summary}) + "\n")
    log.close()
    print(json.dumps(summary))
    return args.out / "final"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train D-FINE on a COCO-format folder.")
    p.add_argument("--data", type=Path, required=True, help="split folder or annotations file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant", choices=VARIANTS, default="n")
    p.add_argument("--input-size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--max-minutes", type=float, default=0.0, help="0: no time limit")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--clip-grad", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ema-warmup", type=int, default=200)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0: torch's default")
    p.add_argument("--workers", type=int, default=8, help="threads decoding the dataset")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every-s", type=float, default=300.0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
