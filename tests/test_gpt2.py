"""GPT-2's Conv1D layers (Hugging Face, weight stored transposed) on a randomly initialised
GPT2LMHeadModel: exact at full rank, compressed at a ratio, calibrated, saved and loaded, generating."""

import pytest
import torch

import tdnn
from tdnn.layers import registry
from tdnn.layers import walk
from models import gpt2

transformers = pytest.importorskip("transformers")
VOCAB = 128  # gpt2()'s


def tokens(batch=2, length=16, seed=0):
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_full_rank_svd_of_every_conv1d_gives_exact_logits():
    model = gpt2().double()
    ids = tokens()
    swaps = {}
    for name, layer, _ in walk.named_layers(model):
        cls = registry.factorized_class(layer, "auto")
        if registry.kind_of(layer).name == "Conv1D":
            assert cls.__name__ == "SVDConv1D"
            swaps[id(layer)] = cls.from_dense(layer, cls.max_rank(layer), name=name)
    assert len(swaps) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    reference = logits(model, ids)
    small = walk.swap(model, swaps)
    torch.testing.assert_close(logits(small, ids), reference, atol=1e-9, rtol=0)


@pytest.fixture(scope="module")
def compressed():
    return tdnn.compress_model(gpt2(), ranks=0.5).eval()


def test_ratio_compresses_every_conv1d_and_keeps_the_tied_head(compressed):
    plan = compressed.tdnn_plan
    conv1d = [e for e in plan.layers if e.kind == "Conv1D"]
    names = {e.name.split(".", 3)[-1] for e in conv1d}
    assert names == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"} and len(conv1d) == 8
    assert all(e.method == "svd" for e in conv1d)
    assert all(type(compressed.get_submodule(e.name)).__name__ == "SVDConv1D" for e in conv1d)
    head = plan["lm_head"]
    assert not head.factorized and "tied to transformer.wte" in head.reason
    assert compressed.lm_head.weight is compressed.transformer.wte.weight
    dense = sum(p.numel() for p in gpt2().transformer.h.parameters())
    assert sum(p.numel() for p in compressed.transformer.h.parameters()) < 0.6 * dense


def test_save_load_is_bit_identical_and_generates_the_same_tokens(compressed, tmp_path):
    ids = tokens()
    tdnn.save(compressed, tmp_path / "gpt2.safetensors")
    loaded = tdnn.load(tmp_path / "gpt2.safetensors", gpt2()).eval()
    assert torch.equal(logits(loaded, ids), logits(compressed, ids))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    out = compressed.generate(ids, **kwargs)
    assert out.shape == (2, 22)
    assert torch.equal(loaded.generate(ids, **kwargs), out)
    merged = tdnn.merge(compressed)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(logits(merged, ids), logits(compressed, ids), atol=1e-4, rtol=1e-4)


def test_calibrated_conv1d_factors_are_closer_on_the_data():
    model, ids = gpt2(), tokens(batch=8, length=32)
    plain = tdnn.compress_model(model, ranks=0.3)
    aware = tdnn.compress_model(model, ranks=0.3, calibration=[{"input_ids": ids[:4]}, {"input_ids": ids[4:]}])
    assert all(e.data_aware for e in aware.tdnn_plan.factorized())
    reference = logits(model, ids)

    def error(m):
        return float((logits(m, ids) - reference).norm() / reference.norm())

    assert error(aware) < 0.8 * error(plain)
