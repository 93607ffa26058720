r"""How a sparse guide spreads one overall density over its sites.

SSVI (Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025) keeps ``s = density * d`` active weights; the
paper gives every layer the same density (``"uniform"``). The Erdős–Rényi-Kernel rule of RigL (Evci,
Gale, Menick, Castro, Elsen, ICML 2020, section 3) gives small layers more: a site of shape
``(n_1, ..., n_r)`` gets a density proportional to

.. math::

    \rho_l = \epsilon \, \frac{\sum_j n_j}{\prod_j n_j},

with one :math:`\epsilon` for all sites chosen so that the active counts add up to the budget
``round(density * total)`` over the sparse sites. A site whose :math:`\rho_l` would exceed 1 is made
dense, its coordinates are taken off the budget, and :math:`\epsilon` is solved again for the rest,
until no site exceeds 1. Counts are then whole numbers by largest remainders (:func:`whole_counts`),
so the total is exact.

    >>> import torch
    >>> counts = erk_counts({"conv": torch.Size([16, 8, 3, 3]), "head": torch.Size([10, 16])}, 0.1)
    >>> counts, sum(counts.values()) == round(0.1 * (16 * 8 * 9 + 10 * 16))
    ({'conv': 70, 'head': 61}, True)
"""

import math

#: the allocations :class:`~pyro_ssvi.SparseSubspaceGuide` takes
ALLOCATIONS = ("uniform", "erk")


def whole_counts(targets, limits):
    """Whole counts ``k_l <= limits[l]`` (at least 1 each) summing to ``round(sum(targets))``: each target
    rounded down, then the remainder given one by one to the largest fractional parts (ties: the earlier
    site)."""
    total = int(round(sum(targets.values())))
    counts = {n: min(limits[n], max(1, math.floor(t))) for n, t in targets.items()}
    position = {n: i for i, n in enumerate(targets)}
    order = sorted(targets, key=lambda n: (-(targets[n] - math.floor(targets[n])), position[n]))
    short = total - sum(counts.values())
    while short > 0 and any(counts[n] < limits[n] for n in order):
        for n in order:
            if short and counts[n] < limits[n]:
                counts[n] += 1
                short -= 1
    return counts


def erk_densities(shapes, density):
    r"""Per-site densities of the ERK rule (the module docstring) for ``shapes`` (name -> ``torch.Size``),
    an overall ``density`` in ``(0, 1]``; sites made dense get exactly 1."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    budget = density * sum(numel.values())
    dense = set()
    while True:
        free = [n for n in shapes if n not in dense]
        left = budget - sum(numel[n] for n in dense)
        if not free or left <= 0:
            return {n: 1.0 if n in dense else 0.0 for n in shapes}
        eps = left / sum(raw[n] * numel[n] for n in free)
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense.update(over)


def erk_counts(shapes, density):
    """Active counts of the ERK rule: :func:`erk_densities` made whole (:func:`whole_counts`); they sum to
    ``round(density * total)`` exactly."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    rho = erk_densities(shapes, density)
    targets = {n: rho[n] * numel[n] for n in shapes}
    scale = round(density * sum(numel.values())) / sum(targets.values())  # the budget rounded, not each target
    return whole_counts({n: t * scale for n, t in targets.items()}, numel)


def uniform_counts(shapes, density):
    """Active counts of the uniform rule: ``round(density * numel)`` per site, at least 1 (the paper's)."""
    return {n: min(math.prod(s), max(1, int(round(density * math.prod(s))))) for n, s in shapes.items()}


def active_counts(shapes, density, allocation="uniform"):
    """``{site: k}`` for ``shapes`` (name -> ``torch.Size``) at the overall ``density`` under ``allocation``
    (``"uniform"`` or ``"erk"``)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: expected one of {ALLOCATIONS}, got {allocation!r}")
    if density >= 1.0:
        return {n: math.prod(s) for n, s in shapes.items()}
    return (erk_counts if allocation == "erk" else uniform_counts)(shapes, density)


__all__ = ["ALLOCATIONS", "active_counts", "erk_counts", "erk_densities", "uniform_counts", "whole_counts"]
