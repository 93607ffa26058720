r"""Sparse kernels for linear and 2-d convolution layers whose weight is a sparse SSVI site.

A sparse site keeps ``k = density * out * in`` active weights (Li, Miao, Qiu, Zhang, ICLR 2024,
arXiv 2402.11025). Written as a dense, zero-filled ``(out, in)`` matrix, ``y = x W^T`` costs as
much as dense VI. Here ``W`` is a CSR matrix on the active set instead, and a training step never
forms a dense weight or a dense weight gradient:

.. math::

    y = (W x^\top)^\top, \qquad
    \frac{\partial L}{\partial x} = (W^\top g^\top)^\top, \qquad
    \frac{\partial L}{\partial v_e} = \sum_b g_{b, r_e}\, x_{b, c_e}

for output gradient ``g`` and active entry ``e`` at row ``r_e``, column ``c_e``. The forward and
the input gradient are sums of gathered rows weighted by the active values, over the CSR structure
of ``W`` and of ``W^T`` (its structure cached): ``F.embedding_bag`` with per-sample weights, which
on x86 CPUs PyTorch runs with FBGEMM's sparse-dense kernel, about twice as fast as its CSR matrix
product. The value gradient is ``torch.sparse.sampled_addmm`` (``g^T x`` computed at the active
positions only). Values are read in storage order; when the storage is in the row-major order of
``W`` (:class:`~pyro_ssvi.SSVI` keeps it so) no permutation is needed for ``W`` itself.

* :class:`LinearPattern`: the CSR structures of ``W`` and ``W^T`` for one active set; built
  once per active set (the guide rebuilds it when a subspace update changes the set).
* :func:`sparse_linear`: ``F.linear`` on active values and a pattern, differentiable in the
  input and the values.
* :func:`sparse_conv2d`: ``F.conv2d`` the same way, by im2col: the ``(out, in k_h k_w)`` matrix
  of the weight (the same row-major flat positions) times the unfolded input columns.
* :class:`KernelSelector`: a guide's patterns and measured choices, site by site (the guide
  saves the choices in its ``state_dict()``).
* :class:`SparseWeight`: a weight-shaped tensor that holds only the active values. A
  :class:`~pyro_ssvi.SparseNormal` with a pattern samples one; ``F.linear`` / ``F.conv2d`` on
  it run the sparse kernels, and any other operation sees the equivalent dense tensor (built on demand, so
  results are always exact). ``log_prob`` of the site reads the active values directly.

Kernel choice. Sparse kernels win only at low density and large enough layers (see
``benchmarks/results/sparse_kernels.md``), so with ``policy="auto"`` each site *measures* both
paths once, at its first training call (per dtype and device): a few forward + backward passes of
each, on the call's own input and values, and keeps the sparse kernel only when its median time is
below :data:`SPARSE_MARGIN` times the dense one (a sparse pass over :data:`EARLY_REJECT` times the
dense one, cold and again warm, decides for dense at once). Every other call shape (batch rows, or
a convolution's :class:`ConvCall`; which gradients are needed) follows that measurement by fixed
rules (:meth:`LinearPattern.use_sparse`), so that the kernels of a run, and the last bits of its
numbers, depend on the machine's load only through the one measurement the guide saves.
``policy="sparse"`` skips the measurement. Choose per site with the guide's ``sparse_kernels``
argument.
"""

import math
import statistics
import time
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import direct_conv

#: the sparse kernel is chosen only when it measures faster than this fraction of the dense time
SPARSE_MARGIN = 0.9

#: timed forward + backward passes per path when measuring a call shape (after one warm-up each)
MEASURE_REPEATS = 5

#: convolutions with fewer multiply-adds than this (dense count, per call) run dense without a measurement:
#: there the choice saves next to nothing (the sparse path measured slower for every ResNet-18 layer on a CPU,
#: see ``benchmarks/results/sparse_kernels.md``), and timing such small calls would make it depend on noise
MIN_CONV_MACS = 2**24

#: a sparse pass slower than this many dense passes, in the warm-up and again in the first timed pass (so
#: that one-time costs of a first call cannot decide), decides for the dense path at once: a losing
#: kernel, e.g. an im2col convolution at a large batch, costs two passes to rule out, not all of them
EARLY_REJECT = 4.0

#: functions that only read a tensor's metadata (answered by a SparseWeight without densifying)
TENSOR_METADATA = frozenset({
    torch.Tensor.shape.__get__,
    torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__,
    torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_leaf.__get__,
    torch.Tensor.ndim.__get__,
    torch.Tensor.layout.__get__,
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.__len__,
    torch.Tensor.is_floating_point,
})


def _csr(crow, col, values, shape):
    with warnings.catch_warnings():  # PyTorch says once per process that CSR support is "beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _bag(col, crow, table, weights):
    """Row ``r``: the sum of ``weights[e] * table[col[e]]`` over ``e`` in ``crow[r] .. crow[r + 1]``."""
    return F.embedding_bag(col, table, crow[:-1], mode="sum", per_sample_weights=weights)


