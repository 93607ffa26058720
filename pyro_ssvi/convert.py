"""Turn ``torch.nn`` networks into Pyro BNNs.

:func:`bayesianize` makes chosen weights of an ordinary ``nn.Module`` ``PyroSample`` sites
(default: every ``Linear`` and ``Conv`` weight; batch-norm parameters and biases stay
deterministic parameters), with priors that follow the module's device (:class:`DevicePrior`).
It keeps the values it replaced: :func:`pretrained_values` returns them by site name, and
:func:`pretrained_init` is an ``init_loc_fn`` starting a guide there::

    net = bayesianize(trained_net)                  # trained_net: an ordinary, trained nn.Module
    model = BayesianClassifier(net)
    guide = SparseSubspaceGuide(model, density=0.1, init_loc_fn=pretrained_init(model))
"""

import copy
import fnmatch

import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro.infer.autoguide.initialization import init_to_value
from pyro.nn import PyroSample
from pyro.nn.module import to_pyro_module_

from .distributions import factorised_base
from .guide import init_to_normal

DEFAULT_BAYESIAN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _make_prior(prior, name, shape):
    """``(prior of the site, the scalar prior it expands or None)``."""
    fn = prior(name, shape) if callable(prior) and not isinstance(prior, torch.distributions.Distribution) else prior
    if not isinstance(fn, torch.distributions.Distribution):
        raise ValueError(f"prior: expected a Pyro distribution or a callable (name, shape) -> distribution, got {fn!r} for {name!r}")
    scalar = fn if fn.batch_shape == () and fn.event_shape == () else None
    if scalar is not None:
        fn = fn.expand(shape)
    if tuple(fn.batch_shape) == tuple(shape) and fn.event_shape == ():
        fn = fn.to_event(len(shape))
    if tuple(fn.event_shape) != tuple(shape) or fn.batch_shape != ():
        raise ValueError(
            f"prior: for {name!r} expected a scalar distribution or one with event shape {tuple(shape)}, "
            f"got batch {tuple(fn.batch_shape)} event {tuple(fn.event_shape)}"
        )
    if factorised_base(fn) is None:
        raise ValueError(f"prior: the prior for {name!r} is not factorised over coordinates")
    return fn, scalar


def distribution_to(fn, device, dtype=None):
    """A copy of the distribution ``fn`` with every tensor parameter on ``device`` (floating ones in ``dtype``).

    Torch distributions have no ``.to()``; this copies ``fn`` and moves the tensors (and nested
    distributions: ``Independent``'s base, ``MixtureSameFamily``'s parts, ``StudentT``'s chi2)
    found in its attributes.
    """
    new = copy.copy(fn)
    for key, value in vars(fn).items():
        if torch.is_tensor(value):
            new.__dict__[key] = value.to(device, dtype=dtype if dtype is not None and value.is_floating_point() else value.dtype)
        elif isinstance(value, torch.distributions.Distribution):
            new.__dict__[key] = distribution_to(value, device, dtype)
    return new


#: non-persistent buffer on every module with a Bayesian weight: it follows ``module.to(device)``
#: and tells the prior where to live
_ANCHOR = "_prior_device_anchor"

#: prefix of the non-persistent buffers that keep the values ``bayesianize`` replaced:
#: ``module._pretrained_weight`` holds what ``module.weight`` was
_PRETRAINED = "_pretrained_"


class DevicePrior:
    """A ``PyroSample`` prior that follows its module's device and floating dtype.

    A fixed distribution given to ``PyroSample`` keeps its tensors where they were made, so
    ``model.to("cuda")`` would leave the prior, and every weight sampled from it, on the CPU.
    This callable (``PyroSample`` calls it with the module) returns the prior on the device of
    the module's anchor buffer, built once per device: a scalar prior is moved and then
    expanded (no dense copy); any other prior is moved whole.
    """

    def __init__(self, fn, scalar=None):
        self.fn, self.scalar = fn, scalar  # the site's prior; the scalar it expands, if it is one
        self._by_device = {}

    def __call__(self, module):
        anchor = getattr(module, _ANCHOR, None)
        if anchor is None:
            return self.fn
        key = (anchor.device, anchor.dtype)
        fn = self._by_device.get(key)
        if fn is None:
            if self.scalar is not None:
                shape = self.fn.event_shape
                fn = distribution_to(self.scalar, *key).expand(shape).to_event(len(shape))
            else:
                fn = distribution_to(self.fn, *key)
            self._by_device[key] = fn
        return fn

    def __getstate__(self):
        return {"fn": self.fn, "scalar": self.scalar, "_by_device": {}}


