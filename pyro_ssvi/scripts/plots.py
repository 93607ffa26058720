"""Plots of the metrics of :mod:`pyro_ssvi.metrics` (matplotlib, an optional dependency)."""

import torch

from ..metrics import ece, reliability_diagram

__all__ = ["plot_reliability", "plot_uncertainty_histograms"]


def plot_reliability(probs, y, ax=None, n_bins=15, label=None):
    """Draw a reliability diagram with matplotlib; returns the axes."""
    import matplotlib.pyplot as plt

    d = reliability_diagram(probs, y, n_bins)
    ax = ax or plt.gca()
    centers = (d["edges"][:-1] + d["edges"][1:]) / 2
    ax.bar(centers.cpu().numpy(), torch.nan_to_num(d["accuracy"]).cpu().numpy(), width=1 / n_bins, alpha=0.6, edgecolor="k", label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE = {ece(probs, y, n_bins):.3f}")
    return ax


def plot_uncertainty_histograms(scores, ax=None, bins=30, xlabel="predictive entropy"):
    """Overlaid normalised histograms of an uncertainty score, one per data set; returns the axes.

    :param dict scores: ``{label: 1-D tensor of scores}``, e.g. in-distribution and each OOD set.
    """
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    values = {k: torch.as_tensor(v).double().reshape(-1) for k, v in scores.items()}
    present = [v for v in values.values() if v.numel()]
    lo = min(float(v.min()) for v in present) if present else 0.0
    hi = max(float(v.max()) for v in present) if present else 1.0
    edges = torch.linspace(lo, max(hi, lo + 1e-6), bins + 1).cpu().numpy()  # shared bins over all sets
    for label, v in values.items():
        ax.hist(v.detach().cpu().numpy(), bins=edges, density=True, alpha=0.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend()
    return ax
