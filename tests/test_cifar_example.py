"""examples/cifar_resnet.py end to end on small CIFAR-format files and on synthetic data."""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cifar_resnet.py"


@pytest.fixture(scope="module")
def cifar():
    return load_script(SCRIPT, "cifar_resnet")


def write_cifar(root, kind, n_per_batch=24, n_test=40, seed=0):
    """Small files in torchvision's on-disk layout (cifar-10-batches-py / cifar-100-python)."""
    rng = np.random.default_rng(seed)
    classes = 10 if kind == "cifar10" else 100
    label_key = "labels" if kind == "cifar10" else "fine_labels"

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: rng.integers(0, classes, n).tolist()}

    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        files = {f"data_batch_{i}": batch(n_per_batch) for i in range(1, 6)}
        files["test_batch"] = batch(n_test)
        files["batches.meta"] = {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        files = {"train": batch(5 * n_per_batch), "test": batch(n_test), "meta": {"fine_label_names": [f"c{i}" for i in range(100)]}}
    for name, obj in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)


def write_svhn(root, n=30, seed=0):
    """A small test_32x32.mat in SVHN's format (X: 32 x 32 x 3 x N uint8, y: N x 1 labels 1..10)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    savemat(root / "test_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": rng.integers(1, 11, (n, 1))})


@pytest.fixture
def no_md5(monkeypatch):
    """Our files cannot match torchvision's MD5 sums; check they exist instead (all else is real)."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.svhn as tv_svhn

    for module in (tv_cifar, tv_svhn):
        monkeypatch.setattr(module, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


SMALL = ["--epochs", "1", "--width", "4", "--batch-size", "16", "--mc-samples", "2", "--no-progress", "--update-every", "2", "--bn-batches", "2"]


def check_result(result, density=0.1):
    for key in ("test_accuracy", "test_nll", "test_ece", "test_brier"):
        assert set(result[key]) == {"mc", "posterior_mean"}
    for kind in ("mc", "posterior_mean"):
        assert 0.0 <= result["test_accuracy"][kind] <= 1.0
        assert 0.0 <= result["test_ece"][kind] <= 1.0
        assert result["test_nll"][kind] > 0 and 0 <= result["test_brier"][kind] <= 2
    assert result["active_params"] <= result["dense_params"]
    assert result["sparse_site_density"] == pytest.approx(density, rel=0.02)
    assert result["guide_bytes"] < result["dense_guide_bytes"]
    assert 0 < result["train_flops_per_step"] < result["dense_vi_train_flops_per_step"]
    assert result["epochs"] >= 1 and result["seconds"] > 0


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_real_torchvision_loading_path(tmp_path, cifar, no_md5, kind):
    write_cifar(tmp_path, kind)
    out = tmp_path / "m.json"
    result = cifar.main(["--dataset", kind, "--data-dir", str(tmp_path), "--out", str(out)] + SMALL)
    check_result(result)
    assert result["active_params"] / result["dense_params"] == pytest.approx(0.1, abs=0.01)
    assert json.loads(out.read_text())["test_accuracy"] == result["test_accuracy"]
    # the sparse layers hold 10% of their weights; the first convolution stays dense
    assert result["density"] > 0.1


def test_dense_vi_baseline_same_code_path(tmp_path, cifar):
    result = cifar.main(["--dataset", "synthetic", "--num-synthetic", "64", "--density", "1.0"] + SMALL)
    assert result["active_params"] == result["dense_params"] and result["updates"] == 0
    assert result["train_flops_per_step"] == result["dense_vi_train_flops_per_step"]


@pytest.mark.determinism
def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path, cifar, monkeypatch):
    import pyro_ssvi.kernels as kernels

    # the two first runs "measure" alike (two real measurements can disagree on a loaded machine); the resumed
    # process measures the opposite, and must still take their kernels
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: {"sparse": True, "dense_s": 2.0, "sparse_s": 1.0})
    args = ["--dataset", "synthetic", "--num-synthetic", "96", "--epochs", "2", "--width", "4", "--batch-size", "16",
            "--mc-samples", "2", "--no-progress", "--update-every", "2", "--bn-batches", "2", "--seed", "3"]
    full = cifar.main(args + ["--checkpoint", str(tmp_path / "a.pt")])

    real_save = cifar.save_atomic

    class Crash(Exception):
        pass

    def save_then_crash(obj, path):
        real_save(obj, path)
        raise Crash

    monkeypatch.setattr(cifar, "save_atomic", save_then_crash)
    with pytest.raises(Crash):
        cifar.main(args + ["--checkpoint", str(tmp_path / "b.pt")])
    monkeypatch.setattr(cifar, "save_atomic", real_save)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["epoch"] == 0
    # the kernel choices are saved in the guide's state (_extra_state): a resumed process that would
    # measure the opposite must still take the saved ones, and end as the uninterrupted run
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: {"sparse": False, "dense_s": 1.0, "sparse_s": 2.0})
    monkeypatch.setattr(kernels, "measure_conv2d", lambda *a, **k: pytest.fail("measured a convolution below MIN_CONV_MACS"))
    # the resumed process meets call shapes first after the checkpoint (the evaluation's batches): they too must
    # take the uninterrupted run's kernels, by rule, not by a measurement that the inversion would flip
    saved = torch.load(tmp_path / "b.pt", weights_only=False)["guide"]["_extra_state"]["kernel_decisions"]
    new_shapes = {s: [r for r in full["kernel_decisions"][s] if r not in saved.get(s, [])] for s in full["kernel_decisions"]}
    assert any(new_shapes.values())
    resumed = cifar.main(args + ["--checkpoint", str(tmp_path / "b.pt"), "--resume"])
    assert resumed["kernel_decisions"] == full["kernel_decisions"]
    for key in ("test_accuracy", "test_nll", "test_ece", "test_brier", "updates", "active_params"):
        assert resumed[key] == full[key], key
    strip = lambda log: [{k: v for k, v in row.items() if k not in cifar.TIMING_FIELDS} for row in log]  # noqa: E731
    assert strip(resumed["epoch_log"]) == strip(full["epoch_log"])