def bayesianize(net, prior=None, include=DEFAULT_BAYESIAN_TYPES, exclude=(), *, keep_values=True):
    """Convert ``net`` (in place) into a ``PyroModule`` whose chosen weights are ``PyroSample`` sites.

    :param nn.Module net: an ordinary network.
    :param prior: a scalar Pyro distribution (expanded to each weight's shape), a distribution
        with the weight's shape as event shape, or a callable ``(name, shape) -> distribution``.
        Default ``Normal(0, 1)``.
    :param include: module types whose ``weight`` becomes Bayesian, or parameter-name patterns
        (``fnmatch`` style, e.g. ``"layer*.conv*.weight"``). Default: Linear and Conv weights.
    :param exclude: parameter-name patterns kept deterministic (e.g. ``"fc.weight"``).
    :param bool keep_values: keep a copy of each replaced weight (default), for
        :func:`pretrained_values` / :func:`pretrained_init`. The copy is a non-persistent buffer
        of the weight's module (``module._pretrained_weight``): it follows ``net.to(device or
        dtype)``, ``copy.deepcopy`` and pickling, is not a parameter (no optimiser sees it) and
        stays out of ``state_dict()``, so checkpoints are not doubled. It costs one dense copy
        of the converted weights in memory; :func:`clear_pretrained_values` frees it once a
        guide has read it.
    :returns: the converted network (the same object, now a ``PyroModule``).
    """
    if not isinstance(net, nn.Module):
        raise ValueError(f"net: expected a torch.nn.Module, got {type(net).__name__}")
    prior = dist.Normal(0.0, 1.0) if prior is None else prior
    include = tuple(include)
    by_type = all(isinstance(i, type) for i in include)
    by_name = all(isinstance(i, str) for i in include)
    if not (by_type or by_name):
        raise ValueError("include: expected module types or parameter-name patterns, not a mix")
    if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise ValueError(f"exclude: expected an iterable of parameter-name patterns, got {exclude!r}")
    chosen = []
    for mod_name, module in net.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if by_type:
                take = pname == "weight" and isinstance(module, include)
            else:
                take = _matches(full, include)
            if take and not _matches(full, exclude):
                chosen.append((mod_name, pname, full, tuple(param.shape)))
    if not chosen:
        raise ValueError("include/exclude: no parameter of the network was selected to be Bayesian")
    to_pyro_module_(net)
    for mod_name, pname, full, shape in chosen:
        module = net.get_submodule(mod_name) if mod_name else net
        fn, scalar = _make_prior(prior, full, shape)
        weight = getattr(module, pname)
        if getattr(module, _ANCHOR, None) is None:
            module.register_buffer(_ANCHOR, torch.empty(0, device=weight.device, dtype=weight.dtype), persistent=False)
        if keep_values:  # a copy: the caller may still hold (and change) the old Parameter
            module.register_buffer(_PRETRAINED + pname, weight.detach().clone(), persistent=False)
        setattr(module, pname, PyroSample(DevicePrior(fn, scalar)))
    net.bayesian_sites = tuple(full for _, _, full, _ in chosen)
    return net


def _pretrained_buffers(net):
    """``(module path, module, parameter name, buffer name)`` of every kept value under ``net``."""
    if not isinstance(net, nn.Module):
        raise ValueError(f"net: expected a torch.nn.Module, got {type(net).__name__}")
    for path, module in net.named_modules():
        for key, _ in list(module.named_buffers(recurse=False)):
            if key.startswith(_PRETRAINED):
                yield path, module, key[len(_PRETRAINED) :], key


def pretrained_values(net):
    """The weights :func:`bayesianize` replaced by sample sites: ``{site name: tensor}``.

    Pass the model the guide traces: Pyro names a site by its module's path from the model
    (``"layer1.0.conv1.weight"`` for the bayesianized network itself, ``"net.layer1.0.conv1.weight"``
    inside a :class:`BayesianClassifier`), and so does this function, with the paths of
    ``net.named_modules()``. The tensors are the stored buffers themselves (on the network's current
    device and dtype; do not modify them in place); ``{}`` when nothing was kept.

    Start a guide at the pretrained network with Pyro's ``init_to_value`` (or :func:`pretrained_init`)::

        guide = SparseSubspaceGuide(model, init_loc_fn=init_to_value(values=pretrained_values(model)))

        >>> from pyro_ssvi import BayesianClassifier
        >>> net = bayesianize(nn.Linear(3, 2))
        >>> list(pretrained_values(BayesianClassifier(net)))
        ['net.weight']
    """
    values = {}
    for path, module, pname, key in _pretrained_buffers(net):
        values[f"{path}.{pname}" if path else pname] = getattr(module, key)
    return values


def pretrained_init(net, fallback=None):
    """A Pyro ``init_loc_fn`` that starts every site :func:`bayesianize` created at its pretrained value.

    ``init_to_value(values=pretrained_values(net), fallback=fallback)``; sites without a kept value
    (other ``PyroSample`` sites of the model) go to ``fallback``, by default the guide's own default
    :func:`~pyro_ssvi.guide.init_to_normal` (means ``N(0, 0.01^2)``; Pyro's ``init_to_value``
    default, ``init_to_uniform``, would draw weights uniformly in ``(-2, 2)``). The values are read
    when this is called: call it after moving the model to its device::

        model = BayesianClassifier(bayesianize(trained_net)).to(device)
        guide = SparseSubspaceGuide(model, density=0.1, init_loc_fn=pretrained_init(model))
    """
    fallback = init_to_normal if fallback is None else fallback
    if not callable(fallback):
        raise ValueError(f"fallback: expected a callable init function site -> value, got {fallback!r}")
    values = pretrained_values(net)
    if not values:
        raise ValueError("net: it holds no pretrained values (was it bayesianized with keep_values=False, or cleared?)")
    return init_to_value(values=values, fallback=fallback)


def clear_pretrained_values(net):
    """Drop the values :func:`bayesianize` kept (e.g. once a guide has read them); returns how many."""
    dropped = 0
    for _, module, _, key in list(_pretrained_buffers(net)):
        delattr(module, key)
        dropped += 1
    return dropped


__all__ = [
    "DEFAULT_BAYESIAN_TYPES",
    "DevicePrior",
    "bayesianize",
    "clear_pretrained_values",
    "distribution_to",
    "pretrained_init",
    "pretrained_values",
]
