r"""Local reparameterisation (Kingma et al. 2015; Li et al., ICLR 2024) as a Pyro effect handler.

For a layer linear in its weight, ``y = f(x, W)`` (``F.linear``, ``F.conv1d/2d/3d``),
with independent Gaussian weights ``W_ij ~ N(mu_ij, sigma_ij^2)``, the
pre-activation is Gaussian too, so it is sampled directly::

    y = f(x, mu) + sqrt( f(x^2, sigma^2) + eps ) * N(0, 1)        (+ bias on the mean)

Every example gets its own noise, which lowers the gradient variance sharply
compared with one weight sample per minibatch. For a
:class:`~pyro_ssvi.SparseNormal` site, ``mu`` and ``sigma^2`` are weight-shaped tensors that
are zero off the active set: :class:`~pyro_ssvi.kernels.SparseWeight` (active values only, and
sparse kernels for both products) where the guide chose sparse kernels for the site, dense
scattered tensors otherwise.

How it works: inside the handler, every sample a *guide* draws from a Gaussian
(:class:`~pyro_ssvi.SparseNormal`, or the ``Normal`` auxiliary site of Pyro's
``AutoNormal``) is registered. A ``TorchFunctionMode`` intercepts calls of the
linear functions whose ``weight`` is a registered sample and computes them as
above. The first time a site is seen, it is only *observed*: if, while the model
runs, the sample feeds anything other than the ``weight`` argument of those
functions, the site falls back to weight sampling with a warning naming it;
otherwise later passes use local reparameterisation. (The first pass of every
site is therefore an ordinary weight-sampling pass.)

Use it around the ELBO computation::

    lrt = LocalReparameterizationMessenger()
    for x, y in data:
        with lrt:
            svi.step(x, y)

or let :class:`~pyro_ssvi.SSVI` apply it (``local_reparameterization=True``).
"""

import contextlib
import functools
import itertools
import sys
import warnings

import torch
import torch.nn.functional as F
from pyro.ops.provenance import ProvenanceTensor, detach_provenance, get_provenance, track_provenance
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.replay_messenger import ReplayMessenger
from torch.distributions import Independent, Normal
from torch.overrides import TorchFunctionMode

from . import direct_conv
from .batched import CONV_ARGS, CONV_SPATIAL_DIMS
from .distributions import SparseNormal
from .kernels import TENSOR_ADD, TENSOR_METADATA, SparseWeight
from .modes import TorchModeMessenger, handler_stack

_SIGNATURES = {F.linear: ("input", "weight", "bias"), **{conv: CONV_ARGS for conv in CONV_SPATIAL_DIMS}}


def _unexpand(t):
    """``t`` with every expanded (stride-0) dim cut to size 1: moments shared by all particles."""
    index = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for n, st in zip(t.shape, t.stride()))
    return t[index]


#: functions that read a tensor's metadata (or make a new tensor like it); they never count as "using" a weight
_METADATA = TENSOR_METADATA | {torch.Tensor.grad_fn.__get__, torch.zeros_like, torch.ones_like, torch.empty_like}


class _Entry:
    """A registered Gaussian weight sample, or a shifted copy of one (``root`` counts its uses)."""

    __slots__ = ("tensor", "name", "fn", "shift", "_root", "uses")

    def __init__(self, tensor, name, fn, shift=None, root=None):
        self.tensor, self.name, self.fn, self.shift = tensor, name, fn, shift
        self._root = root  # None for a root: no reference to itself, so no cycle keeps a pass's samples alive
        self.uses = 0

    @property
    def root(self):
        return self if self._root is None else self._root


