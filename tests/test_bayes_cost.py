"""benchmarks/bayes_cost.py runs end to end with the tiniest settings and writes its table, JSON and plot."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bayes_cost_quick_run_writes_its_results(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bayes_cost.py"), "--quick", "--models", "mlp,resnet18",
           "--configs", "det,ssvi0.1-lrt", "--threads", "1", "--results-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "bayes_cost.md").read_text()
    payload = json.loads((tmp_path / "bayes_cost.json").read_text())
    assert (tmp_path / "bayes_cost.png").stat().st_size > 1000
    runs = payload["results"]
    assert {(r["model"], r["config"]) for r in runs} == {(m, c) for m in ("mlp", "resnet18") for c in ("det", "ssvi0.1-lrt")}
    assert all(r["seconds_per_step"] > 0 for r in runs)
    profiled = [r for r in runs if "profile" in r]
    assert len(profiled) == 2 and all(set(r["profile"]["categories"]) >= {"forward: LRT noise", "optimiser (Adam)"} for r in profiled)
    assert "Where a SSVI 0.1 LRT step goes" in md and "resnet18-w2" in md and "| mlp |" in md


def test_bayes_cost_names_a_bad_flag():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bayes_cost.py"), "--configs", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--configs" in res.stderr


def test_replicas_pool_the_steps_of_each_configuration(tmp_path):
    """--replicas 2: each configuration in two processes; one report each, with both processes' steps."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bayes_cost.py"), "--quick", "--models", "mlp", "--configs", "det,ssvi0.1-w",
           "--threads", "1", "--replicas", "2", "--profile-steps", "0", "--results-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = json.loads((tmp_path / "bayes_cost.json").read_text())["results"]
    assert sorted(r["config"] for r in runs) == ["det", "ssvi0.1-w"]
    for r in runs:
        assert len(r["replica_seconds"]) == 2 and len(r["seconds_all"]) >= 2 * 2  # --quick: 2 timed steps per process
        assert "replica" not in r and "config_keys" not in r
    assert "2 processes of its own" in (tmp_path / "bayes_cost.md").read_text()


def test_pool_replicas_medians():
    from conftest import load_script

    cost = load_script(ROOT / "benchmarks" / "cost.py", "cost_for_pooling")  # upper medians
    cfgs = [{"config": "a", "model": "m", "replica": 0, "profile_steps": 2}, {"config": "a", "model": "m", "replica": 1, "profile_steps": 0},
            {"config": "b", "model": "m", "replica": 0, "profile_steps": 0}]
    reports = [
        {**cfgs[0], "seconds_all": [1.0, 3.0], "seconds_per_step": 2.0, "cold_seconds_per_step": 5.0, "profile": {"x": 1}},
        {**cfgs[1], "seconds_all": [2.0, 4.0, 6.0], "seconds_per_step": 4.0, "cold_seconds_per_step": 7.0},
        {**cfgs[2], "seconds_all": [9.0], "seconds_per_step": 9.0, "cold_seconds_per_step": None},
    ]
    a, b = cost.pool_replicas(cfgs, reports)
    assert a["seconds_all"] == [1.0, 2.0, 3.0, 4.0, 6.0] and a["seconds_per_step"] == 3.0 and a["replica_seconds"] == [2.0, 4.0]
    assert a["cold_seconds_per_step"] == 7.0 and a["profile"] == {"x": 1}  # replica 0's profile
    assert b["seconds_per_step"] == 9.0 and b["replica_seconds"] == [9.0] and b["cold_seconds_per_step"] is None
    assert "replica_kernel_choices" not in a
    reports[0]["kernel_choices"], reports[1]["kernel_choices"] = {"w": [{"sparse": True}]}, {"w": [{"sparse": False}]}
    assert cost.pool_replicas(cfgs, reports)[0]["replica_kernel_choices"] == [{"w": [{"sparse": True}]}, {"w": [{"sparse": False}]}]


def test_fast_settings_configurations_run_and_profile_their_optimiser(tmp_path):
    """The fast settings (validation off, one fused torch Adam): SSVI and AutoNormal (through its ELBOModule)
    step, the profile finds the torch optimiser's step, and the targets table checks them too."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bayes_cost.py"), "--quick", "--models", "mlp",
           "--configs", "det,ssvi0.1-lrt-fast,ssvi0.1-w-fast,autonormal-w-fast", "--threads", "1", "--results-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = {r["config"]: r for r in json.loads((tmp_path / "bayes_cost.json").read_text())["results"]}
    assert set(runs) == {"det", "ssvi0.1-lrt-fast", "ssvi0.1-w-fast", "autonormal-w-fast"}
    assert all(r["seconds_per_step"] > 0 for r in runs.values())
    assert runs["ssvi0.1-lrt-fast"]["profile"]["categories"]["optimiser (Adam)"] > 0
    md = (tmp_path / "bayes_cost.md").read_text()
    assert "| mlp | SSVI 0.1 weights, fast settings |" in md and "| mlp | SSVI 0.1 LRT, fast settings |" in md
    assert "AutoNormal weights, fast settings" in md
