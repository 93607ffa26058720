r"""Sites that cannot be sparse, kept dense inside :class:`~pyro_ssvi.SparseSubspaceGuide` with ``AutoNormal``'s
parametrisation: one :class:`DenseSite` module per site.

A sparse site needs real coordinates with independent scalar priors, each of which can be a point mass at
zero (Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025). Three kinds of latent are not like that
(:func:`why_dense` tells them): a site whose support is not the reals (a noise scale ``sigma ~ Uniform(0, 10)``,
a hierarchical prior's ``tau ~ HalfNormal``, mixture weights on a simplex), a site whose prior couples its
coordinates (``MultivariateNormal``), and a latent local to a subsampled ``pyro.plate`` (one per data point).
Such a site gets what Pyro's ``AutoNormal`` gives it: a mean-field Normal in the unconstrained space of
:math:`T = \mathrm{biject\_to}(\mathrm{support})`,

.. math:: u \sim \mathcal N(\mu, \mathrm{diag}\,\sigma^2), \qquad \theta = T(u), \qquad
          \log q(\theta) = \log \mathcal N(u; \mu, \sigma^2) - \log \left|\det \frac{\partial T}{\partial u}\right|,

drawn as ``AutoNormal`` draws it: an auxiliary site ``<name>_unconstrained`` for ``u`` and a ``Delta`` at
:math:`\theta` that carries the Jacobian term, so every Pyro ELBO scores it as it scores ``AutoNormal``. A latent
local to a subsampled plate keeps ``mu`` and ``sigma`` for the plate's full size and uses the rows of the
minibatch (``pyro.subsample``), as ``AutoNormal`` does.

Parameters, saved as the sparse sites' are (``locs.<site>``, ``unconstrained_scales.<site>``)::

    loc                  Parameter  unconstrained shape (plate batch at full size + event)   mu
    unconstrained_scale  Parameter  the same shape                                            rho, sigma = t(rho)
"""

import torch
from pyro import poutine
import pyro
import pyro.distributions as dist
from pyro.distributions.util import sum_rightmost
from pyro.nn import PyroModule
from torch.distributions import biject_to
from torch.distributions.transforms import identity_transform

from .distributions import factorised_base
from .site import check_finite_parameters, scale_bijection


def _base_constraint(constraint):
    # peel wrappers such as independent(...) and MixtureSameFamily's support constraint
    while hasattr(constraint, "base_constraint"):
        constraint = constraint.base_constraint
    return constraint


def is_real(constraint):
    """Whether ``constraint`` is the reals (under ``independent`` wrappers)."""
    return type(_base_constraint(constraint)) is type(dist.constraints.real)


def subsampled_frames(site):
    """The subsampled vectorised ``pyro.plate`` frames of a trace site, with their full sizes: ``[(frame, full size)]``
    (the frame's ``size`` is the subsample's)."""
    out = []
    for f in site["cond_indep_stack"]:
        full = f.full_size if f.full_size is not None else f.size
        if f.vectorized and f.size != full:
            out.append((f, full))
    return out


def why_dense(site):
    """Why the latent trace ``site`` cannot be sparse, as a phrase for messages and ``summary()``; ``None`` if it can.

        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("w", dist.Normal(0., 1.).expand([3]).to_event(1))
        ...     pyro.sample("sigma", dist.Uniform(0., 10.))
        >>> trace = pyro.poutine.trace(model).get_trace()
        >>> why_dense(trace.nodes["w"]), why_dense(trace.nodes["sigma"])
        (None, 'support Interval(lower_bound=0.0, upper_bound=10.0) is not real')
    """
    fn = site["fn"]
    if not is_real(fn.support):
        return f"support {fn.support} is not real"
    if factorised_base(fn) is None:
        return f"prior {type(fn).__name__} is not factorised over coordinates"
    frames = subsampled_frames(site)
    if frames:
        return f"local to the subsampled pyro.plate({frames[0][0].name!r})"
    return None


def to_support(support):
    """The bijection from the reals onto ``support``: the identity for a real support (under any wrapper, such as
    a mixture's), else ``torch.distributions.biject_to(support)``."""
    return identity_transform if is_real(support) else biject_to(support)


def check_transformable(name, support):
    """:func:`to_support` of ``support``, or a ``ValueError`` naming the site if no bijection maps the reals onto
    it (a discrete or spherical support): Pyro's wording first, then what works with this guide."""
    if getattr(support, "is_discrete", False):
        raise ValueError(
            f"Continuous inference cannot handle discrete sample site '{name}'. For a discrete latent, enumerate it "
            "out (pyro.infer.TraceEnum_ELBO with infer={'enumerate': 'parallel'}) and hide it from the guide, or give "
            "it its own guide in an AutoGuideList, e.g. AutoDiscreteParallel or "
            f"AutoDelta(poutine.block(model, expose=[{name!r}]))"
        )
    try:
        return to_support(support)
    except NotImplementedError:
        if type(_base_constraint(support)).__name__ == "_Sphere":
            raise ValueError(
                f"site {name!r}: support {support} has no bijection from the reals; for a direction on the sphere, "
                f"reparameterise it as Pyro advises: poutine.reparam(model, config={{{name!r}: ProjectedNormalReparam()}}) "
                "(pyro.infer.reparam), which makes it a real-valued site"
            ) from None
        raise ValueError(
            f"site {name!r}: support {support} has no bijection from the reals (torch.distributions.biject_to); "
            f"give the site its own guide in an AutoGuideList, e.g. AutoDelta(poutine.block(model, expose=[{name!r}]))"
        ) from None


