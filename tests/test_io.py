"""Save / load / apply_plan: bit-identical round trips, ties, atomic writes, clear mismatch errors,
tampered and fuzzed checkpoint headers."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import tdnn
from tdnn.analysis.report import checkpoint_report
from tdnn.deploy import io
from models import TinyTransformer, calib_net, json_values, mlp16, resnet18, saved_mlp16


def transformer():
    torch.manual_seed(0)
    return TinyTransformer().eval()


def small_net():
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def outputs_equal(a, b):
    a, b = (a,) if torch.is_tensor(a) else a, (b,) if torch.is_tensor(b) else b
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# Every method on resnet18: CP in layer1, SVD k×k convs in layer2, Tucker-2 elsewhere, SVD 1×1 and fc.
RESNET_RANKS = {"conv1": None, "fc": 4, "re:layer1\\..*": tdnn.LayerSpec(16, method="cp"),
                "re:layer2\\..*": tdnn.LayerSpec(16, method="svd"), "re:.*": 16}
CASES = {
    "resnet18": (resnet18, lambda: torch.randn(2, 3, 32, 32), {"ranks": RESNET_RANKS}),
    "transformer": (transformer, lambda: torch.randint(0, 100, (3, 12)), {"ranks": 0.5}),
}


@pytest.fixture(scope="module", params=list(CASES))
def compressed(request):
    build, inputs, kwargs = CASES[request.param]
    torch.manual_seed(1)
    return build, inputs(), tdnn.compress_model(build(), **kwargs).eval()


def test_save_load_is_bit_identical(compressed, tmp_path):
    build, x, small = compressed
    path = tmp_path / "model.safetensors"
    tdnn.save(small, path)
    fresh = build()  # new random dense weights, same architecture
    loaded = tdnn.load(path, fresh).eval()
    assert outputs_equal(loaded(x), small(x))
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in small.named_modules()]
    assert loaded.tdnn_plan.to_dict() == small.tdnn_plan.to_dict()
    for (name, a), (_, b) in zip(loaded.named_modules(), small.named_modules()):
        if isinstance(a, tdnn.Factorized):
            assert (a.rank, a.rel_error, a.dense_kwargs) == (b.rank, b.rel_error, b.dense_kwargs), name
    header = io.read_header(path)
    assert header["tdnn_version"] == tdnn.__version__ and header["format_version"] == io.FORMAT_VERSION


def test_state_dict_and_apply_plan_round_trip(compressed):
    build, x, small = compressed
    plan = json.loads(json.dumps(small.tdnn_plan.to_dict()))  # as a user would store it
    rebuilt = tdnn.apply_plan(build(), plan)
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    assert outputs_equal(rebuilt.eval()(x), small(x))
    assert isinstance(rebuilt.tdnn_plan, tdnn.Plan)


def test_torch_save_whole_module(compressed, tmp_path):
    _, x, small = compressed
    torch.save(small, tmp_path / "whole.pt")
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert outputs_equal(again(x), small(x))
    assert again.tdnn_plan == small.tdnn_plan


def test_checkpoint_is_one_file_without_pickle(tmp_path):
    small = tdnn.compress_model(small_net(), ranks=0.5)
    tdnn.save(small, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == ["m.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o666 & ~umask  # not private
    tensors = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert set(tensors) == set(small.state_dict())
    plan = io.read_header(tmp_path / "m.safetensors")["plan"]
    assert [(e.name, e.method, e.rank) for e in plan.layers] == [
        ("0", "tucker2", small[0].rank), ("2", "tucker2", small[2].rank), ("4", "svd", small[4].rank),
        ("6", "svd", small[6].rank)]


def test_shared_and_tied_weights_survive(tmp_path):
    def build():
        torch.manual_seed(0)
        shared = nn.Linear(32, 32)
        net = nn.Sequential(nn.Embedding(10, 32), shared, nn.ReLU(), shared, nn.Linear(32, 10, bias=False))
        net[4].weight = net[0].weight  # tied embedding / output projection, left dense
        return net

    small = tdnn.compress_model(build(), ranks={"1": 8})
    tdnn.save(small, tmp_path / "m.safetensors")
    stored = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert "3.first.weight" not in stored and "4.weight" not in stored  # stored once
    loaded = tdnn.load(tmp_path / "m.safetensors", build())
    assert loaded[1] is loaded[3] and isinstance(loaded[1], tdnn.SVDLinear)
    assert loaded[4].weight is loaded[0].weight
    tokens = torch.randint(0, 10, (4, 5))
    assert torch.equal(loaded(tokens), small(tokens))


def test_root_layer_and_already_compressed_target(tmp_path):
    small = tdnn.compress_model(nn.Linear(64, 48), ranks=6)
    tdnn.save(small, tmp_path / "root.safetensors")
    loaded = tdnn.load(tmp_path / "root.safetensors", nn.Linear(64, 48))
    x = torch.randn(3, 64)
    assert isinstance(loaded, tdnn.SVDLinear) and torch.equal(loaded(x), small(x))
    # loading into a model that already has the planned structure (e.g. to resume) works too
    other = tdnn.compress_model(nn.Linear(64, 48), ranks=6)
    assert torch.equal(tdnn.load(tmp_path / "root.safetensors", other)(x), small(x))


def test_load_on_meta_device_with_assign(tmp_path):
    small = tdnn.compress_model(small_net(), ranks=0.5)
    tdnn.save(small, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = small_net()
    loaded = tdnn.load(tmp_path / "m.safetensors", skeleton, assign=True)
    assert not any(p.is_meta for p in loaded.parameters())
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(loaded(x), small(x))


def test_train_mode_frozen_and_half_precision_round_trip(tmp_path):
    net = small_net().train().to(torch.bfloat16)
    net[0].requires_grad_(False)
    small = tdnn.compress_model(net, ranks=0.5)
    tdnn.save(small, tmp_path / "m.safetensors")
    fresh = small_net().train().to(torch.bfloat16)
    fresh[0].requires_grad_(False)
    loaded = tdnn.load(tmp_path / "m.safetensors", fresh)
    assert loaded.training and all(m.training for m in loaded.modules())
    assert [p.requires_grad for p in loaded[0].parameters()] == [False] * 4  # 3 factors + bias
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    x = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16)
    assert torch.equal(loaded(x), small(x))


# -- atomic writes -----------------------------------------------------------------------------

def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    tdnn.save(tdnn.compress_model(small_net(), ranks=0.5), path)
    before = path.read_bytes()

    real_save = safetensors.torch.save_file

    def crash_half_way(tensors, filename, metadata=None):  # the real writer, interrupted
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt("simulated crash during write")

    monkeypatch.setattr(io, "save_file", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        tdnn.save(tdnn.compress_model(small_net(), ranks=0.25), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_killed_writer_never_leaves_a_partial_checkpoint(tmp_path):
    """SIGKILL a process that keeps saving a ~12 MB model: the file at ``path`` always loads."""
    path = tmp_path / "big.safetensors"
    script = textwrap.dedent(f"""
        import sys, torch, tdnn
        factor = [tdnn.SVDLinear.structure(torch.nn.Linear(1024, 1024), 256) for _ in range(4)]
        small = torch.nn.Sequential(*factor, torch.nn.Linear(1024, 1024))  # weights are irrelevant here
        tdnn.save(small, {str(path)!r})
        print("ready", flush=True)
        while True:
            tdnn.save(small, {str(path)!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.7)  # several saves are under way by now
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stored = safetensors.torch.load_file(path)  # raises on a truncated or corrupt file
    assert len(stored) == 4 * 3 + 2
    header = io.read_header(path)
    assert len(header["plan"].factorized()) == 4


# -- mismatches --------------------------------------------------------------------------------

@pytest.fixture
def saved_small(tmp_path):
    path = tmp_path / "m.safetensors"
    tdnn.save(tdnn.compress_model(small_net(), ranks=0.5), path)
    return path


def test_wrong_layer_type_names_the_layer(saved_small):
    wrong = small_net()
    wrong[2] = nn.Linear(16, 16)
    params = [p.clone() for p in wrong.parameters()]
    with pytest.raises(ValueError, match=r"^.*m.safetensors: 2: the plan has a Conv2d layer here, the model a Linear$"):
        tdnn.load(saved_small, wrong)
    assert type(wrong[0]) is nn.Conv2d  # nothing was changed
    assert all(torch.equal(a, b) for a, b in zip(params, wrong.parameters()))


def test_missing_layer_names_the_layer(saved_small):
    with pytest.raises(ValueError, match=r"^.*m.safetensors: 4: the plan has a Linear layer here that the model does not have"):
        tdnn.load(saved_small, small_net()[:4])


def test_wrong_shape_names_the_first_mismatching_layer(saved_small):
    wrong = small_net()
    wrong[4] = nn.Linear(16 * 4 * 4, 40)
    wrong[6] = nn.Linear(40, 5)
    with pytest.raises(ValueError, match=r"^.*m.safetensors: 4: the model's layer Linear\(in_features=256, out_features=40.*"
                                         r"does not match the saved layer Linear"):
        tdnn.load(saved_small, wrong)


def test_extra_layer_in_model_is_named(saved_small):
    bigger = nn.Sequential(*small_net(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^.*m.safetensors: 7: the checkpoint has no '7.weight'"):
        tdnn.load(saved_small, bigger)


def test_apply_plan_mismatches():
    plan = tdnn.compress_model(small_net(), ranks=0.5).tdnn_plan
    other = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3))
    with pytest.raises(ValueError, match=r"^0: the plan uses method 'tucker2', which does not apply to Conv2d"):
        tdnn.apply_plan(other, plan)
    narrow = small_net()
    narrow[2] = nn.Conv2d(16, 2, 3)
    with pytest.raises(ValueError, match=r"^2: rank=\(\d+, \d+\) exceeds the full rank \(2, 16\)"):
        tdnn.apply_plan(narrow, plan)
    with pytest.raises(ValueError, match=r"^0: method: unknown method 'tuker'"):
        tdnn.apply_plan(small_net(), {"layers": [{"name": "0", "kind": "Conv2d", "method": "tuker", "rank": 2}]})
    with pytest.raises(TypeError, match=r"plan must be a tdnn.Plan or its to_dict\(\), got list"):
        tdnn.apply_plan(small_net(), [])


def test_not_a_tdnn_checkpoint(tmp_path):
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"plain.safetensors: not a tdnn checkpoint .*write it with tdnn.save"):
        tdnn.load(tmp_path / "plain.safetensors", small_net())
    torch.save(small_net().state_dict(), tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match=r"pickle.pt: not a tdnn checkpoint \(cannot read it as safetensors"):
        tdnn.load(tmp_path / "pickle.pt", small_net())
    with pytest.raises(FileNotFoundError):
        tdnn.load(tmp_path / "missing.safetensors", small_net())


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    tdnn.save(tdnn.compress_model(small_net(), ranks=0.5), path)
    tensors = safetensors.torch.load_file(path)
    header = io.read_header(path)
    meta = {"format": io.FORMAT, "format_version": "99", "tdnn_version": "9.0",
            "plan": json.dumps(header["plan"].to_dict()), "layers": "{}", "aliases": "{}"}
    safetensors.torch.save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match=r"format version 99 \(tdnn 9.0\) is newer than this tdnn reads \(1\)"):
        tdnn.load(path, small_net())