def in_row_major_order(index):
    """Whether the flat positions ``index`` are strictly increasing: the row-major order of the
    weight's entries, which the kernels read without a permutation."""
    return bool((index[1:] > index[:-1]).all())


def _compressed(major, minor, n_major, order, dtype):
    """CSR ``crow``/``col`` for entries sorted by ``order`` (row-major in the compressed dim; ``None``:
    already in that order)."""
    crow = torch.zeros(n_major + 1, dtype=dtype, device=major.device)
    crow[1:] = torch.bincount(major, minlength=n_major).cumsum(0)
    return crow, (minor if order is None else minor[order]).to(dtype).contiguous()


class LinearPattern:
    r"""CSR structures of an ``(out, in)`` weight with active flat positions ``index``, and of ``W^T``.

    A convolution weight ``(out, in, *kernel)`` is described as its ``(out, in * prod(kernel))``
    im2col matrix (the same row-major flat positions): ``shape`` is that matrix's, ``weight_shape``
    the weight's own.

    ``index`` lists the active entries in the guide's storage order (any order, no repeats); the
    pattern remembers the permutations from that order to the row-major order of ``W`` and of
    ``W^T``, so values are passed in storage order.

    :param torch.Tensor index: flat (row-major) positions, shape ``(k,)``, any integer dtype.
    :param shape: ``(out, in)``, or ``(out, in, *kernel)`` for a convolution weight.
    :param str policy: ``"auto"`` (measure each call shape, :meth:`use_sparse`) or ``"sparse"``.
    :param dict decisions: measured choices to start from (a rebuilt pattern keeps its site's).

        >>> pattern = LinearPattern(torch.tensor([5, 0, 3]), (2, 4))
        >>> pattern.dense(torch.tensor([1., 2., 3.]))
        tensor([[2., 0., 0., 3.],
                [0., 1., 0., 0.]])
    """

    def __init__(self, index, shape, policy="auto", decisions=None):
        if policy not in ("auto", "sparse"):
            raise ValueError(f"policy: expected 'auto' or 'sparse', got {policy!r}")
        if len(shape) < 2:
            raise ValueError(f"shape: expected (out, in) or (out, in, *kernel), got {tuple(shape)}")
        self.source, self.version = index, index._version  # the active set this pattern was built from
        self.weight_shape, self.policy = torch.Size(shape), policy
        self.shape = torch.Size((shape[0], self.weight_shape[1:].numel()))
        self.decisions = {} if decisions is None else decisions
        out_f, in_f = self.shape
        flat = index.long()
        self.index = flat
        rows, cols = flat // in_f, flat % in_f
        # storage already in row-major order (SSVI keeps it so): values need no permutation
        self.sorted = in_row_major_order(flat)
        self.order = self.inverse = None
        if not self.sorted:
            self.order = torch.argsort(flat)  # storage slot of each CSR entry of W
            self.inverse = torch.empty_like(self.order)  # CSR position of each storage slot
            self.inverse[self.order] = torch.arange(self.order.numel(), device=flat.device)
        # int32 indices where they fit: PyTorch's CPU kernels otherwise convert them at every call
        dtype = torch.int32 if max(self.shape.numel(), flat.numel() + 1) < 2**31 else torch.int64
        self.crow, self.col = _compressed(rows, cols, out_f, self.order, dtype)
        self.t_order = torch.argsort(cols * out_f + rows)  # storage slot of each CSR entry of W^T
        self.t_crow, self.t_col = _compressed(cols, rows, in_f, self.t_order, dtype)
        self._structures = {}

    @property
    def num_active(self):
        return self.index.numel()

    def __getstate__(self):
        # sparse CSR tensors cannot be copied or pickled: copies rebuild them on first use
        return {**self.__dict__, "_structures": {}}

    def built_from(self, index):
        """Whether this pattern describes ``index`` as it is now (same tensor, not modified since)."""
        return index is self.source and index._version == self.version

    def to_row_major(self, values):
        """``values`` (storage order) in the row-major order of ``W``'s CSR entries."""
        return values if self.sorted else values.index_select(0, self.order)

    def from_row_major(self, values):
        """Per-entry ``values`` in ``W``'s CSR order back in storage order."""
        return values if self.sorted else values.index_select(0, self.inverse)

    def cached(self, key, build):
        """``build()``, computed once per pattern and ``key`` (structures other kernels derive from this one;
        dropped with the pattern when its active set changes)."""
        if key not in self._structures:
            self._structures[key] = build()
        return self._structures[key]

    def structure(self, like):
        """``W``'s CSR structure with placeholder values of ``like``'s dtype and device (cached), for
        kernels that read only the structure (``sampled_addmm`` with ``beta=0``)."""
        return self.cached((like.dtype, like.device), lambda: _csr(
            self.crow, self.col, torch.zeros(self.num_active, dtype=like.dtype, device=like.device), self.shape))

    def matmul(self, values, xt):
        r"""``W @ xt`` for ``xt`` of shape ``(in, n)``: row ``r`` of the result is
        :math:`\sum_{e:\, r_e = r} v_e\, xt_{c_e}`, a weighted sum of gathered rows of ``xt``
        (``F.embedding_bag`` with per-sample weights over the CSR structure; on CPU PyTorch runs it
        with FBGEMM's sparse-dense kernel, about twice as fast as its CSR matrix product here)."""
        return _bag(self.col, self.crow, xt, self.to_row_major(values))

    def rmatmul(self, values, gt):
        """``W^T @ gt`` for ``gt`` of shape ``(out, n)``, through the CSR structure of ``W^T``."""
        return _bag(self.t_col, self.t_crow, gt, values.index_select(0, self.t_order))

    @property
    def is_conv(self):
        """Whether this is the pattern of a convolution weight (more than two dims)."""
        return len(self.weight_shape) > 2

    def dense(self, values):
        """The dense weight of shape ``weight_shape`` (zeros off the active set); differentiable in ``values``."""
        flat = values.new_zeros(self.shape.numel()).scatter(0, self.index, values)
        return flat.reshape(self.weight_shape)

    def use_sparse(self, x2d, values, conv=None):
        """Whether the sparse kernel runs for this call. ``x2d`` is the input of ``F.linear`` (rows, in), or
        with ``conv`` (a :class:`ConvCall`) that of ``F.conv2d`` (``N, C, H, W``).

        ``"auto"`` decides each new call shape once, by rules that depend on timing only through the site's
        one measurement (per dtype and device), which is saved with the other decisions:

        1. a convolution below :data:`MIN_CONV_MACS` runs dense, unmeasured;
        2. a site that has a measured decision follows it (the measured shape nearest in work, see
           :meth:`work`): the decision records the shape it ``"follows"``;
        3. otherwise a training call (one that needs the values' gradient) is measured: the site's
           measurement;
        4. otherwise (a call without gradients before the site's first training call) the call runs dense,
           and nothing is recorded, so the shape is decided again once the site has its measurement.

        Every shape a run meets after its first training step is therefore decided by saved state and
        fixed rules, never by the machine's load at that moment: a run resumed from a checkpoint takes
        the same kernels as the uninterrupted run, whatever shapes it meets first after the resume.
        """
        if self.policy == "sparse":
            return True
        value_grad = torch.is_grad_enabled() and values.requires_grad
        key = (x2d.shape[0] if conv is None else conv, x2d.dtype, x2d.device, torch.is_grad_enabled() and x2d.requires_grad, value_grad)
        decision = self.decisions.get(key)
        if decision is None:
            if conv is not None and self.conv_macs(conv) < MIN_CONV_MACS:
                decision = {"sparse": False, "dense_s": None, "sparse_s": None, "below_min_work": True}
            elif measured := [k for k, d in self.decisions.items() if is_measured(d) and k[1:3] == key[1:3]]:
                near = min(measured, key=lambda k: (abs(math.log(self.work(k[0]) / self.work(key[0]))), self.work(k[0])))
                decision = {"sparse": self.decisions[near]["sparse"], "dense_s": None, "sparse_s": None,
                            "follows": _shape_fields(near[0])}
            elif value_grad:
                decision = measure(self, x2d, values) if conv is None else measure_conv2d(self, x2d, values, conv)
            else:
                return False
            self.decisions[key] = decision
        return decision["sparse"]

    def work(self, shape):
        """Multiply-adds of the dense call of ``shape`` (batch rows of ``F.linear``, or a :class:`ConvCall`), at least 1."""
        if isinstance(shape, ConvCall):
            return max(self.conv_macs(shape), 1)
        return max(int(shape), 1) * self.shape.numel()

    def conv_call(self, x, stride=1, padding=0, dilation=1):
        """The :class:`ConvCall` of ``F.conv2d(x, W, ..., stride, padding, dilation)`` when the sparse
        kernel covers it on this weight (a 4-d weight, ``x`` of its input channels), else ``None``."""
        if len(self.weight_shape) != 4 or x.dim() != 4 or x.shape[1] != self.weight_shape[1]:
            return None
        return ConvCall.of(x, stride, padding, dilation)

    def conv_macs(self, conv):
        """Multiply-adds of the dense ``F.conv2d`` call ``conv`` (a :class:`ConvCall`) with this weight."""
        out_h, out_w = conv.output_size(self.weight_shape[2:])
        return conv.input[0] * out_h * out_w * self.shape.numel()


