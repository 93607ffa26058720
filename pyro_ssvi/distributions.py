r"""Distributions for sparse sites.

:class:`SparseNormal` is the variational family of one SSVI site (Li, Miao, Qiu, Zhang,
ICLR 2024, arXiv 2402.11025)::

    q_{S,phi}(theta) = prod_{i in S} Normal(theta_i; mu_i, sigma_i^2) * prod_{i not in S} delta(theta_i = 0)

It stores only the ``k = |S|`` active coordinates (``loc``, ``scale`` and the flat
``index`` of each active entry) and scatters them into a dense tensor of the
site's shape when sampled, so every sample is exactly zero off the active set.
Its :meth:`~SparseNormal.log_prob` and :meth:`~SparseNormal.entropy` are the
density and entropy of the active coordinates: the density of ``q`` with respect
to Lebesgue measure on its support.

:class:`SubspacePrior` restricts a factorised prior ``p(theta) = prod_i p_i(theta_i)``
to the same active set, ``p_S = prod_{i in S} p_i``, so that a Monte Carlo ELBO
(``Trace_ELBO``) and the analytic one (``TraceMeanField_ELBO``) estimate the same
subspace objective. ``kl_divergence(SparseNormal, prior)`` is registered for both
a plain ``Independent`` prior and a :class:`SubspacePrior`; it is analytic when
the prior's coordinates are Normal and raises ``NotImplementedError`` otherwise,
which makes ``TraceMeanField_ELBO`` fall back on its Monte Carlo estimate.

*Plate-local sites.* A latent inside a ``pyro.plate`` (per-task or per-group weights) has
a batch shape ``B`` from the plate besides its event shape ``E``. Its coordinate set is
then the whole shape ``B + E`` (flat row-major positions ``i``, ``|S| = k``), and each
batch element ``b`` gets its own term, the sum over the active coordinates that fall in it:

.. math:: \log q(\theta)_b = \sum_{i \in S,\ \lfloor i / |E| \rfloor = b} \log \mathcal N(\theta_i; \mu_i, \sigma_i^2)

(0 for a batch element with no active coordinate); likewise ``log p_S``, the entropy and
the KL. Summed over ``b`` these are the global site's quantities, so an ELBO that scales
and sums per batch element (``Trace_ELBO``, ``TraceMeanField_ELBO``, ``TraceGraph_ELBO``)
estimates the same subspace objective. The reduction is one ``index_add`` over the ``k``
active coordinates, ``O(k)``.
"""

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import Cauchy, Independent, Laplace, Normal, StudentT, kl_divergence, register_kl

from .batched import BatchedSample
from .kernels import SparseWeight

_HALF_LOG_2PI_E = 0.5 + 0.5 * math.log(2 * math.pi)


def factorised_base(fn):
    """Return the scalar-event distribution under ``Independent`` wrappers, or ``None``.

    A prior is *factorised* when, after removing ``Independent`` (``.to_event``)
    wrappers, its event shape is ``()``: each coordinate is an independent scalar
    distribution (Normal, Laplace, StudentT, a scale mixture via
    ``MixtureSameFamily``...). ``MultivariateNormal`` and friends are not.
    """
    while isinstance(fn, Independent):
        fn = fn.base_dist
    if isinstance(fn, SubspacePrior):
        return factorised_base(fn.base)
    if fn.event_shape != torch.Size():
        return None
    return fn


def elementwise_log_prob(base, value, shape):
    """``log p_i(value_i)`` for every coordinate of a factorised ``base``; shape ``value.shape``."""
    lp = base.log_prob(value)
    return lp.expand(value.shape[: value.dim() - len(shape)] + shape)


def _flat(value, shape):
    return value.reshape(value.shape[: value.dim() - len(shape)] + (-1,))


def _unravel(index, shape):
    """Row-major coordinates of flat positions ``index`` in a tensor of ``shape``: one tensor per dim."""
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index = index // size
    return tuple(reversed(coords))


