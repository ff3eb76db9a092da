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
    assert result.steps == 48 and held_out_kl(student, teacher, held) < 0.8 * before
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied


def test_labels_of_a_hugging_face_model_use_its_own_shifted_loss():
    model, batch = tiny_lm(), text(n=1)[0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = float(model(**batch, labels=labels).loss)
    result = tdnn.finetune(model, [{**batch, "labels": labels}], lr=1e-9, progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)


def test_padding_is_left_out_of_distillation():
    logits = torch.randn(2, 5, 7)
    other = logits.clone()
    other[1, 3:] += 10  # differs only at padded positions
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
    moving = tdnn.compress_model(teacher, ranks=0.5)
    tdnn.finetune(moving, batches, teacher=teacher, freeze_batchnorm=False, progress=False)
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