@pytest.mark.determinism
def test_a_new_run_given_a_run_s_kernel_decisions_repeats_its_numbers(tmp_path, cifar, monkeypatch):
    """--kernel-decisions: the choices recorded in a run's --out JSON, taken back by a new run that would
    measure the opposite (a loaded machine), give that run's numbers; measuring gives other choices."""
    import pyro_ssvi.kernels as kernels

    args = ["--dataset", "synthetic", "--num-synthetic", "64", "--epochs", "1", "--width", "4", "--batch-size", "16",
            "--mc-samples", "2", "--no-progress", "--bn-batches", "1", "--seed", "5"]
    first = cifar.main(args + ["--out", str(tmp_path / "a.json")])
    assert first["kernel_decisions"] == json.loads((tmp_path / "a.json").read_text())["kernel_decisions"]
    assert any("conv2d" in row for rows in first["kernel_decisions"].values() for row in rows)  # convolutions measured too
    for name in ("measure", "measure_conv2d"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, **k: (lambda d: {**d, "sparse": not d["sparse"]})(_real(*a, **k)))
    again = cifar.main(args + ["--kernel-decisions", str(tmp_path / "a.json")])
    assert again["kernel_decisions"] == first["kernel_decisions"]
    for key in ("test_accuracy", "test_nll", "test_ece", "epoch_log"):
        strip = (lambda v: [{k: x for k, x in row.items() if k not in cifar.TIMING_FIELDS} for row in v]) if key == "epoch_log" else (lambda v: v)
        assert strip(again[key]) == strip(first[key]), key
    measured = cifar.main(args)
    assert measured["kernel_decisions"] != first["kernel_decisions"]


def test_checkpoint_is_written_atomically(tmp_path, cifar, monkeypatch):
    path = tmp_path / "c.pt"
    cifar.save_atomic({"a": 1}, str(path))

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cifar.torch, "save", broken)
    with pytest.raises(cifar.WriteError, match="disk full"):
        cifar.save_atomic({"a": 2}, str(path))
    assert torch.load(path) == {"a": 1}  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_missing_cifar_is_one_line_exit_2(tmp_path):
    res = run_cli("--data-dir", str(tmp_path / "nowhere"), "--epochs", "1")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "--download" in lines[0] and "cifar10" in lines[0]