def batch_sum(values, batch_index, batch_shape):
    r"""Sum ``values`` (``... + (k,)``, one per active coordinate) per batch element of a plate-local site.

    ``batch_index[j]`` is the flat batch element of active coordinate ``j`` (its flat position
    ``i_j`` over ``batch_shape + event_shape`` divided by the event's size); ``None`` means all
    coordinates in row-major order. The result has shape ``... + batch_shape``:

    .. math:: r_b = \sum_{j:\ \mathrm{batch\_index}_j = b} v_j \qquad (0 \text{ where no } j \text{ falls in } b)

    One ``index_add``, ``O(k)``. With ``batch_shape = ()`` it is ``values.sum(-1)``.

        >>> batch_sum(torch.tensor([1., 2., 4.]), torch.tensor([0, 2, 0]), torch.Size([3]))
        tensor([5., 0., 2.])
    """
    if len(batch_shape) == 0:
        return values.sum(-1)
    lead = values.shape[:-1]
    if batch_index is None:
        return values.reshape(lead + (batch_shape.numel(), -1)).sum(-1).reshape(lead + batch_shape)
    out = values.new_zeros(lead + (batch_shape.numel(),))
    return out.index_add(-1, batch_index, values).reshape(lead + batch_shape)


#: scalar families :func:`restrict` rebuilds from their parameters (keyed by constructor)
_RESTRICTABLE = {
    Normal.__init__: (Normal, ("loc", "scale")),
    Laplace.__init__: (Laplace, ("loc", "scale")),
    Cauchy.__init__: (Cauchy, ("loc", "scale")),
    StudentT.__init__: (StudentT, ("df", "loc", "scale")),
}


def _restrict_param(p, batch_shape, shape, index):
    """``p`` broadcast to ``batch_shape = lead + shape``, read at flat site positions ``index``."""
    p = torch.broadcast_to(p, batch_shape)
    lead = batch_shape[: len(batch_shape) - len(shape)]
    if all(st == 0 for st in p.stride()[len(lead) :]):  # one value for the whole site (an expanded scalar)
        return p[(Ellipsis,) + (0,) * len(shape)].unsqueeze(-1)
    return active_values(p, index, shape)


def restrict(scalar, index, shape):
    r"""The factorised ``scalar`` distribution at the active coordinates only, or ``None``.

    ``scalar`` has batch shape ``lead + shape`` (one scalar distribution per coordinate); the
    result has batch shape ``lead + (k,)`` (or ``lead + (1,)`` when the parameters are one value
    expanded over the site), so ``log p_i(theta_i)`` for ``i in S`` costs ``O(k)``, not
    ``O(prod(shape))``. Normal, Laplace, Cauchy and StudentT are rebuilt from their parameters;
    ``None`` for other families (callers then evaluate densely). ``index`` ``None``: every
    coordinate, in row-major order.

        >>> p = Normal(torch.tensor(0.), torch.tensor(2.)).expand([3, 4])
        >>> restrict(p, torch.tensor([0, 7]), torch.Size([3, 4])).scale
        tensor([2.])
    """
    entry = _RESTRICTABLE.get(type(scalar).__init__)
    if entry is None:
        return None
    family, names = entry
    batch = scalar.batch_shape
    if batch[len(batch) - len(shape) :] != shape:
        return None
    params = {n: _restrict_param(getattr(scalar, n), batch, shape, index) for n in names}
    return family(**params, validate_args=False)


def active_values(value, index, shape):
    """``value`` (``... + shape``) at flat positions ``index``: ``... + (k,)``; a :class:`~pyro_ssvi.kernels.SparseWeight`
    on that active set answers with its stored values."""
    if isinstance(value, SparseWeight):
        active = value.active_at(index)
        if active is not None:
            return active
    if index is None:
        return _flat(value, shape)
    lead = value.shape[: value.dim() - len(shape)]
    try:
        flat = value.view(lead + (-1,))  # no copy
    except RuntimeError:  # e.g. a prior's parameters expanded over a plate: read the k entries in place
        return value[(Ellipsis,) + _unravel(index.long(), shape)]
    return flat.index_select(-1, index)


