"""YAML configs: the shipped files load and compress; every kind of mistake names the file and key;
hostile files (alias bombs, huge values) are refused at once with a short message."""

import time
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import tdnn
from tdnn.layers.registry import factorized_class
from tdnn.config import known_keys
from tdnn.planning.ranks import NO_ENTRY, RankRule
from tdnn.layers.walk import named_layers

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"resnet18_tucker2.yaml", "resnet50_cp.yaml", "resnet18_svd_fc.yaml", "resnet18_digits.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_cover_their_resnet(path):
    """Each pattern lands on the layers it is meant for (checked on a meta-device ResNet: no work)."""
    cfg = tdnn.load_config(path)
    arch = "resnet50" if "resnet50" in path.name else "resnet18"
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    rule = RankRule(cfg.compress["ranks"])
    chosen = {}
    for name, module, _ in named_layers(model):
        spec = rule(name, module)
        if spec is not NO_ENTRY and spec.rank is not None:
            method = spec.method or cfg.compress.get("method", "auto")
            chosen[name] = (factorized_class(module, method).method, spec.rank)
    assert "conv1" not in chosen and rule.unused_keys() == [], rule.unused_keys()
    if "svd_fc" in path.name:
        assert chosen == {"fc": ("svd", 64)}
    elif "cp" in path.name:
        assert chosen["layer1.0.conv2"][0] == "cp" and chosen["layer1.0.conv1"][0] == "svd"
        assert len(chosen) == len(list(named_layers(model))) - 2  # all but the stem and fc
    else:
        assert chosen["layer1.0.conv1"][0] == "tucker2" and chosen["layer2.0.downsample.0"][0] == "svd"
        assert len(chosen) == len(list(named_layers(model))) - 2
    assert set(cfg.finetune) <= set(known_keys("finetune"))


def test_config_feeds_compress_model_and_finetune(tmp_path):
    path = write(tmp_path, """
description: a small test
compress:
  method: svd
  ranks:
    "0": {rank: 8, method: svd}
    "re:.*": null
finetune:
  epochs: 2
  lr: 5e-2
  optimizer: adamw
""")
    cfg = tdnn.load_config(path)
    assert cfg.finetune == {"epochs": 2, "lr": 0.05, "optimizer": "adamw"}
    assert cfg.description == "a small test" and cfg.source == str(path)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    small = tdnn.compress_model(net, **cfg.compress)
    assert type(small[0]).__name__ == "SVDLinear" and small[0].rank == 8 and isinstance(small[2], nn.Linear)
    result = tdnn.finetune(small, [(torch.randn(16, 32), torch.randint(0, 4, (16,)))], progress=False,
                           **cfg.finetune)
    assert result.steps == 2


def test_new_settings_are_accepted_without_edits():
    """Keys come from the fields of the settings: whatever setting compress_model takes is allowed."""
    import dataclasses

    fields = [f.name for f in dataclasses.fields(tdnn.CompressSettings)]
    assert known_keys("compress") == [k for k in fields if k != "filter_fn"]
    assert known_keys("finetune") == [f.name for f in dataclasses.fields(tdnn.FinetuneSettings) if f.name != "loss_fn"]


