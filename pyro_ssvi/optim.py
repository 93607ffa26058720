r"""Optimiser state of the slots a subspace update refills.

An update writes new entries into storage slots of a site's ``loc`` / ``rho`` tensors
(Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025: "reset optimiser state of every
changed entry"). :func:`reset_optimizer_state` zeroes their per-coordinate state
(momentum, Adam moments). For SGD that makes a slot exactly a fresh optimiser.

Adam is different: its step count ``t`` is shared by the whole tensor, so a slot reset
at step ``b`` restarts its moments at zero but keeps the bias correction
``1 - beta^t ~ 1``. Its first update is then

.. math:: \mathrm{lr}\, \frac{(1-\beta_1) g}{\sqrt{(1-\beta_2) g^2}} \approx 3.2\, \mathrm{lr}

rather than Adam's ``lr``. :func:`fresh_adam_correction` makes such a slot step exactly like
a fresh Adam of age ``a = t - b``: after ``optimizer.step()`` it adds, on the young slots,

.. math:: \mathrm{lr} \Big( \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}
                         - \frac{m / (1-\beta_1^a)}{\sqrt{v / (1-\beta_2^a)} + \epsilon} \Big),

the difference between the update ``torch.optim.Adam`` made and a fresh Adam's. The slot
birth steps ``b`` live in the guide (:meth:`SparseSubspaceGuide.entry_births`), so the
correction needs no extra optimiser state and checkpoints with ``state_dict()``.
"""

import functools
import math

import torch
from pyro.optim import PyroOptim
from pyro.optim.optim import is_scheduler

#: corrections are skipped once beta2^age falls below this: the two updates then agree to ~1e-6
_NEGLIGIBLE = 1e-6


def torch_optimizers(optim):
    """The ``torch.optim.Optimizer`` objects behind ``optim`` (a ``PyroOptim``, an optimiser or a scheduler)."""
    if isinstance(optim, PyroOptim):
        for opt in optim.optim_objs.values():
            yield opt.optimizer if is_scheduler(opt) else opt
    elif isinstance(optim, torch.optim.Optimizer):
        yield optim
    elif is_scheduler(optim):
        yield optim.optimizer


@torch.no_grad()
def reset_optimizer_state(optim, params, positions):
    """Zero the per-coordinate optimiser state (momentum, Adam moments...) of ``params`` at ``positions``.

    Works for a :class:`pyro.optim.PyroOptim` (one torch optimiser per parameter) and for
    a plain :class:`torch.optim.Optimizer`. Every state tensor shaped like the parameter
    is reset; scalar state such as Adam's step count is shared and left alone (see
    :func:`fresh_adam_correction`).

        >>> p = torch.nn.Parameter(torch.ones(4))
        >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        >>> p.grad = torch.ones(4); opt.step()
        >>> reset_optimizer_state(opt, [p], torch.tensor([1]))
        >>> opt.state[p]["momentum_buffer"]
        tensor([1., 0., 1., 1.])
    """
    if positions.numel() == 0:
        return
    params = list(params)
    for opt in torch_optimizers(optim):
        for p in params:
            state = opt.state.get(p)
            if not state:
                continue
            for value in state.values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value[positions] = 0


@functools.lru_cache(maxsize=16)
def _inverse_bias_corrections(b1, b2, dtype, device):
    """``1 / (1 - beta^a)`` for ages ``a = 0 .. H`` (``H``: beta2^H below 1e-6; entry 0 unused), looked
    up per slot instead of a ``pow`` per slot and step."""
    horizon = math.ceil(math.log(_NEGLIGIBLE) / math.log(b2)) if 0 < b2 < 1 else 1
    ages = torch.arange(horizon + 1, dtype=torch.float64, device=device)
    return (1 / (1 - b1**ages)).to(dtype), (1 / (1 - b2**ages)).to(dtype)