def _gaussian(fn):
    """The Normal under ``Independent`` wrappers, or ``None``."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn if isinstance(fn, Normal) else None


def _in_model():
    return any(isinstance(frame, (ReplayMessenger, ConditionMessenger)) for frame in handler_stack())


class SampleRegistry:
    """The Gaussian weight samples a pass has drawn, looked up by tensor identity.

    A shifted sample ``w + delta`` (``delta`` a same-shaped tensor) is registered too, as
    ``N(mu + delta, sigma^2)`` with the root's use count; an ``AutoNormal`` site's ``Delta`` that
    carries the sample of its Gaussian ``<name>_unconstrained`` site takes that entry over.
    """

    def __init__(self):
        self._by_id, self._by_name = {}, {}

    def __bool__(self):
        return bool(self._by_id)

    def lookup(self, t):
        """The entry of tensor ``t``, or ``None``."""
        if not torch.is_tensor(t):
            return None
        entry = self._by_id.get(id(t))
        return entry if entry is not None and entry.tensor is t else None

    def carried(self, v):
        """The entry whose sample a Delta site carries: the same tensor, or (when vectorised
        particles expanded the Delta) a view with the same storage, offset, shape and strides."""
        entry = self.lookup(v)
        if entry is not None or not torch.is_tensor(v):
            return entry
        for entry in self._by_name.values():
            t = entry.tensor
            if t.data_ptr() == v.data_ptr() and t.shape == v.shape and t.stride() == v.stride():
                return entry
        return None

    def register(self, tensor, name, fn):
        """``tensor`` is site ``name``'s sample from the Gaussian ``fn`` (replacing that site's old entry)."""
        self.forget(name)
        entry = _Entry(tensor, name, fn)
        self._by_id[id(tensor)] = entry
        self._by_name[name] = entry

    def forget(self, name):
        old = self._by_name.pop(name, None)
        if old is not None:
            self._by_id.pop(id(old.tensor), None)

    def shifted(self, func, a, b):
        """``a + b`` with exactly one registered operand and a same-shaped tensor: the sum, registered
        as a shifted entry; ``None`` otherwise (the caller computes the sum itself)."""
        ea, eb = self.lookup(a), self.lookup(b)
        if (ea is None) == (eb is None):
            return None
        entry, other = (ea, b) if ea is not None else (eb, a)
        if not torch.is_tensor(other) or other.shape != entry.tensor.shape:
            return None
        out = func(a, b)
        shift = other if entry.shift is None else entry.shift + other
        self._by_id[id(out)] = _Entry(out, entry.name, entry.fn, shift, entry.root)
        return out

    def among(self, args, kwargs):
        """Entries of the tensors among ``args`` / ``kwargs`` (one level into lists and tuples)."""
        hits = []
        for a in itertools.chain(args, kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                entry = self.lookup(t)
                if entry is not None:
                    hits.append(entry)
        return hits

    def clear(self):
        self._by_id, self._by_name = {}, {}


class UsageTracker:
    """Which sites may use local reparameterisation: ``eligible[name]`` is ``True`` (in use) or
    ``False`` (fell back to weight sampling, with a ``RuntimeWarning`` naming the site).

    A site's first pass only observes: the site becomes eligible at the end of a pass in which its
    sample was the ``weight`` of exactly one layer call and fed nothing else.
    """

    def __init__(self):
        self.eligible = {}
        self._good, self._bad = set(), {}

    def use(self, entry, func):
        """Record that ``entry``'s sample is the weight of a ``func`` call; whether to compute it by LRT."""
        root = entry.root
        root.uses += 1
        if root.uses > 1:
            self.mark_bad(entry.name, f"is the weight of more than one {func.__name__} call in one model pass "
                          "(a reused or tied weight)")
            return False
        status = self.eligible.get(entry.name)
        if status is None:
            self._good.add(entry.name)
        return status is True

    def mark_bad(self, name, reason):
        """Site ``name``'s sample was used in a way LRT cannot follow (warns now if it was eligible)."""
        if self.eligible.get(name) is True:
            self._warn(name, reason)
        self._bad.setdefault(name, reason)

    def _warn(self, name, reason):
        warnings.warn(
            f"local reparameterisation: site {name!r} {reason}; falling back to weight sampling for this site",
            RuntimeWarning,
            stacklevel=3,
        )
        self.eligible[name] = False

    def finish_pass(self):
        """Settle the sites first seen in this pass."""
        for name, reason in self._bad.items():
            if self.eligible.get(name) is None:
                self._warn(name, reason)
        for name in self._good - set(self._bad):
            if self.eligible.get(name) is None:
                self.eligible[name] = True
        self._good, self._bad = set(), {}