def test_save_refuses_meta_and_non_tensor_state(tmp_path):
    with torch.device("meta"):
        meta = small_net()
    with pytest.raises(ValueError, match=r"^0: '0.weight' is on the meta device"):
        tdnn.save(meta, tmp_path / "m.safetensors")

    class WithExtra(nn.Linear):
        def get_extra_state(self):
            return {"step": 3}

    with pytest.raises(TypeError, match=r"^0: state_dict entry '0._extra_state' is a dict, not a tensor"):
        tdnn.save(nn.Sequential(WithExtra(4, 4)), tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_plan_details_kept_and_hand_built_models_described(tmp_path):
    calibrated = tdnn.compress_model(small_net(), ranks=0.5, calibration=[torch.randn(4, 8, 6, 6)]).eval()
    assert all(e.data_aware for e in calibrated.tdnn_plan.factorized())
    tdnn.save(calibrated, tmp_path / "c.safetensors")
    loaded = tdnn.load(tmp_path / "c.safetensors", small_net()).eval()
    assert loaded.tdnn_plan == calibrated.tdnn_plan
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(loaded(x), calibrated(x))

    # no tdnn_plan at all: the plan is read off the factorized modules
    torch.manual_seed(0)
    hand = nn.Sequential(tdnn.SVDLinear.from_dense(nn.Linear(40, 30), 5), nn.ReLU(), nn.Linear(30, 3))
    tdnn.save(hand, tmp_path / "h.safetensors")
    plan = io.read_header(tmp_path / "h.safetensors")["plan"]
    assert [(e.name, e.method, e.rank, e.reason) for e in plan.layers] == [
        ("0", "svd", 5, None), ("2", None, None, "not compressed")]
    fresh = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3))
    x = torch.randn(4, 40)
    assert torch.equal(tdnn.load(tmp_path / "h.safetensors", fresh)(x), hand(x))