def adam_param_groups(optim):
    """``{id(param): (optimizer, group)}`` for parameters under ``torch.optim.Adam`` / ``AdamW`` without amsgrad."""
    out = {}
    for opt in torch_optimizers(optim):
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            for group in opt.param_groups:
                if not group.get("amsgrad", False):
                    out.update({id(p): (opt, group) for p in group["params"]})
    return out


@torch.no_grad()
def fresh_adam_correction(optim, params, births, groups=None):
    """After an optimiser step, make every slot born at step ``b > 0`` step like a fresh Adam.

    :param optim: the optimiser that just stepped (``PyroOptim``, ``torch.optim`` optimiser or
        scheduler). Only ``torch.optim.Adam`` / ``AdamW`` without ``amsgrad`` are corrected;
        other optimisers are left as they are.
    :param params: parameters of one site (e.g. its ``loc`` and ``rho``), one slot per entry.
    :param torch.Tensor births: step at which each slot was (re)filled, shaped like the
        parameters; ``0`` for slots filled at set-up, which need no correction.
    :param dict groups: ``adam_param_groups(optim)``, to reuse across sites of one step.
    :returns: the number of slot-parameter pairs corrected.
    """
    groups = adam_param_groups(optim) if groups is None else groups
    corrected = 0
    factors = {}  # per (t, b1, b2): the slots' bias corrections, shared by the site's parameters
    for p in params:
        if id(p) not in groups:
            continue
        opt, group = groups[id(p)]
        state = opt.state.get(p)
        if not state or "exp_avg" not in state:
            continue
        b1, b2 = (float(b) for b in group["betas"])
        lr, eps = float(group["lr"]), float(group["eps"])
        t = int(state["step"])
        key = (t, b1, b2)
        if key not in factors:
            factors[key] = _slot_corrections(births, t, b1, b2, p.dtype, p.device)
        n_young, shared1, shared2, c1, c2 = factors[key]
        if n_young == 0:
            continue
        m, v = state["exp_avg"], state["exp_avg_sq"]
        # p += lr * (shared step - fresh step); exactly 0 where a slot's factors are the shared ones
        step = m * (shared1 / ((v * shared2).sqrt_().add_(eps)) - c1.reshape(m.shape) / ((v * c2.reshape(v.shape)).sqrt_().add_(eps)))
        p.add_(step, alpha=lr)
        corrected += n_young
    return corrected


def _slot_corrections(births, t, b1, b2, dtype, device):
    """Adam's inverse bias corrections per slot: a fresh Adam's (age ``t - birth``) for young slots, the
    shared ones (age ``t``) elsewhere, looked up in one table so both are the same float bits."""
    inv1, inv2 = _inverse_bias_corrections(b1, b2, dtype, device)
    horizon = min(t, inv1.numel() - 1)
    lo = max(t - horizon, 0)  # young: born after step lo (after set-up, less than `horizon` steps ago)
    shared1 = torch.tensor(1 / (1 - b1**t), dtype=dtype, device=device)
    shared2 = torch.tensor(1 / (1 - b2**t), dtype=dtype, device=device)
    flat = births.reshape(-1)
    n_young = int((flat > lo).sum())
    if n_young == 0:
        return 0, shared1, shared2, None, None
    # tables over birth steps lo .. t: entry 0 (born at or before lo: not young) holds the shared factors,
    # entry j the factors of age t - lo - j (at least 1)
    ages = (t - lo - torch.arange(1, t - lo + 1, device=device)).clamp_(min=1)
    idx = (flat - lo).clamp_(0, t - lo)
    c1 = torch.cat([shared1.reshape(1), inv1[ages]]).index_select(0, idx)
    c2 = torch.cat([shared2.reshape(1), inv2[ages]]).index_select(0, idx)
    return n_young, shared1, shared2, c1, c2


__all__ = ["adam_param_groups", "fresh_adam_correction", "reset_optimizer_state", "torch_optimizers"]