@pytest.mark.parametrize("text, error, match", [
    ("compress:\n  ranks: 0.5\n  rank_method: svd\n", ValueError,
     r"cfg\.yaml: unknown key 'compress\.rank_method'; known keys: ranks, "),
    ("compress:\n  ranks: 0.5\nfinetune:\n  epoch: 3\n", ValueError,
     r"cfg\.yaml: unknown key 'finetune\.epoch'; known keys: .*epochs"),
    ("compres:\n  ranks: 0.5\n", ValueError, r"cfg\.yaml: unknown key 'compres'; a config has the keys"),
    ("finetune:\n  epochs: 1\n", ValueError, r"cfg\.yaml: missing key 'compress'"),
    ("compress:\n  budget: {params: 2}\n", ValueError, r"cfg\.yaml: 'compress\.budget': Budget: params=2"),
    ("compress:\n  budget: {param: 0.5}\n", TypeError, r"cfg\.yaml: 'compress\.budget': .*'param'"),
    ("compress:\n  ranks: 0.5\n  method: tucker\n", ValueError,
     r"cfg\.yaml: 'compress\.method': .*unknown method 'tucker'"),
    ("compress:\n  ranks:\n    fc: 1.5\n", ValueError, r"cfg\.yaml: 'compress\.ranks': ranks\['fc'\]: ratio=1\.5"),
    ("compress:\n  ranks:\n    fc: {rank: 8, mehtod: svd}\n", ValueError, r"cfg\.yaml: 'compress\.ranks'.*mehtod"),
    ("compress:\n  ranks:\n    're:layer[': 0.5\n", ValueError, r"cfg\.yaml: 'compress\.ranks'.*regular expression"),
    ("compress:\n  ranks: 0.5\nfinetune:\n  epochs: two\n", TypeError,
     r"cfg\.yaml: 'finetune\.epochs' must be int, got 'two'"),
    ("compress:\n  ranks: 0.5\nfinetune:\n  lr: [0.1]\n", TypeError, r"cfg\.yaml: 'finetune\.lr' must be float"),
    ("compress:\n  ranks: 0.5\nfinetune:\n  max_steps: true\n", TypeError,
     r"'finetune\.max_steps' must be int or null, got True"),
    ("compress:\n  ranks: {fc: 8, fc: 16}\n", ValueError, r"cfg\.yaml: invalid YAML at line 2.*duplicate key 'fc'"),
    ("compress:\n  ranks: [0.5\n", ValueError, r"cfg\.yaml: invalid YAML at line \d+, column \d+"),
    ("compress:\n\tranks: 0.5\n", ValueError, r"cfg\.yaml: invalid YAML"),
    ("- compress\n", ValueError, r"cfg\.yaml: a config must be a mapping"),
    ("", ValueError, r"cfg\.yaml: a config must be a mapping"),
    ("compress: 0.5\n", ValueError, r"cfg\.yaml: 'compress' must be a mapping"),
    ("compress:\n  ranks:\n    ? [fc, conv1]\n    : 0.5\n", ValueError,
     r"cfg\.yaml: invalid YAML at line 3, column 7: a key must be a name or a number, got a list"),
    ("compress:\n  ranks: 0.5\n  # na\xefve\n".encode("latin-1"), ValueError, r"cfg\.yaml: not UTF-8 text \(byte 29\)"),
])
def test_config_errors_name_file_and_key(tmp_path, text, error, match):
    with pytest.raises(error, match=match):
        tdnn.load_config(write(tmp_path, text))


def alias_bomb(depth=9):
    """``&a0 [1 × 9]``, ``&a1 [a0, *a0 × 8]``, ... ``&a{depth-1}``: a few hundred bytes that stand for 9**depth values."""
    level = "&a0 [" + ", ".join(["1"] * 9) + "]"
    for k in range(1, depth):
        level = f"&a{k} [{level}" + f", *a{k - 1}" * 8 + "]"
    return level


@pytest.mark.parametrize("value, match", [
    (alias_bomb(), r"cfg\.yaml: its aliases expand to more than 10000 values"),
    ("[" + ", ".join(map(str, range(5000))) + "]", r"cfg\.yaml: 'compress\.damping' must be float, got \[0, 1, "),
], ids=["alias bomb", "long list"])
def test_a_huge_value_is_refused_at_once_in_a_short_message(tmp_path, value, match):
    start = time.perf_counter()
    with pytest.raises((ValueError, TypeError), match=match) as err:
        tdnn.load_config(write(tmp_path, f"compress:\n  ranks: 0.5\n  damping: {value}\n"))
    assert time.perf_counter() - start < 3 and len(str(err.value)) < 300


def test_merge_keys_are_standard_yaml(tmp_path):
    cfg = tdnn.load_config(write(tmp_path, """
compress:
  ranks:
    "0": &spec {rank: 8, method: svd}
    "2": {<<: *spec, rank: 4}
"""))
    assert cfg.compress["ranks"] == {"0": {"rank": 8, "method": "svd"}, "2": {"rank": 4, "method": "svd"}}


def test_budget_mapping_becomes_a_budget(tmp_path):
    cfg = tdnn.load_config(write(tmp_path, "compress:\n  budget: {params: 0.4}\n  method: svd\n"))
    assert cfg.compress == {"budget": tdnn.Budget(params=0.4), "method": "svd"}
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    small = tdnn.compress_model(net, **cfg.compress)
    assert tdnn.report(small).param_ratio <= 0.41


def test_missing_file_is_a_plain_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        tdnn.load_config(tmp_path / "nope.yaml")