class _Mode(TorchFunctionMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, ProvenanceTensor) for a in itertools.chain(args, kwargs.values())):
            # TraceGraph_ELBO tags values of non-reparameterisable sites: look through the tags,
            # and tag the result with their union, as ProvenanceTensor itself does
            plain_args, plain_kwargs = detach_provenance([args, kwargs])
            out = self.__torch_function__(func, types, plain_args, plain_kwargs)
            return track_provenance(out, get_provenance([args, kwargs]))
        registry = self.owner.registry
        if registry:
            names = _SIGNATURES.get(func)
            if names is not None:
                call = dict(zip(names, args))
                call.update(kwargs)
                entry = registry.lookup(call.get("weight"))
                if entry is not None and registry.lookup(call.get("input")) is None:
                    return self.owner.layer_call(func, call, entry, args, kwargs)
            elif func in TENSOR_ADD and not kwargs and len(args) == 2:  # sample + shift: N(mu + shift, sigma^2)
                out = registry.shifted(func, *args)
                if out is not None:
                    return out
            if func not in _METADATA:
                hits = registry.among(args, kwargs)
                if hits and _in_model():
                    fname = getattr(func, "__name__", repr(func))
                    for entry in hits:
                        self.owner.usage.mark_bad(entry.name, f"feeds {fname}, not only the weight of F.linear / F.conv1d/2d/3d")
        return func(*args, **kwargs)


