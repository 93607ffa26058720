"""The example scripts and their files: output paths, checkpoints and flags are checked before any
data is loaded; a refusal is one line on stderr (exit 2, or 1 for a failed write), and no file is
changed or lost."""

import errno
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from pyro_ssvi.scripts.cli import run_main

from conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR = ROOT / "examples" / "cifar_resnet.py"
DIGITS = ROOT / "examples" / "digits.py"
TINY = ["--dataset", "synthetic", "--num-synthetic", "32", "--width", "4", "--epochs", "2", "--batch-size", "16",
        "--mc-samples", "1", "--bn-batches", "0", "--no-progress"]


def load(path, name):
    return load_script(path, name)


@pytest.fixture(scope="module")
def cifar():
    return load(CIFAR, "cifar_resnet_files")


@pytest.fixture(scope="module")
def digits():
    return load(DIGITS, "digits_files")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, cifar):
    """A checkpoint of a 2-epoch run stopped after its first epoch."""
    path = tmp_path_factory.mktemp("stopped") / "run.pt"
    cifar.main(TINY + ["--checkpoint", str(path), "--stop-after", "1"])
    return path


@pytest.fixture
def ckpt(tmp_path, stopped):
    """A copy of :func:`stopped` in this test's folder."""
    path = tmp_path / "run.pt"
    shutil.copyfile(stopped, path)
    return path


@pytest.fixture
def no_data(monkeypatch, cifar, digits):
    """Loading any data fails the test: refusals come before."""

    def loaded(*a, **k):
        raise AssertionError("data were loaded")

    for mod, name in ((cifar, "synthetic_cifar"), (cifar, "load_cifar"), (cifar, "load_folder"), (digits, "load_digits_split")):
        monkeypatch.setattr(mod, name, loaded)


@pytest.fixture(scope="module")
def digits_command(digits):
    """What ``python examples/digits.py ARGS`` runs."""
    return lambda argv: run_main(digits.main, argv)


def refused(capsys, command, argv, code=2):
    """Run a script's command in-process; check the exit code and a single stderr line; return that line."""
    with pytest.raises(SystemExit) as e:
        command(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert e.value.code == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def files(folder):
    return sorted(p.name for p in folder.iterdir())


# output paths ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, make, arg, named",
    [
        ("--out", "file", "f/x.json", "f/x.json"),
        ("--out", "dir", "d", "d"),
        ("--checkpoint", "dir", "d", "d"),
        ("--checkpoint", "file", "f/c.pt", "f/c.pt"),
        ("--plot", "dir", "m-reliability.png", "m-reliability.png"),
    ],
)
def test_cifar_unwritable_outputs_are_refused_up_front(tmp_path, capsys, cifar, no_data, flag, make, arg, named):
    target = tmp_path / arg.split("/")[0]
    target.mkdir() if make == "dir" else target.write_text("keep")
    argv = TINY + (["--out", str(tmp_path / "m.json"), "--plot"] if flag == "--plot" else [flag, str(tmp_path / arg)])
    before = files(tmp_path)
    line = refused(capsys, cifar.command, argv)
    assert flag in line and str(tmp_path / named) in line
    assert files(tmp_path) == before and (make == "dir" or target.read_text() == "keep")


def test_the_shift_plot_is_checked_up_front_too(tmp_path, capsys, cifar, no_data):
    (tmp_path / "m-shift.png").mkdir()
    line = refused(capsys, cifar.command, TINY + ["--out", str(tmp_path / "m.json"), "--plot", "--shift", "contrast"])
    assert "--plot" in line and str(tmp_path / "m-shift.png") in line
    assert files(tmp_path) == ["m-shift.png"]