class SparseNormal(TorchDistribution):
    r"""Mean-field Normal on an active set ``S`` of a tensor, exact zeros elsewhere.

    :param torch.Tensor loc: means of the active coordinates, shape ``lead + (k,)``.
    :param torch.Tensor scale: standard deviations, same shape as ``loc``.
    :param torch.Tensor index: flat (row-major) positions (any integer dtype) of the ``k`` active
        coordinates in a tensor of shape ``shape``; ``None`` means all coordinates
        are active in their natural order (``k == prod(shape)``).
    :param torch.Size shape: the dense shape of one draw of the site: its coordinate set. For a
        global site this is the event shape; for a plate-local site it is ``plate batch shape +
        event shape`` (see ``event_dim``).
    :param pattern: a :class:`~pyro_ssvi.kernels.LinearPattern` of ``index`` (2-d sites and 4-d
        convolution weights), or ``None``. With a pattern, an unbatched sample is a
        :class:`~pyro_ssvi.kernels.SparseWeight`: it holds only the ``k`` active values, and
        ``F.linear`` / ``F.conv2d`` on it run sparse kernels.
    :param int event_dim: how many rightmost dims of ``shape`` are event dims (default: all). The
        dims left of them, ``B = shape[:-event_dim]``, are the batch dims of the site's enclosing
        ``pyro.plate`` (s): the distribution's batch shape is then ``lead + B`` and its event shape
        ``E = shape[-event_dim:]``, while ``S`` still indexes the whole ``B + E``.

    The entropy and ``log_prob`` cover the active coordinates only:
    :math:`\log q(\theta) = \sum_{i \in S} \log \mathcal N(\theta_i; \mu_i, \sigma_i^2)`; with a
    plate batch ``B`` one such sum per batch element ``b``, over the ``i \in S`` with
    :math:`\lfloor i / |E| \rfloor = b` (0 for a batch element without active coordinates).

        >>> q = SparseNormal(torch.zeros(2), torch.ones(2), torch.tensor([1, 6]), (3, 4), event_dim=1)
        >>> q.batch_shape, q.event_shape, q.log_prob(torch.zeros(3, 4)).shape
        (torch.Size([3]), torch.Size([4]), torch.Size([3]))
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(self, loc, scale, index, shape, pattern=None, validate_args=None, event_dim=None):
        shape = torch.Size(shape)
        numel = shape.numel()
        event_dim = len(shape) if event_dim is None else int(event_dim)
        if not 0 <= event_dim <= len(shape):
            raise ValueError(f"event_dim must lie in [0, {len(shape)}] for shape {tuple(shape)}, got {event_dim}")
        if loc.shape != scale.shape:
            raise ValueError(f"loc and scale must have one shape, got {tuple(loc.shape)} and {tuple(scale.shape)}")
        k = loc.shape[-1]
        if index is None:
            if k != numel:
                raise ValueError(f"index=None needs k == prod(shape) = {numel}, got k = {k}")
        elif index.shape != (k,):
            raise ValueError(f"index must have shape ({k},), got {tuple(index.shape)}")
        elif pattern is not None:
            if event_dim != len(shape):
                raise ValueError("pattern: a plate-local site (event_dim < len(shape)) runs dense; pass pattern=None")
            if pattern.weight_shape != shape or pattern.num_active != k:
                raise ValueError(f"pattern: expected a pattern of {k} entries in shape {tuple(shape)}")
            index = pattern.index  # the pattern's int64 copy of this index, made once per active set
        else:
            index = index.long()  # scatter wants int64; the guide stores int32
        self.loc, self.scale, self.index, self.site_shape, self.pattern = loc, scale, index, shape, pattern
        split = len(shape) - event_dim
        self.site_batch_shape, self._event_numel = shape[:split], shape[split:].numel()
        super().__init__(loc.shape[:-1] + self.site_batch_shape, shape[split:], validate_args=validate_args)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def num_active(self):
        return self.loc.shape[-1]

    @property
    def batch_index(self):
        """The flat batch element (within the plate batch shape) of each active coordinate, ``index // |E|``, or
        ``None`` for a global site or a dense site (every coordinate, in order)."""
        if self.index is None or len(self.site_batch_shape) == 0:
            return None
        if getattr(self, "_batch_index", None) is None:
            self._batch_index = torch.div(self.index, self._event_numel, rounding_mode="floor")
        return self._batch_index

    def _per_batch(self, values):
        """Per-coordinate ``values`` (``... + (k,)``) summed per batch element: ``... + site batch``."""
        return batch_sum(values, self.batch_index, self.site_batch_shape)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        plate = self.site_batch_shape
        split = len(batch_shape) - len(plate)
        if split < 0 or batch_shape[split:] != plate:
            raise ValueError(f"SparseNormal.expand: batch shape {tuple(batch_shape)} must end with the site's plate "
                             f"batch shape {tuple(plate)}")
        k = (self.num_active,)
        lead = batch_shape[:split]
        return SparseNormal(self.loc.expand(lead + k), self.scale.expand(lead + k), self.index, self.site_shape,
                            self.pattern, event_dim=len(self.event_shape))

    # dense <-> active conversions ------------------------------------------------
    def scatter(self, active):
        """Place ``active`` (``... + (k,)``) into zeros of shape ``... + shape``."""
        lead = active.shape[:-1]
        if self.index is None:
            return active.reshape(lead + self.site_shape)
        out = active.new_zeros(lead + (self.site_shape.numel(),))
        out = out.scatter(-1, self.index.expand(lead + (self.num_active,)), active)
        return out.reshape(lead + self.site_shape)

    def gather(self, value):
        """The active coordinates of a dense ``value`` (``... + shape``), shape ``... + (k,)``."""
        return active_values(value, self.index, self.site_shape)

    def embed(self, active):
        """``active`` (``... + (k,)``) as a site-shaped tensor: a :class:`~pyro_ssvi.kernels.SparseWeight`
        when this distribution has a kernel pattern and ``active`` has no batch dims, else :meth:`scatter`."""
        if self.pattern is not None and active.dim() == 1:
            return SparseWeight(active, self.pattern)
        return self.scatter(active)

    # Distribution API -------------------------------------------------------------
    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)[: -len(self.site_shape) or None] + (self.num_active,)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = self.embed(torch.addcmul(self.loc, self.scale, eps))
        # draws with batch dims (a parallel Predictive, vectorised particles) apply themselves per draw
        return value.as_subclass(BatchedSample) if value.dim() > len(self.site_shape) else value

    def log_prob(self, value):
        active = self.gather(value)
        var = self.scale**2
        lp = -((active - self.loc) ** 2) / (2 * var) - self.scale.log() - 0.5 * math.log(2 * math.pi)
        return self._per_batch(lp)

    def entropy(self):
        return self._per_batch(_HALF_LOG_2PI_E + self.scale.log())

    @property
    def mean(self):
        return self.scatter(self.loc)

    @property
    def variance(self):
        return self.scatter(self.scale**2)


class SubspacePrior(TorchDistribution):
    r"""A factorised prior restricted to an active set: :math:`p_S = \prod_{i \in S} p_i`.

    ``log_prob`` sums the coordinates' log densities over ``S`` only; samples are the
    prior's samples with the inactive coordinates set to zero.

    :param base: the model's prior for the site (factorised; batch shape ``()`` for a global site,
        ``lead + B`` for a site local to plates of batch shape ``B``).
    :param torch.Tensor index: flat positions (any integer dtype) of the active coordinates.
    :param torch.Size shape: the site's coordinate shape, the space ``index`` points into: the event
        shape (the default) or, for a plate-local site, ``B + event shape``. ``log_prob`` then has one
        value per batch element ``b`` of ``B``, :math:`\sum_{i \in S,\ \lfloor i/|E| \rfloor = b} \log p_i(\theta_i)`.
    """

    arg_constraints = {}

    def __init__(self, base, index, shape=None, validate_args=False):
        scalar = factorised_base(base)
        if scalar is None:
            raise ValueError(f"SubspacePrior needs a factorised prior, got {type(base).__name__}")
        event = base.event_shape
        shape = event if shape is None else torch.Size(shape)
        split = len(shape) - len(event)
        plate = shape[: max(split, 0)]
        batch = base.batch_shape
        if split < 0 or shape[split:] != event or len(batch) < split or batch[len(batch) - split :] != plate:
            raise ValueError(f"SubspacePrior: site shape {tuple(shape)} must be the prior's trailing batch dims plus its "
                             f"event shape; the prior has batch {tuple(base.batch_shape)}, event {tuple(event)}")
        self.base, self.scalar, self.index = base, scalar, index  # int32 indexes fine here: no copy
        self.site_shape, self.site_batch_shape = shape, plate
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def coordinate_numel(self):
        """How many coordinates one draw of the site has (``prod(site shape)``): what ``index`` ranges over."""
        return self.site_shape.numel()

    @property
    def support(self):
        return self.base.support

    @property
    def has_rsample(self):
        return self.base.has_rsample

    def expand(self, batch_shape, _instance=None):
        """The restriction of the expanded prior (vectorised particles expand every site)."""
        return SubspacePrior(self.base.expand(batch_shape), self.index, self.site_shape)

    def _mask(self, value):
        flat = _flat(value, self.site_shape)
        keep = torch.zeros(flat.shape[-1], dtype=torch.bool, device=flat.device)
        keep[self.index] = True
        return torch.where(keep, flat, torch.zeros_like(flat)).reshape(value.shape)

    def rsample(self, sample_shape=torch.Size()):
        return self._mask(self.base.rsample(sample_shape))

    def sample(self, sample_shape=torch.Size()):
        return self._mask(self.base.sample(sample_shape))

    def log_prob(self, value):
        r""":math:`\sum_{i \in S} \log p_i(\theta_i)` (per batch element of a plate-local site), evaluated at
        the active coordinates only when the prior family allows (:func:`restrict`)."""
        active_prior = restrict(self.scalar, self.index, self.site_shape)
        if active_prior is not None:
            lp = active_prior.log_prob(active_values(value, self.index, self.site_shape))
        else:
            lp = active_values(elementwise_log_prob(self.scalar, value, self.site_shape), self.index, self.site_shape)
        return batch_sum(lp, _batch_index(self.index, self.site_shape, self.event_shape), self.site_batch_shape)


def _batch_index(index, shape, event_shape):
    """``index // |E|`` (int64), the flat plate-batch element of each active coordinate; ``None`` without plate dims."""
    if index is None or len(shape) == len(event_shape):
        return None
    return torch.div(index.long(), event_shape.numel(), rounding_mode="floor")


