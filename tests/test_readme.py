"""The README's usage example and main job must keep working as written."""

import math
import pathlib
import re
import subprocess
import sys

import torch

from conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_usage_block():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    return blocks[0]


def test_readme_usage_example_runs(digits):
    code = readme_usage_block()
    assert "total_steps=5000" in code and "range(5000)" in code
    code = code.replace("total_steps=5000", "total_steps=300").replace("range(5000)", "range(300)")
    Xtr, ytr, Xte, _ = digits
    ns = {"x_batch": Xtr, "y_batch": ytr, "x_test": Xte[:50]}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["pred"]["_RETURN"].shape == (20, 50, 10)
    assert ns["pred"]["obs"].shape == (20, 50)
    guide = ns["guide"]
    assert guide.active_params == 740 and len(ns["svi"].history) == 2  # updates at 100 and 200 (< 225)
    assert torch.isfinite(torch.tensor(ns["loss"]))


def test_readme_commands_name_the_main_job_and_pytest():
    text = (ROOT / "README.md").read_text()
    assert ".venv/bin/python examples/digits.py" in text
    assert ".venv/bin/python -m pytest -q" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in ci and "-eq 5" in ci


def test_main_job_cli(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "rel.png"
    cmd = [sys.executable, str(ROOT / "examples" / "digits.py"), "--steps", "100", "--seeds", "2", "--no-progress", "--out", str(out),
           "--plot", str(png)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "accuracy" in res.stdout and "0.1" in res.stdout and "mean ± sd over 2 seeds" in res.stdout
    assert png.stat().st_size > 5000
    import json
    import statistics

    saved = json.loads(out.read_text())
    results = saved["results"]
    assert [(r["seed"], r["density"]) for r in results] == [(0, 0.1), (0, 1.0), (1, 0.1), (1, 1.0)]
    for r in results:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["nll"] > 0
        assert r["active_params"] == (740 if r["density"] == 0.1 else 7400)
    sparse, dense = saved["summary"]
    assert sparse["guide_bytes"] < 0.15 * dense["guide_bytes"] and sparse["seeds"] == 2
    for row in saved["summary"]:  # the table's mean ± sd is over the seeds' own figures
        values = [r["accuracy"] for r in results if r["density"] == row["density"]]
        assert row["accuracy"] == statistics.fmean(values) and abs(row["accuracy_sd"] - statistics.stdev(values)) < 1e-12
        assert f"{row['accuracy']:.4f} ± {row['accuracy_sd']:.4f}" in res.stdout


def test_main_job_bad_flag_is_one_line():
    cmd = [sys.executable, str(ROOT / "examples" / "digits.py"), "--densities", "0,2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "--densities" in res.stderr


def _digits_example():
    return load_script(ROOT / "examples" / "digits.py", "digits_example")


def test_main_job_weights_the_kl_once_and_scales_only_the_likelihood():
    import pyro

    mod = _digits_example()
    model = mod.MLP(num_data=1438)
    x, y = torch.rand(128, 64), torch.randint(0, 10, (128,))
    tr = pyro.poutine.trace(model).get_trace(x, y)
    assert tr.nodes["obs"]["scale"] == 1438 / 128
    assert tr.nodes["fc1.weight"]["scale"] == 1.0 and tr.nodes["fc2.weight"]["scale"] == 1.0


def test_main_job_full_batch_is_every_training_image_once(monkeypatch):
    mod = _digits_example()
    data = mod.load_digits_split(0)
    seen = []

    class Recording(mod.SSVI):
        def step(self, x, y):
            seen.append(x)
            return super().step(x, y)

    monkeypatch.setattr(mod, "SSVI", Recording)
    mod.fit(0.1, data, steps=2, lr=1e-2, hidden=10, seed=0, batch_size=None, progress=False)
    assert len(data[0]) == 1438 and all(x.shape[0] == 1438 for x in seen)
    assert all(torch.equal(x, data[0]) for x in seen)
    seen.clear()
    mod.fit(0.1, data, steps=2, lr=1e-2, hidden=10, seed=0, batch_size=100, progress=False)
    assert [x.shape[0] for x in seen] == [100, 100]


def readme_block(marker):
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if marker in b]
    assert len(blocks) == 1, f"README: expected one python block containing {marker!r}"
    return blocks[0]


def test_readme_horseshoe_keeps_the_support_and_beats_a_fixed_prior(capsys):
    """The README's hierarchical-prior example, as written, against the same SSVI run with N(0, 1)."""
    import pyro
    import pyro.distributions as dist

    from pyro_ssvi import SSVI, SparseSubspaceGuide

    ns = {}
    exec(compile(readme_block("AutoGuideList(horseshoe)"), "README.md", "exec"), ns)
    assert "true support in the active set: 10/10" in capsys.readouterr().out
    sparse, support = ns["sparse"], ns["support"]
    assert int(sparse.active_mask("w")[support].sum()) == 10
    rmse_horseshoe = float(ns["rmse"])

    p = ns["p"]

    def fixed(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([p]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    pyro.clear_param_store()
    guide = SparseSubspaceGuide(fixed, density=0.1)
    svi = SSVI(fixed, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.TraceMeanField_ELBO(), total_steps=1500, update_every=75)
    for _ in range(1500):
        svi.step(ns["x_train"], ns["y_train"])
    rmse_fixed = float((ns["x_test"] @ guide.median()["w"] - ns["y_test"]).pow(2).mean().sqrt())
    assert rmse_horseshoe <= rmse_fixed, (rmse_horseshoe, rmse_fixed)


def test_readme_pretrained_start_fine_tunes_from_the_largest_weights(capsys):
    """The README's "From a pretrained network" block, with fewer steps: the fine-tuned posterior starts on the
    trained network's largest weights and beats SSVI from scratch at equal steps."""
    code = readme_block("init_subspace=\"magnitude\"")
    assert "steps=300" in code
    ns = {}
    exec(compile(code.replace("steps=300", "steps=60"), "README.md", "exec"), ns)
    results = ns["results"]
    assert results["SSVI fine-tuned"]["accuracy"] > results["SSVI from scratch"]["accuracy"]
    assert 0 < ns["T"] < 10 and any(name.startswith("SSVI fine-tuned, T=") for name in results)
    assert "SSVI fine-tuned" in capsys.readouterr().out


def test_readme_plate_local_block_trains():
    """The "Plate-local latents" block: per-task weights, fitted with SSVI over the whole (T, H, D) site."""
    import pyro
    import pyro.distributions as dist

    from pyro_ssvi import SSVI, SparseSubspaceGuide

    text = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if 'pyro.plate("tasks"' in b)
    T, N, D, H = 3, 20, 4, 2
    torch.manual_seed(0)
    x = torch.randn(T, N, D)
    w_true = torch.randn(T, H, D)
    y = torch.einsum("thd,tnd->tnh", w_true, x) + 0.1 * torch.randn(T, N, H)
    pyro.clear_param_store()
    ns = {"pyro": pyro, "dist": dist, "torch": torch, "SparseSubspaceGuide": SparseSubspaceGuide, "T": T, "H": H, "D": D}
    exec(compile(code, "README.md", "exec"), ns)
    guide = ns["guide"]
    svi = SSVI(ns["model"], guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.TraceMeanField_ELBO(), total_steps=40, update_every=10)
    for _ in range(40):
        svi.step(x, y)
    assert guide.median()["w"].shape == (T, H, D)
    assert guide.active_index("w").numel() == round(0.1 * T * H * D) and len(svi.history) == 2
    pyro.clear_param_store()


def test_readme_tutorial_block_trains_with_the_guide_swapped_and_reports_the_dense_noise_scale(capsys):
    """The "Any model AutoNormal takes" block: Pyro's regression tutorial, ``sigma ~ Uniform(0, 10)`` dense."""
    import pyro

    text = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "class BayesianRegression" in b)
    assert "guide = SparseSubspaceGuide(model, density=0.5)        # was: AutoNormal(model)" in code
    pyro.clear_param_store()
    torch.manual_seed(0)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    guide, out = ns["guide"], capsys.readouterr().out
    assert "sigma" in out and "Interval" in out and guide.summary()["sigma"]["dense"].startswith("support Interval")
    assert guide.site_info("linear.weight").k == 10 and ns["samples"]["obs"].shape == (100, 400)
    sigma = float(guide.median()["sigma"])
    assert 0.3 < sigma < 3.0  # half the weights active: the noise scale absorbs what the active set misses
    pyro.clear_param_store()


def test_readme_fast_settings_block_runs(digits):
    """The README's fast settings, as written: validation off, one fused torch Adam over model and guide,
    SSVI's updates on schedule."""
    import pyro

    from conftest import BNN
    from pyro_ssvi import SSVI, SparseSubspaceGuide

    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "fused=True" in b)
    block = block.replace("total_steps=5000", "total_steps=30, update_every=10")
    Xtr, ytr, _, _ = digits
    pyro.clear_param_store()
    model = BNN()
    ns = {"pyro": pyro, "torch": torch, "SSVI": SSVI, "model": model, "guide": SparseSubspaceGuide(model, density=0.1),
          "x_batch": Xtr[:64], "y_batch": ytr[:64]}
    with pyro.validation_enabled(True):  # restores Pyro's checks for the tests that follow
        exec(compile(block, "README.md", "exec"), ns)
        assert not pyro.infer.util.is_validation_enabled()
        svi = ns["svi"]
        assert isinstance(svi.optim, torch.optim.Adam) and svi.optim.defaults["fused"]
        losses = [svi.step(Xtr[:64], ytr[:64]) for _ in range(12)]
    assert pyro.infer.util.is_validation_enabled()
    assert [h["step"] for h in svi.history] == [10] and all(math.isfinite(x) for x in losses)
    pyro.clear_param_store()
