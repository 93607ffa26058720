r"""Weights with leading batch dimensions in ``F.linear`` and ``F.conv1d/2d/3d``.

With vectorised particles (``Trace_ELBO(num_particles=P, vectorize_particles=True)``) or a
parallel ``Predictive`` Pyro draws every latent site once per particle, inside a plate at
batch dim ``-(max_plate_nesting + 1)``: a ``(out, in)`` weight arrives as a ``(P, 1, out, in)``
tensor, and ``nn.Linear`` / ``nn.Conv2d`` refuse it (Pyro issue 503). Under
:class:`BatchedLayersMessenger` each particle's weight applies to its own slice of the input,
with the usual broadcasting of Pyro's batch dims: the weight's leading dims align on the
right with the input's leading dims,

.. math:: y[\ldots, b, o] = \sum_i x[\ldots, b, i]\, W[\ldots, o, i] + \beta[\ldots, o]

for linear layers (one ``einsum``, no copy of the weight per example), and one grouped
convolution per call for convolutions (``torch.func.vmap`` over the dims where the weight
varies). Pooling functions (``F.avg_pool2d``, ``F.max_pool2d``, adaptive pools, 1d/2d/3d)
given more leading dims than they accept fold them into their batch dim. Everything else
(activations, ``x.flatten(-3)``, ``torch.cat``) already broadcasts; write flattening with
negative dims (``nn.Flatten(-3)``, not ``nn.Flatten()``), as a flatten from dim 1 would
merge the particle and data dims.

Normalisation modules (batch, instance and group norm) cannot take a particle dimension:
called in a pass that has already applied a batched weight, they raise a ``ValueError``
naming the module. Use sequential particles for such networks.
"""

import functools
import re
import weakref

import torch
import torch.nn.functional as F
from pyro.poutine.plate_messenger import PlateMessenger
from torch.overrides import TorchFunctionMode

from .modes import TorchModeMessenger, handler_stack

#: the convolutions handled, with their number of spatial dims
CONV_SPATIAL_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
#: their signature (positional order)
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_POOL = re.compile(r"^(max_pool|avg_pool|adaptive_avg_pool|adaptive_max_pool|lp_pool)([123])d(_with_indices)?$")
_POOL_MODULES = ("torch.nn.functional", "torch._C._nn", "torch")
_NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm, torch.nn.GroupNorm)


def batched_linear(input, weight, bias=None):
    r"""``F.linear`` for a weight (and bias) with leading batch dims, broadcast against the input's.

    ``input``: ``(*xb, in)``, ``weight``: ``(*wb, out, in)``, ``bias``: ``(*bb, out)`` or ``None``;
    the result is ``(*broadcast(xb, wb, bb), out)``.

        >>> x, w = torch.randn(5, 3), torch.randn(4, 1, 2, 3)   # 4 particles, 5 examples
        >>> batched_linear(x, w).shape
        torch.Size([4, 5, 2])
        >>> torch.allclose(batched_linear(x, w)[2], F.linear(x, w[2, 0]))
        True
    """
    if weight.dim() == 2:
        out = F.linear(input, weight)
    else:
        out = torch.einsum("...i,...oi->...o", input, weight)
    return out if bias is None else out + bias


