"""bfloat16 on a CPU that emulates it, and a --device that is not here: the training and evaluation commands
say so before they start."""

from __future__ import annotations

import warnings

import pytest
import torch

from rmt_tools import hardware
from rmt_training.evaluate_lengths import main as evaluate_main
from rmt_training.train import main as train_main


@pytest.fixture
def emulating_cpu(monkeypatch):
    """This CPU as one without oneDNN bfloat16 kernels, whatever the machine running the tests has."""
    monkeypatch.setattr(hardware, "cpu_bfloat16_is_fast", lambda: False)


def test_the_warning_names_the_flag_and_the_fix_on_an_emulating_cpu_only(emulating_cpu, monkeypatch):
    warning = hardware.slow_bfloat16_warning("cpu", "--bf16")
    assert warning is not None
    assert "--bf16" in warning and "leave out --bf16" in warning and hardware.cpu_capability() in warning
    assert hardware.slow_bfloat16_warning("cuda", "--bf16") is None
    assert hardware.slow_bfloat16_warning("cuda:0", "--bf16") is None
    monkeypatch.setattr(hardware, "cpu_bfloat16_is_fast", lambda: True)
    assert hardware.slow_bfloat16_warning("cpu", "--bf16") is None


def test_the_check_agrees_with_onednn_where_torch_has_it():
    onednn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if onednn is None:
        pytest.skip("this torch build has no oneDNN bfloat16 check")
    assert hardware.cpu_bfloat16_is_fast() is bool(onednn())


def test_train_warns_about_bf16_before_anything_else(emulating_cpu, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    (tmp_path / "run" / "final").mkdir(parents=True)  # a finished run: the command stops after its checks
    command = ["--output-dir", str(tmp_path / "run")]
    with pytest.warns(UserWarning, match="leave out --bf16"), pytest.raises(SystemExit, match="has finished"):
        train_main([*command, "--bf16"])
    with warnings.catch_warnings(record=True) as seen, pytest.raises(SystemExit, match="has finished"):
        warnings.simplefilter("always")
        train_main(command)
    assert not [w for w in seen if "bfloat16" in str(w.message)]


def test_evaluate_lengths_warns_about_bfloat16_on_the_cpu_only(emulating_cpu, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # --device cuda passes the device check
    command = ["no-checkpoint", "--results", str(tmp_path / "r.json"), "--segments", "1", "--samples", "1", "2"]
    with pytest.warns(UserWarning, match="leave out --dtype bfloat16"), pytest.raises(SystemExit):
        evaluate_main([*command, "--dtype", "bfloat16", "--device", "cpu"])
    with warnings.catch_warnings(record=True) as seen, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        evaluate_main([*command, "--dtype", "bfloat16", "--device", "cuda"])
    assert not [w for w in seen if "bfloat16" in str(w.message)]


def test_a_device_that_is_not_here_is_refused_before_any_loading(tmp_path, monkeypatch):
    from rmt_training.harness import main as harness_main

    assert hardware.device_problem("cpu") is None
    assert "is not a torch device" in hardware.device_problem("gpu0")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert "no cuda device is available" in hardware.device_problem("cuda:0")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert hardware.device_problem("cuda") is None and hardware.device_problem("cuda:0") is None
    assert "has 1 cuda device(s)" in hardware.device_problem("cuda:1")
    results = tmp_path / "r.json"  # the checkpoint does not exist: the device is what stops the command
    with pytest.raises(SystemExit, match="'gpu0' is not a torch device"):
        evaluate_main(
            ["no-checkpoint", "--results", str(results), "--segments", "1", "--samples", "1", "--device", "gpu0"]
        )
    with pytest.raises(SystemExit, match="'cuda:1': this machine has 1 cuda"):
        harness_main(["no-checkpoint", str(tmp_path / "harness"), "--device", "cuda:1"])
    assert not results.exists() and not (tmp_path / "harness").exists()