@pytest.mark.parametrize("flag", [["--density", "0"], ["--epochs", "0"], ["--resume"], ["--val-fraction", "1.5"], ["--stop-after", "0"],
                                  ["--kernel-decisions", "/no/such.json"], ["--kernel-decisions", __file__],
                                  ["--deterministic", "--kernel-decisions", __file__]])
def test_bad_flags(flag):
    res = run_cli(*flag)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "error" in res.stderr


def test_failed_download_is_a_usage_error(tmp_path, cifar, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar as tv_cifar

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(cifar.UsageError, match="downloading cifar10 .* failed"):
        cifar.main(["--data-dir", str(tmp_path), "--download", "--epochs", "1"])


def test_augment_is_a_crop_and_flip(cifar):
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = cifar.augment(x)
    torch.manual_seed(0)
    i, j, flip = torch.randint(0, 9, (2,)), torch.randint(0, 9, (2,)), torch.rand(2) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for k in range(2):
        ref = padded[k, :, i[k] : i[k] + 32, j[k] : j[k] + 32]
        ref = ref.flip(-1) if flip[k] else ref
        assert torch.equal(out[k], ref)
    assert out.shape == x.shape


def test_recipe_trains_on_every_image_and_a_split_only_when_asked(cifar):
    base = ["--dataset", "synthetic", "--num-synthetic", "64"] + SMALL
    full = cifar.main(base)
    assert full["train_images"] == 64 and full["val_images"] == 0
    assert "val_accuracy" not in full["epoch_log"][0]
    split = cifar.main(base + ["--val-fraction", "0.25"])
    assert split["train_images"] == 48 and split["val_images"] == 16
    assert 0 <= split["epoch_log"][0]["val_accuracy"] <= 1


RESUME = ["--dataset", "synthetic", "--num-synthetic", "32", "--epochs", "2", "--width", "4", "--batch-size", "16",
          "--mc-samples", "1", "--no-progress", "--bn-batches", "0"]


@pytest.fixture(scope="module")
def written_checkpoint(tmp_path_factory, cifar):
    path = tmp_path_factory.mktemp("ckpt") / "run.pt"
    cifar.main(RESUME[:5] + ["1"] + RESUME[6:] + ["--checkpoint", str(path)])  # one epoch of a 1-epoch run
    return path


@pytest.mark.parametrize(
    "change, flag",
    [(["--width", "8"], "--width"), (["--density", "0.2"], "--density"), (["--epochs", "3"], "--epochs"),
     (["--dataset", "cifar10"], "--dataset")],
)
def test_resume_from_a_checkpoint_of_another_run_is_one_line(tmp_path, written_checkpoint, change, flag):
    args = RESUME[:5] + ["1"] + RESUME[6:] + ["--checkpoint", str(written_checkpoint), "--resume"]
    i = args.index(change[0]) if change[0] in args else None
    args = args[:i] + change + args[i + 2 :] if i is not None else args + change
    res = run_cli(*args, "--data-dir", str(tmp_path))
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1 and str(written_checkpoint) in lines[0] and flag in lines[0], lines


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None], ids=["corrupt", "foreign"])
def test_resume_from_a_corrupt_or_foreign_file_is_one_line(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    res = run_cli(*RESUME, "--checkpoint", str(path), "--resume")
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1 and str(path) in lines[0]


def test_ood_evaluation_selective_prediction_and_plots(tmp_path, cifar, no_md5):
    write_cifar(tmp_path, "cifar10")
    write_cifar(tmp_path, "cifar100", seed=1)
    write_svhn(tmp_path)
    out = tmp_path / "m.json"
    result = cifar.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(out), "--ood", "svhn,cifar100", "--plot"] + SMALL)
    saved = json.loads(out.read_text())
    assert set(saved["ood"]) == {"svhn", "cifar100"}
    for name in ("svhn", "cifar100"):
        ood = saved["ood"][name]
        assert set(ood) == {"mc", "posterior_mean"}
        assert set(ood["mc"]) == {"entropy", "mutual_information"} and set(ood["posterior_mean"]) == {"entropy"}
        for kind in ood.values():
            for m in kind.values():
                assert set(m) == {"auroc", "aupr", "fpr95"} and all(0.0 <= v <= 1.0 for v in m.values())
    for key in ("test_aurc", "test_accuracy_at_80", "test_accuracy_at_90", "test_accuracy_at_95"):
        assert set(result[key]) == {"mc", "posterior_mean"} and all(0.0 <= v <= 1.0 for v in result[key].values())
    for suffix in ("reliability", "uncertainty"):
        assert (tmp_path / f"m-{suffix}.png").stat().st_size > 5000


