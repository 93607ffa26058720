"""The benchmark scripts run end to end (tiny settings) and write their table, JSON and plot."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_UCI = ROOT.parent / "shared" / "data" / "uci"


def run(script, *args, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--results-dir", str(tmp_path), "--workers", "1", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def outputs(tmp_path, name):
    md = (tmp_path / f"{name}.md").read_text()
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert {"torch", "pyro", "python", "machine"} <= set(payload["environment"])
    return md, payload


@pytest.mark.skipif(not SHARED_UCI.exists(), reason="../shared/data/uci is not beside this checkout")
def test_uci_benchmark(tmp_path):
    run("uci.py", "--datasets", "yacht", "--splits", "2", "--steps", "30", "--mc-samples", "5", tmp_path=tmp_path)
    md, payload = outputs(tmp_path, "uci")
    runs = payload["results"]
    assert len(runs) == 2 * 4 and {r["method"] for r in runs} == {"dense VI", "SSVI 0.5", "SSVI 0.2", "SSVI 0.1"}
    assert all(r["rmse"] > 0 for r in runs)
    assert "PBP (published)" in md and "MC dropout (published)" in md and "±" in md
    assert payload["args"]["splits"] == 2


def test_digits_benchmark(tmp_path):
    run("digits.py", "--seeds", "1", "--steps", "20", "--cnn-steps", "10", "--mc-samples", "3", tmp_path=tmp_path)
    md, payload = outputs(tmp_path, "digits")
    runs = payload["results"]
    parts = {r["part"] for r in runs}
    assert parts == {"a", "b", "c", "d"}
    assert len([r for r in runs if r["part"] == "a"]) == 12
    ood = [r for r in runs if r["part"] == "b" and r["density"] is not None]
    assert all(0 <= r["mi_auroc"] <= 1 and 0 <= r["entropy_aupr"] <= 1 for r in ood)
    for heading in ("(a) Quality", "(b) OOD", "(c) Removal", "(d) Robustness"):
        assert heading in md


def test_cost_benchmark(tmp_path):
    # --baseline-ref HEAD: the same rows once more from a worktree of the last commit
    run("cost.py", "--models", "mlp3,resnet18", "--mlp-width", "32", "--width", "4", "--repeats", "2", "--warmup", "1", "--update-every", "2",
        "--block", "2", "--baseline-ref", "HEAD", tmp_path=tmp_path)
    md, payload = outputs(tmp_path, "cost")
    runs = payload["results"]
    assert len(runs) == 24  # 2 models x 2 samplings x 5 guides, and SSVI 0.1 at the baseline commit
    assert sum(r["kernels"] == "baseline" for r in runs) == 4 and "SSVI 0.1 at HEAD" in md
    for r in runs:
        assert r["seconds_per_step"] > 0 and r["peak_memory_bytes"] > 0 and r["guide_bytes"] > 0
        # blocks of 2: one cold step (timed apart, unless it is an update step) and then one timed step per round
        assert len(r["seconds_all"]) >= 2
        if r["density"] is None:  # AutoNormal: no update steps, so its second round's cold step is recorded
            assert r["cold_seconds_per_step"] > 0
    sparse = [r for r in runs if r["density"] == 0.1 and r["model"] == "mlp3"]
    assert sorted(map(str, (r["kernels"] for r in sparse))) == ["False", "False", "auto", "auto", "baseline", "baseline"]
    assert all(r["update_step_seconds"] is not None for r in sparse)
    # the kernel choice of every 2-d sparse site is recorded; kernels off records none
    for r in sparse:
        if r["kernels"] != "baseline":
            assert bool(r["kernel_choices"]) == (r["kernels"] == "auto")
    assert "Targets (sparse kernels" in md and "x AutoNormal" in md and "kernels off" in md
    assert "<= 0.5x SSVI at HEAD" in md  # the memory target is checked against the baseline commit


def test_adam_reset_benchmark(tmp_path):
    run("adam_reset.py", "--seeds", "1", "--steps", "40", "--update-every", "10", "--mc-samples", "2", tmp_path=tmp_path)
    md = (tmp_path / "adam_reset.md").read_text()
    runs = json.loads((tmp_path / "adam_reset.json").read_text())["results"]
    assert [r["optimiser"] for r in runs] == ["zero", "fresh"] and all(r["updates"] == 2 for r in runs)
    # the measurement itself: a fresh Adam's first steps are about lr, zeroed state under a shared step is not
    by = {r["optimiser"]: r for r in runs}
    assert by["fresh"]["refilled_step_over_lr"] != by["zero"]["refilled_step_over_lr"]
    assert "optimizer_reset" in md and "fresh" in md


def test_exploration_benchmark(tmp_path):
    run("exploration.py", "--steps", "30", "--update-every", "10", tmp_path=tmp_path)
    runs = json.loads((tmp_path / "exploration.json").read_text())["results"]
    assert len(runs) == 4 * 3 * 2 and all(r["updates"] == 2 for r in runs)
    assert all(0.0 <= r["replaced_fraction"] <= 1.0 for r in runs)
    assert "replaced" in (tmp_path / "exploration.md").read_text()


@pytest.mark.parametrize(
    "script, flag",
    [("uci.py", "--splits=30"), ("digits.py", "--parts=xyz"), ("cost.py", "--models=vgg"), ("adam_reset.py", "--seeds=0"),
     ("exploration.py", "--steps=0"), ("particles.py", "--archs=vgg"),
     ("distributed.py", "--procs=0"), ("sparse_kernels.py", "--densities=2"),
     ("cost.py", "--baseline-ref=no-such-commit"), ("cost.py", "--block=0"), ("repeat_tests.py", "--runs=0"),
     ("cifar_gap.py", "--cells=nope")],
)
def test_bad_flags_are_one_line(script, flag):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), flag], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and flag.split("=")[0] in res.stderr


def test_particles_benchmark(tmp_path):
    run("particles.py", "--particles", "2", "--warmup", "1", "--blocks", "2", "--steps-per-block", "1", "--batch-size", "16", tmp_path=tmp_path)
    md, payload = outputs(tmp_path, "particles")
    runs = payload["results"]
    assert [(r["arch"], r["lrt"]) for r in runs] == [("mlp", False), ("mlp", True), ("cnn", False), ("cnn", True)]
    for r in runs:
        assert r["sequential_seconds"] > 0 and r["vectorised_seconds"] > 0 and r["steps_timed"] == 2
        assert abs(r["ratio"] - r["vectorised_seconds"] / r["sequential_seconds"]) < 1e-12
    assert "target 0.5x" in md


def test_distributed_benchmark(tmp_path):
    run("distributed.py", "--images", "64", "--width", "4", "--epochs", "1", "--batch-size", "32", "--repeats", "1", tmp_path=tmp_path)
    md, payload = outputs(tmp_path, "distributed")
    runs = payload["results"]
    assert sorted(r["processes"] for r in runs) == [1, 2]
    assert all(r["images_per_second"] > 0 and r["seconds"] > 0 for r in runs)
    assert "images / s" in md


def test_sparse_kernels_benchmark(tmp_path):
    run("sparse_kernels.py", "--widths", "64", "--densities", "0.1,0.5", "--repeats", "1", "--blocks", "1", "--conv-batch", "2",
        "--conv-densities", "0.05,0.5", tmp_path=tmp_path)
    md, payload = outputs(tmp_path, "sparse_kernels")
    rows, convs, sweep = (payload["results"][k] for k in ("linear", "conv", "conv_density_sweep"))
    assert [(r["width"], r["density"]) for r in rows] == [(64, 0.1), (64, 0.5)]
    assert [(c["channels"], c["size"]) for c in convs] == [(64, 32), (128, 16), (256, 8), (512, 4)]
    assert [(c["channels"], c["density"]) for c in sweep] == [(64, 0.05), (64, 0.5), (256, 0.05), (256, 0.5)]
    paths = ["im2col"] + (["direct"] if "direct_seconds" in convs[0] else [])
    # the sparse paths compute what the dense ones do
    assert all(r["max_relative_error"] < 1e-5 for r in rows)
    assert all(c[f"{p}_relative_error"] < 1e-5 for c in convs + sweep for p in paths)
    assert all(c["limit_seconds"] == pytest.approx(c["density"] * c["dense_seconds"]) for c in convs + sweep)
    assert (tmp_path / "sparse_kernels_conv_density.png").stat().st_size > 1000
    assert all(isinstance(r["auto_picks_sparse"], bool) for r in rows)
    assert "Crossover" in md and "Convolutions" in md


def test_repeat_tests_counts_passing_and_failing_runs(tmp_path):
    """benchmarks/repeat_tests.py: every run of a passing file passes; a failing one is counted, its lines shown, exit 1."""
    passing, failing = tmp_path / "test_ok.py", tmp_path / "test_bad.py"
    passing.write_text("def test_ok():\n    assert True\n")
    failing.write_text("def test_bad():\n    assert False\n")
    res = run("repeat_tests.py", "--runs", "2", str(passing), tmp_path=tmp_path / "ok")
    assert "run 2/2: pass" in res.stdout and "2 of 2 runs passed" in res.stdout
    payload = json.loads((tmp_path / "ok" / "repeat_tests.json").read_text())
    assert payload["results"]["passed"] == 2 and [r["passed"] for r in payload["results"]["runs"]] == [True, True]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "repeat_tests.py"), "--results-dir", str(tmp_path / "bad"), "--runs", "2", str(failing)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and "2 of 2 runs failed" in res.stderr and res.stderr.count("\n") == 1
    assert "FAILED" in res.stdout and "0 of 2 runs passed" in (tmp_path / "bad" / "repeat_tests.md").read_text()


FAKE_PYRO_TESTS = '''
import pyro, pyro.distributions as dist, pytest, torch
from pyro.infer.autoguide import AutoDelta, AutoNormal
from tests.common import marker


@pytest.mark.parametrize("auto_class", [AutoDelta, AutoNormal])
def test_scale_site(auto_class):
    def model():
        pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
    assert marker and set(auto_class(model)()) == {"sigma", "w"}


@pytest.mark.parametrize("auto_class", [AutoNormal])
def test_discrete_site(auto_class):
    def model():
        pyro.sample("z", dist.Bernoulli(0.5))
    auto_class(model)()
'''


def test_pyro_autoguide_tests_adds_our_guide_beside_autonormal_and_classifies_the_failures(tmp_path):
    fake = tmp_path / "pyro" / "tests"
    (fake / "infer").mkdir(parents=True)
    (fake / "common.py").write_text("marker = True\n")
    (fake / "infer" / "test_autoguide.py").write_text(FAKE_PYRO_TESTS)
    run("pyro_autoguide_tests.py", "--pyro-tests", str(fake), "--densities", "1,0.5", tmp_path=tmp_path)
    payload = json.loads((tmp_path / "pyro_autoguide_tests.json").read_text())["results"]
    assert payload["lists"] == 2
    assert payload["per_density"] == {"1": {"cases": 2, "passed": 1, "skipped or xfail": 0},
                                      "0.5": {"cases": 2, "passed": 1, "skipped or xfail": 0}}
    assert payload["causes"] == {"discrete site refused (Pyro's wording)": 2}  # AutoNormal refuses it too
    cases = {c["test"]: c for c in payload["cases"]}
    assert cases["test_discrete_site[SparseSubspaceGuide_d05]"]["autonormal"] == "failed"
    assert cases["test_scale_site[SparseSubspaceGuide_d1]"]["outcome"] == "passed"
    assert "| test_scale_site[SparseSubspaceGuide_d05] | passed | passed |" in (tmp_path / "pyro_autoguide_tests.md").read_text()


def test_pyro_autoguide_tests_without_the_tests_folder_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pyro_autoguide_tests.py"), "--pyro-tests", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--pyro-tests" in res.stderr and "Traceback" not in res.stderr
