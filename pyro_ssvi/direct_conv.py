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
    def _forward(x, v, s2, row_ptr, ent_i, ent_a, ent_b, y, y_var, geometry):
        """``y[o] += v_e x[i_e]`` shifted, for each entry of row ``o`` (and ``y_var[o] += s2_e x[i_e]^2`` when
        ``y_var`` is not empty); one task per output channel. Layout ``(channel, h, w, image)``."""
        _, height, width, n_img = x.shape
        out_c, out_h, out_w = y.shape[0], y.shape[1], y.shape[2]
        moments = y_var.shape[0] > 0
        for o in prange(out_c):
            for e in range(row_ptr[o], row_ptr[o + 1]):
                val, var, i = v[e], s2[e], ent_i[e]  # s2: the values again when there are no moments
                off_h, off_w, h0, h1, w0, w1 = _window(ent_a[e], ent_b[e], geometry, height, width, out_h, out_w)
                for h in range(h0, h1):
                    ih = h * geometry[0] + off_h
                    for w in range(w0, w1):
                        iw = w * geometry[1] + off_w
                        if moments:
                            for n in range(n_img):
                                xv = x[i, ih, iw, n]
                                y[o, h, w, n] += val * xv
                                y_var[o, h, w, n] += var * xv * xv
                        else:
                            for n in range(n_img):
                                y[o, h, w, n] += val * x[i, ih, iw, n]

    @njit(parallel=True, cache=True)
    def _input_grad(g, g_var, x, v, s2, chan_ptr, t_o, t_a, t_b, t_rm, gx, geometry):
        """``gx[i] += v_e g[o_e]`` shifted back (``+ 2 s2_e x[i] g_var[o_e]`` with moments), for each entry of
        input channel ``i``; one task per input channel."""
        _, height, width, n_img = gx.shape
        out_h, out_w = g.shape[1], g.shape[2]
        moments = g_var.shape[0] > 0
        for i in prange(gx.shape[0]):
            for t in range(chan_ptr[i], chan_ptr[i + 1]):
                val, var, o = v[t_rm[t]], s2[t_rm[t]], t_o[t]
                var2 = var + var  # 2 s2, in the values' dtype
                off_h, off_w, h0, h1, w0, w1 = _window(t_a[t], t_b[t], geometry, height, width, out_h, out_w)
                for h in range(h0, h1):
                    ih = h * geometry[0] + off_h
                    for w in range(w0, w1):
                        iw = w * geometry[1] + off_w
                        if moments:
                            for n in range(n_img):
                                gx[i, ih, iw, n] += val * g[o, h, w, n] + var2 * x[i, ih, iw, n] * g_var[o, h, w, n]
                        else:
                            for n in range(n_img):
                                gx[i, ih, iw, n] += val * g[o, h, w, n]

    @njit(parallel=True, cache=True)
    def _value_grad(x, g, g_var, ent_o, ent_i, ent_a, ent_b, gv, gs, acc, geometry):
        """``gv[e] = sum g[o_e] x[i_e]`` shifted over positions and images (and ``gs[e] = sum g_var[o_e] x[i_e]^2``
        with moments); one task per entry, summed per image in ``acc`` (float64, a row per thread) in a fixed
        order, then over images, so the result depends neither on the thread count nor on the processor."""
        _, height, width, n_img = x.shape
        out_h, out_w = g.shape[1], g.shape[2]
        moments = g_var.shape[0] > 0
        for e in prange(ent_o.shape[0]):
            row = acc[numba.get_thread_id()]
            row[:] = 0.0
            o, i = ent_o[e], ent_i[e]
            off_h, off_w, h0, h1, w0, w1 = _window(ent_a[e], ent_b[e], geometry, height, width, out_h, out_w)
            for h in range(h0, h1):
                ih = h * geometry[0] + off_h
                for w in range(w0, w1):
                    iw = w * geometry[1] + off_w
                    if moments:
                        for n in range(n_img):
                            xv = x[i, ih, iw, n]
                            row[n] += g[o, h, w, n] * xv
                            row[n_img + n] += g_var[o, h, w, n] * xv * xv
                    else:
                        for n in range(n_img):
                            row[n] += g[o, h, w, n] * x[i, ih, iw, n]
            total, total_var = 0.0, 0.0
            for n in range(n_img):
                total += row[n]
            gv[e] = total
            if moments:
                for n in range(n_img):
                    total_var += row[n_img + n]
                gs[e] = total_var