def test_missing_ood_set_is_one_line_exit_2(tmp_path):
    res = run_cli("--dataset", "synthetic", "--num-synthetic", "32", "--epochs", "1", "--ood", "svhn", "--data-dir", str(tmp_path))
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1 and "svhn" in lines[0] and "--download" in lines[0]


@pytest.mark.parametrize("flag", [["--ood", "mnist"], ["--ood", "cifar10"], ["--plot"], ["--eval-only"]])
def test_bad_evaluation_flags(flag):
    res = run_cli(*flag)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and flag[0] in res.stderr


def test_eval_only_reproduces_the_training_runs_metrics(tmp_path, cifar, written_checkpoint):
    args = RESUME[:5] + ["1"] + RESUME[6:]
    trained = cifar.main(args + ["--checkpoint", str(tmp_path / "again.pt")])
    evaluated = cifar.main(args + ["--checkpoint", str(tmp_path / "again.pt"), "--eval-only"])
    for key in cifar.TEST_METRICS:
        assert evaluated[f"test_{key}"] == trained[f"test_{key}"], key
    assert evaluated["eval_only"] and evaluated["epochs"] == trained["epochs"] == 1
    assert evaluated["epoch_log"] == trained["epoch_log"] and evaluated["updates"] == trained["updates"]
    more = cifar.main(args + ["--checkpoint", str(tmp_path / "again.pt"), "--eval-only", "--mc-samples", "3"])
    assert more["test_accuracy"]["posterior_mean"] == trained["test_accuracy"]["posterior_mean"]
    # an eval-only run refuses a checkpoint of another model, and trains nothing
    res = run_cli(*args, "--checkpoint", str(written_checkpoint), "--eval-only", "--width", "8")
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "--width" in lines[0], res.stderr


def test_help_shows_every_flag_with_a_default(cifar):
    parser = cifar.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    text = " ".join(parser.format_help().split())  # undo line wrapping
    assert text.count("(default:") == len(options)
    for shown in ("(default: 200)", "(default: snr_abs)", "(default: 0.01)", "(default: 0.0)", "(default: uniform)"):
        assert shown in text
    # --density has no single default: 0.1, and 1.0 (the plain network) with --deterministic
    assert "Default: 0.1, and 1.0 (the plain network) with --deterministic" in text
    assert cifar.parse_args(["--dataset", "synthetic"]).density == 0.1
    assert cifar.parse_args(["--dataset", "synthetic", "--deterministic"]).density == 1.0


def test_val_fraction_is_checked_against_the_loaded_images_before_the_model(tmp_path, cifar, no_md5, monkeypatch):
    write_cifar(tmp_path, "cifar10")  # 120 training images: 0.996 of them is all 120 (50000 would leave 200)

    def built(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(cifar, "cifar_resnet18", built)
    with pytest.raises(cifar.UsageError, match="--val-fraction 0.996: leaves no training image of the 120"):
        cifar.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--val-fraction", "0.996"] + SMALL)


def test_observed_logits_are_the_likelihoods_of_the_step(cifar):
    """The training accuracy's logits: read at the observed site, those of the pass that made the loss."""
    import pyro

    from pyro_ssvi import SSVI, BayesianClassifier, SparseSubspaceGuide, bayesianize

    torch.manual_seed(0)
    pyro.clear_param_store()
    model = BayesianClassifier(bayesianize(torch.nn.Linear(5, 3)))
    guide = SparseSubspaceGuide(model, density=0.5)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO(), total_steps=4)
    seen = []
    hook = model.net.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    observed = cifar.ObservedLogits("obs")
    with observed:
        svi.step(x, y)
    hook.remove()
    # the likelihood normalises its logits: the same up to a per-row constant, the same argmax
    torch.testing.assert_close(observed.logits, seen[-1].log_softmax(-1))
    with observed:  # a pass without the observed site leaves the last value
        guide(x)
    torch.testing.assert_close(observed.logits, seen[-1].log_softmax(-1))
    pyro.clear_param_store()


