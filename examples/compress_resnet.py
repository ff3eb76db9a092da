"""Compress a torchvision ResNet the way that keeps its accuracy, and see how much to compress.

With no arguments this runs offline in about two minutes on 2 CPU cores: a ResNet-18 is trained
briefly on scikit-learn's handwritten digits (1,797 real 8×8 scans, upsampled to 32×32), then

1. compressed plainly with configs/resnet18_digits.yaml (Tucker-2 at 30% of each conv's parameters,
   no data: what ``tdnn compress`` does),
2. compressed data-aware under a global budget at the same parameter count
   (``Budget(params=...)`` with 256 calibration images),
3. swept: plain and data-aware budgets from 10% to 50% of the parameters, one calibration pass
   for all, each model's top-1 and latency measured (the Pareto plot),
4. the data-aware model fine-tuned with labels plus distillation from the original,

and writes the sweep's plot and the data-aware model's per-layer plot::

    python examples/compress_resnet.py [--out-dir runs/compress_resnet]

On your own data and weights (torchvision weights download on first use)::

    python examples/compress_resnet.py --arch resnet50 --weights IMAGENET1K_V2 \\
        --data /path/to/imagenet --config configs/resnet50_cp.yaml --out resnet50_cp.safetensors
    python examples/compress_resnet.py --arch resnet18 --data cifar10 --train-epochs 30 \\
        --config configs/resnet18_tucker2.yaml
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tdnn
from tdnn import _vision as vision
from tdnn.analysis.report import format_table
from tdnn.analysis.sweep import ranks_filter
from tdnn.core.timing import latencies

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="torchvision model: resnet18, resnet34, resnet50, ...")
    p.add_argument("--weights", help="torchvision weights name (IMAGENET1K_V1, ResNet50_Weights.DEFAULT) "
                                     "or a local state-dict file; default: train from scratch")
    p.add_argument("--data", default="digits", help="'digits' (embedded), 'cifar10' (downloads), or an "
                                                    "ImageFolder directory with train/ and val/")
    p.add_argument("--config", default=str(CONFIGS / "resnet18_digits.yaml"), help="YAML config")
    p.add_argument("--train-epochs", type=int, help="train the original first (default: 4 without "
                                                    "--weights or when the classifier was replaced, else 0)")
    p.add_argument("--train-lr", type=float, default=2e-3, help="AdamW learning rate for --train-epochs")
    p.add_argument("--finetune-epochs", type=int, help="override the config's finetune epochs")
    p.add_argument("--calibration-batches", type=int, default=4, help="training batches to calibrate on")
    p.add_argument("--targets", default="0.1,0.2,0.5",
                   help="parameter fractions to sweep (the plain model's fraction is added)")
    p.add_argument("--out-dir", default="runs/compress_resnet", help="where the plots go")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, help="default: 32 for digits/CIFAR, 224 for folders")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for cifar10/folders")
    p.add_argument("--latency-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine, multi-threaded kernels "
                        "stall on busy cores; use more on an idle machine)")
    p.add_argument("--checkpoint-dir", help="fine-tuning checkpoints (resume by re-running)")
    p.add_argument("--out", help="save the fine-tuned model with tdnn.save (.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[vision.Data, nn.Module]:
    """The data and the trained original."""
    data = vision.image_data(args.data, image_size=args.image_size, batch_size=args.batch_size,
                             workers=args.workers)
    original = vision.build_model(args.arch, weights=args.weights)
    replaced = vision.set_num_classes(original, data.num_classes)
    epochs = args.train_epochs if args.train_epochs is not None else 4 if args.weights is None or replaced else 0
    print(f"{args.arch} on {data.name} ({len(data.train.dataset)} train / {len(data.test.dataset)} test "
          f"images, {data.num_classes} classes, {data.image_size}x{data.image_size}), "
          f"{torch.get_num_threads()} CPU thread(s), config {args.config}")
    if epochs:
        print(f"training the original for {epochs} epochs")
        tdnn.finetune(original, data.train, epochs=epochs, optimizer="adamw", lr=args.train_lr, weight_decay=0.05,
                      seed=args.seed, progress=not args.quiet)
    return data, original.eval()


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


def compress(args: argparse.Namespace, cfg: tdnn.Config, data: vision.Data, original: nn.Module,
             x: torch.Tensor) -> dict[str, Any]:
    """The plain model by the config, the sweep, and the data-aware model at the plain one's size."""
    plain, plain_s = timed(tdnn.compress_model, original, **cfg.compress)
    ratio = round(tdnn.report(plain).param_ratio, 4)
    torch.manual_seed(args.seed)  # the training loader's order: which images calibrate
    calibration = tdnn.Calibration(images for images, _ in itertools.islice(data.train, args.calibration_batches))
    method = cfg.compress.get("method", "auto")
    options = {k: v for k, v in cfg.compress.items() if k not in ("ranks", "method")}
    if isinstance(cfg.compress.get("ranks"), Mapping):  # the same layers as the config compresses
        options["filter_fn"] = ranks_filter(cfg.compress["ranks"])
    targets = sorted({*(float(t) for t in args.targets.split(",")), ratio})
    swept, sweep_s = timed(tdnn.sweep, original, lambda m: vision.top1(m, data.test), targets=targets,
                           calibration=calibration, methods=(method,), modes=("plain", "data-aware"), inputs=[x],
                           metric="top-1", progress=not args.quiet, **options)
    print(f"sweep: {len(swept.rows) - 1} models in {sweep_s:.0f} s, calibrated once\n{swept}\n")
    # the same Calibration: its statistics are kept, so this costs no calibration pass
    aware, aware_s = timed(tdnn.compress_model, original, budget=tdnn.Budget(params=ratio),
                           calibration=calibration, method=method, **options)
    images = sum(len(b) for b in calibration)
    return {"plain": plain, "aware": aware, "sweep": swept, "seconds": {"plain": plain_s, "aware": aware_s},
            "labels": {"plain": "plain: the config's ranks, no data",
                       "aware": f"data-aware: Budget(params={ratio}), {images} images"}}


