"""SSVI on CIFAR-10/100 with a Bayesian ResNet-18: the reference recipe of Li, Miao, Qiu, Zhang (ICLR 2024).

Full recipe on a GPU (CIFAR-10 at density 0.1, 200 epochs)::

    python examples/cifar_resnet.py --data-dir ./data --download --out cifar10.json --checkpoint ckpt.pt

Dense VI baseline through the same code path: ``--density 1.0``. The deterministic baseline
(the same ResNet-18 as a plain network, SGD on the cross-entropy): ``--deterministic``. CPU
smoke run::

    python examples/cifar_resnet.py --dataset synthetic --epochs 2 --width 8 --subset 512

Defaults are the recipe: batch 128, SGD momentum 0.9, lr 0.01 on the means (weight decay
5e-4) and on the scales (no weight decay), cosine learning rate over the epochs, prior
N(0, 0.005^2), KL weight ``kl_scale = 0.01`` warmed up linearly over the first half of the
steps (``--kl-scale 1`` is the true ELBO), update_every 100, removal_fraction 0.3,
stop_updates_at 0.75, removal ``snr_abs``, addition ``gradient``, local reparameterisation,
random crop (pad 4) and horizontal flip, training on all training images. ``--val-fraction F``
holds out a validation split that is monitored each epoch; the test set is evaluated once, at
the end, and never picks a checkpoint.

Data: torchvision's CIFAR-10/100 (``--dataset cifar10|cifar100``), CIFAR-shaped synthetic
templates (``--dataset synthetic``), or an image folder ``DIR/train/<class>/*``,
``DIR/test/<class>/*`` (``--dataset folder --data-dir DIR [--image-size N]``, through
``examples/folder_data.py``: classes are the sorted folder names, the network's head has one
output per class, and the images are normalised by the training images' channel means and
standard deviations). Evaluation: ``--ood`` (torchvision sets or ``folder:PATH``), ``--shift``
(the CIFAR-10-C-style corruptions of ``examples/corruptions.py`` at severities 1-5) and
``--calibrate`` (temperature scaling fitted on the validation split). ``--init-from CKPT``
starts SSVI from a trained deterministic network (fine-tuning for ``--epochs``).

Several processes (GPUs, or CPU processes with gloo) with PyTorch's launcher::

    torchrun --nproc_per_node=4 examples/cifar_resnet.py --data-dir ./data --out cifar10.json --checkpoint ckpt.pt

``--batch-size`` stays the global batch: each of the N ranks takes its 1/N of every batch of
one shared, per-epoch shuffle. SSVI keeps the ranks' subspaces identical (see
``pyro_ssvi.distributed``); the deterministic network's gradients are averaged over the ranks;
the KL is weighted by the full training set; rank 0 alone prints, writes checkpoints and
``--out``; the test set (and each shifted test set) is split across ranks and gathered. A
checkpoint does not depend on the number of processes: one written by N resumes on M.

Files and flags are checked before any data is loaded: ``--out``, the ``--plot`` images and
``--checkpoint`` must be writable (missing folders are made) and distinct; an existing
checkpoint is continued with ``--resume`` (refused if a training flag differs from the one it was
written with: only the flags of ``EVAL_FLAGS`` may change) or replaced with ``--overwrite``,
never silently. A failed checkpoint write (a full disk) keeps the previous checkpoint and exits 1.

The script reads as a recipe: :func:`load_data` (the loaders, augmentation and normalisation
live in the sibling ``examples/cifar_data.py``), :func:`build_model` / :func:`build_guide`,
the training run (:class:`BayesianRun` or :class:`DeterministicRun`, each with ``step``,
``predict_batch`` and ``state_dict``), :func:`train_one_epoch`, :func:`evaluate`,
:func:`save_checkpoint` / :func:`load_checkpoint`, and :func:`main` wiring them.
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer.autoguide.initialization import init_to_value

from pyro_ssvi import SSVI, SparseSubspaceGuide, SwapSchedule
from pyro_ssvi.allocation import ALLOCATIONS
from pyro_ssvi.masks import SparseMasks
from pyro_ssvi.scripts.cli import ArgumentParser, run_main
from pyro_ssvi.criteria import REMOVAL_CRITERIA
from pyro_ssvi.cost import dense_guide_bytes, flops_report, guide_state_bytes, tensor_bytes
from pyro_ssvi.distributed import average_, broadcast_state, leave_process_group
from pyro_ssvi.finite import NonFiniteLossError, gradient_max_abs
from pyro_ssvi.guide import init_to_normal
from pyro_ssvi.handlers import KLScaleMessenger
from pyro_ssvi.metrics import (
    apply_temperature,
    classification_metrics,
    fit_temperature,
    mc_predict,
    mean_predict,
    ood_report,
    predictive_entropy,
    selective_metrics,
)
from pyro_ssvi.models import (
    BayesianClassifier,
    ResNet18,
    bayesianize,
    cifar_resnet18,
    clear_pretrained_values,
    pretrained_values,
    recalibrate_batchnorm,
)

# the sibling modules examples/cifar_data.py, folder_data.py and corruptions.py, however this file is run
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from cifar_data import (  # noqa: E402
    MEAN,
    NUM_CLASSES,
    OOD_SETS,
    STD,
    UsageError,
    augment,
    load_cifar,
    load_folder,
    load_ood,
    normalise,
    resize_images,
    synthetic_cifar,
)
from corruptions import CORRUPTIONS, SEVERITIES, corrupt, corruption_seed, parse_severities, parse_shift  # noqa: E402
from folder_data import FolderDataError, channel_stats, load_images  # noqa: E402


class WriteError(Exception):
    """A checkpoint or output file could not be written (a full disk...); one line, exit code 1."""


# data (the loaders live in examples/cifar_data.py) ------------------------------------
def load_ood_set(name, args, image_hw):
    """The images of one ``--ood`` entry (a torchvision set or ``folder:PATH``), at the training image size.

    With ``--image-size N`` they are resized to ``N x N``; without it, images of another size than the
    training images are refused in one line.
    """
    if name.startswith("folder:"):
        path = name[len("folder:") :]
        try:
            x = load_images(path, image_size=args.image_size, progress=not args.no_progress)
        except FolderDataError as e:
            raise UsageError(f"--ood {name}: {str(e).replace('image_size=N', '--image-size N')}") from e
    else:
        x = load_ood(name, args.data_dir, args.download)
        if args.image_size is not None:
            x = resize_images(x, args.image_size)
    if tuple(x.shape[-2:]) != tuple(image_hw):
        (h, w), (th, tw) = x.shape[-2:], image_hw
        raise UsageError(
            f"--ood {name}: its images are {w}x{h} (width x height) but the training images are {tw}x{th}; "
            "pass --image-size N to resize both"
        )
    return x


def load_data(args):
    """``(train, test, classes, (mean, std))``: uint8 images and labels of the run's data set, with the
    normalisation constants (for ``folder``: computed later from the training images, so ``None``)."""
    if args.dataset == "synthetic":
        train, test = synthetic_cifar(args.num_synthetic, max(64, args.num_synthetic // 2), seed=args.seed)
        return train, test, tuple(str(c) for c in range(10)), ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    if args.dataset == "folder":
        (x, y), test, classes = load_folder(args.data_dir, args.image_size, not args.no_progress)
        # a folder lists its images class by class: one fixed shuffle (the same for every --seed) before
        # --subset and --val-fraction take their first and last images
        order = torch.randperm(len(x), generator=torch.Generator("cpu").manual_seed(0), device="cpu")
        return (x[order], y[order]), test, classes, None
    train, test = load_cifar(args.dataset, args.data_dir, args.download)
    return train, test, tuple(str(c) for c in range(NUM_CLASSES[args.dataset])), (MEAN[args.dataset], STD[args.dataset])


# checkpoints -----------------------------------------------------------------------------
def temp_prefix(path):
    """Name prefix of the temporary files of checkpoint ``path``: ``.<name>.tmp-`` in its folder."""
    return f".{os.path.basename(path)}.tmp-"


def save_atomic(obj, path):
    """Write ``obj`` with torch.save to a temporary file in the same folder, then rename.

    A failed write (a full disk, an unwritable folder) removes the temporary file, leaves the
    previous checkpoint as it was and raises :class:`WriteError`.
    """
    folder = os.path.dirname(path) or "."
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path))
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(f"--checkpoint {path}: writing failed ({e.strerror or e}); the previous checkpoint is kept") from e
        raise


def remove_stale_temps(path):
    """Remove the temporary files that interrupted writes of checkpoint ``path`` left (no other file)."""
    folder = os.path.dirname(path) or "."
    for name in os.listdir(folder):
        stale = os.path.join(folder, name)
        if name.startswith(temp_prefix(path)) and os.path.isfile(stale):
            os.unlink(stale)


def write_outputs(args, result, predictions, say):
    """Write ``--out`` (and with ``--plot`` the images beside it); a failed write is a :class:`WriteError`.

    ``predictions``: ``{"test": prediction, "y": labels, "ood": {name: prediction}}``.
    """
    try:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        if args.plot:
            paths = list(save_plots(args.out, predictions["test"], predictions["y"], predictions["ood"]))
            if result.get("shift"):
                paths.append(save_shift_plot(plot_paths(args.out, shift=True)[-1], result))
            for path in paths:
                say(f"plot: {path}")
    except OSError as e:
        raise WriteError(f"--out: writing {e.filename or args.out} failed ({e.strerror or e})") from e


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# A run's flags are its identity. EVAL_FLAGS only say what to evaluate, where the files and
# data are, and how this invocation runs: they may change between a run and its --resume or
# --eval-only. Every other flag (RUN_FLAGS, defined below the parser) fixes the training, so a
# new flag is part of the identity unless it is added here. --bn-batches is a training flag: it
# recomputes the batch-norm statistics that training goes on from after each validation.
# --shift and --calibrate are evaluation: the temperature is fitted after training, on the
# validation split, and never changes the trained weights. --kernel-decisions only starts a new
# run (the checkpoints then carry the choices in the guide's state).
EVAL_FLAGS = (
    "mc_samples", "out", "plot", "ood", "no_progress", "checkpoint", "resume", "overwrite", "stop_after", "eval_only",
    "data_dir", "download", "device", "shift", "shift_severities", "shift_images", "calibrate", "kernel_decisions",
)
#: flags that fix the model and the data: --eval-only needs a checkpoint that agrees on them
MODEL_FLAGS = ("dataset", "width", "density", "allocation", "head_dense", "prior_scale", "subset", "val_fraction", "num_synthetic", "seed", "deterministic",
               "image_size")
#: the training flags that an --eval-only run uses as given (the others come from its checkpoint)
EVAL_TIME_FLAGS = EVAL_FLAGS + ("bn_batches",)
CHECKPOINT_KEYS = ("model", "guide", "optimizer", "scheduler", "ssvi", "rng", "epoch", "seconds", "log", "args")


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def load_checkpoint(path, args, device, flags=None):
    """Read a checkpoint written by this script and check it belongs to a run with the same ``flags``
    (default: every flag of :data:`RUN_FLAGS`).

    Raises :class:`UsageError` naming the file, and the first flag that differs, for an
    unreadable, foreign or mismatching checkpoint.
    """
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # torch.load raises many types for a corrupt file
        raise UsageError(f"--checkpoint {path}: not a readable checkpoint ({_first_line(e)})") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS) or not isinstance(ckpt["args"], dict):
        raise UsageError(f"--checkpoint {path}: not a checkpoint of examples/cifar_resnet.py (keys missing)")
    saved, current = ckpt["args"], vars(args)
    # --deterministic first: it decides what --density means, so a mismatch there is the one to name
    for flag in sorted(RUN_FLAGS if flags is None else flags, key=lambda f: f != "deterministic"):
        # a flag newer than the checkpoint had its default value there
        if saved.get(flag, RUN_DEFAULTS[flag]) != current[flag]:
            raise UsageError(
                f"--checkpoint {path}: written with --{flag.replace('_', '-')} {saved.get(flag, RUN_DEFAULTS[flag])}, this run has "
                f"{current[flag]}; use the same flag or another --checkpoint"
            )
    if flags is None and current.get("init_from") and os.path.isfile(current["init_from"]):
        saved_hash, now = saved.get("init_from_sha256"), file_sha256(current["init_from"])
        if saved_hash is not None and saved_hash != now:
            raise UsageError(
                f"--checkpoint {path}: started from --init-from {current['init_from']} with sha256 {saved_hash[:12]}..., "
                f"but that file now has {now[:12]}...; it changed since: use another --checkpoint"
            )
    return ckpt


def save_checkpoint(run, epoch, elapsed, epochs_log, flags, path):
    """Write the whole state of a run after ``epoch`` (0-based) to ``path`` atomically (:func:`save_atomic`)."""
    save_atomic({**run.state_dict(), "rng": rng_state(), "epoch": epoch, "seconds": elapsed, "log": epochs_log, "args": flags}, path)


def file_sha256(path):
    """sha256 of a file's bytes (hex), recorded for ``--init-from`` so a resumed run starts from the same file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_init_state(path, num_classes, width):
    """The plain ResNet-18 ``state_dict`` that ``--init-from`` starts from, checked against this run's network.

    ``path`` holds a ``--deterministic`` run's checkpoint or a plain ``state_dict`` of
    ``pyro_ssvi.models.ResNet18(num_classes, width)``. A foreign file, or a network of another width
    or number of classes (a missing, unexpected or differently shaped tensor), is a one-line
    :class:`UsageError` naming the first differing tensor.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises many types for a corrupt file
        raise UsageError(f"--init-from {path}: not a readable checkpoint or state_dict ({_first_line(e)})") from e
    if isinstance(obj, dict) and all(k in obj for k in CHECKPOINT_KEYS) and isinstance(obj.get("args"), dict):
        if not obj["args"].get("deterministic"):
            raise UsageError(
                f"--init-from {path}: a checkpoint of a Bayesian run (--density {obj['args'].get('density')}); "
                "pass a --deterministic run's checkpoint or a plain ResNet18 state_dict"
            )
        state = obj["model"]
    elif isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        state = obj
    else:
        raise UsageError(f"--init-from {path}: neither a --deterministic run's checkpoint nor a ResNet18 state_dict")
    with torch.device("meta"):  # shapes only: no memory, and the random number generators are untouched
        reference = ResNet18(num_classes, width).state_dict()
    here = f"this run's network (--width {width}, {num_classes} classes)"
    for key, tensor in reference.items():
        if key not in state:
            raise UsageError(f"--init-from {path}: tensor {key!r} {tuple(tensor.shape)} of {here} is missing there")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UsageError(f"--init-from {path}: tensor {key!r} is {tuple(state[key].shape)} there but {tuple(tensor.shape)} in {here}")
    unexpected = [k for k in state if k not in reference]
    if unexpected:
        raise UsageError(f"--init-from {path}: unexpected tensor {unexpected[0]!r} {tuple(state[unexpected[0]].shape)}, not in {here}")
    return state


# evaluation ------------------------------------------------------------------------------
# A prediction is ``{predictive: (S, N, C) class probabilities on the CPU}``: for a Bayesian run
# "mc" (S weight draws; absent when --mc-samples 0) and "posterior_mean" (S = 1); for a
# --deterministic run "network" (S = 1). Every per-predictive JSON field uses these keys.
@torch.no_grad()
def predict(run, x, prep, mc_samples, batch_size):
    """:meth:`predict_batch` of ``run`` over ``x`` in batches, in eval mode; ``{predictive: (S, N, C)}``."""
    run.module.eval()
    parts = {}
    try:
        for start in range(0, len(x), batch_size):
            for kind, probs in run.predict_batch(prep(x[start : start + batch_size]), mc_samples).items():
                parts.setdefault(kind, []).append(probs.cpu())
    finally:
        run.module.train()
    return {kind: torch.cat(p, dim=1) for kind, p in parts.items()}


def predict_sharded(run, x, prep, mc_samples, batch_size, world):
    """:func:`predict` with the images split across the ``world`` ranks and gathered in order."""
    if world == 1:
        return predict(run, x, prep, mc_samples, batch_size)
    part = torch.tensor_split(torch.arange(len(x)), world)[torch_dist.get_rank()]
    mine = predict(run, x[part.to(x.device)], prep, mc_samples, batch_size)
    parts = [None] * world
    torch_dist.all_gather_object(parts, mine)
    return {kind: torch.cat([p[kind] for p in parts], dim=1) for kind in mine}


def start_processes(args):
    """``(rank, world, device)``; under torchrun (``WORLD_SIZE`` > 1) joins the process group:
    nccl on CUDA (one GPU per local rank), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if world == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch_dist.init_process_group("nccl" if cuda else "gloo")
    return torch_dist.get_rank(), world, device