class _CSRLinearT(torch.autograd.Function):
    r"""``W x^T`` of shape ``(out, rows)`` (contiguous): the transposed output of ``F.linear(x, W)``."""

    @staticmethod
    def forward(ctx, x2d, values, pattern):
        xt = x2d.t().contiguous()  # free when x2d is itself a transposed layer output, as below
        ctx.pattern = pattern
        ctx.save_for_backward(xt, values)
        return pattern.matmul(values, xt)

    @staticmethod
    def backward(ctx, grad):
        xt, values = ctx.saved_tensors
        pattern = ctx.pattern
        grad_x = grad_values = None
        gt = grad.contiguous()
        if ctx.needs_input_grad[0]:
            grad_x = pattern.rmatmul(values, gt).t()
        if ctx.needs_input_grad[1]:
            sampled = torch.sparse.sampled_addmm(pattern.structure(values), gt, xt.t(), beta=0.0).values()
            grad_values = pattern.from_row_major(sampled)
        return grad_x, grad_values, None


def _csr_linear(x2d, values, pattern):
    """``F.linear(x2d, W)`` returned column-major (the transpose of a contiguous ``(out, rows)``): the next
    sparse layer's ``xt`` is then a view, no copy."""
    return _CSRLinearT.apply(x2d, values, pattern).t()


