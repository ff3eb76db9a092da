"""finetune: labels, distillation, exact resume (in process, after SIGKILL, with samplers drawing from
the global RNG), torchrun DDP and FSDP2, checkpoints that are unwritable, damaged, not ours, written
for another model or other data, or in use by another run."""

import contextlib
import importlib.util
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset, WeightedRandomSampler

import tdnn
from tdnn.finetune import distillation_loss, global_batch_sizes
import models
from models import digits_mlp

WORKER = Path(__file__).with_name("finetune_worker.py")
_spec = importlib.util.spec_from_file_location("finetune_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def digits():
    x, y = models.digits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1300], perm[1300:]
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="module")
def teacher(digits):
    """A dense MLP trained from labels with finetune itself."""
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = digits_mlp()
    data = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    tdnn.finetune(model, data, epochs=8, lr=0.1, progress=False)
    return model.eval()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def kl_to(teacher, student, x):
    with torch.no_grad():
        return distillation_loss(student.eval()(x), teacher.eval()(x), temperature=1.0).item()


def test_labels_train_a_classifier(teacher, digits):
    _, _, xt, yt = digits
    assert accuracy(teacher, xt, yt) > 0.93


def test_distillation_lowers_kl_on_held_out_inputs(teacher, digits):
    x, _, xt, yt = digits
    student = tdnn.compress_model(teacher, ranks={"0": 6, "2": None})  # rank 6 of 64
    before, acc_before = kl_to(teacher, student, xt), accuracy(student, xt, yt)
    unlabelled = DataLoader(TensorDataset(x), batch_size=64, shuffle=True)  # inputs only
    frozen = [t.clone() for t in teacher.state_dict().values()]
    result = tdnn.finetune(student, unlabelled, teacher=teacher, epochs=6, lr=0.05, progress=False)
    after, acc_after = kl_to(teacher, student, xt), accuracy(student, xt, yt)
    print(f"KL to teacher on held-out digits: {before:.4f} -> {after:.4f}; "
          f"top-1 {acc_before:.3f} -> {acc_after:.3f}")
    assert result.steps == 6 * 19  # 2 of the 21 batches held out to judge the weights by
    assert after < 0.25 * before
    assert acc_after > acc_before
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.state_dict().values()))


def test_mixed_loss_and_eval_callback(teacher, digits):
    x, y, xt, yt = digits
    student = tdnn.compress_model(teacher, ranks=0.3)
    before = accuracy(student, xt, yt)
    seen_modes = []

    def evaluate(model):
        seen_modes.append(model.training)
        return {"top1": accuracy(model, xt, yt)}

    data = DataLoader(TensorDataset(x, y), batch_size=100)
    result = tdnn.finetune(student, data, teacher=teacher, alpha=0.3, epochs=2, lr=0.05,
                           eval_fn=evaluate, progress=False)
    assert result.epochs == 2 and len(result.evals) == 2 and seen_modes == [False, False]
    assert result.evals[-1]["top1"] > before + 0.05
    assert student.training is False  # finetune restores the mode it found


class Crash(Exception):
    pass


class CrashingDigits(Dataset):
    """Raises when the ``crash_after``-th sample is fetched, like a job dying mid-epoch."""

    def __init__(self, x, y, crash_after=None):
        self.x, self.y, self.crash_after, self.fetched = x, y, crash_after, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.fetched += 1
        if self.crash_after is not None and self.fetched >= self.crash_after:
            raise Crash
        return self.x[i], self.y[i]


