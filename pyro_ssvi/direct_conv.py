r"""Direct sparse 2-d convolution on the CPU, compiled with numba: the sparse path of ``F.conv2d`` on a sparse
4-d site when numba is installed (:func:`available`), without im2col.

A weight ``W`` of shape ``(O, C, k_h, k_w)`` is given at its active entries ``e = (o_e, i_e, a_e, b_e)`` with
values ``v_e``. With stride ``s``, padding ``p`` and dilation ``d`` (per axis),

.. math:: y_{n, o, h, w} = \sum_{e:\, o_e = o} v_e\, x_{n, i_e,\, h s + a_e d - p,\, w s + b_e d - p}

(terms outside the input are zero), and its three products touch only active entries:

* forward: for each image ``n`` and output channel ``o`` (one task of the parallel loop, which owns the
  output plane ``y[n, o]``), add ``v_e`` times the shifted input plane ``x[n, i_e]`` for each entry of row ``o``;
* input gradient: ``dx[n, i] += v_e`` times the output-gradient plane ``g[n, o_e]`` shifted back, for each entry
  of input channel ``i`` (one task per ``(n, i)``, which owns ``dx[n, i]``);
* value gradient of the active entries only: :math:`\partial L / \partial v_e = \sum_{n, h, w} g_{n, o_e, h, w}
  \, x_{n, i_e, h s + a_e d - p, w s + b_e d - p}`, one dot product per entry (one task per entry), accumulated
  in float64.

No dense weight, dense weight gradient or column matrix is formed; an image's planes are read row by row
(contiguous in ``w`` for stride 1). Direct sparse convolution: Park et al., "Faster CNNs with direct sparse
convolutions and guided pruning", ICLR 2017; CPU sparse training kernels with cost linear in density:
Nikdan et al., "SparseProp", ICML 2023.

The kernels run float32 and float64 contiguous CPU tensors on numba's threads (set to torch's thread count at
each call); anything else (a GPU tensor, another dtype) takes the im2col path of :mod:`pyro_ssvi.kernels`.
``PYRO_SSVI_DIRECT_CONV=0`` in the environment turns the direct path off.
"""

import os
from typing import NamedTuple

import torch

try:  # optional: without numba the im2col path runs
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised by the tests with the direct path off
    numba = None


def available():
    """Whether the direct kernels can run: numba importable and ``PYRO_SSVI_DIRECT_CONV`` not ``"0"``."""
    return numba is not None and os.environ.get("PYRO_SSVI_DIRECT_CONV", "1") != "0"


def applies(x, values):
    """Whether the direct kernels take this call: :func:`available`, CPU tensors of float32 or float64."""
    return available() and x.device.type == "cpu" and values.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) \
        and values.dtype == x.dtype


class Plan(NamedTuple):
    """The entries of a pattern decoded for the kernels (int64 NumPy arrays).

    Row-major order (the forward and value-gradient loops): ``row_ptr`` (``O + 1``), and per entry ``ent_i``,
    ``ent_a``, ``ent_b``, ``ent_o``. Input-channel order (the input-gradient loop): ``chan_ptr`` (``C + 1``) and
    per entry ``t_o``, ``t_a``, ``t_b`` and ``t_rm`` (its row-major position).
    """

    row_ptr: object
    ent_o: object
    ent_i: object
    ent_a: object
    ent_b: object
    chan_ptr: object
    t_o: object
    t_a: object
    t_b: object
    t_rm: object