def summary(rows: list[tuple[str, nn.Module, float, float | None]], x: torch.Tensor) -> tuple[str, list[float]]:
    """The table of ``(label, model, top-1, seconds)`` rows, latencies timed interleaved; the latency ratios."""
    lat = latencies({str(id(m)): m.eval() for _, m, _, _ in rows}, x, warmup=3, repeats=15)
    ms = [lat[str(id(m))] * 1e3 for _, m, _, _ in rows]
    reports = [tdnn.report(m, inputs=x[:1]) for _, m, _, _ in rows]
    ratios = [t / ms[0] for t in ms]
    lines = [[label, f"{rep.params_after:,}", f"{rep.params_after / reports[0].params_after:.3f}",
              f"{rep.flops_after / 1e6:,.1f}", f"{t:.1f}", f"{ratio:.3f}", f"{acc:.2%}",
              "-" if seconds is None else f"{seconds:.0f}"]
             for (label, _, acc, seconds), rep, t, ratio in zip(rows, reports, ms, ratios)]
    size = "x".join(map(str, x.shape[1:]))
    head = ["", "params", "x", f"MFLOPs (1x{size})", f"ms (batch {len(x)}, {torch.get_num_threads()} thr)", "x",
            "top-1", "time s"]
    return format_table(head, lines, right=set(range(1, 8))), ratios


def plots(out_dir: Path, name: str, made: dict[str, Any], tuned: nn.Module, errors: dict[str, float],
          x: torch.Tensor) -> None:
    """The sweep's Pareto plot and the data-aware model's per-layer plot."""
    sweep_png, layers_png = out_dir / "sweep.png", out_dir / "layers.png"
    made["sweep"].plot(sweep_png, title=f"{name}: top-1 against size, plain and data-aware budgets")
    tdnn.report(tuned, inputs=x[:1]).plot(layers_png, errors=errors, title=f"{name}, {made['labels']['aware']}")
    print(f"plots: {sweep_png} (top-1 against parameters and latency), {layers_png} (per layer)")


def deployed(original: nn.Module, tuned: nn.Module, data: vision.Data, x: torch.Tensor) -> None:
    """Both models in their deployment form (BatchNorm folded, memory layout measured), timed alike."""
    fast = {name: tdnn.optimize_for_inference(m, x) for name, m in (("original", original), ("tuned", tuned))}
    lat = latencies(fast, x, warmup=3, repeats=15)
    form = fast["tuned"].tdnn_inference
    print(f"deployed (optimize_for_inference: {len(form.folded)} BatchNorms folded, {form.memory_format}): "
          f"{lat['original'] * 1e3:.1f} ms -> {lat['tuned'] * 1e3:.1f} ms (x{lat['tuned'] / lat['original']:.3f}), "
          f"top-1 {vision.top1(fast['tuned'], data.test):.2%}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    cfg = tdnn.load_config(args.config)
    data, original = prepare(args)
    x = next(iter(data.test))[0][:args.latency_batch]  # timed, and where per-layer errors are measured
    trained_s = time.perf_counter() - start
    made = compress(args, cfg, data, original, x)
    tuned = made["aware"]  # fine-tuned in place; its accuracy before is taken first
    errors = tdnn.layer_errors(original, tuned, [x])
    acc = {name: vision.top1(m, data.test) for name, m in (("original", original), ("plain", made["plain"]),
                                                              ("aware", tuned))}
    settings = {**cfg.finetune, **({"epochs": args.finetune_epochs} if args.finetune_epochs is not None else {})}
    _, made["seconds"]["tuned"] = timed(tdnn.finetune, tuned, data.train, teacher=original,
                                        eval_fn=vision.top1_fn(data.test), checkpoint_dir=args.checkpoint_dir,
                                        seed=args.seed, progress=not args.quiet, **settings)
    acc["tuned"] = vision.top1(tuned, data.test)
    labels = {"original": "original", **made["labels"], "tuned": f"  + fine-tuned ({settings.get('epochs', 1)} epochs)"}
    models = {"original": original, "plain": made["plain"], "aware": tuned, "tuned": tuned}
    table, ratios = summary([(labels[k], m, acc[k], made["seconds"].get(k)) for k, m in models.items()], x)
    print(f"{table}\n")
    deployed(original, tuned, data, x)
    plots(Path(args.out_dir), f"{args.arch} on {data.name}", made, tuned, errors, x)
    print(f"train {trained_s:.0f} s, total {time.perf_counter() - start:.0f} s")
    if args.out:
        tdnn.save(tuned, args.out)
        print(f"saved the fine-tuned model to {args.out} (load with tdnn.load(path, {args.arch}(...)))")
    return {**acc, "latency_ratio": ratios[-1], "sweep": made["sweep"]}


if __name__ == "__main__":
    main()
