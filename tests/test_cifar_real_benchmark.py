"""benchmarks/cifar_real.py without training: --dry-run commands, resume logic, and the report from given run JSONs."""

import json
import pathlib
import subprocess
import sys

import pytest

from conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cifar_real.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "cifar_real_benchmark")


def dry(bench, capsys, tmp_path, *flags):
    bench.main(["--dry-run", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
                "--results-dir", str(tmp_path / "results"), *flags])
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def flag(cmd, name):
    parts = cmd.split()
    return parts[parts.index(name) + 1] if name in parts else None


def test_dry_run_prints_the_default_plan_and_runs_nothing(bench, capsys, tmp_path):
    lines = dry(bench, capsys, tmp_path)
    assert len(lines) == 7  # deterministic 1, dense VI 2, SSVI 0.1 2, SSVI 0.05 1, SSVI 0.1 fine-tuned 1
    assert all("examples/cifar_resnet.py" in c for c in lines)
    finetune = [c for c in lines if "--init-from" in c]
    assert len(finetune) == 1 and flag(finetune[0], "--epochs") == "2" and flag(finetune[0], "--density") == "0.1"
    det = next(c for c in lines if "--deterministic" in c)
    assert flag(finetune[0], "--init-from") == flag(det, "--checkpoint")  # starts from the deterministic run of its seed
    lines = [c for c in lines if "--init-from" not in c]
    methods = [("--deterministic" in c, flag(c, "--density"), flag(c, "--seed")) for c in lines]
    assert methods == [(True, None, "0"), (False, "1.0", "0"), (False, "0.1", "0"), (False, "0.05", "0"), (False, "1.0", "1"), (False, "0.1", "1")]
    for c in lines:
        assert flag(c, "--dataset") == "folder" and flag(c, "--data-dir") == str(tmp_path / "data")
        assert flag(c, "--shift") == "all" and flag(c, "--mc-samples") == "10"
        assert flag(c, "--width") == "8" and flag(c, "--epochs") == "5"
        assert flag(c, "--shift-severities") == "3,5" and flag(c, "--shift-images") == "2000"
        assert flag(c, "--out").startswith(str(tmp_path / "runs")) and flag(c, "--out").endswith(".json")
        assert flag(c, "--checkpoint").endswith(".pt") and "--resume" not in c and "--stop-after" not in c
    assert len({flag(c, "--out") for c in lines}) == 6 and len({flag(c, "--checkpoint") for c in lines}) == 6
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_dry_run_options(bench, capsys, tmp_path):
    lines = dry(bench, capsys, tmp_path, "--methods", "ssvi0.05,dense", "--seeds", "3", "--width", "8", "--epochs", "2",
                "--stop-after", "1", "--device", "cuda")
    assert len(lines) == 6
    assert [(flag(c, "--density"), flag(c, "--seed")) for c in lines] == [(d, s) for s in "012" for d in ("0.05", "1.0")]
    assert all(flag(c, "--width") == "8" and flag(c, "--epochs") == "2" and flag(c, "--stop-after") == "1"
               and flag(c, "--device") == "cuda" for c in lines)


def test_dry_run_marks_done_resumed_and_blocked_runs(bench, capsys, tmp_path):
    args = bench.parse_args(["--dry-run", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs")])
    runs = bench.plan(args)
    (tmp_path / "runs").mkdir()
    pathlib.Path(runs[0]["out"]).write_text("{}")  # finished
    pathlib.Path(runs[1]["checkpoint"]).write_bytes(b"ckpt")  # stopped early
    lines = dry(bench, capsys, tmp_path)
    assert lines[0].startswith(f"# {runs[0]['tag']}: done")
    assert "blocked: checkpoint exists, pass --resume" in lines[1] and "--resume" not in lines[1].split(" (blocked")[0]
    lines = dry(bench, capsys, tmp_path, "--resume")
    assert lines[1].split()[-1] == "--resume" and all("--resume" not in c for c in lines[2:])


def test_blocked_runs_refuse_to_start(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    runs = tmp_path / "runs"
    runs.mkdir()
    res = subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(data), "--runs-dir", str(runs), "--methods", "deterministic", "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    tag = res.stdout.split("--checkpoint ")[1].split()[0]
    pathlib.Path(tag).write_bytes(b"ckpt")
    res = subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(data), "--runs-dir", str(runs), "--methods", "deterministic",
                          "--results-dir", str(tmp_path / "results")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "pass --resume" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--methods", "ssvi0.2"], "unknown method 'ssvi0.2'"),
    (["--seeds", "0"], "--seeds must be positive"),
    (["--width", "-1"], "--width must be positive"),
])
def test_bad_flags(bench, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--dry-run", "--runs-dir", str(tmp_path), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_folder_is_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--data-dir", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path / "runs")])
    assert e.value.code == 2 and "no train/ and test/ folders" in capsys.readouterr().err