def plan(pattern):
    """The :class:`Plan` of a convolution ``pattern`` (:class:`~pyro_ssvi.kernels.LinearPattern`)."""
    out_c, in_c, kh, kw = pattern.weight_shape
    kk = kh * kw
    row_ptr = pattern.crow.long()
    cols = pattern.col.long()  # row-major entries' columns i * kk + a * kw + b
    ent_o = torch.repeat_interleave(torch.arange(out_c), row_ptr.diff())
    t_rank = torch.argsort(cols * out_c + ent_o)  # row-major entries in (i, a, b, o) order
    t_cols = cols[t_rank]
    chan_ptr = torch.searchsorted(t_cols, torch.arange(in_c + 1) * kk)
    as_np = lambda t: t.contiguous().numpy()  # noqa: E731
    return Plan(as_np(row_ptr), as_np(ent_o), as_np(cols // kk), as_np(cols % kk // kw), as_np(cols % kw), as_np(chan_ptr),
                as_np(ent_o[t_rank]), as_np(t_cols % kk // kw), as_np(t_cols % kw), as_np(t_rank))


if numba is not None:
    @njit(cache=True, inline="always")
    def _span(offset, stride, size, out_size):
        """Output positions ``[lo, hi)`` whose input position ``j * stride + offset`` lies in ``[0, size)``."""
        lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
        last = size - 1 - offset
        hi = 0 if last < 0 else min(out_size, last // stride + 1)
        return lo, max(lo, hi)

    @njit(cache=True, inline="always")
    def _window(a, b, geometry, height, width, out_h, out_w):
        """For kernel position ``(a, b)``: the input offsets ``(a d_h - p_h, b d_w - p_w)`` and the output rows
        ``[h0, h1)`` and columns ``[w0, w1)`` whose input positions lie inside the image."""
        sh, sw, ph, pw, dh, dw = geometry
        off_h, off_w = a * dh - ph, b * dw - pw
        h0, h1 = _span(off_h, sh, height, out_h)
        w0, w1 = _span(off_w, sw, width, out_w)
        return off_h, off_w, h0, h1, w0, w1

    @njit(parallel=True, cache=True)
    def _forward(x, v, row_ptr, ent_i, ent_a, ent_b, y, sh, sw, ph, pw, dh, dw):
        n_img, _, height, width = x.shape
        out_c, out_h, out_w = y.shape[1], y.shape[2], y.shape[3]
        for task in prange(n_img * out_c):
            n, o = task // out_c, task % out_c
            for e in range(row_ptr[o], row_ptr[o + 1]):
                val, i = v[e], ent_i[e]
                oh_a, ow_b, h0, h1, w0, w1 = _window(ent_a[e], ent_b[e], (sh, sw, ph, pw, dh, dw), height, width, out_h, out_w)
                for h in range(h0, h1):
                    ih = h * sh + oh_a
                    for w in range(w0, w1):
                        y[n, o, h, w] += val * x[n, i, ih, w * sw + ow_b]

    @njit(parallel=True, cache=True)
    def _input_grad(g, v, chan_ptr, t_o, t_a, t_b, t_rm, gx, sh, sw, ph, pw, dh, dw):
        n_img, in_c, height, width = gx.shape
        out_h, out_w = g.shape[2], g.shape[3]
        for task in prange(n_img * in_c):
            n, i = task // in_c, task % in_c
            for t in range(chan_ptr[i], chan_ptr[i + 1]):
                val, o = v[t_rm[t]], t_o[t]
                oh_a, ow_b, h0, h1, w0, w1 = _window(t_a[t], t_b[t], (sh, sw, ph, pw, dh, dw), height, width, out_h, out_w)
                for h in range(h0, h1):
                    ih = h * sh + oh_a
                    for w in range(w0, w1):
                        gx[n, i, ih, w * sw + ow_b] += val * g[n, o, h, w]

    @njit(parallel=True, cache=True)
    def _value_grad(x, g, ent_o, ent_i, ent_a, ent_b, gv, sh, sw, ph, pw, dh, dw):
        n_img, _, height, width = x.shape
        out_h, out_w = g.shape[2], g.shape[3]
        for e in prange(ent_o.shape[0]):
            o, i = ent_o[e], ent_i[e]
            oh_a, ow_b, h0, h1, w0, w1 = _window(ent_a[e], ent_b[e], (sh, sw, ph, pw, dh, dw), height, width, out_h, out_w)
            acc = 0.0
            for n in range(n_img):
                for h in range(h0, h1):
                    ih = h * sh + oh_a
                    for w in range(w0, w1):
                        acc += g[n, o, h, w] * x[n, i, ih, w * sw + ow_b]
            gv[e] = acc

    @njit(parallel=True, cache=True)
    def _forward_moments(x, m, s2, row_ptr, ent_i, ent_a, ent_b, y_m, y_v, sh, sw, ph, pw, dh, dw):
        n_img, _, height, width = x.shape
        out_c, out_h, out_w = y_m.shape[1], y_m.shape[2], y_m.shape[3]
        for task in prange(n_img * out_c):
            n, o = task // out_c, task % out_c
            for e in range(row_ptr[o], row_ptr[o + 1]):
                mean, var, i = m[e], s2[e], ent_i[e]
                oh_a, ow_b, h0, h1, w0, w1 = _window(ent_a[e], ent_b[e], (sh, sw, ph, pw, dh, dw), height, width, out_h, out_w)
                for h in range(h0, h1):
                    ih = h * sh + oh_a
                    for w in range(w0, w1):
                        xv = x[n, i, ih, w * sw + ow_b]
                        y_m[n, o, h, w] += mean * xv
                        y_v[n, o, h, w] += var * xv * xv

    @njit(parallel=True, cache=True)
    def _input_grad_moments(g_m, g_v, x, m, s2, chan_ptr, t_o, t_a, t_b, t_rm, gx, sh, sw, ph, pw, dh, dw):
        n_img, in_c, height, width = gx.shape
        out_h, out_w = g_m.shape[2], g_m.shape[3]
        for task in prange(n_img * in_c):
            n, i = task // in_c, task % in_c
            for t in range(chan_ptr[i], chan_ptr[i + 1]):
                mean, var2, o = m[t_rm[t]], 2.0 * s2[t_rm[t]], t_o[t]
                oh_a, ow_b, h0, h1, w0, w1 = _window(t_a[t], t_b[t], (sh, sw, ph, pw, dh, dw), height, width, out_h, out_w)
                for h in range(h0, h1):
                    ih = h * sh + oh_a
                    for w in range(w0, w1):
                        iw = w * sw + ow_b
                        gx[n, i, ih, iw] += mean * g_m[n, o, h, w] + var2 * x[n, i, ih, iw] * g_v[n, o, h, w]

    @njit(parallel=True, cache=True)
    def _value_grad_moments(x, g_m, g_v, ent_o, ent_i, ent_a, ent_b, gm, gs, sh, sw, ph, pw, dh, dw):
        n_img, _, height, width = x.shape
        out_h, out_w = g_m.shape[2], g_m.shape[3]
        for e in prange(ent_o.shape[0]):
            o, i = ent_o[e], ent_i[e]
            oh_a, ow_b, h0, h1, w0, w1 = _window(ent_a[e], ent_b[e], (sh, sw, ph, pw, dh, dw), height, width, out_h, out_w)
            acc_m, acc_s = 0.0, 0.0
            for n in range(n_img):
                for h in range(h0, h1):
                    ih = h * sh + oh_a
                    for w in range(w0, w1):
                        xv = x[n, i, ih, w * sw + ow_b]
                        acc_m += g_m[n, o, h, w] * xv
                        acc_s += g_v[n, o, h, w] * xv * xv
            gm[e], gs[e] = acc_m, acc_s


def _geometry(call):
    return (*call.stride, *call.padding, *call.dilation)


def _threads():
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class _DirectConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, pattern, call):
        p = pattern.cached("direct_conv", lambda: plan(pattern))
        x = x.contiguous()
        v = pattern.to_row_major(values).detach().contiguous()
        y = x.new_zeros((x.shape[0], pattern.weight_shape[0]) + call.output_size(pattern.weight_shape[2:]))
        _threads()
        _forward(x.detach().numpy(), v.numpy(), p.row_ptr, p.ent_i, p.ent_a, p.ent_b, y.numpy(), *_geometry(call))
        ctx.save_for_backward(x, v)
        ctx.plan, ctx.pattern, ctx.call = p, pattern, call
        return y

    @staticmethod
    def backward(ctx, grad):
        x, v = ctx.saved_tensors
        p, geometry = ctx.plan, _geometry(ctx.call)
        g = grad.contiguous()
        gx = gv = None
        _threads()
        if ctx.needs_input_grad[0]:
            gx = torch.zeros_like(x)
            _input_grad(g.numpy(), v.numpy(), p.chan_ptr, p.t_o, p.t_a, p.t_b, p.t_rm, gx.numpy(), *geometry)
        if ctx.needs_input_grad[1]:
            gv = torch.empty_like(v)
            _value_grad(x.detach().numpy(), g.numpy(), p.ent_o, p.ent_i, p.ent_a, p.ent_b, gv.numpy(), *geometry)
            gv = ctx.pattern.from_row_major(gv)
        return gx, gv, None, None


class _DirectConvMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, pattern, call):
        p = pattern.cached("direct_conv", lambda: plan(pattern))
        x = x.contiguous()
        m = pattern.to_row_major(mean).detach().contiguous()
        s2 = pattern.to_row_major(var).detach().contiguous()
        shape = (x.shape[0], pattern.weight_shape[0]) + call.output_size(pattern.weight_shape[2:])
        y_m, y_v = x.new_zeros(shape), x.new_zeros(shape)
        _threads()
        _forward_moments(x.detach().numpy(), m.numpy(), s2.numpy(), p.row_ptr, p.ent_i, p.ent_a, p.ent_b, y_m.numpy(),
                         y_v.numpy(), *_geometry(call))
        ctx.save_for_backward(x, m, s2)
        ctx.plan, ctx.pattern, ctx.call = p, pattern, call
        return y_m, y_v

    @staticmethod
    def backward(ctx, g_m, g_v):
        x, m, s2 = ctx.saved_tensors
        p, geometry = ctx.plan, _geometry(ctx.call)
        g_m = torch.zeros_like(g_v) if g_m is None else g_m.contiguous()
        g_v = torch.zeros_like(g_m) if g_v is None else g_v.contiguous()
        gx = gm = gs = None
        _threads()
        if ctx.needs_input_grad[0]:
            gx = torch.zeros_like(x)
            _input_grad_moments(g_m.numpy(), g_v.numpy(), x.detach().numpy(), m.numpy(), s2.numpy(), p.chan_ptr, p.t_o,
                                p.t_a, p.t_b, p.t_rm, gx.numpy(), *geometry)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gm, gs = torch.empty_like(m), torch.empty_like(s2)
            _value_grad_moments(x.detach().numpy(), g_m.numpy(), g_v.numpy(), p.ent_o, p.ent_i, p.ent_a, p.ent_b,
                                gm.numpy(), gs.numpy(), *geometry)
            gm, gs = ctx.pattern.from_row_major(gm), ctx.pattern.from_row_major(gs)
        return gx, gm, gs, None, None


def conv2d_moments(x, mean, var, pattern, call):
    r"""Local reparameterisation's two products of a sparse 2-d convolution in one pass over ``x``:
    ``(F.conv2d(x, M), F.conv2d(x * x, V))`` for the sparse ``M`` and ``V`` of ``mean`` and ``var`` (storage
    order) on ``pattern``, ``x * x`` formed on the fly; differentiable in ``x``, ``mean`` and ``var``
    (:math:`\partial / \partial x = \mathrm{conv}^T(g_M, M) + 2 x \odot \mathrm{conv}^T(g_V, V)`)."""
    return _DirectConvMoments.apply(x, mean, var, pattern, call)


def conv2d(x, values, pattern, call):
    r"""``F.conv2d(x, W)`` (no bias, ``groups=1``) for the sparse ``W`` of ``values`` (storage order) on the
    convolution ``pattern``, with the geometry ``call`` (a :class:`~pyro_ssvi.kernels.ConvCall`), by the direct
    kernels; differentiable in ``x`` and ``values``. Output ``(N, O, H_out, W_out)``, contiguous."""
    return _DirectConv2d.apply(x, values, pattern, call)


__all__ = ["Plan", "applies", "available", "conv2d", "conv2d_moments", "plan"]
