"""The Hugging Face round trip: save_pretrained, then from_pretrained in a fresh process from the
directory alone: bit-identical logits, the compressed parameter count, ties, the same generation."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import models
import tdnn
from models import gpt2

transformers = pytest.importorskip("transformers")


def llama():
    return models.llama(layers=2, positions=None)


FRESH = textwrap.dedent("""
    import json, sys, torch, tdnn
    directory, ids = sys.argv[1], torch.load(sys.argv[2])
    model = tdnn.from_pretrained(directory)
    head = model.get_output_embeddings().weight
    tied = head is model.get_input_embeddings().weight
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    torch.save({"logits": logits, "tokens": tokens}, sys.argv[3])
    dense_left = [n for n, _, _ in tdnn.layers.walk.named_layers(model) if n.startswith(("model.layers", "transformer.h"))]
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "tied": tied,
                      "meta": any(t.is_meta for t in [*model.parameters(), *model.buffers()]),
                      "class": type(model).__name__, "dense_left": dense_left}))
""")


@pytest.mark.parametrize("build", [llama, gpt2])
def test_a_fresh_process_rebuilds_the_compressed_model_from_the_directory(build, tmp_path):
    model = build()
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    small = tdnn.compress_model(model, ranks=0.5, calibration=[{"input_ids": ids}])
    tdnn.save_pretrained(small, tmp_path / "small")
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == [
        "config.json", "generation_config.json", "tdnn_config.json", "tdnn_model.safetensors"]
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "small"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        assert torch.equal(out["logits"], small(ids).logits)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(out["tokens"], small.generate(ids, **kwargs))
    assert fresh["params"] == sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert fresh["tied"] and not fresh["meta"] and fresh["class"] == type(model).__name__
    assert fresh["dense_left"] == []
    info = json.loads((tmp_path / "small" / "tdnn_config.json").read_text())
    assert info["parameters"] == fresh["params"]


def test_transformers_alone_refuses_the_directory(tmp_path):
    tdnn.save_pretrained(tdnn.compress_model(llama(), ranks=0.5), tmp_path)
    with pytest.raises(OSError):  # no model.safetensors: it must not load random factor-less weights
        transformers.LlamaForCausalLM.from_pretrained(tmp_path)


def test_not_a_hugging_face_model_or_directory(tmp_path):
    with pytest.raises(TypeError, match="not a Hugging Face model"):
        tdnn.save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    (tmp_path / "tdnn_config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not written by tdnn.save_pretrained"):
        tdnn.from_pretrained(tmp_path)