class LocalReparameterizationMessenger(TorchModeMessenger):
    r"""Sample pre-activations of linear/conv layers with Gaussian weights (local reparameterisation).

    .. math:: y = f(x, \mu) + \sqrt{f(x^2, \sigma^2) + \epsilon}\;\xi, \qquad \xi \sim \mathcal N(0, I)

    (Kingma, Salimans, Welling 2015; used by default in Li, Miao, Qiu, Zhang, ICLR 2024,
    arXiv 2402.11025). A weight sample shifted by a tensor, ``w + delta``, is Gaussian too,
    ``N(mu + delta, sigma^2)``, and is handled as such (this is how
    :class:`~pyro_ssvi.handlers.DataGradientMessenger`'s probe reaches the mean path).

    A site falls back to weight sampling, with a ``RuntimeWarning`` naming it, when its
    sample feeds anything but the ``weight`` of ``F.linear`` / ``F.conv1d/2d/3d``, or when
    one sample is the weight of more than one call in a model pass (a reused or tied
    weight, ``fc(fc(x))``): independent noise per call would be wrong there. Misuse is
    detected on a site's first pass, which is always a weight-sampling pass. A misuse that
    first appears in a later pass (e.g. data-dependent reuse) is caught when it happens: that
    pass has already used local reparameterisation for the earlier calls; the following passes
    fall back.

    The handler is re-entrant, like Pyro's ``ReentrantMessenger``: entering an instance
    that is already active only counts the depth; the outermost exit ends the pass. Its parts:
    a :class:`SampleRegistry` of the pass's samples, a :class:`UsageTracker` of the sites'
    eligibility, and the formula, :func:`gaussian_layer`.

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.nn import PyroModule, PyroSample
        >>> from pyro_ssvi import SparseSubspaceGuide
        >>> net = PyroModule[torch.nn.Linear](4, 2)
        >>> net.weight = PyroSample(dist.Normal(0., 1.).expand([2, 4]).to_event(2))
        >>> guide = SparseSubspaceGuide(net, density=0.5)
        >>> lrt = LocalReparameterizationMessenger()
        >>> for _ in range(2):  # the first pass checks how the sample is used
        ...     with lrt:
        ...         loss = pyro.infer.Trace_ELBO().differentiable_loss(net, guide, torch.randn(3, 4))
        >>> lrt.eligible
        {'weight': True}

    :param float eps: added to the output variance before the square root (1e-8).

    ``eligible`` maps site names to ``True`` (local reparameterisation in use) or
    ``False`` (fell back to weight sampling); it persists across uses of one instance.
    """

    def __init__(self, eps=1e-8):
        super().__init__()
        self.eps = float(eps)
        self.registry = SampleRegistry()
        self.usage = UsageTracker()
        self.model_scoped = False
        self._squares = _Squares()

    @property
    def eligible(self):
        """``{site: True | False}``: the sites settled so far (see :class:`UsageTracker`)."""
        return self.usage.eligible

    def layer_call(self, func, call, entry, args, kwargs):
        """A call whose ``weight`` is a registered sample: local reparameterisation or weight sampling."""
        if self.usage.use(entry, func):
            return gaussian_layer(func, call, entry.fn, entry.shift, self.eps, self._squares)
        return func(*args, **kwargs)

    # Pyro messenger -------------------------------------------------------------
    def scope_to(self, model):
        """Return ``model`` wrapped so that torch calls are intercepted only while it runs.

        Use the wrapped model inside this handler's context: the handler still registers
        the guide's samples, but the guide and the ELBO's own arithmetic then run without
        the interception's per-call cost. :class:`~pyro_ssvi.SSVI` does this.
        """
        self.model_scoped = True

        @functools.wraps(model)
        def scoped(*args, **kwargs):
            with _Mode(self):
                return model(*args, **kwargs)

        return scoped

    def make_mode(self):
        return None if self.model_scoped else _Mode(self)

    def end(self):
        """The end of a pass: settle the sites first seen in it, forget its samples."""
        self.usage.finish_pass()
        self.registry.clear()
        self._squares.clear()

    def _pyro_post_sample(self, msg):
        value = msg["value"]
        if msg["is_observed"] or not torch.is_tensor(value):
            return
        registry = self.registry
        if registry.lookup(value) is not None:
            return  # the model's site carrying a registered guide sample
        fn = msg["fn"]
        carried = registry.carried(getattr(fn, "v", None))
        if carried is not None:
            # AutoNormal: a Delta site carries the sample of its Gaussian "<name>_unconstrained" site
            registry.forget(carried.name)
            registry.register(value, msg["name"], carried.fn)
            return
        if isinstance(fn, SparseNormal):
            registry.register(value, msg["name"], fn)
        elif msg["infer"].get("is_auxiliary") and _gaussian(fn) is not None:
            registry.register(value, msg["name"], fn)


def weight_moments(fn, weight, shift=None):
    """Mean (plus ``shift``) and variance of a Gaussian weight sample ``weight`` drawn from ``fn``
    (a :class:`~pyro_ssvi.SparseNormal` or a Normal), weight-sized except that batch dims shared
    by every particle (expanded, stride 0) are kept at size 1."""
    if isinstance(fn, SparseNormal):
        # weight-shaped: sparse weights (no dense copy) where the site has a kernel pattern
        mean, var = fn.embed(_unexpand(fn.loc)), fn.embed(_unexpand(fn.scale) ** 2)
    else:
        base = _gaussian(fn)
        shape = weight.shape[: weight.dim() - base.loc.dim()] + base.loc.shape
        mean, var = _unexpand(base.loc.expand(shape)), _unexpand(base.scale.expand(shape)) ** 2
    if shift is not None:
        mean = mean + shift
    return mean, var