def primary(prediction):
    """The predictive the summaries show: "mc" when there are MC draws, else the only other one."""
    return "mc" if "mc" in prediction else next(iter(prediction))


def report(prediction, y):
    """Classification and selective-prediction metrics of every predictive: ``{predictive: {metric: value}}``."""
    y = y.cpu()
    out = {}
    for kind, draws in prediction.items():
        probs = draws.mean(0)
        out[kind] = {**classification_metrics(probs, y), **selective_metrics(probs, y)}
    return out


def ood_results(in_prediction, out_prediction):
    """``{predictive: {score: {"auroc", "aupr", "fpr95"}}}``; a single-draw predictive has entropy only."""
    return {kind: ood_report(in_prediction[kind], out_prediction[kind]) for kind in in_prediction}


#: metrics of every shifted test set (corruption x severity)
SHIFT_METRICS = ("accuracy", "nll", "ece")


def evaluate_shift(predict_fn, x, y, names, seed, rank=0, progress=False, severities=SEVERITIES):
    """Metrics of the test set under CIFAR-10-C-style corruptions at ``severities`` (default 1-5).

    ``predict_fn(x_uint8) -> {predictive: (S, N, C)}`` predicts a whole (corrupted) uint8 test set.
    Each (corruption, severity) is drawn with ``corruption_seed(seed, name, severity)`` and its
    MC draws are seeded alike, so every cell is reproducible on its own, whatever the order or
    subset of ``names``. Returns ``{predictive: {"by_corruption": {name: {"1": {accuracy, nll,
    ece}, ...}}, "mean": {"1": {...}, ..., "5": {...}}}}``, the means taken over the corruptions
    (only the keys of ``severities``).
    """
    from tqdm.auto import tqdm

    y = y.cpu()
    out = {}
    with tqdm(total=len(names) * len(severities), desc="shift", disable=not progress, leave=False) as bar:
        for name in names:
            for severity in severities:
                cell_seed = corruption_seed(seed, name, severity)
                shifted = corrupt(x, name, severity, generator=cell_seed)
                pyro.set_rng_seed((cell_seed + 7919 * rank) % 2**32)
                for kind, draws in predict_fn(shifted).items():
                    m = classification_metrics(draws.mean(0), y)
                    cells = out.setdefault(kind, {"by_corruption": {}, "mean": {}})["by_corruption"].setdefault(name, {})
                    cells[str(severity)] = {k: m[k] for k in SHIFT_METRICS}
                bar.set_postfix(corruption=name, severity=severity)
                bar.update(1)
    for res in out.values():
        for severity in severities:
            rows = [cells[str(severity)] for cells in res["by_corruption"].values()]
            res["mean"][str(severity)] = {k: sum(r[k] for r in rows) / len(rows) for k in SHIFT_METRICS}
    return out