def run_resumable(digits, tmp_path, crash_after=None, max_steps=None):
    x, y, _, _ = digits
    torch.manual_seed(0)
    teacher = digits_mlp(dropout=True)
    student = tdnn.compress_model(teacher, ranks=0.3)
    data = DataLoader(CrashingDigits(x, y, crash_after), batch_size=64, shuffle=True)
    result = tdnn.finetune(student, data, teacher=teacher, epochs=3, max_steps=max_steps, lr=0.05,
                           checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    return student, result


def test_crashed_and_resumed_run_equals_uninterrupted_run(digits, tmp_path):
    full, full_result = run_resumable(digits, tmp_path / "full")
    # 19 steps per epoch (2 of 21 batches held out, fetched first); crash in step 30 (epoch 2),
    # after the checkpoint at step 25. The best weights by the held-out KL are resumed too.
    with pytest.raises(Crash):
        run_resumable(digits, tmp_path / "cut", crash_after=2 * 64 + 29 * 64 + 10)
    resumed, resumed_result = run_resumable(digits, tmp_path / "cut")
    assert resumed_result.resumed_from == 25
    assert resumed_result.steps == full_result.steps == 57
    assert resumed_result.losses == full_result.losses and resumed_result.held_out == full_result.held_out
    assert resumed_result.best_step == full_result.best_step is not None
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # A finished run restarted with the same arguments is a no-op that keeps the weights.
    again, again_result = run_resumable(digits, tmp_path / "cut")
    assert again_result.resumed_from == 57 and len(again_result.losses) == 57
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values()))


def test_resume_with_other_settings_is_refused(digits, tmp_path):
    run_resumable(digits, tmp_path, max_steps=7)
    with pytest.raises(ValueError, match=r"different settings \(max_steps: 7 -> 8\)"):
        run_resumable(digits, tmp_path, max_steps=8)


HELD = 3 * 64  # samples each worker process fetches first: the 3 held-out batches of 28


def worker_weights(path):
    return torch.load(path, weights_only=True)


