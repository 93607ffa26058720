r"""Deterministic sparse training on SSVI's schedule: the price of sparsity without the Bayesian part.

A plain network keeps ``k_l`` nonzero weights per masked layer (the same counts as a sparse guide:
:func:`~pyro_ssvi.allocation.active_counts`) and, on the update steps of a
:class:`~pyro_ssvi.SwapSchedule`, swaps ``n_t = floor(f(t) k_l)`` of them as RigL does (Evci, Gale, Menick,
Castro, Elsen, ICML 2020): the active weights of smallest magnitude go, the inactive ones of largest dense
gradient come in at zero,

.. math::

    S \leftarrow \bigl(S \setminus \operatorname{bottom}_{n_t} |w_S|\bigr) \cup
    \operatorname{top}_{n_t} |\nabla_{w} L|_{S^c},

chosen by the same :func:`~pyro_ssvi.subspace.select_swap` as SSVI's update (an entry removed and chosen again
stays). Outside the active set the weights are exact zeros at every step: the gradient is masked before the
optimiser step, and the optimiser's state (SGD momentum) is zeroed where an entry leaves or arrives.

    >>> import torch
    >>> from pyro_ssvi import SwapSchedule
    >>> net = torch.nn.Linear(20, 5)
    >>> masks = SparseMasks({"weight": net.weight}, 0.1, SwapSchedule(total_steps=100, update_every=10))
    >>> int((net.weight != 0).sum()), masks.active_params
    (10, 10)
"""

import torch

from .allocation import active_counts
from .subspace import select_swap


class SparseMasks:
    """Masks of the named ``params`` (a mapping name -> ``torch.nn.Parameter``) at ``density``.

    :param float density: overall fraction of each masked weight kept, in ``(0, 1]``.
    :param schedule: the :class:`~pyro_ssvi.SwapSchedule` of the updates (SSVI's).
    :param str allocation: ``"uniform"`` or ``"erk"`` (:mod:`pyro_ssvi.allocation`).
    :param torch.Generator generator: draws the initial active sets (uniformly at random, as SSVI's guide);
        default: the global generator.
    """

    def __init__(self, params, density, schedule, allocation="uniform", generator=None):
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density: expected a float in (0, 1], got {density!r}")
        self.params, self.schedule, self.allocation = dict(params), schedule, allocation
        counts = active_counts({n: p.shape for n, p in self.params.items()}, density, allocation)
        self.masks = {}
        for name, p in self.params.items():
            order = torch.randperm(p.numel(), generator=generator, device="cpu").to(p.device)
            mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            mask[order[: counts[name]]] = True
            self.masks[name] = mask.reshape(p.shape)
        self.history = []
        self.apply()

    @property
    def active_params(self):
        """Nonzero weights kept over all masked parameters."""
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def dense_params(self):
        return sum(m.numel() for m in self.masks.values())

    @torch.no_grad()
    def apply(self):
        """Zero every weight outside its mask."""
        for name, p in self.params.items():
            p.mul_(self.masks[name])

    @torch.no_grad()
    def mask_gradients(self):
        """Zero the gradient outside the masks (call after ``backward``, before the optimiser step)."""
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[name])

    def dense_gradients(self):
        """Copies of the dense gradients, for :meth:`update` (taken before :meth:`mask_gradients`)."""
        return {n: None if p.grad is None else p.grad.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, t, grads, optimizer=None):
        """The swap of step ``t`` (1-based) from the dense gradients ``grads`` (name -> tensor); zero weights
        and ``optimizer`` state where entries arrive, zero where they leave. Returns ``{name: entries swapped}``."""
        swapped = {}
        for name, p in self.params.items():
            mask = self.masks[name].reshape(-1)
            index = mask.nonzero().squeeze(1)
            n = self.schedule.num_swaps(index.numel(), t)
            if grads.get(name) is None:
                raise RuntimeError(f"parameter {name!r}: no gradient on update step {t}; gradient addition needs one")
            grad = grads[name].reshape(-1).abs()
            decision = select_swap(index, p.reshape(-1)[index].abs(), n, p.numel(), lambda cand: grad)
            leaving = decision.removed[~torch.isin(decision.removed, decision.added)]
            changed = torch.cat([leaving, decision.new_index])
            mask[leaving] = False
            mask[decision.new_index] = True
            p.view(-1)[changed] = 0.0  # RigL: new connections start at zero
            if optimizer is not None:
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.view(-1)[changed] = 0.0
            swapped[name] = int(decision.new_index.numel())
        self.history.append({"step": t, "swapped": swapped})
        return swapped

    def state_dict(self):
        return {"masks": {n: m.clone() for n, m in self.masks.items()}, "allocation": self.allocation, "history": list(self.history)}

    def load_state_dict(self, state):
        """Take the masks of ``state`` (refused, unchanged, when names, shapes, counts or allocation differ)."""
        masks = state["masks"]
        if set(masks) != set(self.masks) or state.get("allocation", "uniform") != self.allocation:
            raise ValueError(f"masks: the state holds {sorted(masks)} with allocation {state.get('allocation', 'uniform')!r}, "
                             f"this run masks {sorted(self.masks)} with allocation {self.allocation!r}")
        for name, m in masks.items():
            if m.shape != self.masks[name].shape or int(m.sum()) != int(self.masks[name].sum()):
                raise ValueError(f"masks: {name!r} has shape {tuple(m.shape)} with {int(m.sum())} active in the state, "
                                 f"this run {tuple(self.masks[name].shape)} with {int(self.masks[name].sum())} (another density?)")
        self.masks = {n: m.to(device=self.masks[n].device, dtype=torch.bool).clone() for n, m in masks.items()}
        self.history = list(state.get("history", []))
        self.apply()


__all__ = ["SparseMasks"]