def test_an_unwritable_folder_is_found_by_a_probe_file(tmp_path, capsys, cifar, no_data, monkeypatch):
    import pyro_ssvi.scripts.cli as cli

    def denied(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", denied)  # tests run as root: chmod would not stop them
    line = refused(capsys, cifar.command, TINY + ["--out", str(tmp_path / "m.json")])
    assert "--out" in line and "Permission denied" in line


def test_missing_output_folders_are_made_and_the_probe_removed(tmp_path, cifar, digits):
    args = cifar.parse_args(TINY + ["--out", str(tmp_path / "a" / "b" / "m.json"), "--checkpoint", str(tmp_path / "c" / "r.pt")])
    assert args.out.endswith("m.json")
    assert files(tmp_path / "a" / "b") == [] and files(tmp_path / "c") == []
    digits.parse_args(["--plot", str(tmp_path / "p" / "x.pdf")])
    assert files(tmp_path / "p") == []


def test_out_equal_to_the_checkpoint_is_refused(tmp_path, capsys, cifar, no_data, ckpt):
    before = ckpt.read_bytes()
    line = refused(capsys, cifar.command, TINY + ["--checkpoint", str(ckpt), "--resume", "--out", str(tmp_path / "." / "run.pt")])
    assert "--out" in line and "--checkpoint" in line
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("script", ["cifar", "digits"])
def test_plots_without_matplotlib_are_refused_in_one_line(tmp_path, capsys, cifar, digits_command, no_data, monkeypatch, script):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    if script == "cifar":
        line = refused(capsys, cifar.command, TINY + ["--out", str(tmp_path / "m.json"), "--plot"])
    else:
        line = refused(capsys, digits_command, ["--plot", str(tmp_path / "m.png")])
    assert "--plot" in line and "matplotlib" in line and files(tmp_path) == []


@pytest.mark.parametrize(
    "argv, flag",
    [(["--plot", "out.xyz"], "--plot"), (["--plot", "out"], "--plot"), (["--out", "."], "--out"),
     (["--out", "x.png", "--plot", "x.png"], "--plot"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr")],
)
def test_digits_refusals_are_one_line_before_any_data(tmp_path, capsys, digits_command, no_data, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, digits_command, argv)
    assert flag in line and files(tmp_path) == []


def test_digits_bad_plot_extension_end_to_end(tmp_path):
    res = subprocess.run([sys.executable, str(DIGITS), "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "out.xyz")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert ".xyz" in res.stderr and files(tmp_path) == []


# checkpoints -----------------------------------------------------------------------------------
def test_an_existing_checkpoint_is_not_overwritten_without_being_asked(capsys, cifar, no_data, ckpt):
    before = ckpt.read_bytes()
    line = refused(capsys, cifar.command, TINY + ["--checkpoint", str(ckpt)])
    assert str(ckpt) in line and "--resume" in line and "--overwrite" in line
    line = refused(capsys, cifar.command, TINY + ["--checkpoint", str(ckpt), "--resume", "--overwrite"])
    assert "--overwrite" in line and "--resume" in line
    assert ckpt.read_bytes() == before


def test_existing_checkpoint_end_to_end(ckpt):
    before = ckpt.read_bytes()
    res = subprocess.run([sys.executable, str(CIFAR), *TINY, "--checkpoint", str(ckpt)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "--overwrite" in res.stderr and ckpt.read_bytes() == before


def test_resume_without_a_checkpoint_says_so_and_starts_a_new_run(tmp_path, capsys, cifar):
    path = tmp_path / "new.pt"
    result = cifar.main(TINY + ["--checkpoint", str(path), "--resume", "--stop-after", "1"])
    assert capsys.readouterr().err == f"no checkpoint at {path}: starting a new run\n"
    assert result["stopped_after_epoch"] == 1 and path.exists()


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys, cifar, ckpt, monkeypatch):
    before = ckpt.read_bytes()

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cifar.torch, "save", full)
    line = refused(capsys, cifar.command, TINY + ["--checkpoint", str(ckpt), "--overwrite"], code=1)
    assert "--checkpoint" in line and "No space left on device" in line
    assert ckpt.read_bytes() == before and files(tmp_path) == ["run.pt"]


def test_a_checkpoint_path_that_became_a_folder_is_a_write_error(tmp_path, cifar):
    (tmp_path / "c.pt").mkdir()
    with pytest.raises(cifar.WriteError, match="--checkpoint"):
        cifar.save_atomic({"a": 1}, str(tmp_path / "c.pt"))
    assert files(tmp_path) == ["c.pt"]


def test_resume_removes_its_stale_temporary_files_and_takes_evaluation_flags(tmp_path, capsys, cifar, ckpt):
    others = [".other.pt.tmp-x", "run.pt.tmp-y", ".run.pt.bak", "notes.txt"]
    for name in [".run.pt.tmp-abc", ".run.pt.tmp-def"] + others:
        (tmp_path / name).write_text("x")
    out = tmp_path / "r.json"
    result = cifar.main(TINY + ["--checkpoint", str(ckpt), "--resume", "--mc-samples", "3", "--out", str(out)])
    assert files(tmp_path) == sorted(others + ["r.json", "run.pt"])
    assert result["epochs"] == 2 and "mc" in result["test_accuracy"]
    saved = json.loads(out.read_text())["args"]
    assert saved["mc_samples"] == 3 and saved["lr"] == 0.01 and saved["resume"]


# a run's identity -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [["--lr", "0.5"], ["--lr-scale", "0.5"], ["--kl-scale", "5"], ["--momentum", "0.5"], ["--weight-decay", "0"],
     ["--prior-scale", "0.1"], ["--removal", "snr"], ["--removal-fraction", "0.5"], ["--stop-updates-at", "0.5"],
     ["--addition", "random"], ["--no-augment"], ["--no-lrt"], ["--epochs", "3"], ["--batch-size", "8"],
     ["--bn-batches", "3"], ["--update-every", "7"], ["--deterministic"]],
)
def test_resume_refuses_another_training_flag(capsys, cifar, no_data, ckpt, change):
    before = ckpt.read_bytes()
    argv = TINY + change + ["--checkpoint", str(ckpt), "--resume"]
    line = refused(capsys, cifar.command, argv)
    assert change[0] in line and str(ckpt) in line
    assert ckpt.read_bytes() == before


def test_eval_only_records_the_training_flags_of_its_checkpoint(cifar, ckpt):
    result = cifar.main(TINY + ["--checkpoint", str(ckpt), "--eval-only", "--lr", "0.5", "--mc-samples", "2"])
    assert result["args"]["lr"] == 0.01 and result["args"]["mc_samples"] == 2 and result["epochs"] == 1


def test_every_flag_is_either_evaluation_or_identity(cifar):
    flags = set(vars(cifar.build_parser().parse_args([])))
    evaluation, run = set(cifar.EVAL_FLAGS), set(cifar.RUN_FLAGS)
    assert evaluation <= flags and not evaluation & run and evaluation | run == flags
    assert set(cifar.MODEL_FLAGS) <= run and "bn_batches" in run


# flag values -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [["--removal", "bogus"], ["--removal-fraction", "1.5"], ["--removal-fraction", "-0.1"], ["--stop-updates-at", "3"],
     ["--stop-updates-at", "0"], ["--lr", "-1"], ["--lr", "nan"], ["--lr-scale", "inf"], ["--lr-scale", "0"],
     ["--prior-scale", "0"], ["--prior-scale", "inf"], ["--val-fraction", "0.999"], ["--val-fraction", "nan"],
     ["--kl-scale", "-1"], ["--kl-scale", "nan"], ["--momentum", "5"], ["--momentum", "1"], ["--weight-decay", "-1"],
     ["--weight-decay", "inf"], ["--density", "nan"]],
)
def test_cifar_flag_values_are_checked_up_front(capsys, cifar, no_data, argv):
    line = refused(capsys, cifar.command, TINY + argv)
    assert argv[0] in line


def test_val_fraction_against_the_known_cifar_size(capsys, cifar, no_data):
    line = refused(capsys, cifar.command, ["--dataset", "cifar10", "--val-fraction", "0.99999"])
    assert "--val-fraction" in line and "50000" in line
    line = refused(capsys, cifar.command, ["--dataset", "cifar100", "--subset", "10", "--val-fraction", "0.96"])
    assert "--val-fraction" in line and "10" in line