def _check_input(x, shape):
    if x.dim() < 1 or x.shape[-1] != shape[1]:
        raise RuntimeError(f"sparse_linear: input's last dim must be {shape[1]} (the weight's in_features), "
                           f"got input of shape {tuple(x.shape)}")


def sparse_linear(input, values, pattern, bias=None):
    r"""``F.linear(input, W, bias)`` for the sparse ``W`` given by ``values`` (storage order) on ``pattern``.

    .. math:: y = x W^\top + b, \qquad W_{r_e c_e} = v_e

    Differentiable in ``input``, ``values`` and ``bias``; the backward pass forms neither a dense
    weight nor a dense weight gradient. ``input`` may have any leading dims.

        >>> pattern = LinearPattern(torch.tensor([5, 0, 3]), (2, 4))
        >>> v, x = torch.tensor([1., 2., 3.]), torch.randn(7, 4)
        >>> torch.allclose(sparse_linear(x, v, pattern), F.linear(x, pattern.dense(v)))
        True
    """
    _check_input(input, pattern.shape)
    return _sparse_linear(input.reshape(-1, pattern.shape[1]), input.shape[:-1], values, pattern, bias)


def _sparse_linear(x2d, lead, values, pattern, bias):
    """:func:`sparse_linear` on the input flattened to ``x2d`` (checked), leading dims ``lead``."""
    y = _csr_linear(x2d, values, pattern).reshape(lead + (pattern.shape[0],))
    return y if bias is None else y + bias


class ConvCall(NamedTuple):
    """The call shape of a 2-d convolution: input shape ``(N, C, H, W)`` and the geometry, as pairs."""

    input: tuple
    stride: tuple
    padding: tuple
    dilation: tuple

    @classmethod
    def of(cls, x, stride=1, padding=0, dilation=1):
        """The call shape of ``F.conv2d(x, w, b, stride, padding, dilation)``, or ``None`` when the sparse
        kernel does not cover it: an input that is not ``N, C, H, W`` or has no elements, a padding given
        as a string, a geometry that is not one integer or two per argument."""
        if x.dim() != 4 or x.numel() == 0 or isinstance(padding, str):
            return None
        geometry = tuple(_pair(v) for v in (stride, padding, dilation))
        return None if None in geometry else cls(tuple(x.shape), *geometry)

    def output_size(self, kernel):
        """``(H_out, W_out)`` for a kernel of spatial size ``kernel``."""
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, k, s, p, d in zip(self.input[2:], kernel, self.stride, self.padding, self.dilation))


