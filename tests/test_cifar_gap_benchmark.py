"""benchmarks/cifar_gap.py without training: the cells, their commands, resume states, the records and the report."""

import json
import pathlib

import pytest

from conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cifar_gap.py"


@pytest.fixture(scope="module")
def gap():
    return load_script(SCRIPT, "cifar_gap_benchmark")


def common(tmp_path, *more):
    return ["--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--results-dir", str(tmp_path / "results"), *more]


def flag(cmd, name):
    parts = cmd.split()
    return parts[parts.index(name) + 1] if name in parts else None


def test_every_cell_has_its_own_flags_tag_and_paths(gap, capsys, tmp_path):
    gap.main(["--dry-run", *common(tmp_path)])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    runs = gap.plan(gap.parse_args(["--dry-run", *common(tmp_path)]))
    assert len(lines) == len(runs) and len({r["tag"] for r in runs}) == len(runs)  # a cell shared by studies runs once
    assert {r["seed"] for r in runs} == {0, 1} and runs[0]["seed"] == 0 and runs[-1]["seed"] == 1  # seed 0 of all first
    by_tag = {r["tag"]: c for r, c in zip(runs, lines)}
    erk = next(c for t, c in by_tag.items() if "-erk-" in t)
    assert flag(erk, "--allocation") == "erk" and flag(erk, "--density") == "0.1" and flag(erk, "--width") == "8"
    det_sparse = next(c for t, c in by_tag.items() if t.startswith("detsparse"))
    assert "--deterministic" in det_sparse and flag(det_sparse, "--density") == "0.1"
    det = next(c for t, c in by_tag.items() if t.startswith("det-"))
    assert "--deterministic" in det and flag(det, "--density") is None
    assert any("--no-lrt" in c for c in lines) and any("--head-dense" in c for c in lines)
    assert {flag(c, "--update-every") for c in lines} == {None, "50", "200"}
    assert {flag(c, "--epochs") for c in lines} == {"5", "15"} and {flag(c, "--width") for c in lines} == {"8", "16", "24", "32"}
    for c in lines:
        assert flag(c, "--out").startswith(str(tmp_path / "runs")) and flag(c, "--checkpoint").startswith(str(tmp_path / "ckpt"))
        assert flag(c, "--dataset") == "folder" and flag(c, "--shift") == "all" and flag(c, "--mc-samples") == "10"
    assert not (tmp_path / "runs").exists()


def fake(cell, seed):
    """A JSON shaped like the example's --out, its accuracy set by the cell (dense VI 0.70, SSVI 0.60, levers +0.02)."""
    acc = {"deterministic": 0.66, "deterministic sparse": 0.62, "dense VI": 0.70, "SSVI": 0.60}[cell.method] + 0.01 * seed
    acc += 0.02 * (cell.allocation == "erk" or cell.head_dense) + 0.01 * (cell.width - 8) / 8 + 0.005 * (cell.epochs - 5)
    both = (lambda v: {"network": v}) if cell.method.startswith("det") else (lambda v: {"mc": v, "posterior_mean": v - 0.01})
    shift = {"mean": {s: {"accuracy": acc - 0.1 * int(s), "ece": 0.05} for s in ("3", "5")}}
    return {"test_accuracy": both(acc), "test_nll": both(1.0 - acc), "test_ece": both(0.02), "test_brier": both(0.5),
            "shift": {"network" if cell.method.startswith("det") else "mc": shift}, "active_params": 17714, "dense_params": 175192,
            "guide_bytes": 1, "seconds": 600.0, "train_flops_per_step": 1e9, "updates": 14,
            "epoch_log": [{"epoch": 1, "seconds": 200.0, "load": 3.0}, {"epoch": 2, "seconds": 150.0 + seed, "load": 1.1}],
            "posterior_scales": None if cell.method.startswith("det") else {"a": {"median_sigma": 6e-4, "median_snr": 10.0},
                                                                             "b": {"median_sigma": 8e-4, "median_snr": 20.0}}}


def test_records_and_report_from_finished_runs(gap, tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir()
    runs = gap.plan(gap.parse_args(common(tmp_path)))
    for r in runs[:-1]:  # one run not finished
        pathlib.Path(r["out"]).write_text(json.dumps(fake(r["cell"], r["seed"])))
    records = gap.main(["--report", *common(tmp_path)])
    payload = json.loads((tmp_path / "results" / "cifar_gap.json").read_text())["results"]
    assert len(payload["runs"]) == len(runs) - 1 and payload["missing"] == [runs[-1]["tag"]]
    fields = ("method", "density", "width", "epochs", "allocation", "lrt", "head_dense", "update_every", "seed", "accuracy", "nll",
              "ece", "active_params", "epoch_seconds")
    for rec in payload["runs"]:
        assert all(k in rec for k in fields) and rec["finite"]
        assert rec["epoch_seconds"] == 150.0 + rec["seed"] and rec["epoch_load"] == 1.1  # the fastest epoch, its load
    det = next(r for r in records if r["method"] == "deterministic")
    assert det["lrt"] is False and det["posterior_mean_accuracy"] is None
    base = next(g for g in payload["gaps"] if g["cell"] == "SSVI 0.1 (w8, 5 ep)")
    assert base["accuracy"] == pytest.approx(-10.0) and base["seeds"] == [2, 2]
    erk = next(g for g in payload["gaps"] if g["cell"] == "SSVI 0.1 (w8, 5 ep, erk)")
    assert erk["accuracy"] == pytest.approx(-8.0)
    equal = next(g for g in payload["gaps"] if "w24" in g["cell"])
    assert equal["against"] == "dense VI w8"
    md = (tmp_path / "results" / "cifar_gap.md").read_text()
    assert "## levers" in md and "## width" in md and "Not finished yet" in md
    row = next(line for line in md.splitlines() if line.startswith("| SSVI 0.1 (w8, 5 ep) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "60.50 ± 0.71" and cells[5] == "59.50 ± 0.71"  # MC and posterior-mean accuracy
    assert cells[10] == "7.00e-04" and cells[11] == "15.0"  # median over layers of sigma and SNR
    assert (tmp_path / "results" / "cifar_gap.png").stat().st_size > 1000


@pytest.mark.parametrize("flags, message", [
    (["--cells", "nope"], "unknown study 'nope'"),
    (["--seeds", "0"], "--seeds must be positive"),
    (["--workers", "2"], "one at a time"),
])
def test_bad_flags_are_one_line(gap, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        gap.parse_args(["--dry-run", *common(tmp_path), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
