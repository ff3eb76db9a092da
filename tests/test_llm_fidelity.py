"""Transformers: block-wise sequential calibration (O(blocks) passes, the fidelity of whole-model
sequential), the sensitivity-aware budget, padding kept out of statistics, GQA projections."""

import pytest
import torch
from torch import nn

import tdnn
from tdnn.statistics.hooks import collect
from models import llama

transformers = pytest.importorskip("transformers")


def token_batches(n=4, batch=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 128, (batch, length), generator=g),
             "attention_mask": torch.ones(batch, length, dtype=torch.long)} for _ in range(n)]


def kl(model, reference, batches):
    total = 0.0
    with torch.no_grad():
        for b in batches:
            p = reference(**b).logits.log_softmax(-1)
            q = model(**b).logits.log_softmax(-1)
            total += float((p.exp() * (p - q)).sum(-1).mean())
    return total / len(batches)


def decoder(module, name):
    return name.startswith("model.layers.")


class Counter:
    """Counts forward calls of modules."""

    def __init__(self, modules):
        self.calls = {name: 0 for name in modules}
        self.handles = [m.register_forward_pre_hook(self.hook(name)) for name, m in modules.items()]

    def hook(self, name):
        def count(module, args):
            self.calls[name] += 1
        return count

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("layers", [2, 4])
def test_blockwise_sequential_passes_grow_with_blocks_not_layers(layers):
    model, batches = llama(layers), token_batches()
    counter = Counter({"model": model, **{f"block{i}": b for i, b in enumerate(model.model.layers)}})
    tdnn.compress_model(model, ranks=0.5, filter_fn=decoder, calibration=batches, sequential=True, inplace=True)
    counter.remove()
    n = len(batches)
    assert counter.calls["model"] == n  # one capture pass of the whole model (to its last block), whatever its depth
    per_block = {counter.calls[f"block{i}"] for i in range(layers)}
    # each block: the capture, a statistics pass, a probe of one batch, two runs per step (its copy
    # as the reference, then itself; steps: q/k/v, o, gate/up, down) and the two output streams:
    # the same count for every block, whatever the depth
    assert len(per_block) == 1 and per_block.pop() == n + n + 1 + 4 * 2 * n + 2 * n


def test_blockwise_sequential_matches_whole_model_sequential_and_beats_one_shot():
    model, batches, held = llama(), token_batches(), token_batches(seed=1)
    whole = tdnn.compress_model(model, ranks=0.4, filter_fn=decoder, calibration=batches, sequential=True, blocks=[])
    blockwise = tdnn.compress_model(model, ranks=0.4, filter_fn=decoder, calibration=batches, sequential=True)
    one_shot = tdnn.compress_model(model, ranks=0.4, filter_fn=decoder, calibration=batches)
    assert [e.rank for e in whole.tdnn_plan.layers] == [e.rank for e in blockwise.tdnn_plan.layers]
    k_whole, k_block, k_one = kl(whole, model, held), kl(blockwise, model, held), kl(one_shot, model, held)
    assert k_block == pytest.approx(k_whole, rel=0.02)
    assert k_block < k_one


def test_padding_is_kept_out_of_the_statistics():
    model = llama(2)
    padded = token_batches(n=2)
    for b in padded:
        b["attention_mask"][:, 16:] = 0
        b["input_ids"][:, 16:] = 1
    trimmed = [{k: v[:, :16] for k, v in b.items()} for b in padded]
    layers = {"q": (model.model.layers[0].self_attn.q_proj, "patches")}
    masks = [b["attention_mask"].bool() for b in padded]
    with_mask = collect(model, padded, layers, masks=masks)["q"]
    reference = collect(model, trimmed, layers)["q"]
    assert with_mask.count == reference.count == 2 * 4 * 16
    torch.testing.assert_close(with_mask.gram, reference.gram, rtol=1e-5, atol=1e-6)


def test_gqa_projections_and_the_tied_head():
    model = llama(2)
    small = tdnn.compress_model(model, ranks=0.5, calibration=token_batches(n=1))
    plan = small.tdnn_plan
    k = small.model.layers[0].self_attn.k_proj
    assert isinstance(k, tdnn.SVDLinear) and k.dense_kwargs["out_features"] == 32  # 2 of 4 heads
    assert not plan["lm_head"].factorized and "tied" in plan["lm_head"].reason
    assert small.lm_head.weight is small.model.embed_tokens.weight


class Sensitive(nn.Module):
    """Two equal layers in parallel; the second one's output is amplified 20 times at the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return self.a(x) + 20 * self.b(x)


def test_the_budget_spends_parameters_where_errors_cost_most():
    model = Sensitive().eval()
    x = torch.randn(512, 32) @ torch.randn(32, 32)
    budget = tdnn.compress_model(model, budget=tdnn.Budget(params=0.5), calibration=[x])
    blind = tdnn.compress_model(model, budget=tdnn.Budget(params=0.5, sensitivity=False), calibration=[x])
    plan = budget.tdnn_plan
    rank_b = 32 if not plan["b"].factorized else plan["b"].rank
    assert rank_b > (plan["a"].rank or 32)  # the amplified layer keeps more
    assert abs(blind.tdnn_plan["a"].rank - blind.tdnn_plan["b"].rank) <= 1  # the same weights look alike
    uniform = tdnn.compress_model(model, ranks=8, calibration=[x])  # at least as many parameters
    assert sum(p.numel() for p in budget.parameters()) <= sum(p.numel() for p in uniform.parameters())

    def error(m):
        with torch.no_grad():
            return float((m(x) - model(x)).norm())

    assert error(budget) < 0.9 * error(uniform) and error(budget) < 0.9 * error(blind)


class Twins(nn.Module):
    """Two equal convs; one amplified 20x by a BatchNorm after it, the other by 20x at the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(8, 32, 3, padding=1), nn.Conv2d(8, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32).eval()
        with torch.no_grad():
            self.b.load_state_dict(self.a.state_dict())
            self.bn.weight.fill_(20.0)

    def forward(self, x):
        return self.bn(self.a(x)) + 20 * self.b(x)


def test_the_budget_counts_a_batchnorm_scale_once():
    # The Fisher weight is measured at the conv's output (before the BatchNorm) and the whitened
    # error is the one after it: the scale must not be counted twice. Equal effect, equal ranks.
    model = Twins().eval()
    x = torch.randn(64, 8, 6, 6)
    small = tdnn.compress_model(model, budget=tdnn.Budget(params=0.6), calibration=[x], method="svd")
    plan = small.tdnn_plan
    assert plan["a"].factorized and plan["b"].factorized
    assert abs(plan["a"].rank - plan["b"].rank) <= 1
