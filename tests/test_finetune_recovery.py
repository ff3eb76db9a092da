"""Recovery that never hurts: distillation of a causal LM on next-token logits, Hugging Face label
losses, the best weights kept, BatchNorm statistics frozen, only the factors trained."""

import pytest
import torch
from torch import nn

import tdnn
from tdnn.finetune import distillation_loss

transformers = pytest.importorskip("transformers")


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      initializer_range=0.2,  # peaked next-token distributions
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


def text(n=6, batch=4, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(2, 96, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, 15:] = 0  # one padded sequence
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def held_out_kl(student, teacher, batches):
    with torch.no_grad():
        return sum(float(distillation_loss(student(**b).logits, teacher(**b).logits, temperature=1.0,
                                           mask=b["attention_mask"])) for b in batches) / len(batches)


def test_distillation_lowers_the_kl_of_a_compressed_causal_lm():
    teacher, train, held = tiny_lm(), text(n=16), text(seed=1)
    student = tdnn.compress_model(teacher, ranks=0.3, calibration=train[:2])
    before = held_out_kl(student, teacher, held)
    result = tdnn.finetune(student, train, teacher=teacher, epochs=3, optimizer="adamw", lr=3e-3, progress=False)
    assert result.steps == 42 and held_out_kl(student, teacher, held) < 0.8 * before  # 2 of 16 batches held out
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied


def test_labels_of_a_hugging_face_model_use_its_own_shifted_loss():
    model, batch = tiny_lm(), text(n=1)[0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = float(model(**batch, labels=labels).loss)
    result = tdnn.finetune(model, [{**batch, "labels": labels}], lr=1e-9, progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)


def test_padding_is_left_out_of_distillation():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    other = logits.clone()
    other[1, 3:, 0] += 10  # differs only at padded positions (one class: a shift of all would not change softmax)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    assert float(distillation_loss(other, logits, mask=mask)) == 0.0
    assert float(distillation_loss(other, logits)) > 0


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))


def data(n=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(n)]


def test_the_best_weights_are_kept_also_when_training_only_hurts():
    model, batches = classifier(), data()
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def closeness(m):  # the user's measure: here, how close the weights stay to where they started
        return -sum(float((v.float() - start[k].float()).norm()) for k, v in m.state_dict().items())

    result = tdnn.finetune(model, batches, epochs=2, lr=0.1, eval_fn=closeness, keep_best="max", progress=False)
    assert result.best_step == 0 and result.best_eval == 0.0 and all(v < 0 for v in result.evals)
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    kept = tdnn.finetune(classifier(), batches, epochs=2, lr=0.1, eval_fn=closeness, keep_best="min", progress=False)
    assert kept.best_step == kept.steps  # "min": the farthest, i.e. the last


def test_batchnorm_statistics_are_frozen_when_distilling_unless_asked():
    teacher = classifier().eval()
    batches = [x for x, _ in data()]
    frozen = tdnn.compress_model(teacher, ranks=0.5)
    stats = frozen[1].running_mean.clone()
    tdnn.finetune(frozen, batches, teacher=teacher, progress=False)
    assert torch.equal(frozen[1].running_mean, stats)
    moving = tdnn.compress_model(teacher, ranks=0.5)  # the last weights: the statistics as they moved
    tdnn.finetune(moving, batches, teacher=teacher, freeze_batchnorm=False, keep_best=None, progress=False)
    assert not torch.equal(moving[1].running_mean, stats)


def test_only_the_factors_train_when_asked():
    teacher = classifier().eval()
    student = tdnn.compress_model(teacher, ranks=0.5)
    bn = {k: v.clone() for k, v in student[1].state_dict().items()}
    factors = student[0].first.weight.clone()
    tdnn.finetune(student, [x for x, _ in data()], teacher=teacher, trainable="factorized", lr=0.05, progress=False)
    assert all(torch.equal(v, bn[k]) for k, v in student[1].state_dict().items())
    assert not torch.equal(student[0].first.weight, factors)
    assert all(p.requires_grad for p in student.parameters())  # flags restored


@pytest.mark.parametrize("dropout", [None, True])
def test_distilling_turns_dropout_off_unless_asked(dropout):
    # the teacher's targets are its eval-mode outputs: by default the student matches them without dropout
    teacher = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 4)).eval()
    student = tdnn.compress_model(teacher, ranks=0.5)
    modes = []
    student[2].register_forward_hook(lambda module, args, out: modes.append(module.training))
    tdnn.finetune(student, [x for x, _ in data()], teacher=teacher, keep_best=None, dropout=dropout, progress=False)
    assert modes == [dropout is True] * 8
    modes.clear()
    tdnn.finetune(student, data(), keep_best=None, progress=False)  # labels alone: dropout on, as usual
    assert modes == [True] * 8