def is_weight(site):
    """Whether a latent trace ``site`` is a weight: it can be sparse (:func:`why_dense` is ``None``) and has event
    dims of its own (a layer's ``PyroSample`` prior, ``Normal(0, 1).expand(shape).to_event(n)``). Weights start
    as the SSVI recipe starts them; every other site (a scalar latent, a site that cannot be sparse) where Pyro's
    ``AutoNormal`` starts it."""
    return site["fn"].event_dim >= 1 and why_dense(site) is None


class DenseSite(PyroModule):
    r"""``AutoNormal``'s variational parameters for one site that cannot be sparse (see the module's docstring).

        >>> import pyro.distributions as dist
        >>> from pyro_ssvi.site import SiteInfo
        >>> site = DenseSite("sigma", SiteInfo(torch.Size([]), 1, 1), dist.constraints.positive, 0,
        ...                  torch.tensor(0.), torch.tensor(-2.), reason="support GreaterThan(0.0) is not real")
        >>> float(site.median())  # exp(0)
        1.0

    :param str site_name: the site's name in the model.
    :param SiteInfo info: the site's constrained shape (plate batch at full size + event); ``k = numel``.
    :param support: the prior's support; ``T = biject_to(support)``.
    :param int event_dim: the prior's event dims (of the constrained value).
    :param torch.Tensor loc: ``mu`` in the unconstrained space, the full unconstrained shape.
    :param torch.Tensor unconstrained_scale: ``rho`` of the same shape.
    :param str reason: why the site is dense (:func:`why_dense`).
    :param tuple frames: the vectorised plates the site is local to (any of them may be subsampled).
    :param str scale_transform: ``t``, as for the sparse sites (:func:`~pyro_ssvi.site.scale_bijection`).
    """

    def __init__(self, site_name, info, support, event_dim, loc, unconstrained_scale, reason, frames=(), scale_transform="softplus"):
        super().__init__()
        self.site_name, self.info, self.reason, self.frames = site_name, info, reason, tuple(frames)
        self.support, self.transform = support, to_support(support)
        self.event_dim = int(event_dim)
        #: event dims of ``u`` (a simplex's K coordinates have K - 1 unconstrained ones, still one event dim)
        self.unconstrained_event_dim = self.event_dim + loc.dim() - len(info.shape)
        self._scale = scale_bijection(scale_transform)
        self.loc = torch.nn.Parameter(loc)
        self.unconstrained_scale = torch.nn.Parameter(unconstrained_scale)

    def extra_repr(self):
        return f"{self.site_name!r}, shape={tuple(self.info.shape)}, dense: {self.reason}"

    # what a dense site answers where a sparse one has an active set ------------------------
    def active_index(self):
        return torch.arange(self.info.numel, device=self.loc.device)

    def sparse_index(self):
        return None

    def active_mask(self):
        return torch.ones(self.info.shape, dtype=torch.bool, device=self.loc.device)

    @property
    def births(self):
        return torch.zeros(0, dtype=torch.int32, device=self.loc.device)

    def scale(self):
        return self._scale(self.unconstrained_scale)

    # the posterior ---------------------------------------------------------------------
    def sample(self):
        """Draw the site (inside its plates, which the guide enters): ``u`` at ``<name>_unconstrained``, then ``theta``."""
        loc, scale = self.loc, self.scale()
        if self.frames:  # in a subsampled plate: the minibatch's rows of the full-size parameters (else unchanged)
            loc = pyro.subsample(loc, event_dim=self.unconstrained_event_dim)
            scale = pyro.subsample(scale, event_dim=self.unconstrained_event_dim)
        u = pyro.sample(f"{self.site_name}_unconstrained", dist.Normal(loc, scale).to_event(self.unconstrained_event_dim),
                        infer={"is_auxiliary": True})
        value = self.transform(u)
        log_density = 0.0
        if poutine.get_mask() is not False:  # masked out: Pyro's AutoNormal skips the Jacobian too
            jac = self.transform.inv.log_abs_det_jacobian(value, u)
            log_density = sum_rightmost(jac, jac.dim() - value.dim() + self.event_dim)
        return pyro.sample(self.site_name, dist.Delta(value, log_density=log_density, event_dim=self.event_dim))

    def posterior(self):
        """The distribution of ``theta``: the Normal of ``u`` pushed through ``T`` (full plate size)."""
        base = dist.Normal(self.loc, self.scale()).to_event(self.unconstrained_event_dim)
        return dist.TransformedDistribution(base, [self.transform])

    def median(self):
        """``T(mu)``: the median of ``theta`` (``T`` is monotone coordinate-wise where it is elementwise)."""
        return self.transform(self.loc.detach()).clone()

    def quantiles(self, q):
        """``T`` of the Normal's quantiles ``q`` (shape ``(len(q),) + site shape``), as ``AutoNormal.quantiles``."""
        q = q.reshape((-1,) + (1,) * self.loc.dim())
        return self.transform(torch.distributions.Normal(self.loc.detach(), self.scale().detach()).icdf(q))

    # checkpoints ------------------------------------------------------------------------
    def check_state(self, loc=None, unconstrained_scale=None, index=None, births=None, names=None):
        """``ValueError`` naming the site if the saved means or scales hold non-finite values (a dense site has no
        indices or births to check)."""
        check_finite_parameters(self.site_name, loc, unconstrained_scale, names)


__all__ = ["DenseSite", "check_transformable", "is_real", "is_weight", "subsampled_frames", "to_support", "why_dense"]
