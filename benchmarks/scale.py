"""A 1B-parameter model compressed on one box: peak memory and time of data-aware compression.

The model has the shapes of LLaMA-3.2-1B (hidden 2048, 16 blocks, FFN 8192, GQA 32/8 heads, vocab
128256, tied embeddings: 1.24B parameters, 4.9 GB in float32) with random weights (memory and time
do not depend on the values). A first process writes the weights to a safetensors file once (under
``~/.cache/tdnn/scale``); the measured process builds the model on the meta device, loads the file,
and compresses the decoder Linears to 0.6 of their parameters *with* calibration data (8 sequences
of 512 random tokens), in place, block by block. Reported: wall time per phase and the peak
resident memory of the whole process (``ru_maxrss``) after each, against the goal of 1.5x the float32
model.

Usage::

    pip install -e ".[bench]"
    python benchmarks/scale.py                 # about 20 minutes on 2 cores, 5 GB of disk
    python benchmarks/scale.py --layers 2      # a quick look: 2 blocks instead of 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("TDNN_CACHE", Path.home() / ".cache" / "tdnn")) / "scale"


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                       tie_word_embeddings=True, rope_theta=500000.0, use_cache=False)


def build(layers: int):
    """The model on the meta device: no memory."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config(layers))


def write_weights(layers: int, path: Path) -> None:
    """Random weights (std 0.02, norms at 1) in a safetensors file, one tensor at a time."""
    from safetensors.torch import save_file

    model = build(layers)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        tensors[name] = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's float32 tensors in memory the process owns, read one at a time (no mmap).

    ``safetensors.torch.load_file`` maps the whole file: the dense weights that compression
    replaces are then never given back (the embedding keeps the mapping alive), and every page
    read stays in the resident set; loading with ``safe_open`` and a copy per tensor holds the
    mapping and the copies at once (measured: 2.3x the model during the load)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header, start = json.loads(f.read(size)), 8 + size
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            assert info["dtype"] == "F32", info["dtype"]
            tensor = torch.empty(info["shape"], dtype=torch.float32)
            f.seek(start + info["data_offsets"][0])
            f.readinto(tensor.numpy().reshape(-1).view("uint8"))
            tensors[name] = tensor
    return tensors


def gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(layers: int, path: Path, keep: float, tokens: int, sequential: bool) -> dict:
    """Load and compress in this process; phase times and the peak RSS after each phase."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    import tdnn

    phases, start = {}, time.perf_counter()

    def phase(name: str) -> None:
        nonlocal start
        phases[name] = {"s": round(time.perf_counter() - start, 1), "peak_gib": round(gib(), 2)}
        start = time.perf_counter()

    model = build(layers)
    model.load_state_dict(read_weights(path), assign=True, strict=False)
    model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)  # its buffers are not in the file
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    phase("load")
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 128256, (1, 512), generator=g)} for _ in range(tokens // 512)]
    tdnn.compress_model(model, ranks=keep, calibration=batches, sequential=sequential, inplace=True,
                        filter_fn=lambda m, n: n.startswith("model.layers."))
    phase("compress")
    with torch.no_grad():
        logits = model(input_ids=batches[0]["input_ids"][:, :64]).logits
    assert torch.isfinite(logits).all()
    phase("check (a forward)")
    return {"layers": layers, "params": params, "params_after": sum(p.numel() for p in model.parameters()),
            "float32_gib": params * 4 / 2**30, "phases": phases, "peak_gib": gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder blocks (LLaMA-3.2-1B has 16)")
    parser.add_argument("--keep", type=float, default=0.6, help="fraction of decoder-Linear parameters kept")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens (sequences of 512)")
    parser.add_argument("--sequential", action="store_true", help="sequential (block-wise) calibration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = CACHE / f"llama1b-{args.layers}.safetensors"
    if args.measure:
        print(json.dumps(measure(args.layers, path, args.keep, args.tokens, args.sequential)))
        return
    if not path.exists():
        print(f"writing random weights to {path} (once)", flush=True)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import scale; scale.write_weights({args.layers}, scale.Path({str(path)!r}))"], check=True)
    cmd = [sys.executable, __file__, "--measure", "--layers", str(args.layers), "--keep", str(args.keep),
           "--tokens", str(args.tokens), "--threads", str(args.threads)] + (["--sequential"] if args.sequential else [])
    out = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1])
    goal = 1.5 * out["float32_gib"]
    print(f"\nLLaMA-3.2-1B shapes, {out['layers']} blocks: {out['params'] / 1e9:.2f}B parameters "
          f"({out['float32_gib']:.2f} GiB in float32) -> {out['params_after'] / 1e9:.2f}B "
          f"(decoder Linears at {args.keep}, data-aware{', sequential' if args.sequential else ''}, "
          f"{args.tokens} calibration tokens, {args.threads} threads)\n")
    print("| phase | wall s | peak RSS GiB (process, so far) |\n|---|---|---|")
    for name, p in out["phases"].items():
        print(f"| {name} | {p['s']:.1f} | {p['peak_gib']:.2f} |")
    print(f"\npeak RSS {out['peak_gib']:.2f} GiB = {out['peak_gib'] / out['float32_gib']:.2f}x the float32 model "
          f"(goal <= 1.5x = {goal:.2f} GiB): {'met' if out['peak_gib'] <= goal else 'MISSED'}")


if __name__ == "__main__":
    main()
