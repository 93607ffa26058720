r"""Memory and compute accounting for SSVI (Li et al., ICLR 2024, arXiv 2402.11025).

FLOPs follow the sparse-training convention (RigL): a training step costs the forward
``f`` plus a backward of ``2 f``; a sparse layer's ``f`` scales with its density. With local
reparameterisation a Bayesian layer's forward is two products (mean and variance). A
gradient-based addition costs one dense backward of the scored layers on update iterations,
which amortises to about ``(f_dense - f_sparse) / update_every`` per step::

    f_other  = forward FLOPs of everything but the Bayesian layers (batch norm, ...)
    f_l      = dense forward FLOPs of Bayesian layer l,  d_l its density
    m        = 2 with local reparameterisation, else 1
    SSVI     : 3 (f_other + m sum_l d_l f_l) + sum_{l sparse} (1 - d_l) f_l / update_every
    dense VI : 3 (f_other + m sum_l f_l)

``FlopCounterMode`` counts the dense network; each Bayesian layer's dense ``f_l`` comes from its
output shape (``2 * out.numel() * fan_in``, the convention ``FlopCounterMode`` uses).
"""

import pyro.poutine as poutine
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .optim import torch_optimizers

_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def tensor_bytes(t):
    return t.numel() * t.element_size()


def _guide_optimizer_states(guide, optim):
    """``(parameter, state)`` of every guide parameter the optimiser holds state for."""
    if optim is None:
        return
    ids = {id(p) for p in guide.parameters()}
    for opt in torch_optimizers(optim):
        for p, state in opt.state.items():
            if id(p) in ids:
                yield p, state


def _optimizer_slots(guide, optim):
    """Per-coordinate optimiser tensors per parameter (SGD momentum: 1, Adam: 2, none: 0)."""
    for p, state in _guide_optimizer_states(guide, optim):
        return sum(1 for v in state.values() if torch.is_tensor(v) and v.shape == p.shape)
    return 0


def guide_state_bytes(guide, optim=None):
    """Bytes of the guide's state: parameters, buffers (active indices, slot births) and, when ``optim`` is
    given, the optimiser state of the guide's parameters."""
    total = sum(tensor_bytes(p) for p in guide.parameters()) + sum(tensor_bytes(b) for b in guide.buffers())
    for _, state in _guide_optimizer_states(guide, optim):
        total += sum(tensor_bytes(v) for v in state.values() if torch.is_tensor(v))
    return total


def dense_guide_bytes(guide, optim=None):
    """Bytes a dense mean-field guide over the same sites would hold: ``loc`` and scale for every
    coordinate, plus as many optimiser tensors per parameter as ``optim`` keeps."""
    slots = _optimizer_slots(guide, optim)
    loc = guide.loc(guide.site_names[0])
    return guide.dense_params * 2 * loc.element_size() * (1 + slots)


def _site_module(model, site):
    mod_name, _, pname = site.rpartition(".")
    try:
        module = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    return module if pname == "weight" and isinstance(module, _LINEAR_TYPES) else None


@torch.no_grad()
def layer_flops(model, guide, *args, **kwargs):
    """Dense forward FLOPs of one model call: ``(total, {site: f_l})``.

    The model runs once at the guide's posterior mean under ``FlopCounterMode``; ``f_l`` is
    recorded for every guide site that is the weight of a Linear/Conv module.
    """
    per_site, handles = {}, []
    for site in guide.site_names:
        module = _site_module(model, site)
        if module is None:
            continue

        def hook(mod, inputs, output, site=site):
            fan_in = mod.weight.numel() // mod.weight.shape[0]
            per_site[site] = per_site.get(site, 0) + 2 * output.numel() * fan_in

        handles.append(module.register_forward_hook(hook))
    try:
        with FlopCounterMode(display=False) as counter:
            poutine.block(poutine.condition(model, data=guide.median()))(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return counter.get_total_flops(), per_site


def flops_report(model, guide, *args, local_reparameterization=True, update_every=100, gradient_addition=True, **kwargs):
    """Training and inference FLOPs of SSVI and of dense VI for one call ``model(*args)``.

    :returns: dict with ``dense_forward_flops`` (the deterministic network),
        ``train_flops_per_step`` / ``dense_vi_train_flops_per_step`` (the formulas above),
        ``inference_flops`` / ``dense_inference_flops`` (one forward with one weight sample),
        and ``per_site`` (dense ``f_l`` and density of each Bayesian layer).
    """
    total, per_site = layer_flops(model, guide, *args, **kwargs)
    summary = guide.summary()
    f_bayes = sum(per_site.values())
    f_other = total - f_bayes
    m = 2 if local_reparameterization else 1
    sparse_fwd = sum(summary[s]["density"] * f for s, f in per_site.items())
    overhead = 0.0
    if gradient_addition:
        overhead = sum((1 - summary[s]["density"]) * f for s, f in per_site.items()) / update_every
    return {
        "dense_forward_flops": total,
        "train_flops_per_step": 3 * (f_other + m * sparse_fwd) + overhead,
        "dense_vi_train_flops_per_step": 3 * (f_other + m * f_bayes),
        "inference_flops": f_other + sparse_fwd,
        "dense_inference_flops": total,
        "per_site": {s: {"flops": f, "density": summary[s]["density"]} for s, f in per_site.items()},
    }


__all__ = [
    "dense_guide_bytes",
    "flops_report",
    "guide_state_bytes",
    "layer_flops",
    "tensor_bytes",
]