def _pair(v):
    """``(v, v)`` for an integer, the pair for a sequence of one or two (as ``F.conv2d`` reads them), else ``None``."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if len(v) not in (1, 2) or not all(isinstance(i, int) for i in v):
        return None
    return v * 2 if len(v) == 1 else v


def _conv2d_t(x, values, pattern, call):
    r"""``F.conv2d(x, W)`` as a contiguous ``(out, N, H_out, W_out)`` tensor, by im2col and the CSR kernel:
    the columns ``X`` of ``x`` (``F.unfold``, ``(C k_h k_w, N H_out W_out)``) times the sparse
    ``(out, C k_h k_w)`` matrix of ``W``, :math:`Y = W X`."""
    kernel = pattern.weight_shape[2:]
    cols = F.unfold(x, kernel, dilation=call.dilation, padding=call.padding, stride=call.stride)  # (N, Ckk, L)
    xt = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (Ckk, N L): the CSR kernel's row table
    yt = _CSRLinearT.apply(xt.t(), values, pattern)  # xt.t().contiguous() inside is a view: no copy
    return yt.view((pattern.shape[0], x.shape[0]) + call.output_size(kernel))


def sparse_conv2d(input, values, pattern, bias=None, stride=1, padding=0, dilation=1):
    r"""``F.conv2d(input, W, bias, stride, padding, dilation)`` (``groups=1``) for the sparse ``W`` given by
    ``values`` (storage order) on a convolution ``pattern`` (:class:`LinearPattern` of an
    ``(out, in, k_h, k_w)`` weight), by im2col:

    .. math:: Y_{:, n, l} = W\, X_{:, n, l} + b, \qquad X = \mathrm{unfold}(x) \in \mathbb R^{C k_h k_w \times N L}

    with ``W`` the ``(out, C k_h k_w)`` CSR matrix of the active values. Differentiable in ``input``,
    ``values`` and ``bias``; the backward pass forms neither a dense weight nor a dense weight gradient
    (the value gradient is ``g X^T`` at the active positions only), at the price of the columns ``X``
    (``k_h k_w`` times the input) kept for it. With numba installed, float32 and float64 CPU calls run
    the direct kernels of :mod:`pyro_ssvi.direct_conv` instead (the same products, no columns).

        >>> pattern = LinearPattern(torch.tensor([0, 4, 13]), (2, 1, 3, 3))
        >>> v, x = torch.tensor([1., 2., 3.]), torch.randn(2, 1, 5, 5)
        >>> torch.allclose(sparse_conv2d(x, v, pattern, padding=1), F.conv2d(x, pattern.dense(v), padding=1), atol=1e-6)
        True
    """
    call = pattern.conv_call(input, stride, padding, dilation)
    if call is None:
        raise RuntimeError(f"sparse_conv2d: expected an (N, {pattern.weight_shape[1]}, H, W) input, integer padding and a "
                           f"4-d weight pattern, got input {tuple(input.shape)}, padding {padding!r}, weight {tuple(pattern.weight_shape)}")
    return _sparse_conv2d(input, values, pattern, bias, call)


def _sparse_conv2d(x, values, pattern, bias, call):
    if direct_conv.applies(x, values):  # compiled direct kernels (numba), no im2col
        y = direct_conv.conv2d(x, values, pattern, call)
        return y if bias is None else y + bias.view(-1, 1, 1)
    yt = _conv2d_t(x, values, pattern, call)
    if bias is not None:
        yt = yt + bias.view(-1, 1, 1, 1)
    return yt.transpose(0, 1).contiguous()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed(fn, device):
    """Wall-clock seconds of ``fn()``, device work included."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(pattern, x2d, values, repeats=None):
    """Time the dense and the sparse path of one ``F.linear`` call shape; returns ``{"sparse": bool,
    "dense_s", "sparse_s"}``.

    Both paths run forward (and backward, for the gradients the call needs) on detached copies of
    the call's own input and values, alternately, one warm-up and ``repeats`` timed passes each
    (:data:`MEASURE_REPEATS`); the dense path is what a sparse site costs without this module:
    scatter into a zero weight, ``F.linear``, backward through both. Torch-function modes (Pyro
    handlers' interceptions) are off while timing.
    """
    return _measure(x2d, values, lambda x, v: F.linear(x, pattern.dense(v)), lambda x, v: _csr_linear(x, v, pattern), repeats)


def measure_conv2d(pattern, x, values, call, repeats=None):
    """:func:`measure` for one ``F.conv2d`` call shape ``call`` (a :class:`ConvCall`): the dense path
    scatters into a zero weight and runs ``F.conv2d``, the sparse one :func:`sparse_conv2d`."""
    geometry = {"stride": call.stride, "padding": call.padding, "dilation": call.dilation}
    return _measure(x, values, lambda x, v: F.conv2d(x, pattern.dense(v), **geometry),
                    lambda x, v: _sparse_conv2d(x, v, pattern, None, call), repeats)


def _measure(x, values, dense_fn, sparse_fn, repeats=None):
    """Median seconds of ``dense_fn(x, v)`` and ``sparse_fn(x, v)`` (forward, and backward where the call
    needs gradients) on detached copies, alternately; the decision of :func:`measure`. A sparse pass
    over :data:`EARLY_REJECT` times the dense one in the warm-up and in the first timed pass decides
    for dense at once (``"early": True``, that pass's seconds)."""
    repeats = MEASURE_REPEATS if repeats is None else repeats
    grad = torch.is_grad_enabled()
    needs_x = grad and x.requires_grad
    needs_v = grad and values.requires_grad
    x = x.detach().requires_grad_(needs_x)
    v = values.detach().requires_grad_(needs_v)

    def run(fn, name):
        def once():
            y = fn(x, v)
            if needs_x or needs_v:
                y.backward(torch.ones_like(y))
        once.__name__ = name  # "dense" / "sparse"
        return once

    paths = (("dense", run(dense_fn, "dense")), ("sparse", run(sparse_fn, "sparse")))

    times = {"dense": [], "sparse": []}
    rejecting = False
    try:
        with torch._C.DisableTorchFunction():
            for i in range(repeats + 1):
                passes = {name: _elapsed(fn, x.device) for name, fn in paths}
                slow = passes["sparse"] > EARLY_REJECT * passes["dense"]
                if i == 1 and slow and rejecting:  # slow when cold and warm alike
                    return {"sparse": False, "dense_s": passes["dense"], "sparse_s": passes["sparse"], "early": True}
                rejecting = not i and slow
                if i:  # the first pass of each warms up
                    for name, seconds in passes.items():
                        times[name].append(seconds)
    except RuntimeError as e:  # no sparse kernel for this dtype / device
        return {"sparse": False, "dense_s": None, "sparse_s": None, "error": str(e).splitlines()[0]}
    dense_s, sparse_s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    return {"sparse": sparse_s < SPARSE_MARGIN * dense_s, "dense_s": dense_s, "sparse_s": sparse_s}


