"""examples/cifar_resnet.py on image folders: --dataset folder, --ood folder:, --shift, --calibrate,
--deterministic and --init-from, on tiny generated PNG folders (width 4, 1 epoch)."""

import json
import pathlib
import shutil

import pytest
import torch

from test_folder_data import _pixels, _save, make_folder

from conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cifar_resnet.py"
CLASSES = ("ant", "bee", "cat")
TINY = ["--epochs", "1", "--width", "4", "--batch-size", "8", "--mc-samples", "2", "--bn-batches", "0", "--no-progress"]


@pytest.fixture(scope="module")
def cifar():
    return load_script(SCRIPT, "cifar_resnet_features")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``{"data": 16x16 images plus one 12x12, "uniform": all 16x16, "ood": 12x12 images}``; the decode cache in tmp."""
    root = tmp_path_factory.mktemp("folders")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        make_folder(root / "data", classes=CLASSES, n_train=6, n_test=3, size=(16, 16))
        _save(root / "data" / "train" / "bee" / "odd.png", _pixels(99, (12, 12)))  # mixed sizes: needs --image-size
        make_folder(root / "uniform", classes=CLASSES, n_train=4, n_test=2, size=(16, 16))
        for i in range(5):
            _save(root / "ood" / f"{i}.png", _pixels(200 + i, (12, 12)))
        yield {name: root / name for name in ("data", "uniform", "ood")}


def folder_args(folders, *more):
    return ["--dataset", "folder", "--data-dir", str(folders["data"]), "--image-size", "16", *TINY, *more]


@pytest.fixture(scope="module")
def deterministic(tmp_path_factory, cifar, folders):
    """A --deterministic run on the folder with every evaluation: its checkpoint and JSON."""
    tmp = tmp_path_factory.mktemp("det")
    out, ckpt = tmp / "d.json", tmp / "d.pt"
    cifar.main(folder_args(folders, "--deterministic", "--val-fraction", "0.2", "--calibrate", "--shift", "gaussian_noise,contrast",
                           "--ood", f"folder:{folders['ood']}", "--checkpoint", str(ckpt), "--out", str(out), "--plot"))
    return ckpt, json.loads(out.read_text()), tmp


def refused(capsys, cifar, argv):
    with pytest.raises(SystemExit) as e:
        cifar.command(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def check_shift(shift, kinds, names):
    assert set(shift) == set(kinds)
    for res in shift.values():
        assert set(res) == {"by_corruption", "mean"} and list(res["by_corruption"]) == list(names)
        for cells in list(res["by_corruption"].values()) + [res["mean"]]:
            assert list(cells) == ["1", "2", "3", "4", "5"]
            for m in cells.values():
                assert set(m) == {"accuracy", "nll", "ece"} and 0 <= m["accuracy"] <= 1 and m["nll"] > 0
        for s in "12345":
            rows = [cells[s]["ece"] for cells in res["by_corruption"].values()]
            assert res["mean"][s]["ece"] == pytest.approx(sum(rows) / len(rows))


def test_deterministic_baseline_on_a_folder(cifar, deterministic, folders):
    ckpt, result, tmp = deterministic
    assert result["classes"] == list(CLASSES) and result["train_images"] + result["val_images"] == 19
    assert result["method"] == "deterministic" and result["density"] == 1.0 and result["updates"] == 0
    for metric in cifar.TEST_METRICS:
        assert list(result[f"test_{metric}"]) == ["network"]
    assert result["active_params"] == result["dense_params"] > 0
    weights = result["dense_params"] * 4
    assert weights < result["guide_bytes"] < 3 * weights  # parameters (with batch norm) and SGD momentum
    assert result["train_flops_per_step"] > 0 and "dense_vi_train_flops_per_step" not in result
    assert list(result["temperature"]) == list(result["test_nll_calibrated"]) == list(result["test_ece_calibrated"]) == ["network"]
    assert result["temperature"]["network"] > 0
    check_shift(result["shift"], ["network"], ["gaussian_noise", "contrast"])
    ood = f"folder:{folders['ood']}"
    assert list(result["ood"]) == [ood] and list(result["ood"][ood]) == ["network"]
    assert len(result["normalisation"]["mean"]) == 3
    for suffix in ("reliability", "uncertainty", "shift"):
        assert (tmp / f"d-{suffix}.png").stat().st_size > 5000
    saved = torch.load(ckpt, weights_only=False)
    assert saved["guide"] is None and saved["args"]["deterministic"]


def test_init_from_starts_the_guide_at_the_deterministic_weights(cifar, deterministic, folders):
    ckpt = deterministic[0]
    weights = torch.load(ckpt, weights_only=False)["model"]
    args = cifar.parse_args(folder_args(folders, "--init-from", str(ckpt)))
    state = cifar.read_init_state(str(ckpt), 3, 4)
    model = cifar.build_model(args, 3, 16, state)
    guide = cifar.build_guide(args, model, pretrained=True)
    model.eval()  # as the script sets the guide up: batch-norm statistics untouched
    guide.setup(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert guide.init_subspace == "magnitude"
    median = guide.median()
    for site in guide.site_names:
        w = weights[site[len("net."):]]
        mask = guide.active_mask(site)
        assert torch.equal(median[site][mask], w[mask]), site
        if site in guide.sparse_site_names():  # the active set: the largest magnitudes
            k = guide.site_info(site).k
            assert w.abs()[mask].min() >= w.abs().reshape(-1).topk(k).values.min()
    assert torch.equal(model.net.bn1.running_mean, weights["bn1.running_mean"])  # batch norm loaded too


def test_init_from_run_with_calibration_and_shift(tmp_path, capsys, cifar, deterministic, folders):
    ckpt = tmp_path / "init.pt"
    shutil.copyfile(deterministic[0], ckpt)
    # --no-lrt: the working tree's local reparameterisation currently corrupts the heap on some batch shapes (not this script's code)
    result = cifar.main(folder_args(folders, "--init-from", str(ckpt), "--val-fraction", "0.2", "--calibrate", "--shift", "contrast",
                                    "--no-lrt", "--checkpoint", str(tmp_path / "s.pt")))
    assert result["method"] == "SSVI" and result["args"]["init_from_sha256"] == cifar.file_sha256(str(ckpt))
    for key in ("temperature", "test_nll_calibrated", "test_ece_calibrated", "test_nll", "test_ece"):
        assert set(result[key]) == {"mc", "posterior_mean"}, key
    assert all(v > 0 for v in result["temperature"].values())
    check_shift(result["shift"], ["mc", "posterior_mean"], ["contrast"])
    # --init-from is part of the run's identity (its path and its content), --shift and --calibrate are not
    assert "init_from" in cifar.RUN_FLAGS and {"shift", "calibrate"} <= set(cifar.EVAL_FLAGS)
    torch.save(torch.load(ckpt, weights_only=False)["model"], ckpt)  # another file at the same path
    line = refused(capsys, cifar, folder_args(folders, "--init-from", str(ckpt), "--val-fraction", "0.2", "--no-lrt",
                                              "--checkpoint", str(tmp_path / "s.pt"), "--resume"))
    assert "--init-from" in line and "changed" in line


def test_shift_is_deterministic_under_the_seed(cifar):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (12,))

    def predict(xc):  # an MC-like predictive: noise drawn from the (reseeded) global RNG
        z = net(xc.float() / 255)
        return {"mc": torch.stack([(z + torch.randn_like(z)).softmax(-1) for _ in range(2)]), "posterior_mean": z.softmax(-1)[None]}

    names = ["gaussian_noise", "impulse_noise"]
    a = cifar.evaluate_shift(predict, x, y, names, seed=3)
    b = cifar.evaluate_shift(predict, x, y, names, seed=3)
    c = cifar.evaluate_shift(predict, x, y, names, seed=4)
    assert a == b and a != c
    check_shift(a, ["mc", "posterior_mean"], names)
    # a cell does not depend on the other corruptions evaluated
    alone = cifar.evaluate_shift(predict, x, y, ["impulse_noise"], seed=3)
    assert alone["mc"]["by_corruption"]["impulse_noise"] == a["mc"]["by_corruption"]["impulse_noise"]
    # nor on the other severities: --shift-severities 3,5 gives the cells 3 and 5 of the full evaluation
    some = cifar.evaluate_shift(predict, x, y, names, seed=3, severities=(3, 5))
    for kind in ("mc", "posterior_mean"):
        assert list(some[kind]["mean"]) == ["3", "5"]
        for name in names:
            full = a[kind]["by_corruption"][name]
            assert some[kind]["by_corruption"][name] == {"3": full["3"], "5": full["5"]}


def test_shift_sample_is_fixed_spread_and_seed_free(cifar):
    assert torch.equal(cifar.shift_sample(7, None), torch.arange(7)) and torch.equal(cifar.shift_sample(7, 9), torch.arange(7))
    a = cifar.shift_sample(10000, 2000)
    torch.manual_seed(123)  # the global RNG does not move it
    b = cifar.shift_sample(10000, 2000)
    assert torch.equal(a, b) and len(a.unique()) == 2000 and bool((a[1:] > a[:-1]).all())
    # a folder lists its test images class by class: each block of 1000 (one class) gets 200 +- 4 sd (hypergeometric)
    per_class = torch.bincount(a // 1000, minlength=10).double()
    sd = (2000 * 0.1 * 0.9 * (10000 - 2000) / (10000 - 1)) ** 0.5
    assert bool(((per_class - 200).abs() <= 4 * sd).all()), per_class


def test_shift_severities_and_images_in_the_result(tmp_path, cifar, folders):
    out = tmp_path / "r.json"
    result = cifar.main(folder_args(folders, "--shift", "contrast", "--shift-severities", "5, 3", "--shift-images", "4", "--out", str(out)))
    assert result["shift_images"] == 4 and list(result["shift"]["mc"]["mean"]) == ["3", "5"]
    assert json.loads(out.read_text())["args"]["shift_severities"] == [3, 5]
    assert {"shift_severities", "shift_images"} <= set(cifar.EVAL_FLAGS)


# one-line refusals ------------------------------------------------------------------------------
def broken_folder(tmp_path, folders, breakage):
    root = tmp_path / "data"
    shutil.copytree(folders["uniform"], root)
    if breakage == "empty":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif breakage == "class without images":
        (root / "train" / "dog").mkdir()
    elif breakage == "unreadable file":
        (root / "train" / "ant" / "0001.png").write_bytes(b"not an image")
    elif breakage == "unknown test class":
        shutil.copytree(root / "test" / "ant", root / "test" / "yak")
    return root


@pytest.mark.parametrize(
    "breakage, named",
    [("empty", "no class folders"), ("class without images", "dog"), ("unreadable file", "0001.png"), ("unknown test class", "yak")],
)
def test_bad_image_folders_are_one_line(tmp_path, capsys, cifar, folders, monkeypatch, breakage, named):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = broken_folder(tmp_path, folders, breakage)
    line = refused(capsys, cifar, ["--dataset", "folder", "--data-dir", str(root), *TINY])
    assert "--dataset folder" in line and named in line


def test_mixed_sizes_and_ood_sizes_are_one_line(tmp_path, capsys, cifar, folders, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    line = refused(capsys, cifar, ["--dataset", "folder", "--data-dir", str(folders["data"]), *TINY])
    assert "odd.png" in line and "--image-size N" in line
    line = refused(capsys, cifar, ["--dataset", "folder", "--data-dir", str(folders["uniform"]), "--ood", f"folder:{folders['ood']}", *TINY])
    assert "--ood folder:" in line and "12x12" in line and "--image-size" in line


@pytest.mark.parametrize(
    "argv, named",
    [(["--calibrate"], "--val-fraction"), (["--shift", "fog"], "fog"), (["--image-size", "16"], "--image-size"),
     (["--ood", "folder:/nowhere/at/all"], "--ood"), (["--init-from", "/nowhere.pt"], "--init-from"),
     (["--shift-severities", "6"], "--shift-severities"), (["--shift-severities", ","], "--shift-severities"),
     (["--shift-images", "0"], "--shift-images")],
)
def test_bad_new_flags_are_one_line_before_any_data(capsys, cifar, argv, named):
    line = refused(capsys, cifar, ["--dataset", "synthetic", *TINY, *argv])
    assert named in line


def test_init_from_another_network_is_one_line(tmp_path, capsys, cifar, deterministic, folders, monkeypatch):
    ckpt = deterministic[0]
    line = refused(capsys, cifar, folder_args(folders, "--width", "8", "--init-from", str(ckpt)))
    assert "--init-from" in line and "'conv1.weight'" in line and "(4, 3, 3, 3)" in line and "(8, 3, 3, 3)" in line
    # another number of classes (a plain state_dict), and a file that is no network at all
    from pyro_ssvi.models import ResNet18

    torch.save(ResNet18(5, 4).state_dict(), tmp_path / "five.pt")
    line = refused(capsys, cifar, folder_args(folders, "--init-from", str(tmp_path / "five.pt")))
    assert "'linear.weight'" in line and "(5, 32)" in line and "3 classes" in line
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    line = refused(capsys, cifar, folder_args(folders, "--init-from", str(tmp_path / "foreign.pt")))
    assert "--init-from" in line and "'conv1.weight'" in line and "missing" in line


def test_deterministic_is_part_of_the_identity(tmp_path, capsys, cifar, deterministic, folders):
    path = tmp_path / "d.pt"
    shutil.copyfile(deterministic[0], path)
    line = refused(capsys, cifar, folder_args(folders, "--val-fraction", "0.2", "--checkpoint", str(path), "--resume"))
    assert "--deterministic" in line and str(path) in line


def test_eval_only_of_a_deterministic_checkpoint(cifar, deterministic, folders):
    ckpt, trained, _ = deterministic
    again = cifar.main(folder_args(folders, "--deterministic", "--val-fraction", "0.2", "--checkpoint", str(ckpt), "--eval-only"))
    assert again["eval_only"] and again["test_accuracy"] == trained["test_accuracy"] and again["test_nll"] == trained["test_nll"]
