"""SSVI on CIFAR-10/100 with a Bayesian ResNet-18: the reference recipe of Li, Miao, Qiu, Zhang (ICLR 2024).

Full recipe on a GPU (CIFAR-10 at density 0.1, 200 epochs)::

    python examples/cifar_resnet.py --data-dir ./data --download --out cifar10.json --checkpoint ckpt.pt

Dense VI baseline through the same code path: ``--density 1.0``. CPU smoke run::

    python examples/cifar_resnet.py --dataset synthetic --epochs 2 --width 8 --subset 512

Defaults are the recipe: batch 128, SGD momentum 0.9, lr 0.01 on the means (weight decay
5e-4) and on the scales (no weight decay), cosine learning rate over the epochs, prior
N(0, 0.005^2), KL weight ``kl_scale = 0.01`` warmed up linearly over the first half of the
steps (``--kl-scale 1`` is the true ELBO), update_every 100, removal_fraction 0.3,
stop_updates_at 0.75, removal ``snr_abs``, addition ``gradient``, local reparameterisation,
random crop (pad 4) and horizontal flip, training on all training images. ``--val-fraction F``
holds out a validation split that is monitored each epoch; the test set is evaluated once, at
the end, and never picks a checkpoint.

Several processes (GPUs, or CPU processes with gloo) with PyTorch's launcher::

    torchrun --nproc_per_node=4 examples/cifar_resnet.py --data-dir ./data --out cifar10.json --checkpoint ckpt.pt

``--batch-size`` stays the global batch: each of the N ranks takes its 1/N of every batch of
one shared, per-epoch shuffle. SSVI keeps the ranks' subspaces identical (see
``pyro_ssvi.distributed``); the KL is weighted by the full training set; rank 0 alone prints,
writes checkpoints and ``--out``; the test set is split across ranks and gathered. A
checkpoint does not depend on the number of processes: one written by N resumes on M.
"""

import argparse
import json
import math
import os
import random
import tempfile
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from pyro_ssvi import SSVI, SparseSubspaceGuide
from pyro_ssvi.cli import ArgumentParser, run_main
from pyro_ssvi.cost import dense_guide_bytes, flops_report, guide_state_bytes
from pyro_ssvi.distributed import broadcast_state
from pyro_ssvi.handlers import KLScaleMessenger
from pyro_ssvi.metrics import (
    classification_metrics,
    mc_predict,
    mean_predict,
    ood_report,
    predictive_entropy,
    selective_metrics,
)
from pyro_ssvi.models import cifar_resnet18, recalibrate_batchnorm

MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}


class UsageError(Exception):
    """A problem the user can fix; reported in one line with exit code 2."""


# data ------------------------------------------------------------------------------------
def _torchvision(name, make, data_dir, download):
    """Build a torchvision data set; a missing set or a failed download is a one-line UsageError."""
    try:
        return make()
    except RuntimeError as e:
        if download:
            raise UsageError(f"downloading {name} into {data_dir} failed ({e}); download it by hand and pass --data-dir") from e
        raise UsageError(
            f"{name} not found in {data_dir!r}: pass --download to fetch it, or --data-dir pointing at the folder "
            f"holding {LAYOUT[name]}"
        ) from e
    except OSError as e:
        raise UsageError(f"downloading {name} into {data_dir} failed ({e}); download it by hand and pass --data-dir") from e


OOD_SETS = ("svhn", "cifar10", "cifar100")
LAYOUT = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "test_32x32.mat"}


def _cifar_tensors(ds):
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return x, torch.as_tensor(ds.targets, dtype=torch.long)