def _kl_active(q, p):
    r"""KL(q || p_S) summed over the active coordinates of ``q``; analytic for Normal p_i.

    .. math:: \mathrm{KL} = \sum_{i \in S} \log\frac{s_i}{\sigma_i}
              + \frac{\sigma_i^2 + (\mu_i - m_i)^2}{2 s_i^2} - \frac12

    For a plate-local ``q`` (plate batch ``B``) one such sum per batch element, over the active
    coordinates that fall in it (shape ``lead + B``, what ``TraceMeanField_ELBO`` scales and sums).
    """
    base = factorised_base(p)
    if not isinstance(base, Normal):
        raise NotImplementedError
    if p.event_shape != q.event_shape:
        raise NotImplementedError
    plate, batch = q.site_batch_shape, p.batch_shape
    if len(batch) < len(plate) or batch[len(batch) - len(plate) :] != plate:
        raise NotImplementedError  # the prior does not carry the site's plate dims
    # the prior at the active coordinates, without densifying its (possibly expanded) parameters
    active = restrict(base.expand(p.batch_shape + q.event_shape), q.index, q.site_shape)
    if active is None:
        raise NotImplementedError
    ploc, pscale = active.loc, active.scale
    var_ratio = (q.scale / pscale) ** 2
    t1 = ((q.loc - ploc) / pscale) ** 2
    kl = 0.5 * (var_ratio + t1 - 1 - var_ratio.log())
    return q._per_batch(kl)


@register_kl(SparseNormal, Independent)
def _kl_sparse_independent(q, p):
    return _kl_active(q, p)


@register_kl(SparseNormal, SubspacePrior)
def _kl_sparse_subspace(q, p):
    return _kl_active(q, p.base)


__all__ = ["SparseNormal", "SubspacePrior", "active_values", "batch_sum", "factorised_base", "kl_divergence", "restrict"]
