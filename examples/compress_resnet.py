"""Compress a torchvision ResNet, fine-tune it, and compare original / compressed / fine-tuned.

With no arguments this runs offline in a few minutes on 2 CPU cores: a ResNet-18 is trained
briefly on scikit-learn's handwritten digits (1,797 real 8×8 scans, upsampled to 32×32), then
compressed with configs/resnet18_digits.yaml and fine-tuned with labels plus distillation from the
original::

    python examples/compress_resnet.py

On your own data and weights (torchvision weights download on first use)::

    python examples/compress_resnet.py --arch resnet50 --weights IMAGENET1K_V2 \\
        --data /path/to/imagenet --config configs/resnet50_cp.yaml --out resnet50_cp.safetensors
    python examples/compress_resnet.py --arch resnet18 --data cifar10 --train-epochs 30 \\
        --config configs/resnet18_tucker2.yaml
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import tdnn
from tdnn import _vision as vision
from tdnn.latency import latencies

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


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    cfg = tdnn.load_config(args.config)
    data = vision.image_data(args.data, image_size=args.image_size, batch_size=args.batch_size,
                             workers=args.workers)
    original = vision.build_model(args.arch, weights=args.weights)
    replaced = vision.set_num_classes(original, data.num_classes)
    train_epochs = args.train_epochs
    if train_epochs is None:
        train_epochs = 4 if args.weights is None or replaced else 0
    print(f"{args.arch} on {data.name} ({len(data.train.dataset)} train / {len(data.test.dataset)} test "
          f"images, {data.num_classes} classes, {data.image_size}x{data.image_size}), "
          f"{torch.get_num_threads()} CPU thread(s), config {args.config}")

    if train_epochs:
        print(f"training the original for {train_epochs} epochs")
        tdnn.finetune(original, data.train, epochs=train_epochs, optimizer="adamw", lr=args.train_lr,
                      weight_decay=0.05,
                      seed=args.seed, progress=not args.quiet)
    t = time.perf_counter()
    acc = {"original": vision.top1(original, data.test)}
    trained_at = t - start

    t = time.perf_counter()
    compressed = tdnn.compress_model(original.eval(), **cfg.compress)
    compress_s = time.perf_counter() - t
    acc["compressed"] = vision.top1(compressed, data.test)
    print(f"compressed in {compress_s:.1f} s: top-1 {acc['original']:.2%} -> {acc['compressed']:.2%}")

    tuned = compressed  # fine-tuned in place; its accuracy before is recorded above
    settings = dict(cfg.finetune)
    if args.finetune_epochs is not None:
        settings["epochs"] = args.finetune_epochs
    t = time.perf_counter()
    tdnn.finetune(tuned, data.train, teacher=original, eval_fn=vision.top1_fn(data.test),
                  checkpoint_dir=args.checkpoint_dir, seed=args.seed, progress=not args.quiet, **settings)
    finetune_s = time.perf_counter() - t
    acc["fine-tuned"] = vision.top1(tuned, data.test)

    x = next(iter(data.test))[0][: args.latency_batch]
    rep = tdnn.report(tuned, inputs=x[:1])
    # deployment form of both (BatchNorm folded, memory layout measured): the like-for-like latency
    deployed = {name: tdnn.optimize_for_inference(model, x) for name, model in
                (("original", original), ("compressed", tuned))}
    lat = latencies({"original": original.eval(), "compressed": tuned.eval(),
                     **{f"{name} deployed": model for name, model in deployed.items()}}, x, warmup=3, repeats=15)
    ratio = lat["compressed"] / lat["original"]
    deployed_ratio = lat["compressed deployed"] / lat["original deployed"]
    acc["deployed"] = vision.top1(deployed["compressed"], data.test)
    rows = [("", "original", "compressed", "fine-tuned", "ratio"),
            ("parameters", f"{rep.params_before:,}", f"{rep.params_after:,}", f"{rep.params_after:,}",
             f"{rep.param_ratio:.3f}"),
            (f"MFLOPs (1x3x{data.image_size}x{data.image_size})", f"{rep.flops_before / 1e6:,.1f}",
             f"{rep.flops_after / 1e6:,.1f}", f"{rep.flops_after / 1e6:,.1f}", f"{rep.flop_ratio:.3f}"),
            (f"CPU latency, batch {len(x)}, {torch.get_num_threads()} thr (ms)", f"{lat['original'] * 1e3:.1f}",
             f"{lat['compressed'] * 1e3:.1f}", f"{lat['compressed'] * 1e3:.1f}", f"{ratio:.3f}"),
            ("  the same, both via optimize_for_inference", f"{lat['original deployed'] * 1e3:.1f}", "",
             f"{lat['compressed deployed'] * 1e3:.1f}", f"{deployed_ratio:.3f}"),
            (f"top-1 ({len(data.test.dataset)} test images)", f"{acc['original']:.2%}",
             f"{acc['compressed']:.2%}", f"{acc['fine-tuned']:.2%}", "")]
    print()
    print(table(rows))
    print(f"\n{len(rep.layers) - sum(r.method is None for r in rep.layers)} of {len(rep.layers)} layers "
          f"factorized; train {trained_at:.0f} s, compress {compress_s:.0f} s, fine-tune {finetune_s:.0f} s, "
          f"total {time.perf_counter() - start:.0f} s")
    form = deployed["compressed"].tdnn_inference
    print(f"deployed: {len(form.folded)} BatchNorms folded, {form.memory_format} layout, top-1 {acc['deployed']:.2%}")
    if args.out:
        tdnn.save(tuned, args.out)
        print(f"saved the fine-tuned model to {args.out} (load with tdnn.load(path, {args.arch}(...)))")
    return {**acc, "param_ratio": rep.param_ratio, "flop_ratio": rep.flop_ratio, "latency_ratio": ratio,
            "deployed_latency_ratio": deployed_ratio}


if __name__ == "__main__":
    main()
