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
import weakref

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
    for value in _coordinate_states(optim, params):
        value[positions] = 0


def _coordinate_states(optim, params):
    """Every optimiser state tensor of ``params`` shaped like its parameter (one entry per coordinate)."""
    params = list(params)
    for opt in torch_optimizers(optim):
        for p in params:
            for value in (opt.state.get(p) or {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    yield value


@torch.no_grad()
def permute_optimizer_state(optim, params, perm):
    """Reorder the per-coordinate optimiser state of ``params`` (1-d) as the parameters were:
    ``state[i] <- state[perm[i]]`` for every state tensor shaped like the parameter (momentum, Adam
    moments...), so each coordinate keeps its own state when a guide reorders its storage slots
    (:meth:`SparseSubspaceGuide.replace_entries` with ``sort=True``).

        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        >>> p.grad = torch.tensor([1., 2., 3.]); opt.step()
        >>> permute_optimizer_state(opt, [p], torch.tensor([2, 0, 1]))
        >>> opt.state[p]["momentum_buffer"]
        tensor([3., 1., 2.])
    """
    for value in _coordinate_states(optim, params):
        value.copy_(value.index_select(0, perm))


@functools.lru_cache(maxsize=16)
def _inverse_bias_corrections(b1, b2, dtype, device):
    """``1 / (1 - beta1^a)`` and ``1 / sqrt(1 - beta2^a)`` for ages ``a = 0 .. H`` (``H``: beta2^H below
    1e-6; entry 0 unused), looked up per slot instead of a ``pow`` per slot and step."""
    horizon = math.ceil(math.log(_NEGLIGIBLE) / math.log(b2)) if 0 < b2 < 1 else 1
    ages = torch.arange(horizon + 1, dtype=torch.float64, device=device)
    return (1 / (1 - b1**ages)).to(dtype), (1 / (1 - b2**ages)).sqrt().to(dtype)


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
        # lr * m * (c / (sqrt(v) * q + eps)) for the shared factors (c, q) = (shared1, shared2) and the
        # slots' own (c1, c2), by the same sequence of correctly rounded operations: the difference is
        # exactly 0 on every slot whose factors are the shared ones
        root = v.sqrt()
        step = root.mul(shared2).add_(eps).reciprocal_().mul_(shared1)
        fresh = root.mul_(c2.reshape(v.shape)).add_(eps).reciprocal_().mul_(c1.reshape(m.shape))
        p.add_(step.sub_(fresh).mul_(m), alpha=lr)
        corrected += n_young
    return corrected


#: id(births) -> (weak reference, version, groups): the distinct birth steps of a births buffer, which
#: change only at subspace updates (recomputed then; a stale or dead entry is never used)
_BIRTH_GROUPS = {}


def _birth_groups(births):
    """``(steps, counts, steps_tensor, group)``: the distinct birth steps (a list), their slot counts
    (a list), the same steps as a tensor, and each slot's group, for a births buffer."""
    key = id(births)
    cached = _BIRTH_GROUPS.get(key)
    if cached is not None and cached[0]() is births and cached[1] == births._version:
        return cached[2]
    steps, group, counts = torch.unique(births.reshape(-1), return_inverse=True, return_counts=True)
    groups = (steps.tolist(), counts.tolist(), steps, group)
    for k in [k for k, v in _BIRTH_GROUPS.items() if v[0]() is None]:
        del _BIRTH_GROUPS[k]
    _BIRTH_GROUPS[key] = (weakref.ref(births), births._version, groups)
    return groups


def _slot_corrections(births, t, b1, b2, dtype, device):
    """Adam's bias-correction factors per slot, ``1 / (1 - beta1^a)`` and ``1 / sqrt(1 - beta2^a)``: a
    fresh Adam's (age ``a = t - birth``) for young slots, the shared ones (``a = t``) elsewhere, copied
    from one value so both are the same float bits. Slots born at one step share their factors,
    so they are looked up per distinct birth step; no device synchronisation."""
    inv1, inv2 = _inverse_bias_corrections(b1, b2, dtype, device)
    table = inv1.numel() - 1
    horizon = min(t, table)  # younger than this: corrected (older slots agree with the shared step to ~1e-6)
    if t <= table:
        shared1, shared2 = inv1[t], inv2[t]
    else:
        shared1 = torch.tensor(1 / (1 - b1**t), dtype=dtype, device=device)
        shared2 = torch.tensor((1 / (1 - b2**t)) ** 0.5, dtype=dtype, device=device)
    steps, counts, steps_t, group = _birth_groups(births)
    n_young = sum(n for b, n in zip(steps, counts) if t - b < horizon)
    if n_young == 0:
        return 0, shared1, shared2, None, None
    ages = (t - steps_t.to(device=device, dtype=torch.int64))
    young = ages < horizon
    ages = ages.clamp_(1, table)  # a slot refilled after the optimiser's last step counts as age 1
    c1 = torch.where(young, inv1.index_select(0, ages), shared1).index_select(0, group)
    c2 = torch.where(young, inv2.index_select(0, ages), shared2).index_select(0, group)
    return n_young, shared1, shared2, c1, c2


__all__ = ["adam_param_groups", "fresh_adam_correction", "permute_optimizer_state", "reset_optimizer_state", "torch_optimizers"]