def _densify(obj):
    if isinstance(obj, SparseWeight):
        return obj.materialize()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_densify(o) for o in obj)
    if isinstance(obj, dict):
        return {key: _densify(o) for key, o in obj.items()}
    return obj


#: the argument names of ``F.conv2d`` in order
CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

#: the functions of ``a + b`` (a sparse weight plus a dense tensor of its shape stays lazy: a shifted sparse weight)
TENSOR_ADD = frozenset({torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__})


class SparseWeight(torch.Tensor):
    r"""A weight-shaped tensor that stores only its active values (on a :class:`LinearPattern`).

    ``F.linear(x, w, b)`` runs :func:`sparse_linear`, and ``F.conv2d(x, w, b, stride, padding,
    dilation)`` with ``groups=1`` on a convolution pattern runs :func:`sparse_conv2d` (each when the
    pattern's choice says the sparse kernel is faster for this call shape); every other operation receives the dense tensor (zeros off the
    active set), built once and kept, so results never depend on the representation. Gradients flow
    to ``active`` either way.

    Adding a dense tensor of the same shape, ``w + s``, gives a *shifted* sparse weight that keeps
    ``s`` apart: ``F.linear(x, w + s) = sparse_linear(x, w) + F.linear(x, s)`` (and so for ``F.conv2d``). This is how the zero
    probe of :class:`~pyro_ssvi.handlers.DataGradientMessenger` gets the dense data gradient on update
    steps without a dense copy of the weight.

        >>> pattern = LinearPattern(torch.tensor([5, 0, 3]), (2, 4), policy="sparse")
        >>> w = SparseWeight(torch.tensor([1., 2., 3.]), pattern)
        >>> w.shape, float(w.sum())
        (torch.Size([2, 4]), 6.0)
        >>> F.linear(torch.ones(1, 4), w)
        tensor([[5., 1.]])

    :param torch.Tensor active: the active values in storage order, shape ``(k,)``.
    :param LinearPattern pattern: where they sit.
    :param torch.Tensor shift: an optional dense tensor of the weight's shape added to it.
    """

    @staticmethod
    def __new__(cls, active, pattern, shift=None):
        if active.shape != (pattern.num_active,):
            raise ValueError(f"active: expected shape ({pattern.num_active},), got {tuple(active.shape)}")
        requires_grad = active.requires_grad or (shift is not None and shift.requires_grad)
        w = torch.Tensor._make_wrapper_subclass(cls, pattern.weight_shape, dtype=active.dtype, device=active.device, requires_grad=requires_grad)
        w.active, w.pattern, w.shift, w._dense = active, pattern, shift, None
        return w

    def __init__(self, active, pattern, shift=None):
        pass

    def __repr__(self):
        return f"SparseWeight({self.materialize()!r}, active={self.active.numel()})"

    def as_subclass(self, cls):
        """The dense tensor as ``cls`` (``Tensor.as_subclass`` does not pass through torch function
        handling; Pyro's ``ProvenanceTensor`` uses it under ``TraceGraph_ELBO``)."""
        return self.materialize().as_subclass(cls)

    def active_at(self, index):
        """The active values if ``index`` is the active set this (unshifted) weight lives on (the
        guide's buffer the pattern was built from, or the pattern's own int64 copy), else ``None``."""
        if self.shift is not None:
            return None
        return self.active if index is self.pattern.index or self.pattern.built_from(index) else None

    def materialize(self):
        """The equivalent dense tensor (built on first use, then kept)."""
        grad = torch.is_grad_enabled()
        if self._dense is None or self._dense[0] != grad:
            dense = self.pattern.dense(self.active)
            self._dense = (grad, dense if self.shift is None else dense + self.shift)
        return self._dense[1]

    def linear_t(self, x2d):
        r"""``W x^T``, shape ``(out, rows)``, for ``x2d`` of shape ``(rows, in)``: the transpose of
        ``F.linear(x2d, self)`` as a fresh contiguous tensor (local reparameterisation finishes it in
        place), by the sparse kernel where the pattern chose it for this call shape, else densely.

            >>> pattern = LinearPattern(torch.tensor([5, 0, 3]), (2, 4), policy="sparse")
            >>> SparseWeight(torch.tensor([1., 2., 3.]), pattern).linear_t(torch.ones(3, 4))
            tensor([[5., 5., 5.],
                    [1., 1., 1.]])
        """
        _check_input(x2d, self.pattern.shape)
        if not self.pattern.use_sparse(x2d, self.active):
            return torch.mm(self.materialize(), x2d.t())
        yt = _CSRLinearT.apply(x2d, self.active, self.pattern)
        return yt if self.shift is None else yt + torch.mm(self.shift, x2d.t())

    def _linear(self, x, bias):
        if self.pattern.is_conv:  # a convolution weight in F.linear: PyTorch's own error or result
            return F.linear(x, self.materialize(), bias)
        _check_input(x, self.pattern.shape)
        x2d = x.reshape(-1, x.shape[-1])
        if not self.pattern.use_sparse(x2d, self.active):
            return F.linear(x, self.materialize(), bias)
        y = _sparse_linear(x2d, x.shape[:-1], self.active, self.pattern, bias)
        return y if self.shift is None else y + F.linear(x, self.shift)

    def _conv2d(self, x, bias, call):
        """``F.conv2d(x, self, bias, ...)`` with the geometry ``call`` (a :class:`ConvCall` of ``x``)."""
        if not self.pattern.use_sparse(x, self.active, call):
            return F.conv2d(x, self.materialize(), bias, call.stride, call.padding, call.dilation)
        y = _sparse_conv2d(x, self.active, self.pattern, bias, call)
        return y if self.shift is None else y + F.conv2d(x, self.shift, None, call.stride, call.padding, call.dilation)

    def _shifted_by(self, other):
        """``self + other`` kept lazy, or ``None`` when ``other`` is not a dense tensor of this shape."""
        if isinstance(other, SparseWeight) or not torch.is_tensor(other):
            return None
        if other.shape != self.pattern.weight_shape or other.dtype != self.active.dtype or other.device != self.active.device:
            return None
        return SparseWeight(self.active, self.pattern, other if self.shift is None else self.shift + other)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            call = dict(zip(("input", "weight", "bias"), args), **kwargs)
            w, x, b = call.get("weight"), call.get("input"), call.get("bias")
            if isinstance(w, SparseWeight) and torch.is_tensor(x) and not isinstance(x, SparseWeight) \
                    and not isinstance(b, SparseWeight):
                return w._linear(x, b)
        elif func is F.conv2d:
            call = dict(zip(CONV2D_ARGS, args), **kwargs)
            w, x, b = call.get("weight"), call.get("input"), call.get("bias")
            if isinstance(w, SparseWeight) and torch.is_tensor(x) and not isinstance(x, SparseWeight) \
                    and (b is None or (torch.is_tensor(b) and not isinstance(b, SparseWeight) and b.shape == w.pattern.weight_shape[:1])) \
                    and call.get("groups", 1) == 1:
                shape = w.pattern.conv_call(x, call.get("stride", 1), call.get("padding", 0), call.get("dilation", 1))
                if shape is not None:
                    return w._conv2d(x, b, shape)
        elif func in TENSOR_ADD and not kwargs and len(args) == 2:
            a, b = args
            out = a._shifted_by(b) if isinstance(a, SparseWeight) else b._shifted_by(a)
            if out is not None:
                return out
        if func in TENSOR_METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        return func(*_densify(args), **_densify(kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # every torch call on a SparseWeight is answered in __torch_function__; reaching here means
        # an operation bypassed it (e.g. inside torch.compile), which has no dense data to read
        raise RuntimeError(f"SparseWeight: {func} bypassed torch function handling; call .materialize() first "
                           "or turn sparse kernels off (SparseSubspaceGuide(..., sparse_kernels=False))")


def is_measured(decision):
    """Whether ``decision`` was measured (not decided by a rule of :meth:`LinearPattern.use_sparse`)."""
    return "follows" not in decision and not decision.get("below_min_work")


def _shape_fields(shape):
    """A call shape as plain data: ``{"rows": n}`` of an ``F.linear`` call, ``{"conv2d": {...}}`` of a :class:`ConvCall`."""
    return {"conv2d": {f: list(v) for f, v in shape._asdict().items()}} if isinstance(shape, ConvCall) else {"rows": shape}


def _decision_row(key, decision):
    """One row of a decision table: a decided call shape ``key`` and its ``decision`` as plain data
    (``"rows"``: the batch rows of an ``F.linear`` call; ``"conv2d"``: the :class:`ConvCall` of an
    ``F.conv2d`` call, as lists; a decision that follows another shape names it in ``"follows"``)."""
    shape, dtype, device, input_grad, value_grad = key
    where = _shape_fields(shape)
    return {**where, "dtype": str(dtype), "device": str(device), "input_grad": bool(input_grad),
            "value_grad": bool(value_grad), **decision}


_KEY_FIELDS = ("rows", "conv2d", "dtype", "device", "input_grad", "value_grad")


def _decision_key(row):
    """``(call-shape key, decision)`` of one row of a decision table (the inverse of :func:`_decision_row`)."""
    dtype = getattr(torch, row["dtype"].replace("torch.", ""))
    if "conv2d" in row:
        shape = ConvCall(*(tuple(int(i) for i in row["conv2d"][f]) for f in ConvCall._fields))
    else:
        shape = int(row["rows"])
    key = (shape, dtype, torch.device(row["device"]), bool(row["input_grad"]), bool(row["value_grad"]))
    decision = {k: v for k, v in row.items() if k not in _KEY_FIELDS}
    return key, decision


def parse_decision_table(table):
    """``{site: {call-shape key: decision}}`` from a decision table (``{site: [row, ...]}``), or ``ValueError``
    saying what is wrong with it."""
    if not isinstance(table, Mapping):
        raise ValueError(f"kernel decisions: expected a mapping site -> list of rows, got {type(table).__name__}")
    parsed = {}
    for name, rows in table.items():
        parsed[name] = {}
        for row in rows:
            try:
                key, decision = _decision_key(row)
                ok = isinstance(row["sparse"], bool)
            except (KeyError, TypeError, ValueError, AttributeError):
                ok = False
            if not ok:
                raise ValueError(f"kernel decisions of site {name!r}: a row needs rows (or conv2d), dtype, device, input_grad, "
                                 f"value_grad and sparse (bool), got {row!r}")
            parsed[name][key] = decision
    return parsed


class KernelSelector:
    r"""Which kernel ``F.linear`` / ``F.conv2d`` runs on each sparse weight site of a guide (2-d, or 4-d
    convolution weights), and the measurements behind it.

    One :class:`LinearPattern` per site (rebuilt when the site's active set changes) and, per site,
    the measured choice of every call shape met (``"auto"``: :meth:`LinearPattern.use_sparse`), shared
    with the site's patterns, so a rebuilt pattern keeps its site's measurements (the site's size and
    density are unchanged). :class:`~pyro_ssvi.SparseSubspaceGuide` owns one and saves its decisions
    (:meth:`decision_table`) as its extra state.

        >>> from pyro_ssvi.site import SiteInfo
        >>> selector = KernelSelector({"w": True})
        >>> pattern = selector.pattern("w", SiteInfo(torch.Size([2, 4]), 8, 3), torch.tensor([0, 3, 5]))
        >>> pattern.policy, selector.report()
        ('sparse', {'w': [{'rows': None, 'sparse': True, 'forced': True}]})

    :param choice: ``"auto"``, ``True`` or ``False`` for every site, or a mapping ``site -> choice``
        (unnamed sites: ``"auto"``); see the guide's ``sparse_kernels``.
    """

    def __init__(self, choice="auto"):
        self.choice = choice
        self.patterns = {}  # site -> LinearPattern of its current active set
        self.decisions = {}  # site -> {call shape: measured choice}, shared with the site's patterns

    def site_choice(self, name):
        """``"auto"``, ``True`` or ``False`` for site ``name``."""
        if isinstance(self.choice, Mapping):
            return self.choice.get(name, "auto")
        return self.choice

    def check_site_names(self, names):
        """``ValueError`` if ``choice`` names a site not in ``names`` (the model's sites)."""
        unknown = set(self.choice) - set(names) if isinstance(self.choice, Mapping) else set()
        if unknown:
            raise ValueError(f"sparse_kernels: unknown site names {sorted(unknown)}; the model has {list(names)}")

    def pattern(self, name, info, index):
        """Site ``name`` 's pattern for the active set ``index`` (rebuilt when ``index`` has changed), or
        ``None`` when the site runs dense: a dense or plate-local site, one that is not 2-d or 4-d, a site set to
        ``False``, and under ``torch.jit`` tracing (the same values; no timing inside a trace)."""
        choice = self.site_choice(name)
        if info.full or info.plate_local or len(info.shape) not in (2, 4) or choice is False or torch.jit.is_tracing():
            return None
        pattern = self.patterns.get(name)
        if pattern is None or not pattern.built_from(index):
            # a subspace update (or a move to another device) changed the active set: new structure,
            # same measured choices
            decisions = self.decisions.setdefault(name, {})
            pattern = LinearPattern(index, info.shape, policy="sparse" if choice is True else "auto", decisions=decisions)
            self.patterns[name] = pattern
        return pattern

    def decision_table(self):
        """The measured choices as plain data: ``{site: [{"rows", "dtype", "device", "input_grad",
        "value_grad", "sparse", "dense_s", "sparse_s"}, ...]}`` (sites with none left out)."""
        return {
            name: [_decision_row(key, decision) for key, decision in decisions.items()]
            for name, decisions in self.decisions.items()
            if decisions
        }

    def report(self):
        """:meth:`decision_table`, plus ``{"rows": None, "sparse": True, "forced": True}`` for each site
        forced onto the sparse kernel."""
        out = {name: [dict(entry) for entry in rows] for name, rows in self.decision_table().items()}
        for name, pattern in self.patterns.items():
            if pattern.policy == "sparse":
                out.setdefault(name, []).append({"rows": None, "sparse": True, "forced": True})
        return out

    def set_decision_table(self, table, names):
        """Use the choices of ``table`` (as :meth:`decision_table` returns) for the sites ``names``; sites
        it names lose their other measured choices; ``ValueError`` for a bad table or unknown sites."""
        parsed = parse_decision_table(table)
        unknown = sorted(set(parsed) - set(names))
        if unknown:
            raise ValueError(f"kernel decisions: unknown site names {unknown}; the guide has {list(names)}")
        for name, decisions in parsed.items():
            shared = self.decisions.setdefault(name, {})
            shared.clear()  # in place: built patterns hold this dict
            shared.update(decisions)


__all__ = ["ConvCall", "EARLY_REJECT", "KernelSelector", "LinearPattern", "MEASURE_REPEATS", "MIN_CONV_MACS", "SPARSE_MARGIN", "SparseWeight", "measure", "measure_conv2d",
           "parse_decision_table", "sparse_conv2d", "sparse_linear"]
