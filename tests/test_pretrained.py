"""The Hugging Face round trip: save_pretrained, then from_pretrained in a fresh process from the
directory alone: bit-identical logits, the compressed parameter count, ties, the same generation.
A directory is data: nothing it names is imported, its weights stay inside it, damaged files are
refused naming them (and a fuzz of both files); a failed save leaves the previous one whole."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import models
import tdnn
from models import gpt2, json_values

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


# -- a directory is data -----------------------------------------------------------------------

CONFIG = "tdnn_config.json"
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))  # tiny_llama's vocabulary


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A compressed tiny LLaMA written once by save_pretrained: its directory and logits."""
    small = tdnn.compress_model(models.tiny_llama(), ranks=0.5)
    directory = tmp_path_factory.mktemp("pretrained") / "small"
    tdnn.save_pretrained(small, directory)
    return directory, logits(small)


@pytest.fixture
def saved(saved_llama, tmp_path):
    """A copy of ``saved_llama``'s directory, for a test to damage."""
    return Path(shutil.copytree(saved_llama[0], tmp_path / "small"))


def rewrite(path, values=(), *, drop=()):
    """Rewrite the JSON file ``path`` with ``values`` set and the keys ``drop`` removed."""
    data = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps({**data, **dict(values)}))


def named(path):
    """A regex matching an error message that starts with ``path``."""
    return f"^{re.escape(str(path))}: "


EVILMOD = "import pathlib\npathlib.Path('ran').write_text('code of the directory ran')\nclass Evil: pass\n"


def hostile(directory, monkeypatch):
    """``directory`` as the working directory with '' on sys.path (as for ``python -c`` run there) and
    an ``evilmod.py`` in it; ``os.system`` records its calls. Returns the calls."""
    (directory / "evilmod.py").write_text(EVILMOD)
    monkeypatch.chdir(directory)
    monkeypatch.syspath_prepend("")
    for name in ("this", "evilmod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args) or 0)
    return calls


def nothing_ran(directory, calls):
    return calls == [] and "this" not in sys.modules and "evilmod" not in sys.modules \
        and not (directory / "ran").exists()


@pytest.mark.parametrize("module, name", [("os", "system"), ("this", "this"), ("evilmod", "Evil")])
def test_a_class_the_files_name_is_never_imported_or_called(saved, monkeypatch, module, name):
    calls = hostile(saved, monkeypatch)
    rewrite(saved / CONFIG, {"module": module, "class": name})
    with pytest.raises(ValueError, match=named(saved / CONFIG) + f"'class' names '{name}', not one of transformers'"):
        tdnn.from_pretrained(saved)
    assert nothing_ran(saved, calls)


def test_model_class_must_be_a_transformers_model_class(saved, saved_llama):
    rewrite(saved / CONFIG, {"class": "Unknown"})
    assert torch.equal(logits(tdnn.from_pretrained(saved, model_class=transformers.LlamaForCausalLM)), saved_llama[1])
    with pytest.raises(TypeError, match=r"model_class must be a class \(a transformers model\), got str"):
        tdnn.from_pretrained(saved, model_class="LlamaForCausalLM")
    for cls in (dict, nn.Linear):
        with pytest.raises(ValueError, match=named(saved) + f"{cls.__name__} is not a transformers model class"):
            tdnn.from_pretrained(saved, model_class=cls)


@pytest.mark.parametrize("how", ["absolute", "relative", "symlink"])
def test_weights_outside_the_directory_are_refused(saved, saved_llama, how):
    outside = saved_llama[0] / "tdnn_model.safetensors"  # a good checkpoint, elsewhere
    name = {"absolute": str(outside), "relative": os.path.relpath(outside, saved), "symlink": "link.safetensors"}[how]
    if how == "symlink":
        (saved / name).symlink_to(outside)
    rewrite(saved / CONFIG, {"weights": name})
    with pytest.raises(ValueError, match=named(saved / CONFIG) + "'weights' must be a file name inside the directory"):
        tdnn.from_pretrained(saved)


@pytest.mark.parametrize("damage, kwargs, file, message", [
    (lambda d: rewrite(d / CONFIG, drop=["weights"]), {}, CONFIG, "'weights' must name the weights file, got 'None'"),
    (lambda d: rewrite(d / CONFIG, {"weights": 123}), {}, CONFIG, "'weights' must name the weights file, got '123'"),
    (lambda d: (d / CONFIG).write_text("{not json"), {}, CONFIG, r"not valid JSON \(JSONDecodeError\)"),
    (lambda d: rewrite(d / CONFIG, {"module": "transformers", "class": "GPT2LMHeadModel"}), {}, CONFIG,
     "'class' names 'GPT2LMHeadModel', not one of transformers' model classes for model_type 'llama'"),
    (lambda d: (d / "config.json").write_text(transformers.GPT2Config(n_layer=1).to_json_string()), {}, CONFIG,
     "'class' names 'LlamaForCausalLM', not one of transformers' model classes for model_type 'gpt2'"),
    (lambda d: None, {"model_class": transformers.GPT2LMHeadModel}, "config.json",
     r"a LlamaConfig cannot build GPT2LMHeadModel \(AttributeError: .*embd_pdrop"),
], ids=["no weights", "weights 123", "not JSON", "another class", "another config", "another model_class"])
def test_damaged_files_are_refused_naming_the_file(saved, damage, kwargs, file, message):
    damage(saved)
    with pytest.raises(ValueError, match=named(saved / file) + message):
        tdnn.from_pretrained(saved, **kwargs)


@pytest.mark.parametrize("values", [{"hidden_size": 33}, {"num_attention_heads": 0}, {"vocab_size": -5},
                                    {"torch_dtype": "evil"}], ids=lambda v: next(iter(v)))
def test_a_config_value_transformers_cannot_use_is_refused_naming_the_file(saved, values):
    rewrite(saved / "config.json", values)
    with pytest.raises(ValueError, match=named(saved / "config.json")):
        tdnn.from_pretrained(saved)


class ExtraState(nn.Module):
    def get_extra_state(self):
        return {"step": 3}  # not a tensor: tdnn.save refuses it


def unsaveable(how):
    """A LLaMA of another config (3 layers: a half-written directory would not load) that save refuses."""
    if how == "meta":
        with torch.device("meta"):
            return models.tiny_llama(layers=3)
    model = models.tiny_llama(layers=3)
    model.add_module("extra", ExtraState())
    return model


@pytest.mark.parametrize("how, error", [("meta", "is on the meta device"), ("extra state", "is a dict, not a tensor")])
def test_a_failed_save_leaves_the_previous_save_whole(saved, saved_llama, tmp_path, how, error):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = unsaveable(how)
    with pytest.raises((ValueError, TypeError), match=error):
        tdnn.save_pretrained(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert torch.equal(logits(tdnn.from_pretrained(saved)), saved_llama[1])
    with pytest.raises((ValueError, TypeError), match=error):
        tdnn.save_pretrained(model, tmp_path / "new")
    assert os.listdir(tmp_path) == ["small"]  # no config without weights, no temporary left


def test_a_symlinked_config_is_replaced_not_written_through(saved_llama, tmp_path):
    # the Hugging Face cache: snapshots/<revision>/config.json -> ../../blobs/<hash>, shared by revisions
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    (blobs / "config").write_text('{"model_type": "llama"}')
    (blobs / "tokenizer").write_text("{}")
    (snapshot / "config.json").symlink_to("../../blobs/config")
    (snapshot / "tokenizer.json").symlink_to("../../blobs/tokenizer")
    tdnn.save_pretrained(tdnn.from_pretrained(saved_llama[0]), snapshot)
    assert (blobs / "config").read_text() == '{"model_type": "llama"}'
    assert not (snapshot / "config.json").is_symlink()
    assert os.readlink(snapshot / "tokenizer.json") == "../../blobs/tokenizer"  # carried over as a link
    assert torch.equal(logits(tdnn.from_pretrained(snapshot)), saved_llama[1])


def test_a_directory_with_dense_weights_is_refused(saved_llama, tmp_path):
    models.tiny_llama().save_pretrained(tmp_path)  # a plain Hugging Face directory
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))} holds model.safetensors, a dense model's weights"):
        tdnn.save_pretrained(tdnn.from_pretrained(saved_llama[0]), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # transformers loads what it did


# -- fuzz: tdnn_config.json and config.json ----------------------------------------------------

# Names an attacker (or damage) could put in either file: modules, callables, classes, paths.
NAMES = ["os", "system", "this", "evilmod", "Evil", "builtins", "eval", "LlamaForCausalLM", "LlamaModel",
         "GPT2LMHeadModel", "AutoModelForCausalLM", "PreTrainedModel", "tdnn_model.safetensors", "config.json",
         CONFIG, "evilmod.py", "../small/tdnn_model.safetensors", ".", "..", "", "llama", "gpt2", "bert",
         "tdnn-pretrained", "evilmod.Evil"]
VALUES = st.sampled_from(NAMES) | json_values()


@st.composite
def damaged_json(draw, keys):
    """A file's text: the valid JSON with some of ``keys`` dropped or replaced, other JSON, or any text."""
    how = draw(st.sampled_from(["edit", "edit", "edit", "json", "text", "missing"]))
    if how == "json":
        return json.dumps(draw(json_values()))
    if how == "text":
        return draw(st.text(max_size=20))
    if how == "missing":
        return None
    return {key: draw(st.none() | VALUES) for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3))}