def gaussian_layer(func, call, fn, shift=None, eps=1e-8, squares=None):
    r"""The output of the layer call ``func(**call)`` (``F.linear`` / ``F.conv*``) whose weight is
    Gaussian, ``W ~ fn`` (shifted by ``shift``), sampled by local reparameterisation:

    .. math:: y = f(x, \mu) + \sqrt{f(x^2, \sigma^2) + \epsilon}\;\xi, \qquad \xi \sim \mathcal N(0, I)

    ``call`` maps the function's argument names to values (``input``, ``weight``, ``bias``...);
    ``squares`` (an internal cache) lets layers that share an input square it once per pass.
    Particles (leading weight dims) each draw their own noise.
    """
    squares = _Squares() if squares is None else squares
    weight, x = call["weight"], call["input"]
    mean_w, var_w = weight_moments(fn, weight, shift)
    # y is (*broadcast(x, W) lead, out, ...)
    core = 1 if func is F.linear else CONV_SPATIAL_DIMS[func] + 1  # output (out, *spatial); weight has one dim more
    if func is F.linear and x.dim() == 2 and weight.dim() == 2 and mean_w.dim() == 2:
        # y^T = W x^T, (out, rows) contiguous: the sparse kernels' native layout, and the noise is drawn
        # in it as before ((out, rows), then transposed); the fused output then runs in place
        with _label("lrt.variance"):
            var = _linear_t(squares.square(x), var_w, None)
        with _label("lrt.mean"):
            mean = _linear_t(x, mean_w, call.get("bias"))
        with _label("lrt.output"):
            return pre_activation(mean, var, mean.shape, eps).t()
    plain = func is not F.linear and x.dim() == core + 1 and var_w.dim() == core + 1
    fused = _fused_conv_moments(func, call, x, mean_w, var_w) if plain else None
    if fused is not None:  # a sparse 2-d convolution on the direct kernels: both products in one pass over x
        mean, var = fused
        with _label("lrt.output"):
            return pre_activation(mean, var, mean.shape, eps, noise_order(func, mean.dim()))
    # NCHW: channels-last 2-d convolutions measured about 1.8x faster forward + backward on this CPU, but
    # torch 2.14.1's CPU backward of such convolutions corrupts the heap on some shape sequences (seen as
    # "double free or corruption" in ResNet training with an uneven last batch), so the layout stays NCHW
    fmt = None
    with _label("lrt.variance"):
        x, x2 = squares.prepare(x, fmt)
        if plain:  # eps as the variance's bias: added inside the convolution, no pass of its own
            eps_bias = torch.full(var_w.shape[:1], eps, dtype=var_w.dtype, device=var_w.device)
            var = func(**{**call, "input": x2, "weight": var_w, "bias": eps_bias})
        else:
            var = func(**{**call, "input": x2, "weight": var_w, "bias": None})
    with _label("lrt.mean"):
        mean = func(**{**call, "input": x, "weight": mean_w})
    lead = torch.broadcast_shapes(mean.shape[: mean.dim() - core], weight.shape[: weight.dim() - core - 1])
    shape = lead + mean.shape[mean.dim() - core :]
    with _label("lrt.output"):
        return pre_activation(mean, var, shape, 0.0 if plain else eps, noise_order(func, len(shape)))


def _fused_conv_moments(func, call, x, mean_w, var_w):
    """``(mean, var)`` of ``F.conv2d`` on the sparse mean and variance weights of one site by
    :func:`~pyro_ssvi.direct_conv.conv2d_moments` (one pass over ``x``, ``x * x`` formed on the fly), bias
    added to the mean; ``None`` when that path does not apply (another layer, dense or shifted weights, a
    call the site's kernel choice runs dense, no numba), and the two products then run one by one."""
    if func is not F.conv2d or call.get("groups", 1) != 1 or not (isinstance(mean_w, SparseWeight) and isinstance(var_w, SparseWeight)):
        return None
    pattern = mean_w.pattern
    if var_w.pattern is not pattern or mean_w.shift is not None or var_w.shift is not None or not direct_conv.applies(x, mean_w.active):
        return None
    conv = pattern.conv_call(x, call.get("stride", 1), call.get("padding", 0), call.get("dilation", 1))
    if conv is None or not pattern.use_sparse(x, mean_w.active, conv):
        return None
    with _label("lrt.moments"):
        mean, var = direct_conv.conv2d_moments(x, mean_w.active, var_w.active, pattern, conv)
    bias = call.get("bias")
    return (mean if bias is None else mean + bias.view(-1, 1, 1)), var