@pytest.mark.slow  # two training processes
def test_sigkilled_process_resumes_to_the_same_weights(tmp_path):
    full = worker.train(dropout=True)  # uninterrupted, in this process (also on one thread)
    run = [sys.executable, str(WORKER)]
    ckpt = tmp_path / "ckpt"
    killed = subprocess.run([*run, str(tmp_path / "cut.pt"), "--dropout", "--checkpoint-dir", str(ckpt),
                             "--kill-after", str(HELD + 33 * 64 + 5)], env=ENV, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert (ckpt / "last.pt").exists() and not (tmp_path / "cut.pt").exists()
    assert torch.load(ckpt / "last.pt", weights_only=True)["step"] == 30
    subprocess.run([*run, str(tmp_path / "cut.pt"), "--dropout", "--checkpoint-dir", str(ckpt)],
                   check=True, env=ENV, timeout=120)
    resumed = worker_weights(tmp_path / "cut.pt")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def launches_torchrun(test):
    """Marks a test that launches torchrun: ``distributed`` (and ``slow``), and in one xdist group so
    that no two launches run at once in two workers (each picks a free port; two at once could
    collide). The ``torchrun`` fixture also takes a lock around each launch: pytest-xdist 3.8's
    grouping has no effect with pytest 9.2 (pytest-xdist issue #1386)."""
    for mark in (pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("distributed")):
        test = mark(test)
    return test


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def exclusive(path):
    """Hold an exclusive lock on the file ``path`` (where there is fcntl; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    with open(path, "a") as f:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def torchrun(tmp_path_factory):
    """Run tests/finetune_worker.py under torchrun on 2 processes; one launch at a time among all
    the xdist workers of this run (they share the parent of their temporary directories)."""
    lock = tmp_path_factory.getbasetemp().parent / "tdnn-torchrun.lock"

    def launch(*args, check=True):
        with exclusive(lock):
            return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                                   "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                                   str(WORKER), *map(str, args)],
                                  check=check, env=ENV, timeout=180, capture_output=not check)

    return launch


def assert_matches_single_process(single, path, what):
    trained = worker_weights(path)
    assert trained.keys() == single.keys()
    diff = max((single[k] - trained[k]).abs().max().item() for k in single)
    print(f"{what} vs single process: max abs weight difference {diff:.3g}")
    for name in single:
        torch.testing.assert_close(trained[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def single_process_weights():
    return worker.train()


@launches_torchrun
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_matches_single_process(tmp_path, single_process_weights, parallel, torchrun):
    # fsdp: every parameter, gradient and momentum buffer sharded over the 2 processes (FSDP2 on
    # gloo); the worker checks the model it passed in comes back a plain nn.Sequential
    torchrun(tmp_path / "out.pt", "--parallel", parallel)
    assert_matches_single_process(single_process_weights, tmp_path / "out.pt", f"{parallel} (2 processes, gloo)")


@launches_torchrun
def test_fsdp_trains_a_tied_llama_like_one_process(tmp_path, torchrun):
    # FSDP2 over the 3 decoder blocks and the root, the teacher sharded too; only the factors train
    # (norms and the tied embedding frozen inside the same sharded groups); the worker checks the
    # lm_head/embedding tie survives and the model comes back plain; keep_best evaluates the
    # sharded model on every process and restores its weights
    pytest.importorskip("transformers")
    single = worker.train_llama()
    torchrun(tmp_path / "out.pt", "--llama", "--parallel", "fsdp")
    sharded = torch.load(tmp_path / "out.pt", weights_only=False)
    assert single["evals"][-1] < 0.8 * single["evals"][0], single["evals"]  # it learns
    assert sharded["best_step"] == single["best_step"]
    torch.testing.assert_close(sharded["evals"], single["evals"], rtol=1e-3, atol=0)
    for name, weight in single["state"].items():
        torch.testing.assert_close(sharded["state"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


@launches_torchrun
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_resumes_after_a_worker_is_killed(tmp_path, single_process_weights, parallel, torchrun):
    # a rank SIGKILLed at step ~33: torchrun stops the job; the relaunch resumes from step 30's
    # checkpoint (full weights and momentum; for fsdp gathered from the shards) to the same end
    ckpt = tmp_path / "ckpt"
    killed = torchrun(tmp_path / "out.pt", "--parallel", parallel, "--checkpoint-dir", ckpt,
                      "--kill-after", HELD + 33 * 32 + 5, check=False)
    assert killed.returncode != 0 and not (tmp_path / "out.pt").exists(), killed.stderr[-3000:]
    saved = torch.load(ckpt / "last.pt", weights_only=True)
    assert saved["step"] == 30 and saved["optimizer"]["state"], "momentum buffers are checkpointed"
    assert all(type(t) is torch.Tensor for t in saved["model"].values())  # full tensors, not shards
    torchrun(tmp_path / "out.pt", "--parallel", parallel, "--checkpoint-dir", ckpt)
    assert_matches_single_process(single_process_weights, tmp_path / "out.pt", f"{parallel} killed and resumed")


def test_global_batches_are_shared_out_evenly():
    # 1300 samples, global batch 64: 20 full batches and one of 20 (kept: 20 >= 2 processes).
    assert global_batch_sizes(1300, 64, drop_last=False, world=2) == [64] * 20 + [20]
    assert global_batch_sizes(1300, 64, drop_last=True, world=2) == [64] * 20
    assert global_batch_sizes(129, 64, drop_last=False, world=2) == [64, 64]  # 1 sample for 2


def test_bad_input_is_refused(teacher, digits):
    x, y, _, _ = digits
    student = tdnn.compress_model(teacher, ranks=0.3)
    with pytest.raises(ValueError, match="a batch has no labels"):
        tdnn.finetune(student, [x[:8]], progress=False)
    with pytest.raises(ValueError, match="needs a teacher"):
        tdnn.finetune(student, [(x[:8], y[:8])], alpha=0.5, progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        tdnn.finetune(student, iter([(x[:8], y[:8])]), progress=False)
    with pytest.raises(ValueError, match="epochs=0 must be a positive int"):
        tdnn.finetune(student, [(x[:8], y[:8])], epochs=0, progress=False)
    with pytest.raises(ValueError, match="optimizer='adam'"):
        tdnn.finetune(student, [(x[:8], y[:8])], optimizer="adam", progress=False)
    with pytest.raises(ValueError, match="parallel='zero3': choose 'ddp'"):
        tdnn.finetune(student, [(x[:8], y[:8])], parallel="zero3", progress=False)
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        from tdnn.finetune.data import EpochData
        EpochData(DataLoader(TensorDataset(x, y), batch_size=64), world=3, rank=0, seed=0)


def test_sharded_twins_keep_tensor_attributes_that_are_not_parameters():
    # FSDP's twin is made on the meta device; a plain tensor attribute (an alias of a buffer, as
    # some Hugging Face rotary embeddings keep, or a tensor of its own) must not stay on meta
    import copy as copying

    from tdnn.finetune.parallel import _aliases

    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)
            self.original = self.inv_freq  # an alias
            self.table = torch.ones(3)  # a tensor of its own

    model = nn.Sequential(Rotary())
    memo = {id(t): torch.empty_like(t, device="meta") for t in [*model.buffers(), model[0].table]}
    twin = copying.deepcopy(model, memo)
    twin.to_empty(device="cpu")
    assert twin[0].original.is_meta and twin[0].table.is_meta
    _aliases(model, twin)
    assert twin[0].original is twin[0].inv_freq and torch.equal(twin[0].table, model[0].table)
    assert twin[0].table is not model[0].table


# -- exact resume with samplers that draw from the global RNG ----------------------------------

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


# -- checkpoints: unwritable, damaged, not ours ------------------------------------------------

def tiny_run(directory, *, seed=0, data_seed=0, model=None, **kwargs):
    """A 6 -> 3 classifier (weights from ``seed``, unless ``model`` is given) fine-tuned on 3 batches
    (from ``data_seed``), checkpointed in ``directory``."""
    torch.manual_seed(seed)
    model = model if model is not None else nn.Sequential(nn.Linear(6, 3))
    g = torch.Generator().manual_seed(data_seed)
    data = [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
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


# -- resuming what was started from other weights or data; two runs on one directory -----------

OTHER_RUNS = {  # what a second run on the same checkpoint_dir changes, and what the refusal says
    "another model of the same shapes": (lambda: {"seed": 1}, "another model"),
    "other data of the same length": (lambda: {"data_seed": 1}, "other data"),
    "another architecture": (lambda: {"model": nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))},
                             "another model"),
}


@pytest.mark.parametrize("case", list(OTHER_RUNS))
def test_a_checkpoint_is_resumed_only_by_the_run_it_was_written_for(tmp_path, case):
    other, what = OTHER_RUNS[case]
    tiny_run(tmp_path, epochs=2)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'last.pt'}: was written for {what} .* than this run's; "
                                         r".*pass resume=False"):
        tiny_run(tmp_path, epochs=2, **other())
    assert tiny_run(tmp_path, epochs=2, resume=False, **other()).steps > 0


def test_an_eval_fn_may_return_a_numpy_number():
    scores = iter(np.arange(1, 10, dtype=np.float32))  # better at every evaluation
    result = tiny_run(None, epochs=2, eval_fn=lambda model: next(scores), keep_best="max")
    assert result.best_step == result.steps > 0 and result.best_eval == 3.0  # before training, after each epoch


@pytest.mark.slow  # two training processes
def test_a_second_run_on_one_checkpoint_dir_is_refused_and_the_first_unharmed(tmp_path, single_process_weights):
    # started together, slowed (~7 s of training): whichever locks the directory first trains, the
    # other is refused at once naming it, and the first ends as a run on its own does
    ckpt = tmp_path / "ckpt"
    runs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"{i}.pt"), "--checkpoint-dir", str(ckpt),
                              "--slow", "0.002"], env=ENV, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errors = [run.communicate(timeout=120)[1] for run in runs]
    finally:
        for run in runs:
            run.kill()
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, 1], errors
    first, second = codes.index(0), codes.index(1)
    assert f"checkpoint_dir {ckpt} is in use by process {runs[first].pid}" in errors[second], errors[second]
    assert not (tmp_path / f"{second}.pt").exists()
    trained = worker_weights(tmp_path / f"{first}.pt")
    for name in single_process_weights:
        assert torch.equal(trained[name], single_process_weights[name]), name