def batched_conv(conv, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    r"""``conv`` (``F.conv1d/2d/3d``) for an input and weight with extra leading batch dims.

    ``input``: ``(*xb, N, C, *spatial)``, ``weight``: ``(*wb, out, C / groups, *kernel)``,
    ``bias``: ``(*bb, out)``; ``xb`` (with ``N``) and ``wb`` broadcast on the right. Dims where
    the weight varies are mapped by ``torch.func.vmap`` (a grouped convolution); the others
    are folded into the batch dim ``N``.

        >>> x, w = torch.randn(6, 1, 8, 8), torch.randn(3, 1, 4, 1, 3, 3)
        >>> batched_conv(F.conv2d, x, w, padding=1).shape
        torch.Size([3, 6, 4, 8, 8])
    """
    d = CONV_SPATIAL_DIMS[conv]
    core_x, core_w = d + 1, d + 2
    if input.dim() < core_x + 1:
        raise ValueError(f"{conv.__name__}: a batched weight needs a batched input (N, C, ...), got shape {tuple(input.shape)}")
    xl, wl = input.shape[:-core_x], weight.shape[:-core_w]
    n = max(len(xl), len(wl))
    x = input.reshape((1,) * (n - len(xl)) + tuple(input.shape))
    w = weight.reshape((1,) * (n - len(wl)) + tuple(weight.shape))
    lead = torch.broadcast_shapes(x.shape[:n], w.shape[:n])
    varying = [i for i in range(n) if w.shape[i] > 1]
    shared = [i for i in range(n) if w.shape[i] == 1]
    call = functools.partial(conv, bias=None, stride=stride, padding=padding, dilation=dilation, groups=groups)
    core = tuple(range(n, x.dim()))
    x = x.permute(varying + shared + list(core))
    x = x.expand(tuple(x.shape[: len(varying)]) + tuple(lead[i] for i in shared) + tuple(x.shape[n:]))
    x = x.reshape(tuple(x.shape[: len(varying)]) + (-1,) + tuple(x.shape[n:]))
    w = w.permute(varying + shared + list(range(n, w.dim()))).reshape(tuple(lead[i] for i in varying) + tuple(w.shape[n:]))
    has_x = [x.shape[j] > 1 for j in range(len(varying))]
    x = x.reshape(tuple(s for j, s in enumerate(x.shape[: len(varying)]) if has_x[j]) + tuple(x.shape[len(varying):]))
    fn = call
    for j in reversed(range(len(varying))):
        fn = torch.func.vmap(fn, in_dims=(0 if has_x[j] else None, 0))
    y = fn(x, w)  # (*V, N_shared, out, *spatial')
    y = y.reshape(tuple(lead[i] for i in varying) + tuple(lead[i] for i in shared) + tuple(y.shape[-core_x:]))
    inverse = [0] * n
    for pos, i in enumerate(varying + shared):
        inverse[i] = pos
    y = y.permute(inverse + list(range(n, y.dim())))
    if bias is not None:
        y = y + bias.reshape(tuple(bias.shape) + (1,) * d)
    return y


def fold_leading(func, input, d, *args, **kwargs):
    """Call a ``(N, C, *spatial)`` function on an input with more leading dims, folded into ``N``."""
    lead = input.shape[: -(d + 1)]
    out = func(input.reshape((-1,) + tuple(input.shape[-(d + 1):])), *args, **kwargs)
    if isinstance(out, tuple):
        return tuple(o.reshape(tuple(lead) + tuple(o.shape[1:])) for o in out)
    return out.reshape(tuple(lead) + tuple(out.shape[1:]))


def _pool_dims(func):
    if getattr(func, "__module__", None) not in _POOL_MODULES:
        return None
    m = _POOL.match(getattr(func, "__name__", ""))
    return int(m.group(2)) if m else None


def _align(t, core):
    """Pad a parameter's batch dims on the right up to the outermost active plate's dim.

    ``Predictive(parallel=True)`` conditions the model on samples shaped
    ``(num_samples,) + event_shape`` when the event has more dims than the model has plates,
    so the sample dim is not at its plate's dim ``-(max_plate_nesting + 1)``; ``(S, out, in)``
    becomes ``(S, 1, out, in)`` here.
    """
    if t is None or t.dim() <= core:
        return t
    dims = [-frame.dim for frame in handler_stack() if isinstance(frame, PlateMessenger) and frame.dim is not None]
    lead = t.dim() - core
    if not dims or lead >= max(dims):
        return t
    return t.reshape(tuple(t.shape[:lead]) + (1,) * (max(dims) - lead) + tuple(t.shape[lead:]))


class _Mode(TorchFunctionMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            call = dict(zip(("input", "weight", "bias"), args), **kwargs)
            w, b = call["weight"], call.get("bias")
            if w.dim() > 2 or (b is not None and b.dim() > 1):
                self.owner.batched_calls += 1
                return batched_linear(call["input"], _align(w, 2), _align(b, 1))
        elif func in CONV_SPATIAL_DIMS:
            call = dict(zip(CONV_ARGS, args), **kwargs)
            x, w, b = call["input"], call["weight"], call.get("bias")
            d = CONV_SPATIAL_DIMS[func]
            if x.dim() > d + 2 or w.dim() > d + 2 or (b is not None and b.dim() > 1):
                self.owner.batched_calls += 1
                call.update(conv=func, weight=_align(w, d + 2), bias=_align(b, 1))
                return batched_conv(**call)
        else:
            d = _pool_dims(func)
            if d is not None and args and torch.is_tensor(args[0]) and args[0].dim() > d + 2:
                return fold_leading(func, args[0], d, *args[1:], **kwargs)
        return func(*args, **kwargs)


class BatchedLayersMessenger(TorchModeMessenger):
    r"""Let ``F.linear`` and ``F.conv1d/2d/3d`` take weights with leading (particle) batch dims.

    Apply it to a model for vectorised particles or a parallel ``Predictive``; ``SSVI``
    applies it itself when the ELBO vectorises particles::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.nn import PyroModule, PyroSample
        >>> net = PyroModule[torch.nn.Linear](3, 2)
        >>> net.weight = PyroSample(dist.Normal(0., 1.).expand([2, 3]).to_event(2))
        >>> def model(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         return pyro.sample("y", dist.Normal(net(x), 1.).to_event(1))
        >>> with pyro.plate("particles", 4, dim=-2):
        ...     y = BatchedLayersMessenger(net)(model)(torch.randn(5, 3))
        >>> y.shape
        torch.Size([4, 5, 2])

    Each particle's weight applies to its own slice (see :func:`batched_linear`,
    :func:`batched_conv`); a call without batched weights runs unchanged.

    :param torch.nn.Module module: optional root module, used only to name a module that cannot
        take a particle dim in the error message.
    """

    def __init__(self, module=None):
        super().__init__()
        self._module = weakref.ref(module) if isinstance(module, torch.nn.Module) else None
        self.batched_calls = 0
        self._hook = None

    def _name_of(self, module):
        root = self._module() if self._module is not None else None
        if root is not None:
            for name, m in root.named_modules():
                if m is module:
                    return f"{name or type(root).__name__!r} ({type(module).__name__})"
        return type(module).__name__

    def _check_module(self, module, args):
        if self.batched_calls and isinstance(module, _NORMS):
            raise ValueError(
                f"module {self._name_of(module)}: normalisation layers cannot take the particle dimension of "
                "vectorised particles or a parallel Predictive (their statistics would mix particles); use "
                "sequential particles (vectorize_particles=False / parallel=False) for this network"
            )

    def make_mode(self):
        return _Mode(self)

    def begin(self):
        self.batched_calls = 0
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._check_module)

    def end(self):
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.remove()


#: tensor methods that only reshape or copy a sample: a :class:`BatchedSample` stays one through them
#: (Pyro's ``Predictive`` reshapes the guide's draws before it conditions the model on them)
_KEEPS_BATCHED = frozenset({
    torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.expand, torch.Tensor.__getitem__,
    torch.Tensor.contiguous, torch.Tensor.clone, torch.Tensor.detach, torch.Tensor.to, torch.reshape,
})


def _plain(obj):
    return obj.as_subclass(torch.Tensor) if isinstance(obj, BatchedSample) else obj


class BatchedSample(torch.Tensor):
    r"""A weight sample with leading batch dims (particles, a parallel ``Predictive``'s draws) that
    applies itself per batch element in ``F.linear`` and ``F.conv1d/2d/3d``.

    A :class:`~pyro_ssvi.SparseNormal` with a batch shape draws its samples as this type, so
    ``Predictive(model, guide=guide, parallel=True)`` works on a plain model, without
    :func:`batched_layers`: ``F.linear(x, w)`` with ``w`` of shape ``(S, 1, out, in)`` is
    :func:`batched_linear`, a convolution :func:`batched_conv`, with Pyro's plate dims aligned as
    :class:`BatchedLayersMessenger` does. Reshapes and copies keep the type; every other operation
    returns a plain tensor. Only this guide's sites are covered (an ``AutoNormal`` part of a guide
    list still needs :func:`batched_layers`), and normalisation layers cannot take the extra dim
    (PyTorch's own error then; use ``parallel=False``).

        >>> w = torch.randn(4, 1, 2, 3).as_subclass(BatchedSample)   # 4 draws of a (2, 3) weight
        >>> F.linear(torch.randn(5, 3), w).shape
        torch.Size([4, 5, 2])
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func in CONV_SPATIAL_DIMS:
            names = ("input", "weight", "bias") if func is F.linear else CONV_ARGS
            call = {k: _plain(v) for k, v in dict(zip(names, args), **kwargs).items()}
            core = 2 if func is F.linear else CONV_SPATIAL_DIMS[func] + 2
            if isinstance(dict(zip(names, args), **kwargs).get("weight"), BatchedSample) and call["weight"].dim() > core:
                call["weight"], call["bias"] = _align(call["weight"], core), _align(call.get("bias"), 1)
                if func is F.linear:
                    return batched_linear(call["input"], call["weight"], call["bias"])
                return batched_conv(func, **call)
            args, kwargs = (), call
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in _KEEPS_BATCHED and type(out) is torch.Tensor:
            out = out.as_subclass(cls)
        return out


def batched_layers(fn=None, module=None):
    """Functional form of :class:`BatchedLayersMessenger`: ``batched_layers(model)``."""
    msngr = BatchedLayersMessenger(module if module is not None else fn)
    return msngr(fn) if fn is not None else msngr


__all__ = ["BatchedLayersMessenger", "BatchedSample", "batched_conv", "batched_layers", "batched_linear", "fold_leading"]