def test_the_learning_rate_warms_up_over_a_tenth_of_the_run_by_default():
    def lrs(**options):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = tdnn.FinetuneSettings(**options).scheduler_for(opt, 50)
        seen = []
        for _ in range(50):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen

    warm = lrs()
    assert warm[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0]) and max(warm) == 1.0
    assert lrs(warmup_steps=0)[0] == 1.0 and lrs(warmup_steps=10)[9] == pytest.approx(10 / 11)


# -- safe by default: the held-out slice, the best weights on every exit path ----------------------

def hurt():
    """A compressed classifier and a learning rate that only makes it worse: (student, teacher, batches)."""
    teacher = classifier().eval()
    return tdnn.compress_model(teacher, ranks=0.5, calibration=[x for x, _ in data(2)]), teacher, \
        [x for x, _ in data(16)]


def test_defaults_never_end_worse_on_the_held_out_slice_and_say_so():
    student, teacher, batches = hurt()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    result = tdnn.finetune(student, batches, teacher=teacher, epochs=3, lr=5.0, optimizer="adamw", progress=False)
    assert result.steps == 3 * 14 and len(result.held_out) == 4  # 2 of 16 held out; before + 3 epochs
    assert all(h > result.held_out[0] for h in result.held_out[1:]), result.held_out  # the lr only hurts
    assert result.best_step == 0 and result.best_eval == result.held_out[0]
    assert result.kept.startswith("the weights before training: the lowest held-out KL to the teacher at T=1")
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())
    last = tdnn.compress_model(teacher, ranks=0.5, calibration=[x for x, _ in data(2)])
    opted_out = tdnn.finetune(last, batches, teacher=teacher, epochs=3, lr=5.0, optimizer="adamw", keep_best=None,
                              progress=False)
    assert opted_out.held_out == [] and opted_out.kept.startswith("the last weights (step 48): keep_best=None")


def test_the_held_out_slice_is_never_trained_on():
    student, teacher, batches = hurt()
    trained = []
    hook = student.register_forward_pre_hook(lambda m, args: trained.append(args[0]) if m.training else None)
    result = tdnn.finetune(student, batches, teacher=teacher, epochs=2, progress=False)
    hook.remove()
    held = {id(b) for b in batches[:2]}
    assert len(trained) == result.steps == 2 * 14
    assert not any(any(x.data_ptr() == b.data_ptr() for b in batches[:2]) for x in trained) and held


class _Poisoned(torch.utils.data.Dataset):
    """Samples that turn into NaN, or raise, from the ``at``-th fetch on."""

    def __init__(self, what, at):
        g = torch.Generator().manual_seed(0)
        self.x, self.what, self.at, self.fetched = torch.randn(256, 16, generator=g), what, at, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.fetched += 1
        if self.fetched >= self.at and self.what == "raise":
            raise RuntimeError("a corrupt file")
        return self.x[i] * (float("nan") if self.fetched >= self.at else 1.0)


@pytest.mark.parametrize("what", ["nan loss", "raise", "nan eval"])
def test_the_best_weights_are_restored_on_every_error(what):
    teacher = classifier().eval()
    student = tdnn.compress_model(teacher, ranks=0.5)
    # 8 batches of 32: 1 held out (fetched first); the poison reaches the 3rd training step, before
    # any measurement but the one before training
    data_set = _Poisoned("raise" if what == "raise" else "nan", at=10**9 if what == "nan eval" else 32 * 3 + 5)
    loader = torch.utils.data.DataLoader(data_set, batch_size=32)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    evals = iter([0.5, 0.6, float("nan")])
    options = dict(eval_fn=lambda m: next(evals), keep_best="max") if what == "nan eval" else {}
    errors = {"nan loss": FloatingPointError, "raise": RuntimeError, "nan eval": ValueError}
    seen = {}

    def remember(m):  # the weights at each measurement, to compare with what is restored
        seen[len(seen)] = {k: v.clone() for k, v in m.state_dict().items()}
        return next(evals)

    if what == "nan eval":
        options["eval_fn"] = remember
    with pytest.raises(errors[what]):
        tdnn.finetune(student, loader, teacher=teacher, epochs=3, lr=0.05, progress=False, **options)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    best = seen[1] if what == "nan eval" else start  # the best evaluation (0.6, after epoch 1), or the start
    assert all(torch.equal(v, best[k]) for k, v in student.state_dict().items())