def load_cifar(name, data_dir, download):
    """Training and test sets as uint8 tensors ``(N, 3, 32, 32)`` and labels, via torchvision."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    train = _torchvision(name, lambda: cls(root=data_dir, train=True, download=download), data_dir, download)
    test = _torchvision(name, lambda: cls(root=data_dir, train=False, download=download), data_dir, download)
    return _cifar_tensors(train), _cifar_tensors(test)


def load_ood(name, data_dir, download):
    """The test images of an out-of-distribution set (``svhn``, ``cifar10``, ``cifar100``), uint8 ``(N, 3, 32, 32)``."""
    import torchvision

    if name == "svhn":
        ds = _torchvision(name, lambda: torchvision.datasets.SVHN(root=data_dir, split="test", download=download), data_dir, download)
        return torch.from_numpy(np.asarray(ds.data)).contiguous()
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    return _cifar_tensors(_torchvision(name, lambda: cls(root=data_dir, train=False, download=download), data_dir, download))[0]


def synthetic_cifar(n_train=512, n_test=256, num_classes=10, seed=0):
    """CIFAR-shaped data that a small network can learn: a smooth class template plus noise.

    Templates are random 4x4 colour patterns upsampled to 32x32, so crops and flips keep
    most of the class signal.
    """
    g = torch.Generator("cpu").manual_seed(seed)  # data are made on the CPU, whatever the default device
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g, device="cpu")
    templates = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False) * 255

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g, device="cpu")
        x = 0.6 * templates[y] + 0.4 * torch.rand(n, 3, 32, 32, generator=g, device="cpu") * 255
        return x.to(torch.uint8), y

    return make(n_train), make(n_test)


def normalise(x, mean, std):
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s


def augment(x):
    """Random crop with 4-pixel zero padding and random horizontal flip (torch RNG, on device)."""
    n, dev = x.shape[0], x.device
    padded = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,)).to(dev)
    j = torch.randint(0, 9, (n,)).to(dev)
    flip = (torch.rand(n) < 0.5).to(dev)
    offs = torch.arange(32, device=dev)
    rows = (i[:, None] + offs)[:, :, None]  # (n, 32, 1)
    cols = j[:, None] + torch.where(flip[:, None], 31 - offs, offs)  # (n, 32), reversed when flipped
    out = padded[torch.arange(n, device=dev)[:, None, None], :, rows, cols[:, None, :]]  # (n, 32, 32, C)
    return out.permute(0, 3, 1, 2).contiguous()


# checkpoints -----------------------------------------------------------------------------
def save_atomic(obj, path):
    """Write ``obj`` with torch.save to a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


#: flags that fix the model and the data: --eval-only needs a checkpoint that agrees on them
MODEL_FLAGS = ("dataset", "width", "density", "prior_scale", "subset", "val_fraction", "num_synthetic", "seed")
#: ... and the schedule: --resume needs a checkpoint that agrees on all of these
RUN_FLAGS = MODEL_FLAGS + (
    "epochs", "batch_size", "update_every", "removal_fraction", "stop_updates_at", "removal", "addition", "no_lrt",
)
CHECKPOINT_KEYS = ("model", "guide", "optimizer", "scheduler", "ssvi", "rng", "epoch", "seconds", "log", "args")


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def load_checkpoint(path, args, device, flags=RUN_FLAGS):
    """Read a checkpoint written by this script and check it belongs to a run with the same ``flags``.

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
    for flag in flags:
        if saved.get(flag) != current[flag]:
            raise UsageError(
                f"--checkpoint {path}: written with --{flag.replace('_', '-')} {saved.get(flag)}, this run has "
                f"{current[flag]}; use the same flag or another --checkpoint"
            )
    return ckpt


# evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, guide, x, prep, mc_samples, batch_size):
    """Class probabilities on CPU: per weight draw ``(S, N, C)`` (``None`` if ``mc_samples == 0``)
    and at the posterior mean ``(N, C)``."""
    model.eval()
    mc_probs, mean_probs = [], []
    try:
        for start in range(0, len(x), batch_size):
            xb = prep(x[start : start + batch_size])
            if mc_samples:
                mc_probs.append(mc_predict(model, guide, xb, num_samples=mc_samples).softmax(-1).cpu())
            mean_probs.append(mean_predict(model, guide, xb).softmax(-1).cpu())
    finally:
        model.train()
    return (torch.cat(mc_probs, dim=1) if mc_probs else None), torch.cat(mean_probs)


def predict_sharded(model, guide, x, prep, mc_samples, batch_size, world):
    """:func:`predict` with the images split across the ``world`` ranks and gathered in order."""
    if world == 1:
        return predict(model, guide, x, prep, mc_samples, batch_size)
    part = torch.tensor_split(torch.arange(len(x)), world)[torch_dist.get_rank()]
    mine = predict(model, guide, x[part.to(x.device)], prep, mc_samples, batch_size)
    parts = [None] * world
    torch_dist.all_gather_object(parts, mine)
    mc = torch.cat([p[0] for p in parts], dim=1) if mine[0] is not None else None
    return mc, torch.cat([p[1] for p in parts])


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


def report(prediction, y):
    """Classification and selective-prediction metrics of both predictives: ``{"mc"?, "posterior_mean"}``."""
    sample_probs, mean_probs = prediction
    y = y.cpu()
    out = {"posterior_mean": {**classification_metrics(mean_probs, y), **selective_metrics(mean_probs, y)}}
    if sample_probs is not None:
        probs = sample_probs.mean(0)
        out["mc"] = {**classification_metrics(probs, y), **selective_metrics(probs, y)}
    return out


def _draws(prediction):
    """``{predictive: (S, N, C) probabilities}``: the MC draws, and the posterior mean as one draw."""
    sample_probs, mean_probs = prediction
    out = {"posterior_mean": mean_probs.unsqueeze(0)}
    if sample_probs is not None:
        out["mc"] = sample_probs
    return out


def ood_results(in_prediction, out_prediction):
    """``{predictive: {score: {"auroc", "aupr", "fpr95"}}}``; the posterior mean has entropy only."""
    draws_in, draws_out = _draws(in_prediction), _draws(out_prediction)
    return {kind: ood_report(draws_in[kind], draws_out[kind]) for kind in draws_in}


def save_plots(out_path, test_prediction, y, ood_predictions):
    """``<out>-reliability.png`` and ``<out>-uncertainty.png`` beside the JSON; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_ssvi.metrics import plot_reliability, plot_uncertainty_histograms

    stem = os.path.splitext(out_path)[0]
    kind = "mc" if test_prediction[0] is not None else "posterior_mean"
    probs = test_prediction[0].mean(0) if kind == "mc" else test_prediction[1]
    paths = (stem + "-reliability.png", stem + "-uncertainty.png")
    fig, ax = plt.subplots(figsize=(4, 4))
    plot_reliability(probs, y.cpu(), ax=ax)
    ax.set_title(f"test ({kind.replace('_', ' ')}): " + ax.get_title())
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    scores = {"test (in-distribution)": predictive_entropy(_draws(test_prediction)[kind])}
    scores.update({name: predictive_entropy(_draws(pred)[kind]) for name, pred in ood_predictions.items()})
    plot_uncertainty_histograms(scores, ax=ax, xlabel=f"predictive entropy ({kind.replace('_', ' ')})")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


