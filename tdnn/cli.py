"""The ``tdnn`` command: compress a model by a YAML config, report on a checkpoint, fine-tune it,
sweep budgets.

    tdnn compress configs/resnet18_tucker2.yaml --model resnet18 --weights IMAGENET1K_V1 --out r18.safetensors
    tdnn sweep configs/resnet18_digits.yaml --model resnet18 --weights r18_digits.pt --data digits --plot sweep.png
    tdnn report r18.safetensors [--model resnet18 --input-size 3,224,224]
    tdnn finetune r18.safetensors --model resnet18 --data /path/to/imagefolder \\
        --config configs/resnet18_tucker2.yaml --teacher-weights IMAGENET1K_V1 --out r18_ft.safetensors

``--model`` is a torchvision model name or ``package.module:factory``. ``tdnn finetune`` runs
under ``torchrun`` as well (``torchrun --nproc_per_node=N -m tdnn.cli finetune ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import tdnn
from tdnn import _vision as vision
from tdnn.analysis.plot import checked_path
from tdnn.analysis.report import checkpoint_report, format_table
from tdnn.analysis.sweep import MEASURES, MODES, ranks_filter
from tdnn.deploy.io import read_header
from tdnn.finetune.distributed import Launch


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected sizes like 3,224,224") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive")
    return shape


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected fractions like 0.2,0.3,0.5") from None
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each fraction must be in (0, 1]")
    return values


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(","))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown[0]!r}: choose modes from {', '.join(MODES)}")
    return modes


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


def _model_args(p: argparse.ArgumentParser, *, required: bool, weights: bool) -> None:
    p.add_argument("--model", required=required,
                   help="torchvision model name (resnet18, resnet50, ...) or package.module:factory")
    p.add_argument("--num-classes", type=int, help="classifier size (replaced if the weights differ)")
    if weights:
        p.add_argument("--weights", help="torchvision weights name (IMAGENET1K_V1; downloads) or a local "
                                         "state-dict file (.pt/.pth/.safetensors)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded), 'cifar10' (downloads) or an ImageFolder dir with train/ val/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdnn", description="Compress PyTorch models with low-rank "
                                     "factorized layers, report on them and fine-tune them.")
    parser.add_argument("--version", action="version", version=f"tdnn {tdnn.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="compress a model by a YAML config and save it",
                       description="Build a model, compress it with the 'compress' section of CONFIG "
                                   "and save it with tdnn.save.")
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    _model_args(p, required=True, weights=True)
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument("--input-size", type=_input_shape, default=(3, 224, 224),
                   help="one input's shape for the FLOP count (default 3,224,224)")

    p = sub.add_parser("report", help="per-layer table of a compressed checkpoint",
                       description="Print what a checkpoint holds: each layer's method, rank and "
                                   "parameters; with --model also FLOPs before and after.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a file written by tdnn.save / tdnn compress")
    _model_args(p, required=False, weights=False)
    p.add_argument("--input-size", type=_input_shape, default=(3, 224, 224),
                   help="one input's shape for FLOPs (with --model; default 3,224,224)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sub.add_parser("methods", help="list the registered methods and the layer kinds each applies to",
                   description="Print every method, layer kind and factorized class tdnn knows, including "
                               "ones registered by imported plug-ins.")

    p = sub.add_parser("finetune", help="fine-tune a compressed checkpoint (labels and/or distillation)",
                       description="Fine-tune CHECKPOINT on image data with the 'finetune' section of "
                                   "--config (flags override it), distilling from the dense model "
                                   "when --teacher-weights is given. Runs under torchrun too.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a file written by tdnn.save / tdnn compress")
    _model_args(p, required=True, weights=False)
    _data_args(p)
    p.add_argument("--config", help="YAML config whose 'finetune' section gives the settings")
    p.add_argument("--teacher-weights", help="weights of the dense original, to distill from")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--image-size", type=int)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (cifar10 / folders)")
    p.add_argument("--checkpoint-dir", help="training checkpoints; re-run the command to resume")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh, overwriting the checkpoint in --checkpoint-dir (default: resume from it)")
    p.add_argument("--device", type=_device, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    _sweep_parser(sub)
    return parser


def _sweep_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="compress at several budgets, measure each, mark the Pareto front",
                       description="Compress a model at a series of parameter (or FLOP) budgets with the options "
                                   "of CONFIG's 'compress' section (its ranks, if a mapping, choose the layers), "
                                   "calibrated once on training images; measure each model's size, FLOPs, "
                                   "latency and top-1 on the test split; mark the Pareto front; plot it.")
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    _model_args(p, required=True, weights=True)
    _data_args(p)
    p.add_argument("--targets", type=_fractions, default=(0.1, 0.2, 0.3, 0.5, 0.7),
                   help="fractions of the parameters (or FLOPs) to keep (default 0.1,0.2,0.3,0.5,0.7)")
    p.add_argument("--measure", choices=MEASURES, default="params", help="what the budgets count")
    p.add_argument("--modes", type=_modes, help=f"comma-separated, of {', '.join(MODES)} (default: "
                                                "data-aware, or sequential if the config says so)")
    p.add_argument("--methods", help="comma-separated methods to compare (default: the config's method)")
    p.add_argument("--calibration-batches", type=int, default=4, help="training batches to calibrate on")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (cifar10 / folders)")
    p.add_argument("--latency-batch", type=int, default=32, help="test images per timed forward")
    p.add_argument("--no-latency", action="store_true", help="do not time the models")
    p.add_argument("--plot", help="write the picture to this .png, .svg or .pdf file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", action="store_true")


def _compress(args: argparse.Namespace) -> None:
    cfg = tdnn.load_config(args.config)
    model = vision.build_model(args.model, weights=args.weights, num_classes=args.num_classes).eval()
    small = tdnn.compress_model(model, **cfg.compress)
    tdnn.save(small, args.out)
    print(tdnn.report(small, inputs=torch.zeros(1, *args.input_size)))
    print(f"saved to {args.out}")


def _report(args: argparse.Namespace) -> None:
    if args.model is not None:
        dense = vision.build_model(args.model, num_classes=args.num_classes)
        small = tdnn.load(args.checkpoint, dense).eval()
        rep = tdnn.report(small, inputs=torch.zeros(1, *args.input_size))
        print(json.dumps(rep.to_dict(), indent=2, default=str) if args.json else rep)
        return
    # Without the architecture: everything the checkpoint itself says.
    header = read_header(args.checkpoint)
    if args.json:
        print(json.dumps({**{k: v for k, v in header.items() if k != "plan"}, "plan": header["plan"].to_dict()},
                         indent=2, default=str))
        return
    rep = checkpoint_report(args.checkpoint)
    print(rep)
    print(f"\n{len(header['plan'].factorized())} of {len(header['plan'].layers)} layers factorized; totals over "
          f"these layers; tdnn {header['tdnn_version']}, torch {header['torch_version']}")
    print("pass --model (and --input-size) for whole-model parameters and FLOPs")


def _finetune(args: argparse.Namespace) -> None:
    settings = tdnn.FinetuneSettings(**(tdnn.load_config(args.config).finetune if args.config else {}))
    flags = {key: getattr(args, key) for key in ("epochs", "max_steps", "lr", "checkpoint_every")
             if getattr(args, key) is not None}
    # the evaluation is top-1 accuracy: keep the best epoch unless the config says otherwise
    settings = dataclasses.replace(settings, **flags, keep_best=settings.keep_best or "max")  # checked again
    data = vision.image_data(args.data, image_size=args.image_size, batch_size=args.batch_size,
                             workers=args.workers)
    classes = args.num_classes or data.num_classes
    small = tdnn.load(args.checkpoint, vision.build_model(args.model, num_classes=classes, image_size=data.image_size))
    teacher = None
    if args.teacher_weights is not None:
        teacher = vision.build_model(args.model, weights=args.teacher_weights, num_classes=classes,
                                     image_size=data.image_size)
    elif settings.alpha:
        raise ValueError(f"the config sets alpha={settings.alpha} (distillation): give --teacher-weights, "
                         f"or override the config")
    launch = Launch.from_env()
    device = args.device or (f"cuda:{launch.local_rank}" if torch.cuda.is_available() else "cpu")
    before = vision.top1(small, data.test)
    result = tdnn.finetune(small, data.train, settings, teacher=teacher, eval_fn=vision.top1_fn(data.test),
                           checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume, device=device,
                           progress=not args.no_progress)
    if launch.main:
        small.to("cpu")
        tdnn.save(small, args.out)
        after = result.evals[-1] if result.evals else vision.top1(small, data.test)
        print(f"top-1 on {data.name} test: {before:.2%} before, {after:.2%} after {result.steps} steps; "
              f"saved to {args.out}")


def _sweep(args: argparse.Namespace) -> None:
    if args.plot:
        checked_path(args.plot)  # before the sweep, not after it
    cfg = tdnn.load_config(args.config)
    data = vision.image_data(args.data, image_size=args.image_size, batch_size=args.batch_size,
                             workers=args.workers)
    model = vision.build_model(args.model, weights=args.weights, num_classes=args.num_classes or data.num_classes,
                               image_size=data.image_size).eval()
    options = {k: v for k, v in cfg.compress.items() if k not in ("ranks", "budget", "method", "sequential")}
    if isinstance(cfg.compress.get("ranks"), Mapping):
        options["filter_fn"] = ranks_filter(cfg.compress["ranks"])
    torch.manual_seed(0)  # the training loader's order: which images calibrate
    calibration = [x for x, _ in itertools.islice(data.train, args.calibration_batches)]
    methods = args.methods.split(",") if args.methods else [cfg.compress.get("method", "auto")]
    modes = args.modes or (("sequential",) if cfg.compress.get("sequential") else ("data-aware",))

    def top1(m: torch.nn.Module) -> float:
        return vision.top1(m, data.test)

    result = tdnn.sweep(model, top1, targets=args.targets, measure=args.measure, calibration=calibration,
                        methods=methods, modes=modes, inputs=[next(iter(data.test))[0][:args.latency_batch]],
                        latency=not args.no_latency, progress=not args.no_progress, **options)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    if args.plot:
        result.plot(args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)


def _methods(args: argparse.Namespace) -> None:
    rows = [[method, kind, cls.__name__, f"{cls.kind.dense_type.__module__}.{cls.kind.dense_type.__qualname__}"]
            for method, kind, cls in tdnn.registry.forms()]
    print(format_table(["method", "kind", "class", "replaces"], rows))
    print(f"\nmethod 'auto': {', '.join(f'{k.name} -> {k.auto_method}' for k in tdnn.registry.kinds())}; "
          "a plain matrix (Linear, 1x1 conv) uses svd unless the method has a form that takes matrices")
    for qualified, module in tdnn.registry.pending_kinds().items():
        print(f"{qualified}: registered by {module} when a model holding one is first compressed or loaded")


COMMANDS = {"compress": _compress, "report": _report, "methods": _methods, "finetune": _finetune, "sweep": _sweep}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tdnn`` console script; returns the exit status.

    Example:
        >>> from tdnn.cli import build_parser
        >>> build_parser().parse_args(["report", "model.safetensors"]).command
        'report'
    """
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"tdnn {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
