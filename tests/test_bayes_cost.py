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
