"""The CIFAR example under torchrun: 2 gloo processes on the CPU, synthetic data."""

import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cifar_resnet.py"
ARGS = ["--dataset", "synthetic", "--num-synthetic", "96", "--width", "4", "--batch-size", "32", "--mc-samples", "2",
        "--no-progress", "--update-every", "2", "--bn-batches", "1", "--device", "cpu"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def launch(nproc, *args, port):
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), *ARGS, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               str(SCRIPT), *ARGS, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def updates_expected(epochs, n=96, batch=32, every=2):
    from pyro_ssvi import SwapSchedule

    return len(SwapSchedule(epochs * math.ceil(n / batch), every, 0.3, 0.75).update_steps())


def test_two_processes_train_end_to_end_and_rank_0_alone_reports(tmp_path):
    out = tmp_path / "r.json"
    res = launch(2, "--epochs", "2", "--out", str(out), port=29611)
    result = json.loads(out.read_text())
    assert result["processes"] == 2 and result["train_images"] == 96 and result["epochs"] == 2
    assert result["updates"] == updates_expected(2)
    assert 0 <= result["test_accuracy"]["mc"] <= 1 and result["test_nll"]["mc"] > 0
    assert res.stdout.count("test: ") == 1 and res.stdout.count("epoch   1/2") == 1  # rank 0 alone prints


@pytest.mark.determinism
@pytest.mark.parametrize("first, second, port", [(2, 1, 29621), (1, 2, 29631)])
def test_a_checkpoint_resumes_on_another_number_of_processes(tmp_path, first, second, port):
    ckpt, out = tmp_path / "c.pt", tmp_path / "r.json"
    res = launch(first, "--epochs", "2", "--stop-after", "1", "--checkpoint", str(ckpt), port=port)
    assert "stopped after epoch 1" in res.stdout and not out.exists()
    res = launch(second, "--epochs", "2", "--checkpoint", str(ckpt), "--resume", "--out", str(out), port=port + 1)
    assert "resumed from" in res.stdout
    result = json.loads(out.read_text())
    assert result["processes"] == second and result["epochs"] == 2 and len(result["epoch_log"]) == 2
    assert result["updates"] == updates_expected(2)  # the schedule does not depend on the number of processes


def test_the_deterministic_baseline_and_the_shift_under_two_processes(tmp_path):
    out = tmp_path / "d.json"
    launch(2, "--deterministic", "--epochs", "1", "--shift", "contrast", "--out", str(out), port=29641)
    result = json.loads(out.read_text())
    assert result["processes"] == 2 and result["method"] == "deterministic" and list(result["test_accuracy"]) == ["network"]
    assert result["epoch_log"][0]["train_loss"] > 0 and result["updates"] == 0
    assert set(result["shift"]["network"]["by_corruption"]["contrast"]) == {"1", "2", "3", "4", "5"}