def _geometry(call):
    return (*call.stride, *call.padding, *call.dilation)


def _threads():
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _batch_last(t):
    """``(N, C, H, W)`` -> contiguous ``(C, H, W, N)``: the kernels' layout, images innermost (vector lanes)."""
    return t.detach().permute(1, 2, 3, 0).contiguous()


def _batch_first(t):
    """The kernels' ``(C, H, W, N)`` back to a contiguous ``(N, C, H, W)`` tensor."""
    return t.permute(3, 0, 1, 2).contiguous()


_NONE = torch.zeros(0, 1, 1, 1)  # an empty array: "no variance product" to the kernels


def _empty(like):
    return _NONE.to(like.dtype).numpy()


def _run_forward(x, mean, var, pattern, call):
    """The forward products: ``(plan, x in the kernels' layout, row-major mean, var, y, y_var)``."""
    p = pattern.cached("direct_conv", lambda: plan(pattern))
    xt = _batch_last(x)
    m = pattern.to_row_major(mean).detach().contiguous()
    s2 = None if var is None else pattern.to_row_major(var).detach().contiguous()
    shape = (pattern.weight_shape[0],) + call.output_size(pattern.weight_shape[2:]) + (x.shape[0],)
    y = xt.new_zeros(shape)
    y_var = None if var is None else xt.new_zeros(shape)
    _threads()
    _forward(xt.numpy(), m.numpy(), m.numpy() if s2 is None else s2.numpy(), p.row_ptr, p.ent_i, p.ent_a, p.ent_b, y.numpy(),
             _empty(y) if y_var is None else y_var.numpy(), _geometry(call))
    return p, xt, m, s2, y, y_var


def _run_backward(ctx, g, g_var):
    """Input and value gradients of the forward products (``g_var`` ``None``: no variance product)."""
    xt, m, s2 = ctx.saved_tensors[0], ctx.saved_tensors[1], (ctx.saved_tensors[2] if len(ctx.saved_tensors) > 2 else None)
    p, geometry = ctx.plan, _geometry(ctx.call)
    gt = _batch_last(g)
    gvt = None if g_var is None else _batch_last(g_var)
    none = _empty(gt)
    gx = gm = gs = None
    _threads()
    if ctx.needs_input_grad[0]:
        gxt = torch.zeros_like(xt)
        _input_grad(gt.numpy(), none if gvt is None else gvt.numpy(), xt.numpy(), m.numpy(), m.numpy() if s2 is None else s2.numpy(),
                    p.chan_ptr, p.t_o, p.t_a, p.t_b, p.t_rm, gxt.numpy(), geometry)
        gx = _batch_first(gxt)
    if ctx.needs_input_grad[1] or (s2 is not None and ctx.needs_input_grad[2]):
        gm = torch.empty_like(m)
        gs = torch.empty_like(m) if s2 is not None else None
        acc = torch.empty(numba.get_num_threads(), 2 * xt.shape[-1], dtype=torch.float64)
        _value_grad(xt.numpy(), gt.numpy(), none if gvt is None else gvt.numpy(), p.ent_o, p.ent_i, p.ent_a, p.ent_b,
                    gm.numpy(), (gm if gs is None else gs).numpy(), acc.numpy(), geometry)
        gm = ctx.pattern.from_row_major(gm)
        gs = None if gs is None else ctx.pattern.from_row_major(gs)
    return gx, gm, gs


class _DirectConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, pattern, call):
        p, xt, m, _, y, _ = _run_forward(x, values, None, pattern, call)
        ctx.save_for_backward(xt, m)
        ctx.plan, ctx.pattern, ctx.call = p, pattern, call
        return _batch_first(y)

    @staticmethod
    def backward(ctx, grad):
        gx, gv, _ = _run_backward(ctx, grad, None)
        return gx, gv, None, None


class _DirectConvMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, pattern, call):
        p, xt, m, s2, y, y_var = _run_forward(x, mean, var, pattern, call)
        ctx.save_for_backward(xt, m, s2)
        ctx.plan, ctx.pattern, ctx.call = p, pattern, call
        return _batch_first(y), _batch_first(y_var)

    @staticmethod
    def backward(ctx, g_m, g_v):
        g_m = torch.zeros_like(g_v) if g_m is None else g_m
        g_v = torch.zeros_like(g_m) if g_v is None else g_v
        return (*_run_backward(ctx, g_m, g_v), None, None)


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
