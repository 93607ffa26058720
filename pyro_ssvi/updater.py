r"""The subspace update of SSVI (Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025, Algorithm 1).

On an update step ``t`` (every ``DeltaT`` steps, until ``stop_updates_at * T``), for every sparse
site with ``k`` active entries:

.. math::

    n_t = \lfloor f(t)\, k \rfloor, \qquad
    S \leftarrow \bigl(S \setminus \operatorname{bottom}_{n_t}\, r(\mu_S, \sigma_S)\bigr)
    \cup \operatorname{top}_{n_t}\, a(g_{S^c}),

where ``f`` is the cosine-annealed fraction of :class:`~pyro_ssvi.SwapSchedule`, ``r`` the
removal criterion (higher = keep) and ``a`` the addition criterion over the inactive
coordinates (by default the magnitude of the data term's dense gradient ``g``). New entries
start at ``(new_loc, new_rho)``; the optimiser state of every refilled slot is reset, and with
``optimizer_reset="fresh"`` a refilled slot under Adam then steps exactly as a fresh Adam.

:class:`SubspaceUpdater` holds the criteria, the schedule and the record of every update
(``history``); :class:`~pyro_ssvi.SSVI` calls it after the optimiser step of an update step.
"""

import math

import torch

from .criteria import RandomAddition, get_addition, get_removal, needs_gradient
from .distributed import average_, check_same_active_sets, is_distributed, shared_seed
from .guide import inverse_scale_transform
from .optim import adam_param_groups, fresh_adam_correction, permute_optimizer_state, reset_optimizer_state
from .subspace import select_swap

__all__ = ["SubspaceUpdater"]