def write_damaged(path, damage):
    if damage is None:
        path.unlink()
    elif isinstance(damage, str):
        path.write_text(damage)
    else:
        rewrite(path, {k: v for k, v in damage.items() if v is not None}, drop=[k for k, v in damage.items() if v is None])


@pytest.mark.slow
@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ours=damaged_json(["format", "weights", "class", "module", "model_type", "tdnn_version"]),
       theirs=damaged_json(["model_type", "architectures", "auto_map", "transformers_version"]))
def test_fuzz_pretrained_directories(saved_llama, ours, theirs):
    """Whatever the two files say, from_pretrained loads a model or refuses naming a file of the
    directory, and imports nothing but transformers' own modules."""
    directory = saved_llama[0].parent / "fuzzed"  # a sibling: '../small/...' is a good checkpoint outside
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(saved_llama[0], directory)
    write_damaged(directory / CONFIG, ours)
    write_damaged(directory / "config.json", theirs)
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = hostile(directory, monkeypatch)
        before = set(sys.modules)
        try:
            model = tdnn.from_pretrained(directory)
        except (ValueError, FileNotFoundError) as err:  # the file: an OSError's filename, or what a message starts with
            named = getattr(err, "filename", None) or str(err).partition(": ")[0]
            assert Path(named).parent == directory and str(err).startswith(("[Errno", str(directory))), err
        else:
            assert isinstance(model, transformers.PreTrainedModel)
        imported = set(sys.modules) - before
        assert nothing_ran(directory, calls)
    assert all(name.startswith("transformers.") for name in imported), sorted(imported)