# arguments -------------------------------------------------------------------------------
def build_parser():
    """The command line: every flag has a help text, and ``--help`` shows its default."""
    p = ArgumentParser(
        description="SSVI on CIFAR with a Bayesian ResNet-18 (the reference recipe of Li et al., ICLR 2024).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--dataset", choices=("cifar10", "cifar100", "synthetic"), default="cifar10", help="training data; synthetic = CIFAR-shaped class templates plus noise, no download")
    a("--data-dir", default="./data", help="folder holding (or receiving) the torchvision CIFAR / SVHN files")
    a("--download", action="store_true", help="download missing data sets with torchvision")
    a("--epochs", type=int, default=200, help="training epochs")
    a("--batch-size", type=int, default=128, help="minibatch size")
    a("--density", type=float, default=0.1, help="fraction of active weights per sparse layer; 1.0 = dense VI")
    a("--subset", type=int, default=None, help="use only the first N training images (CPU runs); default: all")
    a("--val-fraction", type=float, default=0.0, help="fraction of the training images held out and evaluated each epoch (0: train on all, as the recipe)")
    a("--width", type=int, default=64, help="ResNet-18 base width (64 = the standard network)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train; auto = cuda when available")
    a("--seed", type=int, default=0, help="seed of every random number generator (and of the synthetic data)")
    a("--mc-samples", type=int, default=10, help="weight draws for the MC-averaged test predictive (0: posterior mean only)")
    a("--checkpoint", default=None, help="save model, guide, optimiser, scheduler and SSVI state here each epoch (atomically)")
    a("--resume", action="store_true", help="continue from --checkpoint if it exists")
    a("--eval-only", action="store_true", help="evaluate the run saved in --checkpoint (finished or not) without training")
    a("--stop-after", type=int, default=None, help="end this invocation after N epochs, with the checkpoint written and no "
      "evaluation (for time-limited jobs: continue with --resume, on any number of processes)")
    a("--out", default=None, help="write the final metrics as JSON here")
    a("--plot", action="store_true", help="with --out: save a reliability diagram and an uncertainty histogram beside it")
    a("--ood", default="", help="comma-separated out-of-distribution test sets among svhn, cifar10, cifar100 (e.g. svhn,cifar100)")
    a("--lr", type=float, default=0.01, help="learning rate of the means and deterministic parameters")
    a("--lr-scale", type=float, default=0.01, help="learning rate of the (unconstrained) scales")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", type=float, default=5e-4, help="weight decay on means and deterministic parameters")
    a("--prior-scale", type=float, default=0.005, help="standard deviation of the N(0, s^2) prior on every Bayesian weight")
    a("--kl-scale", type=float, default=0.01, help="KL weight after the linear warm-up over the first half of training; 1.0 is the true ELBO")
    a("--update-every", type=int, default=100, help="steps between subspace updates")
    a("--removal-fraction", type=float, default=0.3, help="fraction of each sparse layer's active entries swapped at the first update (cosine-annealed)")
    a("--stop-updates-at", type=float, default=0.75, help="fraction of training after which the subspace is frozen")
    a("--removal", default="snr_abs", help="removal criterion: abs_mean, snr, abs_expectation, snr_abs, exp_abs or snr_exp_abs")
    a("--addition", default="gradient", choices=("gradient", "random"), help="addition criterion")
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


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    if not 0 < args.density <= 1:
        p.error(f"--density: expected a value in (0, 1], got {args.density}")
    for name in ("epochs", "batch_size", "width", "update_every", "num_synthetic"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.subset is not None and args.subset < 2:
        p.error(f"--subset: expected at least 2 images, got {args.subset}")
    if args.bn_batches < 0:
        p.error("--bn-batches: expected >= 0")
    if args.mc_samples < 0:
        p.error("--mc-samples: expected >= 0")
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction: expected a value in [0, 1), got {args.val_fraction}")
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint PATH")
    if args.stop_after is not None and (args.stop_after < 1 or not args.checkpoint):
        p.error("--stop-after: expected a positive number of epochs, and --checkpoint PATH to continue from")
    if args.eval_only and not (args.checkpoint and os.path.exists(args.checkpoint)):
        p.error(f"--eval-only needs --checkpoint PATH of an existing checkpoint, got {args.checkpoint!r}")
    if args.plot and not args.out:
        p.error("--plot writes its images beside --out: pass --out PATH too")
    args.ood = [name.strip() for name in args.ood.split(",") if name.strip()]
    for name in args.ood:
        if name not in OOD_SETS:
            p.error(f"--ood: unknown set {name!r}; expected names among {', '.join(OOD_SETS)}")
        if name == args.dataset:
            p.error(f"--ood: {name} is the training set; pick another out-of-distribution set")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


# the run ---------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = start_processes(args)
    try:
        return _main(args, rank, world, device)
    finally:
        if world > 1:
            torch_dist.destroy_process_group()


def _main(args, rank, world, device):
    lead = rank == 0  # prints, checkpoints and --out come from rank 0 alone
    say = print if lead else (lambda *a, **k: None)
    if args.batch_size < world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be at least the {world} processes")
    # read and check a checkpoint before any data is loaded: a foreign one fails fast
    if args.eval_only:
        ckpt = load_checkpoint(args.checkpoint, args, device, flags=MODEL_FLAGS)
    elif args.resume and os.path.exists(args.checkpoint):
        ckpt = load_checkpoint(args.checkpoint, args, device)
    else:
        ckpt = None
    pyro.set_rng_seed(args.seed)
    if args.dataset == "synthetic":
        (xtr, ytr), (xte, yte) = synthetic_cifar(args.num_synthetic, max(64, args.num_synthetic // 2), seed=args.seed)
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    else:
        (xtr, ytr), (xte, yte) = load_cifar(args.dataset, args.data_dir, args.download)
        mean, std = MEAN[args.dataset], STD[args.dataset]
    ood_x = {name: load_ood(name, args.data_dir, args.download) for name in args.ood}  # fail before training
    if args.subset is not None:
        xtr, ytr = xtr[: args.subset], ytr[: args.subset]
    n_val = max(1, int(round(args.val_fraction * len(xtr)))) if args.val_fraction > 0 else 0
    xtr, ytr, xval, yval = xtr[: len(xtr) - n_val], ytr[: len(ytr) - n_val], xtr[len(xtr) - n_val :], ytr[len(ytr) - n_val :]
    n_train = len(xtr)
    xtr, ytr = xtr.to(device), ytr.to(device)

    def prep(x, train=False):
        x = x.to(device)
        if train and not args.no_augment:
            x = augment(x)
        return normalise(x, mean, std)

    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    with pyro.settings.context(module_local_params=True):
        model = cifar_resnet18(NUM_CLASSES[args.dataset], args.width, dist.Normal(0.0, args.prior_scale), num_data=n_train).to(device)
        dense_sites = model.dense_sites if args.density < 1 else ()
        guide = SparseSubspaceGuide(model, density=args.density, dense_sites=dense_sites)
        x0, y0 = prep(xtr[:2]), ytr[:2]
        guide.setup(x0, y0)
        elbo = pyro.infer.TraceMeanField_ELBO()
        groups = [
            {"params": list(guide.locs.parameters()), "lr": args.lr, "weight_decay": args.weight_decay},
            {"params": list(guide.unconstrained_scales.parameters()), "lr": args.lr_scale, "weight_decay": 0.0},
            {"params": list(model.parameters()), "lr": args.lr, "weight_decay": args.weight_decay},
        ]
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
        svi = SSVI(
            model,
            guide,
            optimizer,
            elbo,
            total_steps=total_steps,
            update_every=args.update_every,
            removal_fraction=args.removal_fraction,
            stop_updates_at=args.stop_updates_at,
            removal=args.removal,
            addition=args.addition,
            local_reparameterization=not args.no_lrt,
        )
        start_epoch, elapsed, epochs_log = 0, 0.0, []
        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["model"])
                guide.load_state_dict(ckpt["guide"])
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
                svi.load_state_dict(ckpt["ssvi"])
                set_rng_state(ckpt["rng"])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise UsageError(f"--checkpoint {args.checkpoint}: does not fit this run ({_first_line(e)})") from e
            start_epoch, elapsed, epochs_log = ckpt["epoch"] + 1, ckpt["seconds"], ckpt["log"]
            verb = "evaluating" if args.eval_only else "resumed from"
            say(f"{verb} {args.checkpoint} after epoch {ckpt['epoch'] + 1}")

        def recalibrate():
            if args.bn_batches:
                batches = (prep(xtr[i : i + args.batch_size]) for i in range(0, min(n_train, args.bn_batches * args.batch_size), args.batch_size))
                recalibrate_batchnorm(model, guide, batches)

        logits_seen = {}
        hook = model.net.register_forward_hook(lambda m, i, o: logits_seen.__setitem__("logits", o))
        kl = KLScaleMessenger(0.0)
        per_example = pyro.poutine.scale(scale=1.0 / n_train)
        density = guide.active_params / guide.dense_params
        from tqdm.auto import tqdm

        for epoch in range(start_epoch, start_epoch if args.eval_only else args.epochs):
            t0 = time.perf_counter()
            model.train()
            # one shuffle per epoch, the same on every rank; each rank its own noise; both fixed by
            # (seed, epoch, rank) alone, so a resumed run goes on as an uninterrupted one would
            shuffle = torch.Generator("cpu").manual_seed(args.seed * 1_000_003 + epoch)
            perm = torch.randperm(n_train, generator=shuffle, device="cpu").to(device)
            pyro.set_rng_seed(args.seed + 1_000_003 * (epoch + 1) + 7919 * rank)
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress or not lead, leave=False)
            loss_sum, correct, seen = 0.0, 0, 0
            for b in bar:
                batch = perm[b * args.batch_size : (b + 1) * args.batch_size]
                if len(batch) < world:  # a last batch smaller than the world: every rank still steps
                    batch = batch.repeat(math.ceil(world / len(batch)))[:world]
                idx = batch[rank::world]  # this rank's share of the global batch
                xb, yb = prep(xtr[idx], train=True), ytr[idx]
                kl.scale = args.kl_scale * min(2.0 * svi.step_count / total_steps, 1.0)
                # divide the ELBO by N: mean cross-entropy + kl_scale * KL / N, the recipe's loss
                with kl, per_example:
                    loss = svi.step(xb, yb)
                loss_sum += loss
                seen += len(idx)
                correct += (logits_seen["logits"].argmax(-1) == yb).sum().item()
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{correct / seen:.3f}", density=f"{density:.3f}")
            scheduler.step()
            if world > 1:  # the epoch's figures over all ranks
                totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
                torch_dist.all_reduce(totals)
                loss_sum, correct, seen = totals[0].item() / world, int(totals[1]), int(totals[2])
                broadcast_state(model)  # batch-norm statistics: rank 0's, for validation and checkpoints
            row = {"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "train_accuracy": correct / seen}
            val_text = ""
            if n_val:
                recalibrate()
                val = report(predict_sharded(model, guide, xval, prep, 0, 512, world), yval)["posterior_mean"]
                row.update(val_accuracy=val["accuracy"], val_nll=val["nll"])
                val_text = f"val acc {row['val_accuracy']:.4f}  val NLL {row['val_nll']:.4f}  "
            elapsed += time.perf_counter() - t0
            row.update(lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - t0)
            epochs_log.append(row)
            say(
                f"epoch {row['epoch']:>3}/{args.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}  "
                f"{val_text}density {density:.4f}  lr {row['lr']:.5f}  {row['seconds']:.1f}s"
            )
            if args.checkpoint and lead:
                save_atomic(
                    {
                        "model": model.state_dict(),
                        "guide": guide.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "ssvi": svi.state_dict(),
                        "rng": rng_state(),
                        "epoch": epoch,
                        "seconds": elapsed,
                        "log": epochs_log,
                        "args": vars(args),
                    },
                    args.checkpoint,
                )
            if args.stop_after is not None and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < args.epochs:
                say(f"stopped after epoch {epoch + 1}; continue with --resume --checkpoint {args.checkpoint}")
                hook.remove()
                return {"stopped_after_epoch": epoch + 1, "processes": world}
        hook.remove()
        pyro.set_rng_seed(args.seed + 7919 * rank)  # the evaluation's draws do not depend on how training got here
        if world > 1:
            broadcast_state(model)
        recalibrate()
        test_prediction = predict_sharded(model, guide, xte, prep, args.mc_samples, 256, world)
        test = report(test_prediction, yte)
        ood_predictions = {name: predict_sharded(model, guide, x, prep, args.mc_samples, 256, world) for name, x in ood_x.items()}
        flops = flops_report(
            model,
            guide,
            prep(xtr[: args.batch_size]),
            local_reparameterization=not args.no_lrt,
            update_every=args.update_every,
            gradient_addition=args.addition == "gradient" and args.density < 1,
        )
    result = {
        "processes": world,
        "dataset": args.dataset,
        "density": density,
        "active_params": guide.active_params,
        "dense_params": guide.dense_params,
        "sparse_site_density": _sparse_density(guide),
        "guide_bytes": guide_state_bytes(guide, optimizer),
        "dense_guide_bytes": dense_guide_bytes(guide, optimizer),
        "train_flops_per_step": flops["train_flops_per_step"],
        "dense_vi_train_flops_per_step": flops["dense_vi_train_flops_per_step"],
        "train_images": n_train,
        "val_images": n_val,
        "epochs": len(epochs_log),
        "eval_only": args.eval_only,
        "seconds": elapsed,
        "updates": len(svi.history),
        "epoch_log": epochs_log,
        "args": vars(args),
    }
    for metric in TEST_METRICS:
        result[f"test_{metric}"] = {kind: test[kind][metric] for kind in ("mc", "posterior_mean") if kind in test}
    result["ood"] = {name: ood_results(test_prediction, pred) for name, pred in ood_predictions.items()}
    kind = "mc" if args.mc_samples else "posterior_mean"
    say(
        "test: "
        + "  ".join(f"{k[5:]} {v[kind]:.4f}" for k, v in result.items() if k.startswith("test_"))
        + f"  ({kind.replace('_', ' ')}{f', {args.mc_samples} samples' if args.mc_samples else ''})  "
        f"active {guide.active_params}/{guide.dense_params}"
    )
    for name, res in result["ood"].items():
        say(f"OOD {name}: " + "  ".join(f"{score} AUROC {m['auroc']:.4f} AUPR {m['aupr']:.4f} FPR95 {m['fpr95']:.4f}" for score, m in res[kind].items()))
    if args.out and lead:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        if args.plot:
            for path in save_plots(args.out, test_prediction, yte, ood_predictions):
                say(f"plot: {path}")
    return result


#: test metrics in the JSON, each for the MC predictive and the posterior mean
TEST_METRICS = ("accuracy", "nll", "ece", "brier", "aurc", "accuracy_at_80", "accuracy_at_90", "accuracy_at_95")


def _sparse_density(guide):
    sparse = guide.sparse_site_names()
    if not sparse:
        return 1.0
    info = [guide.site_info(s) for s in sparse]
    return sum(i.k for i in info) / sum(i.numel for i in info)


if __name__ == "__main__":
    run_main(main, usage_errors=(UsageError,))
