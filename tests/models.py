"""The tiny models, data and inspection helpers that more than one test file uses (a builder used by
one file only stays in that file). Import with ``from models import ...``: pytest puts tests/ on
sys.path, and so does running a script from tests/ (``finetune_worker.py`` under torchrun).

Each builder seeds the global RNG where it did in the file it came from, so a model is the same
whichever file builds it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tdnn

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = str(ROOT / "configs" / "resnet18_digits.yaml")


# -- convolutional networks ----------------------------------------------------------------------

def resnet18(num_classes=10):
    """torchvision's ResNet-18, seeded."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


def narrow_resnet18(width=32, num_classes=1000):
    """torchvision's ResNet-18 (its modules, layer names, forward and initialisation) with every width
    scaled by ``width / 64``: the same 21 layers of the same kinds at a fraction of the cost; seeded."""
    import torchvision
    from torchvision.models.resnet import BasicBlock

    with torch.device("meta"):  # the skeleton only: every layer with weights is replaced below
        model = torchvision.models.resnet18(num_classes=num_classes)
    torch.manual_seed(0)
    model.conv1, model.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
    channels = width
    for i, out in enumerate((width, 2 * width, 4 * width, 8 * width), 1):
        stride = 1 if i == 1 else 2
        down = None if stride == 1 else nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False),
                                                      nn.BatchNorm2d(out))
        setattr(model, f"layer{i}", nn.Sequential(BasicBlock(channels, out, stride, down), BasicBlock(out, out)))
        channels = out
    model.fc = nn.Linear(channels, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model.eval()


class SmallResNet(nn.Module):
    """A narrow two-stage ResNet with torchvision's layer names (conv1, layer1.0.conv1, ..., fc)."""

    def __init__(self, num_classes=10):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.layer1 = nn.Sequential(BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2, downsample=down))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_resnet():  # also the CLI's --model models:small_resnet
    torch.manual_seed(0)
    return SmallResNet()


def calib_net():
    """A conv and a Linear head on 3×6×6 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


# -- MLPs ----------------------------------------------------------------------------------------

def mlp16():
    """16 -> 16 -> 4, unseeded."""
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def saved_mlp16(directory):
    """``mlp16()`` compressed at ratio 0.5 and saved as ``directory/m.safetensors``; its path."""
    path = directory / "m.safetensors"
    tdnn.save(tdnn.compress_model(mlp16(), ranks=0.5), path)
    return path


def dead_units():
    """16 -> 32 -> 8 with four ReLU units that never fire: a singular input covariance for the second layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        net[0].bias[:4] = -100.0
    return net


class Twice(nn.Module):
    """One Linear layer (``shared``) called twice in a forward."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))  # the same layer twice


def digits_mlp(dropout=False):
    """The digits classifier 64 -> 128 -> 10 (BatchNorm and dropout in between if asked), unseeded."""
    extra = [nn.BatchNorm1d(128), nn.Dropout(0.2)] if dropout else []
    return nn.Sequential(nn.Linear(64, 128), *extra, nn.ReLU(), nn.Linear(128, 10))


def digits():
    """scikit-learn's 8×8 digits: inputs as flat float vectors in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)


# -- transformers --------------------------------------------------------------------------------

class Block(nn.Module):
    """A transformer-style block: attention (with MHA's never-called out_proj) and an MLP."""

    def __init__(self, dim=64, hidden=256):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=100, dim=64, depth=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.heads = nn.ModuleDict({"cls": nn.Linear(dim, 10), "lm": nn.Linear(dim, vocab)})

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.heads["cls"](x.mean(1)), self.heads["lm"](x)


def llama(layers=3, seed=0, positions=64):
    """A random tied-embedding LLaMA with grouped-query attention: vocabulary 128, width 64, 4 heads
    over 2 key/value heads. ``positions=None``: transformers' default context length."""
    import transformers

    torch.manual_seed(seed)
    extra = {} if positions is None else {"max_position_embeddings": positions}
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, **extra,
                                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_llama(layers=2, tied=False, positions=32):
    """A smaller random LLaMA: vocabulary 64, width 32, 4 heads over 2 key/value heads, seeded.
    ``positions=None``: transformers' default context length."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    extra = {} if positions is None else {"max_position_embeddings": positions}
    if tied:
        extra["tie_word_embeddings"] = True
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, **extra)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_llama_tokens(seed, pad=0):
    """A batch of 4 × 12 tokens for ``tiny_llama``, the last ``pad`` positions masked."""
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[:, ids.shape[1] - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def gpt2():
    """A random two-block GPT-2 (Hugging Face Conv1D layers), vocabulary 128, width 64."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return transformers.GPT2LMHeadModel(config).eval()


# -- fuzzing -------------------------------------------------------------------------------------

def json_values():
    """A hypothesis strategy: small JSON values of every type, nested a little."""
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-3, 10 ** 12) | st.floats(allow_nan=False) | st.text(max_size=6)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


# -- before and after ----------------------------------------------------------------------------

def snapshot(model):
    """What a model is: its modules with their modes, its state and which parameters train."""
    return ([(n, type(m), m.training) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def unchanged(model, snap):
    """Whether ``model`` is still what ``snapshot`` recorded."""
    modules, state, grads = snapshot(model)
    return (modules == snap[0] and grads == snap[2] and state.keys() == snap[1].keys()
            and all(torch.equal(state[k], snap[1][k]) for k in state))
