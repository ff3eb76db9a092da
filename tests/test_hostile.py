"""Hostile inputs, round two: each case once gave a silent wrong result, a lost resume or an unclear
error (issue 12); each test pins the behaviour now."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

import tdnn

ROOT = Path(__file__).resolve().parents[1]


# -- 1. the core install ------------------------------------------------------------------------

EXTRAS = ["torchvision", "sklearn", "transformers", "onnx", "onnxscript", "onnxruntime", "tltorch",
          "matplotlib", "accelerate", "gguf", "hypothesis", "pytest"]
CORE_SCRIPT = f"""
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ImportError(f"{{name}} is an extra, not a core dependency")
sys.meta_path.insert(0, Blocker())
import os, tempfile, torch, tdnn
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
small = tdnn.compress_model(net, ranks=0.5, calibration=[torch.randn(4, 3, 8, 8)]).eval()
path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
tdnn.save(small, path)
fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
x = torch.randn(2, 3, 8, 8)
assert torch.equal(tdnn.load(path, fresh).eval()(x), small(x))
print("core ok")
"""


def test_the_core_install_imports_compresses_saves_and_loads_without_any_extra():
    done = subprocess.run([sys.executable, "-c", CORE_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0 and "core ok" in done.stdout, done.stderr[-2000:]


def test_every_third_party_import_of_the_core_is_a_core_dependency():
    import ast
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip().lower() for dep in project["dependencies"]}
    provides = {"yaml": "pyyaml"}  # import name -> distribution name, where they differ
    optional = {"tdnn/_vision.py", "tdnn/layers/hf_conv1d.py"}  # documented extras, imported on demand
    for path in sorted((ROOT / "tdnn").rglob("*.py")):
        if str(path.relative_to(ROOT)) in optional:
            continue
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top:
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                root = module.split(".")[0]
                if not root or root == "tdnn" or root in sys.stdlib_module_names or root == "__future__":
                    continue
                assert provides.get(root, root) in names, f"{path.name} imports {root}, not a core dependency"


# -- 2. damping and non-finite factors ----------------------------------------------------------

def dead_units():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        net[0].bias[:4] = -100.0  # four ReLU units never fire: a singular input covariance for net[2]
    return net


def test_damping_zero_with_a_singular_covariance_gives_a_finite_model():
    net, x = dead_units(), torch.randn(256, 16)
    small = tdnn.compress_model(net, ranks=0.5, calibration=[x], damping=0.0)
    assert all(torch.isfinite(p).all() for p in small.parameters())
    with torch.no_grad():
        plain = tdnn.compress_model(net, ranks=0.5)
        assert (small(x) - net(x)).norm() <= (plain(x) - net(x)).norm()


@pytest.mark.parametrize("damping", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_damping_is_refused(damping):
    with pytest.raises((ValueError, TypeError), match=r"damping="):
        tdnn.compress_model(dead_units(), ranks=0.5, calibration=[torch.randn(8, 16)], damping=damping)


def test_non_finite_factors_are_refused_with_the_layer_named(monkeypatch):
    from tdnn.algebra import decompose

    real = decompose.svd
    monkeypatch.setattr(decompose, "svd", lambda m, r: tuple(f * float("nan") for f in real(m, r)))
    with pytest.raises(ValueError, match=r"^0: the svd factors .* NaN or Inf"):
        tdnn.compress_model(dead_units(), ranks=0.5)


# -- 3. tied weights ----------------------------------------------------------------------------

class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most small LLMs

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def test_tied_layers_stay_tied_through_compress_save_load_and_merge(tmp_path):
    torch.manual_seed(0)
    model, ids = TinyLM().eval(), torch.randint(0, 50, (2, 7))
    small = tdnn.compress_model(model, ranks=0.5)
    assert small.head.weight is small.embed.weight
    assert "tied to embed" in small.tdnn_plan["head"].reason
    assert isinstance(small.body[0], tdnn.SVDLinear)
    tdnn.save(small, tmp_path / "lm.safetensors")
    with torch.device("meta"):
        skeleton = TinyLM()
    loaded = tdnn.load(tmp_path / "lm.safetensors", skeleton, assign=True).eval()
    assert loaded.head.weight is loaded.embed.weight
    assert torch.equal(loaded(ids), small(ids))
    merged = tdnn.merge(small)
    assert merged.head.weight is merged.embed.weight


# -- 4. exact resume with samplers that draw from the global RNG --------------------------------

class Crash(Exception):
    pass


class Crashing(TensorDataset):
    def __init__(self, x, y, crash_at=None):
        super().__init__(x, y)
        self.crash_at, self.fetched = crash_at, 0

    def __getitem__(self, i):
        self.fetched += 1
        if self.crash_at is not None and self.fetched >= self.crash_at:
            raise Crash
        return super().__getitem__(i)


@pytest.mark.parametrize("sampler", ["weighted", "replacement"])
def test_resume_is_exact_with_samplers_drawing_from_the_global_rng(sampler, tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 12, generator=g), torch.randint(0, 3, (300,), generator=g)

    def run(directory, crash_at=None):
        torch.manual_seed(0)
        model = tdnn.compress_model(nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3)), ranks=0.5)
        data = Crashing(x, y, crash_at)
        pick = (WeightedRandomSampler(torch.linspace(0.2, 1.0, 300), 300) if sampler == "weighted"
                else RandomSampler(data, replacement=True))
        loader = DataLoader(data, batch_size=20, sampler=pick)
        result = tdnn.finetune(model, loader, epochs=3, lr=0.05, checkpoint_dir=directory, checkpoint_every=4,
                               progress=False)
        return model, result

    full, _ = run(tmp_path / "full")
    with pytest.raises(Crash):
        run(tmp_path / "cut", crash_at=22 * 20 + 5)  # in epoch 2, after the checkpoint at step 20
    resumed, result = run(tmp_path / "cut")
    assert result.resumed_from == 20
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# -- 5. sequential mode: a layer called twice, and a failure in place -------------------------

class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))  # the same layer twice


def test_sequential_mode_calibrates_a_layer_called_twice_on_both_calls():
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(128, 16)
    small = tdnn.compress_model(model, ranks=0.5, calibration=[x], sequential=True)
    assert small.tdnn_plan["shared"].data_aware and isinstance(small.shared, tdnn.SVDLinear)
    one_shot = tdnn.compress_model(model, ranks=0.5, calibration=[x])
    with torch.no_grad():
        assert (small(x) - model(x)).norm() <= 1.05 * (one_shot(x) - model(x)).norm()


def test_a_failure_leaves_an_in_place_model_as_it_was(monkeypatch):
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(64, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_children())
    real, calls = tdnn.SVDLinear.from_dense.__func__, []

    def failing(cls, layer, rank, **kwargs):
        calls.append(rank)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(cls, layer, rank, **kwargs)

    monkeypatch.setattr(tdnn.SVDLinear, "from_dense", classmethod(failing))
    with pytest.raises(RuntimeError, match="disk on fire"):
        tdnn.compress_model(model, ranks=0.5, calibration=[x], sequential=True, inplace=True)
    assert dict(model.named_children()) == modules and not hasattr(model, "tdnn_plan")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- 6. optimize_for_inference and outputs kept as a side effect --------------------------------

class KeepsFeature(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.feat = None

    def forward(self, x):
        y = self.conv(x)
        self.feat = y  # kept for a later reader, e.g. a feature-matching loss
        return self.bn(y)


def test_no_fold_into_a_layer_whose_output_is_kept_after_the_call():
    torch.manual_seed(0)
    model, x = KeepsFeature().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model(x)
    feature = model.feat.clone()
    fast = tdnn.optimize_for_inference(model, x, memory_format="contiguous")
    assert fast.tdnn_inference.folded == []
    with torch.no_grad():
        fast(x)
    torch.testing.assert_close(fast.feat, feature)


# -- 7. calibration data ------------------------------------------------------------------------

def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 4))


def test_non_finite_calibration_data_is_refused_with_the_batch_named():
    bad = torch.randn(4, 8, 8, 8)
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"calibration batch 1 holds NaN or Inf"):
        tdnn.compress_model(conv_net(), ranks=0.5, calibration=[torch.randn(4, 8, 8, 8), bad])


def test_non_finite_activations_are_refused_with_the_layer_named():
    net = conv_net()
    with torch.no_grad():
        net[0].weight.mul_(1e30)  # finite weights and inputs, but float32 overflows inside the model
    with pytest.raises(ValueError, match=r"^3: calibration inputs of this layer hold NaN or Inf"):
        tdnn.compress_model(net, ranks=0.5, calibration=[torch.randn(4, 8, 8, 8) * 1e10])


def test_a_single_tensor_as_calibration_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"calibration=\[x\]"):
        tdnn.compress_model(conv_net(), ranks=0.5, calibration=torch.randn(4, 8, 8, 8))


def test_a_loader_of_inputs_and_labels_gets_a_clear_error():
    loader = DataLoader(TensorDataset(torch.randn(16, 8, 8, 8), torch.randint(0, 4, (16,))), batch_size=8)
    with pytest.raises(ValueError, match=r"calibration batch 0: .*model\(\*batch\).*\(x for x, _ in loader\)"):
        tdnn.compress_model(conv_net(), ranks=0.5, calibration=loader)


def test_unbatched_conv_inputs_use_the_channel_axis():
    conv = nn.Conv2d(8, 16, 3, dtype=torch.float64)
    x = torch.randn(8, 8, 10, dtype=torch.float64)  # unbatched (C, H, W) with C == H
    from tdnn.statistics.hooks import collect

    for geometry in ("channels", "patches"):
        unbatched = collect(conv, [x], {"c": (conv, geometry)})["c"].gram
        batched = collect(conv, [x[None]], {"c": (conv, geometry)})["c"].gram
        torch.testing.assert_close(unbatched, batched)


# -- 8. fine-tuning checkpoints -----------------------------------------------------------------

def tiny_run(directory, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]
    return tdnn.finetune(model, data, checkpoint_dir=directory, progress=False, **kwargs)


def test_an_unwritable_checkpoint_dir_fails_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(locked, os.W_OK):  # root writes anywhere: take a directory no one can write into
        locked = Path("/proc/self")
        if not locked.is_dir():
            pytest.skip("no unwritable directory to try")
    steps = []
    model = nn.Sequential(nn.Linear(6, 3))
    model.register_forward_hook(lambda m, a, out: steps.append(1))
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]
    with pytest.raises(ValueError, match=rf"checkpoint_dir {locked} is not writable"):
        tdnn.finetune(model, data, epochs=50, checkpoint_dir=locked, progress=False)
    assert steps == []  # refused before any training


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "step", "no_rng"])
def test_a_damaged_checkpoint_is_refused_with_its_path(damage, tmp_path):
    tiny_run(tmp_path, epochs=2)
    path = tmp_path / "last.pt"
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a checkpoint" * 10)
    else:
        state = torch.load(path, weights_only=True)
        if damage == "step":
            state["step"] = 10 ** 9
        else:
            del state["rng"]
        torch.save(state, path)
    with pytest.raises(ValueError, match=rf"^{path}: .*(delete it|another checkpoint_dir)"):
        tiny_run(tmp_path, epochs=2)


def test_resume_false_never_overwrites_a_file_tdnn_did_not_write(tmp_path):
    (tmp_path / "last.pt").write_text("my notes")
    with pytest.raises(ValueError, match=r"is not a tdnn.finetune checkpoint; refusing to overwrite"):
        tiny_run(tmp_path, resume=False)
    assert (tmp_path / "last.pt").read_text() == "my notes"
    tiny_run(tmp_path / "mine")
    assert tiny_run(tmp_path / "mine", resume=False).resumed_from is None  # its own file: overwritten


# -- 9. tampered checkpoint headers -------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    path = tmp_path / "m.safetensors"
    tdnn.save(tdnn.compress_model(net, ranks=0.5), path)
    return path


def tamper(path, change):
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    save_file(tensors, str(path), metadata=meta)


TAMPERING = {
    "plan without layers": (lambda m: m.update(plan="{}"), r"'plan': .*layers"),
    "layers not a list": (lambda m: m.update(plan='{"layers": "x"}'), r"'plan.layers' must be a list"),
    "no format_version": (lambda m: m.pop("format_version"), r"'format_version' is missing"),
    "bad JSON": (lambda m: m.update(layers="{not json"), r"'layers' is not valid JSON"),
    "string rel_error": (lambda m: m.update(layers=json.dumps(
        {k: {**v, "rel_error": "tiny"} for k, v in json.loads(m["layers"]).items()})), r"rel_error.* a number"),
    "rank of the wrong type": (lambda m: m.update(plan=json.dumps(
        {"layers": [{**e, "rank": str(e["rank"])} for e in json.loads(m["plan"])["layers"]]})),
        r"'plan.layers\[0\].rank'"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_tampered_header_is_refused_naming_the_file_and_field(case, saved, capsys):
    change, message = TAMPERING[case]
    tamper(saved, change)
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=rf"^{saved}: .*{message}"):
        tdnn.load(saved, fresh)
    from tdnn.cli import main

    assert main(["report", str(saved)]) == 2
    assert f"tdnn report: error: {saved}" in capsys.readouterr().err


# -- 10. the command line -----------------------------------------------------------------------

def test_cli_errors_for_a_missing_factory_and_a_bad_device(tmp_path, capsys, saved):
    from tdnn.cli import main

    assert main(["compress", str(ROOT / "configs/resnet18_digits.yaml"), "--model", "collections:missing",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "module collections has no 'missing'" in capsys.readouterr().err
    for device in ("gpu7", "cuda:3"):
        with pytest.raises(SystemExit) as exit_info:
            main(["finetune", str(saved), "--model", "m:f", "--out", "o", "--device", device])
        assert exit_info.value.code == 2
        assert "--device" in capsys.readouterr().err


def headless_classifier():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_a_model_without_a_named_head_is_fine_when_its_class_count_matches():
    from tdnn._vision import build_model

    model = build_model(f"{__name__}:headless_classifier", num_classes=10)
    assert isinstance(model[3], nn.Linear) and model[3].out_features == 10
    with pytest.raises(ValueError, match=r"cannot find the classifier .* gives 10 classes, not 7"):
        build_model(f"{__name__}:headless_classifier", num_classes=7)


# -- 11. minor ----------------------------------------------------------------------------------

def test_compressing_a_compressed_model_says_so():
    small = tdnn.compress_model(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), ranks=4)
    with pytest.raises(ValueError, match=r"already factorized"):
        tdnn.compress_model(small, ranks=2)


def test_errors_of_a_ranks_callable_name_the_layer():
    def ranks(name, module):
        return {"0": 4}[name]

    with pytest.raises(ValueError, match=r"^1: the ranks callable raised KeyError: '1'"):
        tdnn.compress_model(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), ranks=ranks)


def test_load_into_a_meta_model_needs_assign(saved):
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"meta device.*assign=True"):
        tdnn.load(saved, skeleton)


def test_save_does_not_replace_a_read_only_file(saved):
    saved.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    before = saved.read_bytes()
    with pytest.raises(PermissionError, match="read-only"):
        tdnn.save(nn.Sequential(nn.Linear(2, 2)), saved)
    assert saved.read_bytes() == before