def shift_sample(n, count):
    """Indices of the test images scored under shift: all ``n`` when ``count`` is None, else ``count``
    of them drawn without replacement by a fixed generator (seed 0, whatever the run's seed, so that every
    method and seed is scored on the same images), in increasing order. An image folder lists its test
    images class by class, so the first ``count`` would not do."""
    if count is None or count >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:count].sort().values


def calibration(val_prediction, yval, test_prediction, yte):
    """Temperature scaling per predictive: ``T`` fitted by NLL on the validation predictive
    (``metrics.fit_temperature`` on its probabilities, i.e. the log of the MC average for "mc"),
    applied to the test predictive. Returns ``{"temperature", "nll", "ece"}``, each ``{predictive: value}``."""
    out = {"temperature": {}, "nll": {}, "ece": {}}
    for kind, draws in val_prediction.items():
        T = fit_temperature(draws.mean(0).double(), yval.cpu(), from_probs=True)
        calibrated = apply_temperature(test_prediction[kind].mean(0).double(), T, from_probs=True)
        m = classification_metrics(calibrated, yte.cpu())
        out["temperature"][kind], out["nll"][kind], out["ece"][kind] = T, m["nll"], m["ece"]
    return out


def save_plots(out_path, test_prediction, y, ood_predictions):
    """``<out>-reliability.png`` and ``<out>-uncertainty.png`` beside the JSON; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_ssvi.scripts.plots import plot_reliability, plot_uncertainty_histograms

    kind = primary(test_prediction)
    probs = test_prediction[kind].mean(0)
    paths = plot_paths(out_path)
    fig, ax = plt.subplots(figsize=(4, 4))
    plot_reliability(probs, y.cpu(), ax=ax)
    ax.set_title(f"test ({kind.replace('_', ' ')}): " + ax.get_title())
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    scores = {"test (in-distribution)": predictive_entropy(test_prediction[kind])}
    scores.update({name: predictive_entropy(pred[kind]) for name, pred in ood_predictions.items()})
    plot_uncertainty_histograms(scores, ax=ax, xlabel=f"predictive entropy ({kind.replace('_', ' ')})")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def save_shift_plot(path, result):
    """Accuracy and ECE against corruption severity (Ovadia et al., NeurIPS 2019): boxes over the
    corruptions for the summary predictive, the mean over corruptions of every predictive as a
    line; severity 0 is the clean test set. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shift = result["shift"]
    main_kind = "mc" if "mc" in shift else next(iter(shift))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    severities = sorted(int(s) for s in shift[main_kind]["mean"])
    for ax, metric in zip(axes, ("accuracy", "ece")):
        clean = result[f"test_{metric}"]
        boxes = [[cells[str(s)][metric] for cells in shift[main_kind]["by_corruption"].values()] for s in severities]
        ax.boxplot(boxes, positions=severities, widths=0.5)
        for kind, res in shift.items():
            ys = [clean[kind]] + [res["mean"][str(s)][metric] for s in severities]
            ax.plot([0] + severities, ys, marker="o", label=f"{kind.replace('_', ' ')} (mean)")
        ax.set_xticks(range(len(SEVERITIES) + 1))
        ax.set_xticklabels(["clean"] + [str(s) for s in SEVERITIES])
        ax.set_xlim(-0.5, len(SEVERITIES) + 0.5)
        ax.set_xlabel("corruption severity")
        ax.set_ylabel(f"test {metric if metric == 'accuracy' else 'ECE'}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"dataset shift: {len(shift[main_kind]['by_corruption'])} corruptions (boxes: {main_kind.replace('_', ' ')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# models and training runs -------------------------------------------------------------------
def build_model(args, num_classes, n_train, init_state=None):
    """The network: a plain :class:`ResNet18` for ``--deterministic``, else the Bayesian ResNet-18
    (a ``BayesianClassifier`` with the N(0, prior_scale^2) prior). ``init_state`` (``--init-from``)
    is loaded into the plain network first, so ``pretrained_values(model)`` holds its weights and the
    batch-norm parameters and statistics start from it too."""
    if init_state is None and not args.deterministic:
        return cifar_resnet18(num_classes, args.width, dist.Normal(0.0, args.prior_scale), num_data=n_train)
    net = ResNet18(num_classes, args.width)
    if init_state is not None:
        net.load_state_dict(init_state)
    if args.deterministic:
        return net
    return BayesianClassifier(bayesianize(net, prior=dist.Normal(0.0, args.prior_scale)), num_data=n_train)


def build_guide(args, model, pretrained=False):
    """The sparse guide at ``--density`` (the first convolution dense when sparse, and the classifier head with
    ``--head-dense``). ``pretrained``: start
    at the weights ``bayesianize`` replaced (``init_to_value(pretrained_values(model))``, the guide's
    default for any other site) on the active set of their largest magnitudes (``init_subspace="magnitude"``)."""
    dense_sites = (*model.dense_sites, *(model.head_sites if args.head_dense else ())) if args.density < 1 else ()
    kwargs = {}
    if pretrained:
        kwargs = {"init_loc_fn": init_to_value(values=pretrained_values(model), fallback=init_to_normal), "init_subspace": "magnitude"}
    return SparseSubspaceGuide(model, density=args.density, allocation=args.allocation if args.density < 1 else "uniform",
                               dense_sites=dense_sites, **kwargs)


def bn_recalibration_batches(args, xtr, prep):
    """The first ``--bn-batches`` training batches (not augmented), for batch-norm recalibration."""
    n = min(len(xtr), args.bn_batches * args.batch_size)
    return (prep(xtr[i : i + args.batch_size]) for i in range(0, n, args.batch_size))


class ObservedLogits(pyro.poutine.messenger.Messenger):
    """Reads the logits of the ``Categorical`` likelihood at the observed site ``name`` each time the
    model runs under it (the last run's, detached, in :attr:`logits`)."""

    def __init__(self, name):
        super().__init__()
        self.name, self.logits = name, None

    def _pyro_post_sample(self, msg):
        if msg["name"] == self.name and msg["is_observed"]:
            self.logits = msg["fn"].logits.detach()


class BayesianRun:
    """SSVI (or dense VI at ``--density 1``) of the Bayesian ResNet-18: model, guide, optimiser, schedule, SSVI.

    The training accuracy comes from the logits of the likelihood inside ``svi.step``, which
    ``SSVI.step`` does not pass on (it returns the loss): :class:`ObservedLogits`, a Pyro handler
    around the step, reads them at the observed site.
    """

    kinds = ("mc", "posterior_mean")

    def __init__(self, args, model, guide, total_steps, n_train, sample_batch):
        self.args, self.model, self.guide, self.n_train, self.total_steps = args, model, guide, n_train, total_steps
        model.eval()  # the set-up pass traces the model; it must not move the batch-norm statistics
        try:
            guide.setup(*sample_batch)
        finally:
            model.train()
        clear_pretrained_values(model)  # the weights bayesianize kept: the guide has read them
        if args.kernel_decisions:
            try:
                guide.set_kernel_decisions(read_kernel_decisions(args.kernel_decisions))
            except ValueError as e:
                raise UsageError(f"--kernel-decisions {args.kernel_decisions}: {_first_line(e)}") from e
        groups = [
            {"params": list(guide.locs.parameters()), "lr": args.lr, "weight_decay": args.weight_decay},
            {"params": list(guide.unconstrained_scales.parameters()), "lr": args.lr_scale, "weight_decay": 0.0},
            {"params": list(model.parameters()), "lr": args.lr, "weight_decay": args.weight_decay},
        ]
        self.optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=args.epochs)
        self.svi = SSVI(
            model,
            guide,
            self.optimizer,
            pyro.infer.TraceMeanField_ELBO(),
            total_steps=total_steps,
            update_every=args.update_every,
            removal_fraction=args.removal_fraction,
            stop_updates_at=args.stop_updates_at,
            removal=args.removal,
            addition=args.addition,
            local_reparameterization=not args.no_lrt,
        )
        self.kl = KLScaleMessenger(0.0)
        self.per_example = pyro.poutine.scale(scale=1.0 / n_train)

    @property
    def module(self):
        return self.model

    @property
    def density(self):
        return self.guide.active_params / self.guide.dense_params

    def step(self, xb, yb):
        """One SSVI step on a batch: ``(loss, logits)``; the loss is mean cross-entropy + kl_scale * KL / N."""
        self.kl.scale = self.args.kl_scale * min(2.0 * self.svi.step_count / self.total_steps, 1.0)
        observed = ObservedLogits("obs")
        with self.kl, self.per_example, observed:  # divide the ELBO by N: the recipe's loss
            loss = self.svi.step(xb, yb)
        return loss, observed.logits

    def predict_batch(self, xb, mc_samples):
        out = {}
        if mc_samples:
            out["mc"] = mc_predict(self.model, self.guide, xb, num_samples=mc_samples).softmax(-1)
        out["posterior_mean"] = mean_predict(self.model, self.guide, xb).softmax(-1).unsqueeze(0)
        return out

    def recalibrate(self, batches):
        recalibrate_batchnorm(self.model, self.guide, batches)

    def state_dict(self):
        return {"model": self.model.state_dict(), "guide": self.guide.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ssvi": self.svi.state_dict()}

    def load_state_dict(self, ckpt):
        self.model.load_state_dict(ckpt["model"])
        self.guide.load_state_dict(ckpt["guide"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.svi.load_state_dict(ckpt["ssvi"])

    def updates(self):
        return len(self.svi.history)

    def kernel_decisions(self):
        """The sparse-kernel choices the run took (``--kernel-decisions`` takes them back)."""
        return self.guide.kernel_decisions()

    def posterior_scales(self):
        r"""Per Bayesian site, over its active entries: the median posterior standard deviation ``sigma`` and the
        median signal-to-noise ratio ``|mu| / sigma``; how far the scales moved from their start."""
        out = {}
        with torch.no_grad():
            for name in self.guide.site_names:
                loc, sigma = self.guide.loc(name), self.guide.scale(name)
                out[name] = {"median_sigma": sigma.median().item(), "median_snr": (loc.abs() / sigma).median().item()}
        return out

    def costs(self, xb):
        """Active weights, bytes of the guide and its optimiser state, counted FLOPs per training step."""
        args, guide = self.args, self.guide
        flops = flops_report(self.model, guide, xb, local_reparameterization=not args.no_lrt, update_every=args.update_every,
                             gradient_addition=args.addition == "gradient" and args.density < 1)
        return {
            "density": self.density,
            "active_params": guide.active_params,
            "dense_params": guide.dense_params,
            "sparse_site_density": _sparse_density(guide),
            "guide_bytes": guide_state_bytes(guide, self.optimizer),
            "dense_guide_bytes": dense_guide_bytes(guide, self.optimizer),
            "train_flops_per_step": flops["train_flops_per_step"],
            "dense_vi_train_flops_per_step": flops["dense_vi_train_flops_per_step"],
        }


class DeterministicRun:
    """The deterministic baseline: the same ResNet-18 as a plain network, SGD (the recipe's lr, momentum,
    weight decay, cosine schedule) on the mean cross-entropy. Under torchrun every rank steps on its
    share of the global batch and the gradients are averaged over the ranks before each step."""

    kinds = ("network",)

    def __init__(self, args, net, total_steps, n_train, sample_batch, world=1):
        self.args, self.net, self.world = args, net, world
        self.weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        self.masks = None
        if args.density < 1:  # --deterministic --density D: the layers SSVI makes sparse, masked on SSVI's schedule
            dense = set(net.dense_sites) | (set(net.head_sites) if args.head_dense else set())
            weights = {f"{name}.weight": m.weight for name, m in net.named_modules()
                       if isinstance(m, (nn.Conv2d, nn.Linear)) and f"{name}.weight" not in dense}
            schedule = SwapSchedule(total_steps, args.update_every, args.removal_fraction, args.stop_updates_at)
            self.masks = SparseMasks(weights, args.density, schedule, args.allocation,
                                     generator=torch.Generator().manual_seed(args.seed))
        if world > 1:
            broadcast_state(net)  # the same start on every rank
        self.optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=args.epochs)
        self.steps = 0

    module = property(lambda self: self.net)

    @property
    def density(self):
        """Nonzero conv and linear weights over all of them (1 for the plain network)."""
        return 1.0 if self.masks is None else self.active_weights / self.weights

    @property
    def active_weights(self):
        """Conv and linear weights kept: every one outside the masks, the masks' own active entries."""
        return self.weights if self.masks is None else self.weights - self.masks.dense_params + self.masks.active_params

    def step(self, xb, yb):
        """One SGD step: ``(loss, logits)``; a non-finite loss or gradient stops the run, with no parameter changed."""
        self.optimizer.zero_grad(set_to_none=False)
        logits = self.net(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        grads = [p.grad for p in self.net.parameters()]
        if self.world > 1:
            average_(grads)
            loss_t = loss.detach().clone()
            torch_dist.all_reduce(loss_t)
            value = loss_t.item() / self.world
        else:
            value = loss.item()
        if not (math.isfinite(value) and torch.isfinite(gradient_max_abs(grads)).item()):
            raise NonFiniteLossError(
                f"step {self.steps + 1}: the loss or a gradient is not finite (loss {value}); lower --lr ({self.args.lr})"
            )
        dense_grads = None
        if self.masks is not None:
            if self.masks.schedule.is_update_step(self.steps + 1):
                dense_grads = self.masks.dense_gradients()  # gradient addition ranks the inactive weights by them
            self.masks.mask_gradients()
        self.optimizer.step()
        self.steps += 1
        if dense_grads is not None:
            self.masks.update(self.steps, dense_grads, self.optimizer)
        return value, logits.detach()

    def predict_batch(self, xb, mc_samples):
        return {"network": self.net(xb).softmax(-1).unsqueeze(0)}

    def recalibrate(self, batches):
        """Recompute the batch-norm statistics over ``batches`` (equal weights), as the Bayesian run does:
        PyTorch's ``update_bn``."""
        torch.optim.swa_utils.update_bn(batches, self.net)

    def state_dict(self):
        ssvi = {"steps": self.steps, **({"masks": self.masks.state_dict()} if self.masks is not None else {})}
        return {"model": self.net.state_dict(), "guide": None, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ssvi": ssvi}

    def load_state_dict(self, ckpt):
        if ckpt["guide"] is not None:
            raise ValueError("a checkpoint of a Bayesian run")
        if (self.masks is None) != ("masks" not in ckpt["ssvi"]):
            raise ValueError("a checkpoint of a " + ("dense" if self.masks is not None else "sparse") + " deterministic run")
        if self.masks is not None:
            self.masks.load_state_dict(ckpt["ssvi"]["masks"])
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.steps = ckpt["ssvi"]["steps"]

    def updates(self):
        return 0 if self.masks is None else len(self.masks.history)

    def costs(self, xb):
        """Weights (conv and linear; nonzero ones when masked), bytes of parameters and SGD momentum (a masked
        weight stored sparse: value, int64 index and momentum per kept entry), 3x the counted forward FLOPs (a
        masked layer's scaled by its density, as the Bayesian runs count theirs)."""
        from torch.utils.flop_counter import FlopCounterMode

        masked = {} if self.masks is None else {id(p): (self.masks.masks[n], p) for n, p in self.masks.params.items()}
        state = {id(p): [v for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)] for p in self.net.parameters()}
        nbytes = 0
        for p in self.net.parameters():
            if id(p) in masked:
                kept = int(masked[id(p)][0].sum())
                nbytes += kept * (p.element_size() * (1 + len(state[id(p)])) + 8)
            else:
                nbytes += tensor_bytes(p) + sum(tensor_bytes(t) for t in state[id(p)])
        layer_flops, hooks = {}, []
        for m in self.net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m.weight) in masked:
                def hook(mod, inp, out):
                    per_output = mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.in_features
                    layer_flops[id(mod.weight)] = 2 * out.numel() * per_output
                hooks.append(m.register_forward_hook(hook))
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self.net(xb)
        finally:
            for h in hooks:
                h.remove()
            self.net.train(was_training)
        flops = counter.get_total_flops() - sum(f * (1 - masked[key][0].float().mean().item()) for key, f in layer_flops.items())
        return {
            "density": self.density,
            "active_params": self.active_weights,
            "dense_params": self.weights,
            "guide_bytes": nbytes,
            "train_flops_per_step": 3 * flops,
        }


def train_one_epoch(run, epoch, xtr, ytr, prep, args, rank, world, lead):
    """One epoch over one shuffle shared by every rank, each rank stepping on its share of every global
    batch; returns ``(summed loss, correct, seen)`` of this rank."""
    from tqdm.auto import tqdm

    n_train = len(xtr)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    run.module.train()
    # one shuffle per epoch, the same on every rank; each rank its own noise; both fixed by
    # (seed, epoch, rank) alone, so a resumed run goes on as an uninterrupted one would
    shuffle = torch.Generator("cpu").manual_seed(args.seed * 1_000_003 + epoch)
    perm = torch.randperm(n_train, generator=shuffle, device="cpu").to(xtr.device)
    pyro.set_rng_seed(args.seed + 1_000_003 * (epoch + 1) + 7919 * rank)
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress or not lead, leave=False)
    loss_sum, correct, seen = 0.0, 0, 0
    for b in bar:
        batch = perm[b * args.batch_size : (b + 1) * args.batch_size]
        if len(batch) < world:  # a last batch smaller than the world: every rank still steps
            batch = batch.repeat(math.ceil(world / len(batch)))[:world]
        idx = batch[rank::world]  # this rank's share of the global batch
        xb, yb = prep(xtr[idx], train=True), ytr[idx]
        loss, logits = run.step(xb, yb)
        loss_sum += loss
        seen += len(idx)
        correct += (logits.argmax(-1) == yb).sum().item()
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{correct / seen:.3f}", density=f"{run.density:.3f}")
    return loss_sum, correct, seen


def evaluate(run, x, y, prep, mc_samples, world, batch_size=256):
    """``(prediction, report)`` of ``run`` on images ``x`` with labels ``y`` (sharded over the ranks)."""
    prediction = predict_sharded(run, x, prep, mc_samples, batch_size, world)
    return prediction, report(prediction, y)


# arguments -------------------------------------------------------------------------------
def build_parser():
    """The command line: every flag has a help text, and ``--help`` shows its default."""
    p = ArgumentParser(
        description="SSVI on CIFAR with a Bayesian ResNet-18 (the reference recipe of Li et al., ICLR 2024).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--dataset", choices=("cifar10", "cifar100", "synthetic", "folder"), default="cifar10", help="training data; synthetic = "
      "CIFAR-shaped class templates plus noise, no download; folder = the images of --data-dir/train/<class>/ and --data-dir/test/<class>/")
    a("--data-dir", default="./data", help="folder holding (or receiving) the torchvision CIFAR / SVHN files; with --dataset folder, the image folder")
    a("--image-size", type=int, default=None, help="with --dataset folder: resize every image (and every --ood set) to N x N; "
      "default: keep the files' size, which must be the same for all images")
    a("--download", action="store_true", help="download missing data sets with torchvision")
    a("--epochs", type=int, default=200, help="training epochs")
    a("--batch-size", type=int, default=128, help="minibatch size")
    a("--density", type=float, default=None, help="fraction of active weights per sparse layer; 1.0 = dense VI. Default: 0.1, "
      "and 1.0 (the plain network) with --deterministic; --deterministic --density 0.1 trains the plain network sparse "
      "(magnitude removal, gradient addition on SSVI's schedule: RigL)")
    a("--allocation", choices=ALLOCATIONS, default="uniform", help="how --density is spread over the sparse layers: uniform "
      "(every layer the same, the paper's) or erk (Erdős–Rényi-Kernel: small layers keep more, the same total)")
    a("--subset", type=int, default=None, help="use only the first N training images (CPU runs); default: all")
    a("--val-fraction", type=float, default=0.0, help="fraction of the training images held out and evaluated each epoch (0: train on all, as the recipe)")
    a("--width", type=int, default=64, help="ResNet-18 base width (64 = the standard network)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train; auto = cuda when available")
    a("--seed", type=int, default=0, help="seed of every random number generator (and of the synthetic data)")
    a("--mc-samples", type=int, default=10, help="weight draws for the MC-averaged test predictive (0: posterior mean only)")
    a("--checkpoint", default=None, help="save model, guide, optimiser, scheduler and SSVI state here each epoch (atomically)")
    a("--resume", action="store_true", help="continue the run saved in --checkpoint, with the same training flags "
      "(a new run if there is no file yet)")
    a("--overwrite", action="store_true", help="start a new run even though --checkpoint exists, replacing it after the first epoch")
    a("--eval-only", action="store_true", help="evaluate the run saved in --checkpoint (finished or not) without training")
    a("--stop-after", type=int, default=None, help="end this invocation after N epochs, with the checkpoint written and no "
      "evaluation (for time-limited jobs: continue with --resume, on any number of processes)")
    a("--out", default=None, help="write the final metrics as JSON here")
    a("--plot", action="store_true", help="with --out: save a reliability diagram and an uncertainty histogram beside it")
    a("--ood", default="", help="comma-separated out-of-distribution test sets among svhn, cifar10, cifar100, and folder:PATH "
      "(every PNG/JPEG image below PATH) (e.g. svhn,folder:/data/my-ood)")
    a("--shift", default="", help="comma-separated CIFAR-10-C corruptions evaluated at severities 1-5 (or all: "
      + ", ".join(CORRUPTIONS) + "); deterministic under --seed")
    a("--shift-severities", default="1,2,3,4,5", help="with --shift: the severities evaluated (comma-separated, among 1-5)")
    a("--shift-images", type=int, default=None, help="with --shift: score the corruptions on N test images (a fixed, "
      "class-balanced-in-expectation sample, the same for every run and seed) instead of all of them, to save time")
    a("--calibrate", action="store_true", help="fit a temperature per predictive on the validation split (needs --val-fraction > 0) "
      "and report calibrated test NLL and ECE too")
    a("--deterministic", action="store_true", help="the baseline: train the same ResNet-18 as a plain network with SGD on the "
      "cross-entropy (no guide, no KL, no MC)")
    a("--kernel-decisions", default=None, metavar="JSON", help="take the sparse-kernel choices from JSON (a previous run's --out "
      "file, or a table as guide.kernel_decisions() returns) instead of measuring them: a new run with the same flags and "
      "seed then takes that run's kernel paths and repeats its numbers (the measurement depends on the machine's load)")
    a("--init-from", default=None, help="start from a --deterministic run's checkpoint or a plain ResNet18 state_dict of the same "
      "width and classes (magnitude subspace at its weights); --epochs are then fine-tuning epochs")
    a("--lr", type=float, default=0.01, help="learning rate of the means and deterministic parameters")
    a("--lr-scale", type=float, default=0.01, help="learning rate of the (unconstrained) scales")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", type=float, default=5e-4, help="weight decay on means and deterministic parameters")
    a("--prior-scale", type=float, default=0.005, help="standard deviation of the N(0, s^2) prior on every Bayesian weight")
    a("--kl-scale", type=float, default=0.01, help="KL weight after the linear warm-up over the first half of training; 1.0 is the true ELBO")
    a("--update-every", type=int, default=100, help="steps between subspace updates")
    a("--removal-fraction", type=float, default=0.3, help="fraction of each sparse layer's active entries swapped at the first update (cosine-annealed)")
    a("--stop-updates-at", type=float, default=0.75, help="fraction of training after which the subspace is frozen")
    a("--removal", default="snr_abs", choices=sorted(REMOVAL_CRITERIA), help="removal criterion")
    a("--addition", default="gradient", choices=("gradient", "random"), help="addition criterion")
    a("--head-dense", action="store_true", help="keep the classifier head's weight dense (all of it random) in a sparse "
      "guide, as the first convolution is; its weights count in the active total")
    a("--no-lrt", action="store_true", help="sample weights instead of pre-activations (no local reparameterisation)")
    a("--no-augment", action="store_true", help="no random crop and flip")
    a(
        "--bn-batches",
        type=int,
        default=20,
        help="training batches used to recompute batch-norm statistics at the posterior mean before each "
        "evaluation (0: keep the running statistics of training)",
    )
    a("--no-progress", action="store_true", help="no progress bar")
    a("--num-synthetic", type=int, default=512, help="training images of --dataset synthetic")
    return p


#: every flag outside EVAL_FLAGS: --resume needs a checkpoint that agrees on all of them
RUN_FLAGS = tuple(flag for flag in vars(build_parser().parse_args([])) if flag not in EVAL_FLAGS)
#: their defaults: what a checkpoint written before a flag existed had
RUN_DEFAULTS = {flag: value for flag, value in vars(build_parser().parse_args([])).items() if flag in RUN_FLAGS}
#: training images of the data sets whose size is known before loading them
TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000}


def split_sizes(n, val_fraction):
    """``(training, validation)`` image counts of ``n`` images; ``None`` if no training image would be left."""
    n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    return (n - n_val, n_val) if n - n_val >= 1 else None


#: flags whose value must lie in a range: (low, high, low included, high included); all finite
RANGES = {
    "lr": (0, math.inf, False, False),
    "lr_scale": (0, math.inf, False, False),
    "momentum": (0, 1, True, False),
    "weight_decay": (0, math.inf, True, False),
    "prior_scale": (0, math.inf, False, False),
    "kl_scale": (0, math.inf, True, False),
    "removal_fraction": (0, 1, True, True),
    "stop_updates_at": (0, 1, False, True),
    "density": (0, 1, False, True),
    "val_fraction": (0, 1, True, False),
}


def _check_numbers(p, args):
    """One-line errors for numbers out of range (NaN and infinities included)."""
    for name, (low, high, low_in, high_in) in RANGES.items():
        value = getattr(args, name)
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (above and below and math.isfinite(value)):
            if high == math.inf:
                wanted = f"a finite number {'>=' if low_in else '>'} {low}"
            else:
                wanted = f"a value in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            p.error(f"--{name.replace('_', '-')}: expected {wanted}, got {value}")
    for name in ("epochs", "batch_size", "width", "update_every", "num_synthetic") + (("image_size",) if args.image_size is not None else ()):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.subset is not None and args.subset < 2:
        p.error(f"--subset: expected at least 2 images, got {args.subset}")
    if args.bn_batches < 0:
        p.error("--bn-batches: expected >= 0")
    if args.mc_samples < 0:
        p.error("--mc-samples: expected >= 0")
    if args.dataset == "folder":  # its size is known once its files are listed
        return
    n = args.num_synthetic if args.dataset == "synthetic" else TRAIN_IMAGES[args.dataset]
    n = n if args.subset is None else min(n, args.subset)
    if split_sizes(n, args.val_fraction) is None:
        p.error(f"--val-fraction {args.val_fraction}: leaves no training image of the {n}")


def _check_checkpoint(p, args):
    """--resume, --overwrite, --eval-only and --stop-after against the --checkpoint file."""
    if (args.resume or args.overwrite) and not args.checkpoint:
        p.error(f"{'--resume' if args.resume else '--overwrite'} needs --checkpoint PATH")
    if args.overwrite and (args.resume or args.eval_only):
        p.error(f"--overwrite starts a new run: it cannot go with {'--resume' if args.resume else '--eval-only'}")
    if args.stop_after is not None and (args.stop_after < 1 or not args.checkpoint):
        p.error("--stop-after: expected a positive number of epochs, and --checkpoint PATH to continue from")
    if args.eval_only:
        if not (args.checkpoint and os.path.isfile(args.checkpoint)):
            p.error(f"--eval-only needs --checkpoint PATH of an existing checkpoint, got {args.checkpoint!r}")
        return
    if args.checkpoint:
        p.check_output_file("--checkpoint", args.checkpoint)
        if os.path.exists(args.checkpoint) and not (args.resume or args.overwrite):
            p.error(f"--checkpoint {args.checkpoint} exists: pass --resume to continue it or --overwrite to start over")


def plot_paths(out_path, shift=False):
    """The images that --plot writes beside ``--out``: ``<out stem>-reliability.png``, ``-uncertainty.png``
    and, with ``shift`` (--shift), ``-shift.png``."""
    stem = os.path.splitext(out_path)[0]
    return (stem + "-reliability.png", stem + "-uncertainty.png") + ((stem + "-shift.png",) if shift else ())


def _check_outputs(p, args):
    """--out and the --plot images can be written, and none of them is the checkpoint."""
    if args.plot and not args.out:
        p.error("--plot writes its images beside --out: pass --out PATH too")
    if args.out:
        p.check_output_file("--out", args.out)
    images = plot_paths(args.out, shift=bool(args.shift)) if args.plot else ()
    for path in images:
        p.check_image_file("--plot", path)
    p.check_distinct_files([("--checkpoint", args.checkpoint), ("--out", args.out)] + [("--plot", i) for i in images])


def _check_data(p, args):
    """--dataset folder needs an existing --data-dir; --image-size goes with it only; --ood names known sets or folders."""
    if args.dataset == "folder" and not os.path.isdir(args.data_dir):
        p.error(f"--dataset folder: --data-dir {args.data_dir} is not a folder (expected DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg)")
    if args.image_size is not None and args.dataset != "folder":
        p.error(f"--image-size resizes image folders: it goes with --dataset folder, not {args.dataset}")
    args.ood = [name.strip() for name in args.ood.split(",") if name.strip()]
    for name in args.ood:
        if name.startswith("folder:"):
            if not os.path.isdir(name[len("folder:") :]):
                p.error(f"--ood {name}: {name[len('folder:'):]!r} is not a folder")
            continue
        if name not in OOD_SETS:
            p.error(f"--ood: unknown set {name!r}; expected names among {', '.join(OOD_SETS)}, or folder:PATH")
        if name == args.dataset:
            p.error(f"--ood: {name} is the training set; pick another out-of-distribution set")


def _check_evaluation(p, args):
    """--shift names known corruptions; --calibrate has a validation split to fit on."""
    if args.shift.strip():
        try:
            args.shift = parse_shift(args.shift)
        except ValueError as e:
            p.error(f"--shift: {e}")
    else:
        args.shift = []
    try:
        args.shift_severities = parse_severities(args.shift_severities)
    except ValueError as e:
        p.error(f"--shift-severities: {e}")
    if args.shift_images is not None and args.shift_images < 1:
        p.error(f"--shift-images must be positive, got {args.shift_images}")
    if args.calibrate and not args.val_fraction > 0:
        p.error("--calibrate fits the temperature on the validation split: pass --val-fraction F > 0 too")


def _check_init_from(p, args):
    """--init-from names an existing file that is not the run's own checkpoint (read and checked once the classes are known)."""
    if args.init_from is None:
        return
    if not os.path.isfile(args.init_from):
        p.error(f"--init-from {args.init_from}: no such file")
    if args.checkpoint and os.path.realpath(args.checkpoint) == os.path.realpath(args.init_from):
        p.error(f"--init-from {args.init_from}: the same file as --checkpoint; the run would overwrite its own start")


def read_kernel_decisions(path):
    """The kernel decision table in ``path``: a run's ``--out`` JSON (its ``kernel_decisions``) or the table
    itself; ``ValueError`` saying what is wrong."""
    from pyro_ssvi.kernels import parse_decision_table

    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"not a readable JSON file ({_first_line(e)})") from None
    table = obj.get("kernel_decisions", obj) if isinstance(obj, dict) else obj
    parse_decision_table(table)
    return table


def _check_kernel_decisions(p, args):
    """--kernel-decisions: a readable decision table, for a new Bayesian run."""
    if args.kernel_decisions is None:
        return
    if args.deterministic:
        p.error("--kernel-decisions: a --deterministic run has no sparse kernels")
    if args.resume or args.eval_only:
        p.error(f"--kernel-decisions: {'--resume' if args.resume else '--eval-only'} takes the choices saved in the checkpoint")
    try:
        read_kernel_decisions(args.kernel_decisions)
    except ValueError as e:
        p.error(f"--kernel-decisions {args.kernel_decisions}: {_first_line(e)}")


def parse_args(argv):
    """The flags, every one checked (ranges, files, checkpoint) before any data is loaded."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.density is None:
        args.density = 1.0 if args.deterministic else 0.1
    _check_numbers(p, args)
    _check_data(p, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    _check_evaluation(p, args)
    _check_checkpoint(p, args)
    _check_init_from(p, args)
    _check_kernel_decisions(p, args)
    _check_outputs(p, args)
    return args


# the run ---------------------------------------------------------------------------------
def open_checkpoint(args, device, lead):
    """The checkpoint to resume or evaluate (``None`` for a new run), read and checked before any data is loaded.

    A training run's rank 0 first removes the temporary files of interrupted writes of it.
    """
    if not args.checkpoint:
        return None
    if lead and not args.eval_only:
        remove_stale_temps(args.checkpoint)
    if args.eval_only:
        return load_checkpoint(args.checkpoint, args, device, flags=MODEL_FLAGS)
    if not args.resume:
        return None
    if not os.path.exists(args.checkpoint):
        if lead:
            print(f"no checkpoint at {args.checkpoint}: starting a new run", file=sys.stderr)
        return None
    return load_checkpoint(args.checkpoint, args, device)


def flags_used(args, ckpt):
    """The flags the run really has, for its checkpoints and JSON: an --eval-only run's training
    flags are its checkpoint's (a resumed run's agree with them already). A run started
    ``--init-from`` a file also records that file's sha256 (``init_from_sha256``)."""
    flags = dict(vars(args))
    if ckpt is not None and args.eval_only:
        flags.update({k: v for k, v in ckpt["args"].items() if k not in EVAL_TIME_FLAGS})
    elif ckpt is not None and "init_from_sha256" in ckpt["args"]:
        flags["init_from_sha256"] = ckpt["args"]["init_from_sha256"]
    elif args.init_from:
        flags["init_from_sha256"] = file_sha256(args.init_from)
    return flags


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = start_processes(args)
    finished = False
    try:
        result = _main(args, rank, world, device)
        finished = True
        return result
    finally:
        leave_process_group(finished)  # every rank together after a normal finish, at once after an error