SPARSE_ARGS = ["--dataset", "synthetic", "--num-synthetic", "64", "--epochs", "2", "--width", "4", "--batch-size", "16",
               "--mc-samples", "2", "--no-progress", "--update-every", "2", "--bn-batches", "1", "--seed", "1"]


def test_the_deterministic_network_trained_sparse_keeps_exact_zeros_outside_its_masks(tmp_path, cifar):
    """--deterministic --density 0.1: the plain network masked like SSVI's sparse sites (the first convolution
    dense), swapped on SSVI's schedule; every other weight an exact zero; its counts reported like SSVI's."""
    from pyro_ssvi import SwapSchedule

    result = cifar.main(SPARSE_ARGS + ["--deterministic", "--density", "0.1", "--checkpoint", str(tmp_path / "s.pt")])
    assert result["method"] == "deterministic sparse"
    assert result["updates"] == len(SwapSchedule(2 * 4, 2, 0.3, 0.75).update_steps())
    ckpt = torch.load(tmp_path / "s.pt", weights_only=False)
    masks = ckpt["ssvi"]["masks"]["masks"]
    assert "conv1.weight" not in masks and "linear.weight" in masks
    weights = {k: v for k, v in ckpt["model"].items() if k.endswith("weight") and v.dim() in (2, 4)}
    for name, mask in masks.items():
        assert torch.all(weights[name][~mask] == 0) and mask.float().mean().item() == pytest.approx(0.1, abs=0.01)
    nonzero = sum(int((w != 0).sum()) for w in weights.values())
    assert result["active_params"] == nonzero + sum(int((weights[n][m] == 0).sum()) for n, m in masks.items())
    assert result["active_params"] < 0.15 * result["dense_params"] and result["guide_bytes"] > 0
    plain = cifar.main(SPARSE_ARGS + ["--deterministic"])  # no --density: the plain, dense network
    assert plain["method"] == "deterministic" and plain["active_params"] == plain["dense_params"]
    assert result["train_flops_per_step"] < 0.5 * plain["train_flops_per_step"]


def test_erk_allocation_reaches_the_guide_and_a_resume_with_another_is_refused(tmp_path, cifar, capsys):
    from pyro_ssvi.allocation import erk_counts
    from pyro_ssvi.models import ResNet18

    ckpt = tmp_path / "e.pt"
    result = cifar.main(SPARSE_ARGS + ["--allocation", "erk", "--stop-after", "1", "--checkpoint", str(ckpt)])
    assert result == {"stopped_after_epoch": 1, "processes": 1}
    state = torch.load(ckpt, weights_only=False)
    assert state["guide"]["_extra_state"]["allocation"] == "erk"
    shapes = {f"net.{n}": p.shape for n, p in ResNet18(10, 4).named_parameters() if n.endswith("weight") and p.dim() in (2, 4)}
    first = shapes.pop("net.conv1.weight")  # dense, off the budget
    expected = sum(erk_counts(shapes, 0.1).values()) + first.numel()
    assert expected == round(0.1 * sum(s.numel() for s in shapes.values())) + first.numel()
    result = cifar.main(SPARSE_ARGS + ["--allocation", "erk", "--checkpoint", str(ckpt), "--resume"])
    assert result["active_params"] == expected
    with pytest.raises(SystemExit) as e:
        cifar.command(SPARSE_ARGS + ["--allocation", "uniform", "--checkpoint", str(ckpt), "--resume"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allocation" in err and "Traceback" not in err