def fake_result(key, seed):
    """A JSON shaped like the example's --out (values made up, method-dependent)."""
    base = {"deterministic": 0.80, "dense": 0.78, "ssvi0.1": 0.79, "ssvi0.05": 0.77, "ssvi0.1-ft": 0.81}[key] + 0.01 * seed

    def both(v):  # the example writes a deterministic run's single predictive under "network"
        return {"network": v} if key == "deterministic" else {"mc": v, "posterior_mean": v - 0.005}

    shift = {"mean": {str(s): {"accuracy": base - 0.08 * s, "nll": 0.6 + 0.2 * s, "ece": 0.02 + 0.03 * s} for s in range(1, 6)},
             "by_corruption": {}}
    return {"test_accuracy": both(base), "test_nll": both(0.6), "test_ece": both(0.03), "test_brier": both(0.3), "test_aurc": both(0.05),
            "shift": {"network": shift} if key == "deterministic" else {"mc": shift, "posterior_mean": shift},
            "active_params": 100000 if key.startswith("ssvi") else 1000000, "dense_params": 1000000, "guide_bytes": 4000 + seed,
            "seconds": 600.0 + 60 * seed, "train_flops_per_step": 1.5e10,
            "epoch_log": [{"epoch": 1, "seconds": 300.0}, {"epoch": 2, "seconds": 100.0 + 2 * seed}, {"epoch": 3, "seconds": 90.0 + 2 * seed}]}


def test_report_from_finished_runs(bench, tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    common = ["--data-dir", str(data), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    runs = bench.plan(bench.parse_args(common))
    for r in runs:
        pathlib.Path(r["out"]).write_text(json.dumps(fake_result(r["key"], r["seed"])))
    records = bench.main(common)  # every JSON exists: nothing is run
    assert len(records) == 7
    ft = next(r for r in records if r["key"] == "ssvi0.1-ft")
    assert ft["seconds"] == 1200.0  # its own 600 s plus the deterministic run's: equal total training time
    md = (tmp_path / "results" / "cifar_real.md").read_text()
    payload = json.loads((tmp_path / "results" / "cifar_real.json").read_text())
    assert (tmp_path / "results" / "cifar_real.png").stat().st_size > 1000
    assert "JPEG copy" in md and "width 8" in md and "5 epochs" in md
    for label in ("deterministic", "dense VI", "SSVI 0.1", "SSVI 0.05"):
        assert f"| {label} |" in md
    ssvi = next(line for line in md.splitlines() if line.startswith("| SSVI 0.1 |"))
    cells = [c.strip() for c in ssvi.strip("|").split("|")]
    assert cells[1] == "2" and cells[2] == "79.50 ± 0.71"  # accuracy of the MC predictive, mean ± sd of 2 seeds
    assert cells[7] == "55.50 ± 0.71" and cells[10].startswith("0.170")  # shift accuracy at severity 3, ECE at 5
    assert cells[11] == "100,000" and cells[13] == "10.5 ± 0.7"
    assert cells[14] == "91 ± 1"  # the fastest epoch, 90 and 92 s (a slow epoch of 300 s does not move it)
    det = next(line for line in md.splitlines() if line.startswith("| deterministic |"))
    assert "80.00" in det and "±" not in det.split("|")[3]
    assert payload["results"]["missing"] == [] and len(payload["results"]["runs"]) == 7
    assert "| SSVI 0.1 fine-tuned from deterministic |" in md


def test_a_fine_tuned_run_needs_its_deterministic_run(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--methods", "ssvi0.1-ft", "--dry-run"])
    assert e.value.code == 2 and "list deterministic too" in capsys.readouterr().err
