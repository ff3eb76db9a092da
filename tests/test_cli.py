"""The `tdnn` command: compress -> report -> finetune on a small ResNet, help texts, clear errors."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tdnn
from tdnn.cli import main
from models import DIGITS_CONFIG, ROOT, saved_mlp16, small_resnet

MODEL = "models:small_resnet"  # pytest puts tests/ on sys.path


def test_compress_report_finetune(tmp_path, capsys):
    weights = tmp_path / "dense.pt"
    torch.save(small_resnet().state_dict(), weights)
    out = tmp_path / "small.safetensors"
    assert main(["compress", DIGITS_CONFIG, "--model", MODEL, "--weights", str(weights), "--out", str(out),
                 "--input-size", "3,32,32"]) == 0
    printed = capsys.readouterr().out
    assert "layer1.0.conv1" in printed and "tucker2" in printed and "FLOPs x" in printed

    loaded = tdnn.load(out, small_resnet())
    assert type(loaded.layer1[0].conv1).__name__ == "Tucker2Conv2d"
    assert type(loaded.layer2[0].downsample[0]).__name__ == "SVDConv2d"
    assert isinstance(loaded.conv1, nn.Conv2d) and isinstance(loaded.fc, nn.Linear)

    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 of 7 layers factorized" in printed and "layer2.0.downsample.0" in printed

    assert main(["report", str(out), "--model", MODEL, "--input-size", "3x32x32"]) == 0
    rep = tdnn.report(loaded, inputs=torch.zeros(1, 3, 32, 32))
    printed = capsys.readouterr().out
    assert f"{rep.params_after:,}" in printed and f"params x{rep.param_ratio:.3f}" in printed

    tuned = tmp_path / "tuned.safetensors"
    assert main(["finetune", str(out), "--model", MODEL, "--data", "digits", "--config", DIGITS_CONFIG,
                 "--teacher-weights", str(weights), "--max-steps", "4", "--out", str(tuned),
                 "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    printed = capsys.readouterr().out
    found = re.search(r"top-1 on digits test: ([\d.]+)% before, ([\d.]+)% after 4 steps", printed)
    assert found, printed
    assert float(found[2]) >= float(found[1])  # the best epoch is kept: never worse than it started
    assert (tmp_path / "ckpt" / "last.pt").exists() and tuned.exists()


def test_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("compress:\n  ranks: 0.5\n  metod: svd\n")
    assert main(["compress", str(bad), "--model", MODEL, "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"tdnn compress: error: {bad}: unknown key 'compress.metod'" in err
    assert main(["report", str(bad)]) == 2
    assert "not a tdnn checkpoint" in capsys.readouterr().err
    assert main(["compress", DIGITS_CONFIG, "--model", "resnet9000", "--out", str(tmp_path / "y")]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", DIGITS_CONFIG, "--model", MODEL, "--out", "z", "--input-size", "three"])


def test_console_script_help():
    exe = shutil.which("tdnn") or str(Path(sys.executable).with_name("tdnn"))
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tdnn") and "compress" in done.stdout and "finetune" in done.stdout


@pytest.mark.parametrize("command, expected", [("compress", "CONFIG"), ("report", "CHECKPOINT"),
                                               ("finetune", "--teacher-weights")])
def test_help_of_each_command(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: tdnn {command}") and expected in printed


@pytest.fixture
def saved(tmp_path):
    return saved_mlp16(tmp_path)


def test_cli_errors_for_a_missing_factory_and_a_bad_device(tmp_path, capsys, saved):
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
