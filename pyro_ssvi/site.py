r"""Per-site storage of :class:`~pyro_ssvi.SparseSubspaceGuide`: one :class:`SparseSite` module per latent site.

A latent site ``theta`` with ``d`` coordinates (its ``plate batch + event`` shape) keeps
``k = round(density * d)`` of them random (Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025):

.. math:: q(\theta) = \prod_{j=1}^{k} \mathcal N(\theta_{s_j}; \mu_j, \sigma_j^2) \prod_{i \notin S} \delta(\theta_i),
          \qquad S = \{s_1, \dots, s_k\}, \qquad \sigma_j = t(\rho_j)

stored slot by slot: slot ``j`` holds the flat position ``s_j`` (``index``), the mean ``mu_j``
(``loc``), the unconstrained scale ``rho_j`` (``unconstrained_scale``) and the SSVI step at which the
slot was last refilled (``births``). ``t`` is the bijection of ``scale_transform``
(:func:`scale_bijection`: Pyro's ``biject_to(constraints.softplus_positive)``, or ``exp``). A dense
site (``k = d``) stores no index (every coordinate, in natural order) and no births.

A subspace update rewrites slots in place (:meth:`SparseSite.replace`), so the tensors keep their
size and identity for the whole run and an optimiser keeps tracking them.
"""

from typing import NamedTuple

import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import ExpTransform
from pyro.nn import PyroModule
from torch.distributions import biject_to

from .kernels import in_row_major_order

#: the bijections ``rho -> sigma`` of the guide's ``scale_transform`` option
SCALE_TRANSFORMS = {"softplus": biject_to(constraints.softplus_positive), "exp": ExpTransform()}


def scale_bijection(transform):
    r"""The bijection ``t`` with ``sigma = t(rho)`` for ``scale_transform`` ``"softplus"``
    (:math:`\log(1 + e^\rho)`, Pyro's ``biject_to(constraints.softplus_positive)``) or ``"exp"``.

        >>> t = scale_bijection("softplus")
        >>> float(t(torch.tensor(0.0))), float(t.inv(t(torch.tensor(-3.0))))
        (0.6931471824645996, -3.0)
    """
    try:
        return SCALE_TRANSFORMS[transform]
    except (KeyError, TypeError):
        raise ValueError(f"scale_transform: expected 'softplus' or 'exp', got {transform!r}") from None


class SiteInfo(NamedTuple):
    """A site's coordinate set: ``shape`` is ``batch_shape + event shape``; ``batch_shape`` is the
    plate batch of a plate-local site (``()`` for a global one); ``k`` active of ``numel`` coordinates."""

    shape: torch.Size
    numel: int
    k: int
    batch_shape: torch.Size = torch.Size()

    @property
    def full(self):
        return self.k == self.numel

    @property
    def event_shape(self):
        return self.shape[len(self.batch_shape) :]

    @property
    def plate_local(self):
        return len(self.batch_shape) > 0


def check_finite_parameters(site_name, loc=None, unconstrained_scale=None, names=None):
    """``ValueError`` naming the site if a saved ``loc`` or ``unconstrained_scale`` (``None``: not given) holds
    non-finite values; ``names`` maps a field to the name messages give it (default: the field)."""
    names = names or {}
    for field, value in (("loc", loc), ("unconstrained_scale", unconstrained_scale)):
        if value is not None and not torch.isfinite(value).all():
            raise ValueError(f"state_dict: site {site_name!r}: {names.get(field, field)} holds non-finite values")