def noise_order(func, ndim):
    """The storage order the noise of a ``func`` output with ``ndim`` dims is drawn in (``None``: row-major).

    ``F.linear``: ``(..., rows, out)`` drawn as ``(..., out, rows)``, the column-major layout of the
    sparse kernels' output; convolutions: row-major. Leading (particle) dims stay in front, so each
    particle draws what one pass would.
    """
    if func is F.linear and ndim >= 2:
        return tuple(range(ndim - 2)) + (ndim - 1, ndim - 2)
    return None


def _label(name):
    """A ``torch.profiler`` label for a part of the computation (only while a profiler runs)."""
    return torch.autograd.profiler.record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


def _linear_t(x, weight, bias):
    r"""``F.linear(x, weight, bias)^T`` for a 2-d ``x``: ``W x^T + b``, shape ``(out, rows)``, contiguous."""
    if isinstance(weight, SparseWeight):
        yt = weight.linear_t(x)
        return yt if bias is None else yt.add_(bias.unsqueeze(-1))
    if bias is None:
        return torch.mm(weight, x.t())
    return torch.addmm(bias.unsqueeze(-1), weight, x.t())


class _Square(torch.autograd.Function):
    r""":math:`x^2`, with backward :math:`2 x g` in one pass (``x * x`` takes three: two products and their sum)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, x, value=2.0)


class _Squares:
    """A layer input, converted to a memory format, and its square ``x * x``, formed once per input
    tensor and model pass.

    A ResNet's downsampling block feeds one tensor to its first convolution and to its shortcut:
    both variance products read the same square (and the same conversion). Entries are recognised
    by identity and version (an input modified in place is squared again); the last :data:`SIZE`
    inputs are kept, and the handler clears them when the pass ends.
    """

    SIZE = 4

    def __init__(self):
        self._entries = []

    def prepare(self, x, memory_format=None):
        """``(x in memory_format, its square)``; ``memory_format`` ``None`` keeps ``x`` as it is."""
        for t, version, fmt, converted, sq in self._entries:
            if t is x and version == x._version and fmt == memory_format:
                return converted, sq
        converted = x if memory_format is None else x.contiguous(memory_format=memory_format)
        sq = _Square.apply(converted) if torch.is_grad_enabled() and converted.requires_grad else converted * converted
        if self.SIZE > 0:
            self._entries = [(x, x._version, memory_format, converted, sq)] + self._entries[: self.SIZE - 1]
        return converted, sq

    def square(self, x):
        return self.prepare(x)[1]

    def clear(self):
        self._entries = []


class _PreActivation(torch.autograd.Function):
    r"""The local-reparameterisation output and its gradient, in as few passes as possible.

    .. math:: y = m + s\,\xi, \quad s = \sqrt{v + \epsilon}, \quad \xi \sim \mathcal N(0, I); \qquad
              \frac{\partial L}{\partial m} = g, \quad \frac{\partial L}{\partial v} = g\, r, \quad r = \frac{\xi}{2 s}

    (Kingma, Salimans, Welling 2015). Forward: the noise is drawn into a buffer of its own, ``s``
    overwrites ``v`` and ``y`` overwrites ``m`` when they are full-size, in the noise's layout and not
    views, and ``r`` overwrites the noise (unless another reference to the draw exists):
    the only tensor kept for backward. Backward is
    one product; gradients of broadcast ``m`` or ``v`` (moments shared by particles) are summed
    back to their shapes.
    """

    @staticmethod
    def forward(ctx, mean, var, shape, eps, order):
        ctx.set_materialize_grads(False)
        ctx.shapes = mean.shape, var.shape
        buffer = draw_noise(shape, order, mean.dtype, mean.device)
        owned = _unshared(buffer)
        noise = buffer if order is None else buffer.permute(_inverse(order))
        del buffer
        if _owned(mean, noise) and _owned(var, noise):
            std = (var.add_(eps) if eps else var).sqrt_()
            out = mean.addcmul_(std, noise)
            ctx.mark_dirty(mean, var)
        else:
            std = var.add(eps).sqrt_() if eps else var.sqrt()
            out = torch.addcmul(mean, std, noise)
        if ctx.needs_input_grad[1]:
            zero = noise.new_zeros(())
            r = torch.addcdiv(zero, noise, std, value=0.5, out=noise) if owned else torch.addcdiv(zero, noise, std, value=0.5)
            ctx.save_for_backward(r)
        return out, std

    @staticmethod
    def backward(ctx, grad, _grad_std):
        if grad is None:
            return None, None, None, None, None
        mean_shape, var_shape = ctx.shapes
        grad_mean = grad_var = None
        if ctx.needs_input_grad[0]:
            grad_mean = grad if grad.shape == mean_shape else grad.sum_to_size(mean_shape)
        if ctx.needs_input_grad[1]:
            (r,) = ctx.saved_tensors
            grad_var = torch.mul(grad, r)
            grad_var = grad_var if grad_var.shape == var_shape else grad_var.sum_to_size(var_shape)
        return grad_mean, grad_var, None, None, None


def draw_noise(shape, order=None, dtype=None, device=None):
    """Standard normal noise for an output of ``shape``, drawn in storage order: shape ``shape`` permuted
    by ``order`` (``None``: ``shape`` itself); the caller permutes it back (:func:`noise_order`)."""
    return torch.randn(tuple(shape) if order is None else tuple(shape[i] for i in order), dtype=dtype, device=device)


def _inverse(order):
    inverse = [0] * len(order)
    for i, o in enumerate(order):
        inverse[o] = i
    return inverse


def _unshared(t):
    """Whether the caller's local name is the only reference to ``t`` and ``t`` owns its storage, so it
    may be overwritten (not when something else, e.g. a test's recording of the draws, kept it)."""
    return t._base is None and sys.getrefcount(t) <= 3  # the caller's name, this argument, getrefcount's


def _owned(t, like):
    """Whether ``t`` can take the output in place: ``like``'s shape, dtype and layout, and not a view."""
    return t.shape == like.shape and t.stride() == like.stride() and t.dtype == like.dtype and t._base is None


def pre_activation(mean, var, shape, eps=0.0, order=None):
    r"""Sample :math:`y = m + \sqrt{v + \epsilon}\,\xi` of ``shape`` (``mean`` and ``var`` broadcast to it).

    The local-reparameterisation output (Kingma, Salimans, Welling 2015; Li et al., ICLR 2024), by
    ``_PreActivation``: one tensor saved for backward. The noise is drawn in the storage order
    ``order`` (:func:`draw_noise`). ``mean`` and ``var`` are *consumed*: when they are full-size
    tensors in the noise's layout and not views (as :class:`LocalReparameterizationMessenger` makes
    them) they are overwritten; do not read them afterwards.

        >>> _ = torch.manual_seed(0)
        >>> y = pre_activation(torch.zeros(2, 3), torch.full((2, 3), 4.0), (2, 3))
        >>> _ = torch.manual_seed(0)
        >>> torch.allclose(y, 2.0 * torch.randn(2, 3))
        True
    """
    return _PreActivation.apply(mean, var, torch.Size(shape), float(eps), None if order is None else tuple(order))[0]


def local_reparameterization(fn=None, eps=1e-8):
    """Functional form of :class:`LocalReparameterizationMessenger`."""
    msngr = LocalReparameterizationMessenger(eps=eps)
    return msngr(fn) if fn is not None else msngr


__all__ = [
    "LocalReparameterizationMessenger",
    "SampleRegistry",
    "UsageTracker",
    "gaussian_layer",
    "weight_moments",
    "draw_noise",
    "local_reparameterization",
    "noise_order",
    "pre_activation",
]