class SubspaceUpdater:
    """Remove-and-add updates of the active sets, with the optimiser state kept consistent.

        >>> from pyro_ssvi import SwapSchedule
        >>> updater = SubspaceUpdater(SwapSchedule(total_steps=1000, update_every=100), addition="random")
        >>> updater.is_update_step(100), updater.is_update_step(150), updater.needs_gradient
        (True, False, False)

    :param schedule: a :class:`~pyro_ssvi.SwapSchedule` (when and how much to swap).
    :param removal: a name from :data:`pyro_ssvi.criteria.REMOVAL_CRITERIA` or a callable
        ``(loc, scale) -> score`` (higher = keep).
    :param addition: ``"gradient"``, ``"random"`` or a callable ``(grad, candidates) -> scores``.
    :param float new_loc: mean of entering entries.
    :param new_scale: ``"mean"`` (the site's mean ``rho``) or a positive float (a standard deviation).
    :param callable dense_grad_hook: optional ``(site, grad) -> grad`` before ``addition`` ranks.
    :param str optimizer_reset: ``"fresh"`` or ``"zero"`` (see :class:`~pyro_ssvi.SSVI`).
    :param process_group: a ``torch.distributed`` group: dense gradients are averaged over ranks,
        random addition is seeded alike and the active sets are checked to agree after each update.
    """

    def __init__(self, schedule, removal="snr_abs", addition="gradient", new_loc=0.0, new_scale="mean",
                 dense_grad_hook=None, optimizer_reset="fresh", process_group=None):
        self.schedule = schedule
        self.removal = get_removal(removal)
        self.addition = get_addition(addition)
        if isinstance(new_loc, bool) or not isinstance(new_loc, (int, float)) or not math.isfinite(new_loc):
            raise ValueError(f"new_loc: expected a finite float, got {new_loc!r}")
        if not (new_scale == "mean" or (isinstance(new_scale, (int, float)) and not isinstance(new_scale, bool) and new_scale > 0)):
            raise ValueError(f"new_scale: expected 'mean' or a positive float, got {new_scale!r}")
        self.new_loc, self.new_scale = float(new_loc), new_scale
        if dense_grad_hook is not None and not callable(dense_grad_hook):
            raise ValueError(f"dense_grad_hook: expected a callable (site, grad) -> grad, got {dense_grad_hook!r}")
        self.dense_grad_hook = dense_grad_hook
        if optimizer_reset not in ("fresh", "zero"):
            raise ValueError(f"optimizer_reset: expected 'fresh' or 'zero', got {optimizer_reset!r}")
        self.optimizer_reset = optimizer_reset
        self.process_group = process_group
        self.distributed = is_distributed(process_group)
        self.history = []

    @property
    def needs_gradient(self):
        """Whether the addition criterion ranks by the data term's dense gradient."""
        return needs_gradient(self.addition)

    def is_update_step(self, t):
        """Whether step ``t`` (1-based) updates the subspace."""
        return self.schedule.is_update_step(t)

    def seed_alike(self, device):
        """Distributed: give ``addition="random"`` a generator seeded alike on every rank (once)."""
        if isinstance(self.addition, RandomAddition) and self.addition.generator is None:
            generator = torch.Generator(device)
            generator.manual_seed(shared_seed(device, self.process_group))
            self.addition = RandomAddition(generator)

    @torch.no_grad()
    def update(self, t, sites, grads, optim):
        """Update the active set of every ``(guide, name)`` in ``sites`` at step ``t``.

        ``grads`` maps a site name to its dense data-term gradient (consumed: each is released after
        its site); ``optim`` is the ``pyro.optim`` or ``torch.optim`` optimiser whose state follows
        the slots. Appends the update's record to ``history`` and returns it.
        """
        record = {"step": t, "fraction": self.schedule.fraction(t), "scheduled": {}, "swapped": {}, "abs_mean_overlap": {}}
        if self.distributed:  # one bucketed all-reduce, in site order (the same on every rank)
            average_([grads[name] for _, name in sites if name in grads], self.process_group)
        for guide, name in sites:
            n = self.schedule.num_swaps(guide.site_info(name).k, t)
            record["scheduled"][name] = n
            record["swapped"][name] = 0
            if n:
                swapped, overlap = self._update_site(t, guide, name, n, grads.pop(name, None), optim)
                record["swapped"][name], record["abs_mean_overlap"][name] = swapped, overlap
        self.history.append(record)
        if self.distributed:
            check_same_active_sets({name: g.active_index(name) for g, name in sites}, t, self.process_group)
        return record

    def _update_site(self, t, guide, name, n, grad, optim):
        """Swap ``n`` entries of one site; returns ``(entries swapped, overlap with |mu| removal)``."""
        loc, rho, index = guide.loc(name), guide.unconstrained_scale(name), guide.active_index(name)
        scores = self.removal(loc.detach(), guide.transform_scale(rho.detach()))
        if not torch.is_tensor(scores) or scores.shape != loc.shape:
            raise ValueError(f"removal: the criterion returned shape {getattr(scores, 'shape', None)} for site {name!r}, expected {tuple(loc.shape)}")
        if grad is not None and self.dense_grad_hook is not None:
            grad = self.dense_grad_hook(name, grad)
        if grad is None and self.needs_gradient:
            raise RuntimeError(
                f"site {name!r}: no dense gradient was recorded on step {t}; the model does not use the "
                "sampled value differentiably. Use addition='random' for such sites."
            )
        decision = select_swap(index, scores, n, guide.site_info(name).numel, lambda cand: self.addition(grad, cand),
                               overwrite_scores=getattr(self.addition, "fresh_scores", False))
        abs_removed = index[torch.topk(loc.abs(), n, largest=False, sorted=False).indices]
        overlap = torch.isin(decision.removed, abs_removed).sum().item() / n
        if self.new_scale == "mean":
            new_rho = rho.mean()
        else:
            new_rho = inverse_scale_transform(self.new_scale, guide.scale_transform).to(rho)
        # slots stay in the sparse kernels' (row-major) order: the optimiser state, reset at the refilled
        # slots (numbered as before the update), follows the guide's reordering
        perm = guide.replace_entries(name, decision.positions, decision.new_index, self.new_loc, new_rho, step=t, sort=True)
        reset_optimizer_state(optim, (loc, rho), decision.positions)
        if perm is not None:
            permute_optimizer_state(optim, (loc, rho), perm)
        return int(decision.positions.numel()), overlap

    def after_optimizer_step(self, sites, optim):
        """With ``optimizer_reset="fresh"``, refilled slots under Adam step like a fresh Adam
        (:func:`~pyro_ssvi.fresh_adam_correction`); nothing before the first update."""
        if self.optimizer_reset != "fresh" or not self.history:
            return
        groups = adam_param_groups(optim)
        if not groups:
            return
        for guide, name in sites:
            params = (guide.loc(name), guide.unconstrained_scale(name))
            fresh_adam_correction(optim, params, guide.entry_births(name), groups)

    def replaced_fraction(self):
        """Entries that actually changed over entries scheduled to swap, over all updates so far
        (``nan`` before the first update that schedules a swap); near 0 means the addition
        criterion keeps choosing what removal just took out."""
        scheduled = sum(sum(h.get("scheduled", {}).values()) for h in self.history)
        swapped = sum(sum(h["swapped"].values()) for h in self.history)
        return swapped / scheduled if scheduled else float("nan")

    def state_dict(self):
        return {"history": list(self.history)}

    def load_state_dict(self, state):
        self.history = list(state["history"])