def index_dtype(numel):
    """Active indices are stored as int32 (4 bytes per active entry) unless a site is too large."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


class SparseSite(PyroModule):
    r"""The variational parameters of one latent site: ``k`` slots, each an active coordinate.

    ::

        loc                  Parameter  (k,)  mu
        unconstrained_scale  Parameter  (k,)  rho (sigma = t(rho), see scale_bijection)
        index                buffer     (k,)  flat positions of the active coordinates (int32, int64 beyond
                                              2^31 coordinates; empty for a dense site)
        births               buffer     (k,)  SSVI step at which each slot was last refilled (0: since set-up;
                                              int32; empty for a dense site)

    A ``PyroModule``, so that inside its guide's call the parameters are ``pyro.param`` s (as in
    Pyro's autoguides) and ``pyro.optim`` optimisers see them.

        >>> info = SiteInfo(torch.Size([2, 3]), 6, 2)
        >>> site = SparseSite("w", info, torch.tensor([1., 2.]), torch.zeros(2), torch.tensor([4, 1], dtype=torch.int32))
        >>> site.dense(site.loc.detach())
        tensor([[0., 2., 0.],
                [0., 1., 0.]])
        >>> site.sort_slots(), site.index.tolist(), site.loc.tolist()
        (tensor([1, 0]), [1, 4], [2.0, 1.0])

    :param str site_name: the site's name in the model (for messages).
    :param SiteInfo info: the site's shapes and active count.
    :param torch.Tensor loc: ``mu``, shape ``(k,)``.
    :param torch.Tensor unconstrained_scale: ``rho``, shape ``(k,)``.
    :param torch.Tensor index: flat positions, shape ``(k,)`` (``(0,)`` for a dense site).
    :param torch.Tensor births: per-slot refill steps; default zeros (``(0,)`` for a dense site).
    :param tuple frames: names of the vectorised plates a plate-local site is local to.
    """

    def __init__(self, site_name, info, loc, unconstrained_scale, index, births=None, frames=()):
        super().__init__()
        self.site_name = site_name
        if births is None:
            births = torch.zeros(0 if info.full else info.k, dtype=torch.int32, device=index.device)
        self.info = info
        self.frames = tuple(frames)
        self.loc = torch.nn.Parameter(loc)
        self.unconstrained_scale = torch.nn.Parameter(unconstrained_scale)
        self.register_buffer("index", index)
        self.register_buffer("births", births)

    @classmethod
    def initial(cls, site_name, info, value, index, scale, scale_transform="softplus", frames=()):
        """A site starting at ``value`` (its initial dense value) on the active set ``index``
        (flat positions, sorted; ignored for a dense site), with standard deviations ``scale``."""
        if info.full:  # every coordinate active in natural order; no index stored
            loc = value.reshape(-1).clone()
            index = torch.zeros(0, dtype=index_dtype(info.numel), device=value.device)
        else:
            loc = value.reshape(-1)[index].clone()
            index = index.to(index_dtype(info.numel))
        return cls(site_name, info, loc, scale_bijection(scale_transform).inv(scale), index, frames=frames)

    def extra_repr(self):
        return f"{self.site_name!r}, shape={tuple(self.info.shape)}, active={self.info.k}"

    # the active set -------------------------------------------------------------------
    def active_index(self):
        """Flat positions of the active coordinates: the stored buffer (``arange`` for a dense site)."""
        if self.info.full:
            return torch.arange(self.info.numel, device=self.index.device)
        return self.index

    def sparse_index(self):
        """The stored index of a sparse site; ``None`` for a dense one."""
        return None if self.info.full else self.index

    def active_mask(self):
        """Boolean tensor shaped like the site, true on the active set."""
        index = self.active_index()
        mask = torch.zeros(self.info.numel, dtype=torch.bool, device=index.device)
        mask[index] = True
        return mask.reshape(self.info.shape)

    def dense(self, values):
        r"""Per-slot ``values`` (``lead + (k,)``) placed in zeros of shape ``lead + site shape``:
        :math:`\theta_{s_j} = v_j`, :math:`\theta_i = 0` off the active set."""
        lead = values.shape[:-1]
        if self.info.full:
            return values.reshape(lead + self.info.shape)
        index = self.index.long().expand(lead + (self.info.k,))
        out = values.new_zeros(lead + (self.info.numel,)).scatter(-1, index, values)
        return out.reshape(lead + self.info.shape)

    # subspace updates -----------------------------------------------------------------
    @torch.no_grad()
    def replace(self, positions, new_index, loc, unconstrained_scale, step):
        """Put the coordinates ``new_index`` into slots ``positions`` (in place), with means ``loc``,
        unconstrained scales ``unconstrained_scale`` and birth ``step``; ``ValueError`` for positions
        outside ``[0, numel)`` or lengths that differ. Returns whether anything was replaced."""
        if positions.numel() != new_index.numel():
            raise ValueError("positions and new_index must have one length")
        if positions.numel() == 0:
            return False
        if new_index.min() < 0 or new_index.max() >= self.info.numel:
            raise ValueError(f"new_index: positions must lie in [0, {self.info.numel}) for site {self.site_name!r}")
        index = self.active_index()
        index[positions] = new_index.to(index.dtype)
        self.loc[positions] = loc
        self.unconstrained_scale[positions] = unconstrained_scale
        self.births[positions] = int(step)
        return True

    @torch.no_grad()
    def sort_slots(self):
        """Reorder the slots by flat position (the row-major order the sparse kernels read) and return
        the permutation ``perm`` applied (slot ``i`` now holds what slot ``perm[i]`` held), or ``None``
        when they already are in that order."""
        index = self.active_index()
        if in_row_major_order(index):
            return None
        perm = torch.argsort(index)
        for t in (index, self.loc, self.unconstrained_scale, self.births):
            t.copy_(t.index_select(0, perm))
        return perm

    # checkpoints ------------------------------------------------------------------------
    def check_state(self, loc=None, unconstrained_scale=None, index=None, births=None, names=None):
        """``ValueError`` naming the site if these tensors (``None``: not given) cannot be this
        site's state: non-finite means or scales, indices out of ``[0, numel)`` or repeated, negative
        births. ``names`` maps a field to the name messages give it (default: the field)."""
        check_finite_parameters(self.site_name, loc, unconstrained_scale, names)
        site = f"state_dict: site {self.site_name!r}"
        numel = self.info.numel
        if index is not None and index.numel():
            if index.min() < 0 or index.max() >= numel:
                raise ValueError(f"{site}: active indices out of range [0, {numel}) "
                                 f"(min {int(index.min())}, max {int(index.max())})")
            distinct = torch.unique(index).numel()
            if distinct != index.numel():
                raise ValueError(f"{site}: active indices repeat ({distinct} distinct of {index.numel()})")
        if births is not None and births.numel() and births.min() < 0:
            raise ValueError(f"{site}: negative birth steps")


__all__ = ["SCALE_TRANSFORMS", "SiteInfo", "SparseSite", "check_finite_parameters", "index_dtype", "scale_bijection"]