# -- tied weights ------------------------------------------------------------------------------

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


# -- tampered checkpoint headers ---------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    return saved_mlp16(tmp_path)


def tamper(path, change, add=None):
    """Rewrite the checkpoint ``path`` with ``change(metadata)`` applied and the tensors ``add`` added."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    save_file({**tensors, **(add or {})}, str(path), metadata=meta)


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
    "nested 100,000 deep": (lambda m: m.update(layers="[" * 100_000 + "]" * 100_000),
                            r"'layers' is nested too deeply to be a tdnn header"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_tampered_header_is_refused_naming_the_file_and_field(case, saved, capsys):
    change, message = TAMPERING[case]
    tamper(saved, change)
    fresh = mlp16()
    with pytest.raises(ValueError, match=rf"^{saved}: .*{message}"):
        tdnn.load(saved, fresh)
    from tdnn.cli import main

    assert main(["report", str(saved)]) == 2
    assert f"tdnn report: error: {saved}" in capsys.readouterr().err


def stray_alias(meta):
    meta["aliases"] = '{"2.weight": "9.weight"}'  # no tensor '9.weight' is stored


def test_an_alias_to_a_tensor_not_stored_is_refused(saved):
    tamper(saved, stray_alias)
    with pytest.raises(ValueError, match=rf"^{saved}: damaged tdnn checkpoint: 'aliases' maps '2.weight' to "
                                         r"'9.weight', which the file does not hold"):
        tdnn.load(saved, mlp16())


def test_the_report_of_an_alias_to_a_tensor_not_stored_names_the_file(saved, capsys):
    from tdnn.cli import main

    tamper(saved, stray_alias)
    assert main(["report", str(saved)]) == 2
    assert f"tdnn report: error: {saved}: " in capsys.readouterr().err


def test_a_buffer_of_a_module_the_model_lacks_is_refused(saved):
    tamper(saved, lambda m: None, add={io.BUFFERS + "rotary.inv_freq": torch.ones(4)})
    with pytest.raises(ValueError, match=rf"^{saved}: the checkpoint stores the buffer 'rotary.inv_freq', but the "
                                         r"model has no module 'rotary'"):
        tdnn.load(saved, mlp16())


def test_save_into_a_missing_directory_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"the directory {tmp_path / 'missing'} does not exist"):
        tdnn.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "missing" / "m.safetensors")


def test_load_into_a_meta_model_needs_assign(saved):
    with torch.device("meta"):
        skeleton = mlp16()
    with pytest.raises(ValueError, match=r"meta device.*assign=True"):
        tdnn.load(saved, skeleton)


def test_save_does_not_replace_a_read_only_file(saved):
    saved.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    before = saved.read_bytes()
    with pytest.raises(PermissionError, match="read-only"):
        tdnn.save(nn.Sequential(nn.Linear(2, 2)), saved)
    assert saved.read_bytes() == before


# -- fuzz: checkpoint headers ------------------------------------------------------------------

@st.composite
def header_damage(draw):
    """One change to a checkpoint's metadata: a key dropped, a value replaced by text or by JSON
    of another shape, or one field deep inside the plan or layer records replaced."""
    key = draw(st.sampled_from(["format_version", "tdnn_version", "plan", "layers", "aliases"]))
    how = draw(st.sampled_from(["drop", "text", "json", "plan_field", "layer_field"]))
    value = draw(json_values())
    field = draw(st.sampled_from(["name", "kind", "method", "rank", "reason", "data_aware", "latency_ratio",
                                  "bogus", "class", "dense_kwargs", "rel_error"]))
    return key, how, value, field, draw(st.text(max_size=8))


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    torch.manual_seed(0)
    tdnn.save(tdnn.compress_model(calib_net(), ranks=0.5).eval(), path)
    return path


FUZZ_HEADER = settings(max_examples=150, deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.slow
@FUZZ_HEADER
@given(damage=header_damage())
def test_fuzz_checkpoint_headers(saved_bytes, tmp_path_factory, damage):
    """A damaged header loads to the very model that was saved, or is refused with a ValueError
    naming the file; never a KeyError, AttributeError or a crash in repr or the report."""
    key, how, value, field, text = damage
    with safe_open(str(saved_bytes), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if how == "drop":
        meta.pop(key)
    elif how == "text":
        meta[key] = text
    elif how == "json":
        meta[key] = json.dumps(value)
    elif how == "plan_field":
        plan = json.loads(meta["plan"])
        plan["layers"][0][field] = value
        meta["plan"] = json.dumps(plan)
    else:
        layers = json.loads(meta["layers"])
        next(iter(layers.values()))[field] = value
        meta["layers"] = json.dumps(layers)
    path = tmp_path_factory.mktemp("damaged") / "m.safetensors"
    save_file(tensors, str(path), metadata=meta)
    x = torch.randn(2, 3, 6, 6)
    try:
        loaded = tdnn.load(path, calib_net()).eval()
        repr(loaded)
        str(tdnn.report(loaded))
        str(checkpoint_report(path))
    except ValueError as err:
        assert str(err).startswith(f"{path}: ") or str(path) in str(err), err
        return
    reference = tdnn.load(saved_bytes, calib_net()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