def split_data(args, xtr, ytr):
    """``(x_train, y_train, x_val, y_val)``: ``--subset`` first, then the last ``--val-fraction`` held out."""
    if args.subset is not None:
        xtr, ytr = xtr[: args.subset], ytr[: args.subset]
    if split_sizes(len(xtr), args.val_fraction) is None:
        raise UsageError(f"--val-fraction {args.val_fraction}: leaves no training image of the {len(xtr)}")
    n_val = split_sizes(len(xtr), args.val_fraction)[1]
    return xtr[: len(xtr) - n_val], ytr[: len(ytr) - n_val], xtr[len(xtr) - n_val :], ytr[len(ytr) - n_val :]


def _main(args, rank, world, device):
    lead = rank == 0  # prints, checkpoints and --out come from rank 0 alone
    say = print if lead else (lambda *a, **k: None)
    if args.batch_size < world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be at least the {world} processes")
    ckpt = open_checkpoint(args, device, lead)
    flags = flags_used(args, ckpt)
    pyro.set_rng_seed(args.seed)
    (xtr, ytr), (xte, yte), classes, stats = load_data(args)
    ood_x = {name: load_ood_set(name, args, xtr.shape[-2:]) for name in args.ood}  # fail before training
    xtr, ytr, xval, yval = split_data(args, xtr, ytr)
    mean, std = stats if stats is not None else channel_stats(xtr)  # an image folder: its training images' statistics
    init_state = read_init_state(args.init_from, len(classes), args.width) if args.init_from and ckpt is None else None
    n_train, n_val = len(xtr), len(xval)
    xtr, ytr = xtr.to(device), ytr.to(device)

    def prep(x, train=False):
        x = x.to(device)
        if train and not args.no_augment:
            x = augment(x)
        return normalise(x, mean, std)

    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    with pyro.settings.context(module_local_params=True):
        model = build_model(args, len(classes), n_train, init_state).to(device)
        sample = (prep(xtr[:2]), ytr[:2])
        if args.deterministic:
            run = DeterministicRun(args, model, total_steps, n_train, sample, world)
        else:
            run = BayesianRun(args, model, build_guide(args, model, pretrained=init_state is not None), total_steps, n_train, sample)
        start_epoch, elapsed, epochs_log = 0, 0.0, []
        if ckpt is not None:
            try:
                run.load_state_dict(ckpt)
                set_rng_state(ckpt["rng"])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise UsageError(f"--checkpoint {args.checkpoint}: does not fit this run ({_first_line(e)})") from e
            start_epoch, elapsed, epochs_log = ckpt["epoch"] + 1, ckpt["seconds"], ckpt["log"]
            verb = "evaluating" if args.eval_only else "resumed from"
            say(f"{verb} {args.checkpoint} after epoch {ckpt['epoch'] + 1}")
        elif init_state is not None:
            say(f"starting from {args.init_from} ({'fine-tuning' if args.deterministic else 'magnitude subspace at its weights'})")

        def recalibrate():
            if args.bn_batches:
                run.recalibrate(bn_recalibration_batches(args, xtr, prep))

        for epoch in range(start_epoch, start_epoch if args.eval_only else args.epochs):
            t0 = time.perf_counter()
            loss_sum, correct, seen = train_one_epoch(run, epoch, xtr, ytr, prep, args, rank, world, lead)
            run.scheduler.step()
            if world > 1:  # the epoch's figures over all ranks
                totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
                torch_dist.all_reduce(totals)
                loss_sum, correct, seen = totals[0].item() / world, int(totals[1]), int(totals[2])
                broadcast_state(run.module)  # batch-norm statistics: rank 0's, for validation and checkpoints
            row = {"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "train_accuracy": correct / seen}
            val_text = ""
            if n_val:
                recalibrate()
                val = evaluate(run, xval, yval, prep, 0, world, batch_size=512)[1]
                val = val["posterior_mean" if "posterior_mean" in val else "network"]
                row.update(val_accuracy=val["accuracy"], val_nll=val["nll"])
                val_text = f"val acc {row['val_accuracy']:.4f}  val NLL {row['val_nll']:.4f}  "
            elapsed += time.perf_counter() - t0
            # the 1-minute load average beside the epoch's time: other work on the machine slows an epoch down
            row.update(lr=run.scheduler.get_last_lr()[0], seconds=time.perf_counter() - t0, load=os.getloadavg()[0])
            epochs_log.append(row)
            say(
                f"epoch {row['epoch']:>3}/{args.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}  "
                f"{val_text}density {run.density:.4f}  lr {row['lr']:.5f}  {row['seconds']:.1f}s"
            )
            if args.checkpoint and lead:
                save_checkpoint(run, epoch, elapsed, epochs_log, flags, args.checkpoint)
            if args.stop_after is not None and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < args.epochs:
                say(f"stopped after epoch {epoch + 1}; continue with --resume --checkpoint {args.checkpoint}")
                return {"stopped_after_epoch": epoch + 1, "processes": world}
        # evaluation: each part seeded on its own, so evaluation flags never change another part's numbers
        if world > 1:
            broadcast_state(run.module)
        recalibrate()
        pyro.set_rng_seed(args.seed + 7919 * rank)  # the evaluation's draws do not depend on how training got here
        test_prediction, test = evaluate(run, xte, yte, prep, args.mc_samples, world)
        ood_predictions = {name: predict_sharded(run, x, prep, args.mc_samples, 256, world) for name, x in ood_x.items()}
        calibrated = None
        if args.calibrate:
            pyro.set_rng_seed(args.seed + 104729 + 7919 * rank)
            calibrated = calibration(predict_sharded(run, xval, prep, args.mc_samples, 256, world), yval, test_prediction, yte)
        shift = None
        if args.shift:
            keep = shift_sample(len(xte), args.shift_images)
            shift = evaluate_shift(lambda x: predict_sharded(run, x, prep, args.mc_samples, 256, world), xte[keep], yte[keep],
                                   args.shift, args.seed, rank, progress=lead and not args.no_progress,
                                   severities=args.shift_severities)
        costs = run.costs(prep(xtr[: args.batch_size]))
    result = {
        "processes": world,
        "dataset": args.dataset,
        "method": (("deterministic" if args.density == 1 else "deterministic sparse") if args.deterministic
                   else ("dense VI" if args.density == 1 else "SSVI")),
        **costs,
        "train_images": n_train,
        "val_images": n_val,
        "classes": list(classes),
        "normalisation": {"mean": list(mean), "std": list(std)},
        "epochs": len(epochs_log),
        "eval_only": args.eval_only,
        "seconds": elapsed,
        "updates": run.updates(),
        **({"kernel_decisions": run.kernel_decisions()} if hasattr(run, "kernel_decisions") else {}),
        **({"posterior_scales": run.posterior_scales()} if hasattr(run, "posterior_scales") else {}),
        "epoch_log": epochs_log,
        "args": flags,
    }
    for metric in TEST_METRICS:
        result[f"test_{metric}"] = {kind: test[kind][metric] for kind in test}
    if calibrated is not None:
        result["temperature"] = calibrated["temperature"]
        result["test_nll_calibrated"], result["test_ece_calibrated"] = calibrated["nll"], calibrated["ece"]
    result["ood"] = {name: ood_results(test_prediction, pred) for name, pred in ood_predictions.items()}
    if shift is not None:
        result["shift"] = shift
        result["shift_images"] = len(keep)
    kind = primary(test_prediction)
    samples = f", {args.mc_samples} samples" if kind == "mc" else ""
    say(
        "test: "
        + "  ".join(f"{m} {result[f'test_{m}'][kind]:.4f}" for m in TEST_METRICS)
        + f"  ({kind.replace('_', ' ')}{samples})  active {result['active_params']}/{result['dense_params']}"
    )
    if calibrated is not None:
        say(f"calibrated: temperature {result['temperature'][kind]:.3f}  nll {result['test_nll_calibrated'][kind]:.4f}  "
            f"ece {result['test_ece_calibrated'][kind]:.4f}  (fitted on the {n_val} validation images)")
    for name, res in result["ood"].items():
        say(f"OOD {name}: " + "  ".join(f"{score} AUROC {m['auroc']:.4f} AUPR {m['aupr']:.4f} FPR95 {m['fpr95']:.4f}" for score, m in res[kind].items()))
    if shift is not None:
        say("shift (mean over corruptions): " + "  ".join(
            f"s{s} acc {shift[kind]['mean'][str(s)]['accuracy']:.4f} ece {shift[kind]['mean'][str(s)]['ece']:.4f}" for s in args.shift_severities)
            + f"  ({len(keep)} test images)")
    if args.out and lead:
        write_outputs(args, result, {"test": test_prediction, "y": yte, "ood": ood_predictions}, say)
    return result


#: fields of an epoch_log row that measure the machine rather than the run (two identical runs differ in them)
TIMING_FIELDS = ("seconds", "load")

#: test metrics in the JSON, each for every predictive ("mc" and "posterior_mean", or "network")
TEST_METRICS = ("accuracy", "nll", "ece", "brier", "aurc", "accuracy_at_80", "accuracy_at_90", "accuracy_at_95")


def _sparse_density(guide):
    sparse = guide.sparse_site_names()
    if not sparse:
        return 1.0
    info = [guide.site_info(s) for s in sparse]
    return sum(i.k for i in info) / sum(i.numel for i in info)


def command(argv=None):
    """``main`` as a command: usage errors are one line and exit 2, a failed write or a non-finite loss exit 1."""
    run_main(main, argv, usage_errors=(UsageError,), runtime_errors=(WriteError,))


if __name__ == "__main__":
    command()
