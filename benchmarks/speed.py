"""Is the compressed model faster? Dense vs tdnn vs tensorly-torch, measured in one process.

For torchvision ResNet-18/50 (weights do not matter for speed) and a transformer-style MLP
stack, at several methods and ranks: parameter and FLOP ratios (torch.utils.flop_counter), median
CPU latency of dense vs compressed at batch 1 and 32 (eval mode, inference_mode, runs
interleaved so machine noise hits both), and the time compression took. tensorly-torch's
``FactorizedConv.from_conv`` (Tucker, factorized implementation) on the same 3×3 convs is the
reference to beat.

Speedups per batch size: ``plain`` — the compressed model as ``compress_model`` returns it,
against the dense model as built (``dense ms``); ``opt`` — after ``tdnn.optimize_for_inference``
(BatchNorm folded, memory layout measured), against the same dense model; ``opt/opt`` — the
dense model optimised the same way, the like-for-like ratio; ``compiled`` — both optimised
models under ``torch.compile`` (inductor, weights frozen), like for like.

    python benchmarks/speed.py            # full table (about 20 minutes on 2 cores)
    python benchmarks/speed.py --quick    # smaller inputs, fewer runs, no torch.compile
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch._inductor.config
import torchvision
from torch import nn

import tdnn
from tdnn.core.timing import Clock, latencies, latency_ratio
from tdnn.layers import walk
from tdnn.planning.cost import model_flops


class MLPStack(nn.Module):
    """Transformer-style feed-forward blocks: the Linear layers of a ViT-B / BERT-base encoder."""

    def __init__(self, dim: int = 768, hidden: int = 3072, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


@dataclass
class Setting:
    """One row of the table: a model and how to compress it."""

    model: str
    label: str
    compress: Callable[[nn.Module, torch.Tensor, Clock | None], nn.Module]  # (model, example, clock or None)


def _tdnn(method: str, *, ratio: float | None = None, flops: float | None = None, latency: float | None = None,
          latency_aware: bool = False, rank_multiple: int = 1) -> Callable[..., nn.Module]:
    def run(model: nn.Module, example: torch.Tensor, clock: Clock | None = None) -> nn.Module:
        aware = functools.partial(latency_ratio, clock=clock) if latency_aware and clock else latency_aware
        if flops is not None or latency is not None:
            return tdnn.compress_model(model, budget=tdnn.Budget(flops=flops, latency=latency, timer=clock),
                                       method=method, calibration=[example], latency_aware=aware,
                                       rank_multiple=rank_multiple)
        calibration = [example] if latency_aware else None
        return tdnn.compress_model(model, ranks=ratio, method=method, calibration=calibration, latency_aware=aware)
    return run


def _tltorch(rank: float) -> Callable[..., nn.Module]:
    """tensorly-torch's Tucker factorization of every k×k conv (its own from_conv)."""
    def run(model: nn.Module, example: torch.Tensor, clock: Clock | None = None) -> nn.Module:
        import tltorch

        model = copy.deepcopy(model)
        targets = [m for _, m, _ in walk.named_layers(model, lambda m: isinstance(m, nn.Conv2d)) if m.kernel_size != (1, 1)]
        return walk.swap(model, {id(m): tltorch.FactorizedConv.from_conv(
            m, rank=rank, factorization="tucker", implementation="factorized") for m in targets})
    return run


SETTINGS = [
    Setting("resnet18", "tdnn tucker2 FLOPs x0.5", _tdnn("tucker2", flops=0.5)),
    Setting("resnet18", "tdnn svd ratio 0.5", _tdnn("svd", ratio=0.5)),
    Setting("resnet50", "tdnn tucker2 FLOPs x0.5", _tdnn("tucker2", flops=0.5)),
    Setting("resnet50", "tdnn tucker2 FLOPs x0.5 latency-aware", _tdnn("tucker2", flops=0.5, latency_aware=True)),
    Setting("resnet50", "tdnn tucker2 FLOPs x0.5 ranks x8", _tdnn("tucker2", flops=0.5, rank_multiple=8)),
    Setting("resnet50", "tdnn tucker2 latency x0.5 ranks x8", _tdnn("tucker2", latency=0.5, rank_multiple=8)),
    Setting("resnet50", "tdnn tucker2 ratio 0.5", _tdnn("tucker2", ratio=0.5)),
    Setting("resnet50", "tdnn cp ratio 0.5", _tdnn("cp", ratio=0.5)),
    Setting("resnet50", "tdnn cp ratio 0.5 latency-aware", _tdnn("cp", ratio=0.5, latency_aware=True)),
    Setting("resnet50", "tensorly-torch tucker rank 0.5", _tltorch(0.5)),
    Setting("mlp", "tdnn svd ratio 0.5", _tdnn("svd", ratio=0.5)),
    Setting("mlp", "tdnn svd ratio 0.25", _tdnn("svd", ratio=0.25)),
]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return MLPStack().eval()
    return getattr(torchvision.models, name)().eval()


def example(name: str, batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 128, 768) if name == "mlp" else torch.randn(batch, 3, size, size)


def measure(setting: Setting, *, size: int, repeats: int, compile: bool,
            optimised_dense: dict[tuple[str, int], nn.Module]) -> dict[str, object]:
    """One table row; ``optimised_dense`` caches the optimised dense model per (model, batch)."""
    dense = build(setting.model)
    one = example(setting.model, 1, size)
    start = time.perf_counter()
    small = setting.compress(dense, one).eval()
    seconds = time.perf_counter() - start
    rep = tdnn.report(small, inputs=one) if hasattr(small, "tdnn_plan") else None
    params = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in dense.parameters())
    flops = rep.flop_ratio if rep is not None else model_flops(small, one) / model_flops(dense, one)
    row = {"model": setting.model, "setting": setting.label, "params": params, "flops": flops,
           "compress s": seconds}
    for batch in (1, 32):
        x = example(setting.model, batch, size)
        key = (setting.model, batch)
        if key not in optimised_dense:
            optimised_dense[key] = tdnn.optimize_for_inference(dense, x)
        models = {"dense": dense, "small": small, "dense opt": optimised_dense[key],
                  "small opt": tdnn.optimize_for_inference(small, x)}
        compiled = _compiled(models["dense opt"], models["small opt"], x) if compile else None
        if compiled is not None:
            models |= compiled
        t = latencies(models, x, repeats=repeats if batch == 1 else max(3, repeats // 3))
        row[f"bs{batch} dense ms"] = 1e3 * t["dense"]
        row[f"bs{batch} plain"] = t["dense"] / t["small"]
        row[f"bs{batch} opt"] = t["dense"] / t["small opt"]
        row[f"bs{batch} opt/opt"] = t["dense opt"] / t["small opt"]
        row[f"bs{batch} compiled"] = None if compiled is None else t["dense comp"] / t["small comp"]
    return row


def _compiled(dense: nn.Module, small: nn.Module, x: torch.Tensor) -> dict[str, nn.Module] | None:
    """Both models under torch.compile, compiled now; ``None`` if inductor fails on either."""
    torch._dynamo.reset()
    models = {"dense comp": torch.compile(dense), "small comp": torch.compile(small)}
    try:
        with torch.inference_mode():
            for model in models.values():
                model(x)
    except Exception as err:  # e.g. tensorly-torch's FactorizedConv under inductor
        print(f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", file=sys.stderr)
        return None
    return models


def table(rows: list[dict[str, object]]) -> str:
    cols = ["model", "setting", "params", "flops", *(f"bs{b} {c}" for b in (1, 32)
            for c in ("dense ms", "plain", "opt", "opt/opt", "compiled")), "compress s"]
    fmt = {"params": "x{:.2f}", "flops": "x{:.2f}", "bs1 dense ms": "{:.1f}", "bs32 dense ms": "{:.0f}",
           "compress s": "{:.1f}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row[c] is None else fmt.get(c, "{:.2f}x" if "bs" in c else "{}")
                                       .format(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="112×112 images, fewer repeats")
    parser.add_argument("--only", default="", help="run settings whose model or label contains this")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    args = parser.parse_args(argv)
    compile = not (args.quick or args.no_compile)
    # CPU inference with inductor: weights become constants (prepacked for oneDNN, BN folded)
    torch._inductor.config.freezing = True
    size, repeats = (112, 5) if args.quick else (224, 9)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, images {size}x{size}", flush=True)
    rows: list[dict[str, object]] = []
    optimised_dense: dict[tuple[str, int], nn.Module] = {}
    for setting in SETTINGS:
        if args.only and args.only not in f"{setting.model} {setting.label}":
            continue
        rows.append(measure(setting, size=size, repeats=repeats, compile=compile,
                            optimised_dense=optimised_dense))
        print(table(rows[-1:]).splitlines()[-1], flush=True, file=sys.stderr)
    print(table(rows))


if __name__ == "__main__":
    main()
