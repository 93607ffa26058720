"""``SparseSubspaceGuide``: a mean-field Normal guide that stores only an active set.

For each latent site ``theta`` (a weight tensor with ``d = numel`` coordinates) the
guide keeps ``k = round(density * d)`` active coordinates, in one
:class:`~pyro_ssvi.site.SparseSite` module per site (``guide.sites.<site>``), saved by
``state_dict()`` under these keys::

    indices.<site>               IntTensor  (k,)   flat positions of the active entries (int32 buffer,
                                                   int64 beyond 2^31 entries; empty for a dense site)
    births.<site>                IntTensor  (k,)   SSVI step at which each slot was last refilled
                                                   (0: since set-up; int32; empty for a dense site)
    locs.<site>                  Parameter  (k,)   mu
    unconstrained_scales.<site>  Parameter  (k,)   rho, sigma = softplus(rho) (or exp(rho))

and nothing of dense size: the prototype trace Pyro's autoguides keep (a full copy
of every weight) is dropped after set-up. Samples are drawn from
:class:`~pyro_ssvi.distributions.SparseNormal`, exactly zero off the active set.

A latent inside a (non-subsampled) ``pyro.plate``, e.g. per-task weights of batch shape
``B = (T,)`` and event shape ``E = (H, D)``, has the coordinate set ``B + E``: ``d = T H D``,
``k = round(density * d)`` active entries over the whole site (not per task), the same
criteria and updates as a global site, and its samples, ``median()`` and ``quantiles()`` have
the shapes ``AutoNormal`` gives it. The guide samples it inside the same plates, from a
:class:`~pyro_ssvi.distributions.SparseNormal` of batch shape ``B``, so every ELBO scales and
sums one term per batch element (the subspace ELBO of Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025,
unchanged, only partitioned by batch element).

The parameter tensors keep their size for the whole run: a subspace update
rewrites slots in place (:meth:`SparseSubspaceGuide.replace_entries`), so the
optimiser keeps tracking the same tensors and ``state_dict()`` (which includes the
indices and the ``ssvi_step`` counter) is a complete checkpoint. Every piece of
state is an ordinary buffer or parameter, so ``torch.distributed`` can broadcast it. Which kernel
each 2-d sparse site runs on is a :class:`~pyro_ssvi.kernels.KernelSelector`'s business; its
measured decisions are saved as the guide's extra state.
"""

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Mapping

import pyro
import torch
from pyro.infer.autoguide import AutoGuide, AutoGuideList
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule
from pyro.ops.tensor_utils import periodic_repeat

from .allocation import ALLOCATIONS, active_counts
from .dense_site import DenseSite, check_transformable, is_weight, subsampled_frames, to_support, why_dense
from .distributions import SparseNormal
from .kernels import KernelSelector, parse_decision_table
from .site import SiteInfo, SparseSite, scale_bijection


def init_to_normal(site=None, std=0.01):
    """Initialise each weight's mean at ``N(0, std^2)`` (the reference recipe: std 0.01), and every other site
    (:func:`~pyro_ssvi.dense_site.is_weight`: a scalar latent, a constrained support, a prior that couples its
    coordinates, a latent of a subsampled plate) where ``AutoNormal`` starts it: Pyro's ``init_to_feasible``."""
    if site is None:
        return functools.partial(init_to_normal, std=std)
    if not is_weight(site):
        return init_to_feasible(site)
    proto = site["fn"].sample().detach()
    return torch.randn_like(proto) * std


def _is_positive_float(value):
    """A finite positive number (``bool`` excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


#: where each field of a :class:`~pyro_ssvi.site.SparseSite` is saved in ``state_dict()``:
#: ``<container>.<site name>``, the layout of Pyro's ``AutoNormal`` (``locs.<site>``, ``scales.<site>``)
STATE_LAYOUT = (("loc", "locs"), ("unconstrained_scale", "unconstrained_scales"), ("index", "indices"), ("births", "births"))


def _to_saved_layout(guide, state_dict, prefix, local_metadata):
    """State-dict post-hook: ``sites.<site>.<field>`` (the module tree) -> ``<container>.<site>``,
    fields in :data:`STATE_LAYOUT` order, sites in model order."""
    if guide._sites is None:
        return
    for field, container in STATE_LAYOUT:
        for name in guide._sites:
            key = f"{prefix}sites.{name}.{field}"
            if key in state_dict:  # a dense site (pyro_ssvi.dense_site) has no index and no births
                state_dict[f"{prefix}{container}.{name}"] = state_dict.pop(key)


class SparseSubspaceGuide(AutoGuide):
    r"""Sparse mean-field Normal guide for SSVI (Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025).

    .. math:: q(\theta) = \prod_{i \in S} \mathcal N(\theta_i; \mu_i, \sigma_i^2) \prod_{i \notin S} \delta(\theta_i),
              \qquad |S| = \mathrm{round}(\mathrm{density} \cdot d) \text{ per site}

        >>> import pyro.distributions as dist
        >>> from pyro.nn import PyroModule, PyroSample
        >>> net = PyroModule[torch.nn.Linear](20, 5)
        >>> net.weight = PyroSample(dist.Normal(0., 1.).expand([5, 20]).to_event(2))
        >>> guide = SparseSubspaceGuide(net, density=0.1)
        >>> sample = guide(torch.randn(3, 20))["weight"]
        >>> int((sample != 0).sum()), guide.active_params, guide.dense_params
        (10, 10, 100)
        >>> pyro.clear_param_store()  # guides of one class share names in Pyro's param store

    **Which sites are sparse.** A *weight*: a real-valued site whose prior is factorised over its
    coordinates (``Normal(0, 1).expand(shape).to_event(n)``, Laplace, StudentT, scale mixtures),
    outside any subsampled plate. Every other continuous site is kept dense inside this guide with
    ``AutoNormal``'s parametrisation (:mod:`pyro_ssvi.dense_site`: a mean-field Normal in the
    unconstrained space of ``biject_to(support)``): a constrained support (a noise scale
    ``sigma ~ Uniform(0, 10)``, a hierarchical prior's ``tau ~ HalfNormal``, a ``Dirichlet``), a prior
    that couples coordinates (``MultivariateNormal``), a latent of a subsampled plate.
    :meth:`summary` says which sites are dense and why; subspace updates touch the sparse sites only.
    Discrete sites are refused (enumerate them, or give them their own guide in an ``AutoGuideList``).

        >>> def regression(x, y=None):  # Pyro's Bayesian regression tutorial, with its noise scale
        ...     w = pyro.sample("w", dist.Normal(0., 1.).expand([20]).to_event(1))
        ...     sigma = pyro.sample("sigma", dist.Uniform(0., 10.))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("obs", dist.Normal(x @ w, sigma), obs=y)
        >>> guide = SparseSubspaceGuide(regression, density=0.5)
        >>> _ = guide(torch.randn(8, 20), torch.randn(8))
        >>> {n: (v["active"], v["dense"]) for n, v in guide.summary().items()}
        {'w': (10, None), 'sigma': (1, 'support Interval(lower_bound=0.0, upper_bound=10.0) is not real')}
        >>> pyro.clear_param_store()

    :param callable model: a Pyro model (typically a ``PyroModule`` BNN with
        ``PyroSample`` priors). A weight's own dims must be event dims (write priors as
        ``Normal(0, 1).expand(shape).to_event(n)``); batch dims come only from enclosing
        ``pyro.plate`` s (plate-local latents, e.g. per-task weights: the whole ``plate batch + event``
        shape is then the site's coordinate set).
    :param density: fraction of each site's coordinates that are random variables:
        a float in ``(0, 1]`` for every site, or a mapping ``site name -> density``
        (sites it does not name are dense, density 1).
    :param str allocation: how a float ``density`` is spread over the sparse sites
        (:mod:`pyro_ssvi.allocation`): ``"uniform"`` (default, the paper's: every site keeps
        ``round(density * numel)``) or ``"erk"`` (Erdős–Rényi-Kernel, Evci et al. 2020: density
        proportional to ``sum(shape) / prod(shape)``, so small layers keep more, the total
        ``round(density * total)`` exactly). A mapping ``density`` sets every site itself and takes
        only ``"uniform"``. Saved in ``state_dict()``; loading a state of another allocation is refused.
    :param dense_sites: names of sites kept dense (density 1, still mean-field Normal),
        e.g. the first convolution in the reference recipe.
    :param callable init_loc_fn: a Pyro init function ``site -> value``; the value is
        read at the active coordinates once and discarded. Default (:func:`init_to_normal`): the
        weights at ``N(0, 0.01^2)`` (the recipe), every other site where ``AutoNormal`` starts it
        (``init_to_feasible``). A function passed here starts every site.
    :param str init_subspace: how each sparse site's initial active set is chosen: ``"random"``
        (default, the reference recipe: ``k`` entries uniformly at random) or ``"magnitude"``: the
        ``k`` entries of largest ``|value|`` of the site's initial value (what ``init_loc_fn``
        returns; ties go to the lower flat position). With Pyro's ``init_to_value(values=...)`` of a
        trained network (:func:`pyro_ssvi.pretrained_values`) the sparse posterior then starts on the
        network's largest weights, at their values, and training becomes fine-tuning.
    :param init_scale: initial standard deviation of the weights (:func:`~pyro_ssvi.dense_site.is_weight`:
        sites that can be sparse and have event dims): a float, or a pair ``(mean, std)`` for
        ``|N(mean, std^2)|`` draws (the reference code's ``(6e-4, 5e-4)``, the default).
    :param float dense_init_scale: initial standard deviation of every other site (scalar latents, and, in
        their unconstrained space, the sites that cannot be sparse); ``AutoNormal``'s default, 0.1.
    :param callable create_plates: as for Pyro's autoguides, a function of the model's arguments
        returning the ``pyro.plate`` (or plates) the guide creates before sampling, e.g. with the
        minibatch's ``subsample`` indices, so that the model's subsampled plate uses them.
    :param float relative_init_scale: if given, ``delta``: each active entry starts at
        ``sigma = delta * |mu|`` instead (MOPED, Krishnan, Subedar, Tickoo, AAAI 2020), floored at
        1e-8 (a zero mean gets ``init_scale``'s draw); for starting from a pretrained network.
    :param str scale_transform: ``"softplus"`` (default) or ``"exp"``: ``sigma = t(rho)``.
    :param sparse_kernels: how ``F.linear`` runs on a sparse 2-d site, and ``F.conv2d`` on a sparse
        4-d (convolution weight) site (:mod:`pyro_ssvi.kernels`): ``"auto"`` (default) measures the
        sparse kernel against the dense product the first time each call shape occurs and keeps
        the faster (the sparse one only when it is below ``kernels.SPARSE_MARGIN`` of the dense
        time); ``True`` always uses the sparse kernel; ``False`` never (samples are dense,
        zero-filled tensors). A mapping ``site name -> choice`` sets sites one by one (unnamed
        sites: ``"auto"``). Dense sites (density 1), plate-local sites, sites of other ranks and
        vectorised particles always run dense. :meth:`kernel_report` lists the measurements.
    """

    def __init__(
        self,
        model,
        density=0.1,
        *,
        allocation="uniform",
        dense_sites=(),
        init_loc_fn=init_to_normal,
        init_scale=(6e-4, 5e-4),
        dense_init_scale=0.1,
        scale_transform="softplus",
        sparse_kernels="auto",
        init_subspace="random",
        relative_init_scale=None,
        create_plates=None,
    ):
        self._density = self._check_density(density)
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation: expected one of {ALLOCATIONS}, got {allocation!r}")
        if allocation != "uniform" and isinstance(self._density, dict):
            raise ValueError(f"allocation={allocation!r} spreads one float density over the sites; a mapping density "
                             "sets each site itself: pass allocation='uniform' with it")
        self.allocation = allocation
        self.kernels = KernelSelector(self._check_kernels(sparse_kernels))
        if isinstance(dense_sites, str) or not all(isinstance(s, str) for s in dense_sites):
            raise ValueError(f"dense_sites: expected an iterable of site names, got {dense_sites!r}")
        self._dense_sites = frozenset(dense_sites)
        self._init_scale = self._check_init_scale(init_scale)
        if not _is_positive_float(dense_init_scale):
            raise ValueError(f"dense_init_scale: expected a positive float, got {dense_init_scale!r}")
        self._dense_init_scale = float(dense_init_scale)
        if init_subspace not in ("random", "magnitude"):
            raise ValueError(f"init_subspace: expected 'random' or 'magnitude', got {init_subspace!r}")
        self.init_subspace = init_subspace
        if relative_init_scale is not None and not _is_positive_float(relative_init_scale):
            raise ValueError(f"relative_init_scale: expected a positive float or None, got {relative_init_scale!r}")
        self._relative_init_scale = None if relative_init_scale is None else float(relative_init_scale)
        scale_bijection(scale_transform)  # or ValueError
        self.scale_transform = scale_transform
        if not callable(init_loc_fn):
            raise ValueError(f"init_loc_fn: expected a callable site -> value, got {init_loc_fn!r}")
        self.init_loc_fn = init_loc_fn
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)
        self._sites = None  # site name -> its SparseSite (also registered as self.sites.<name>), once set up
        self.register_buffer("ssvi_step", torch.zeros((), dtype=torch.long))
        self.register_state_dict_post_hook(_to_saved_layout)

    # argument checks -----------------------------------------------------------------
    @staticmethod
    def _check_per_site(arg, value, ok, expected):
        """``value`` (one setting, or a mapping site -> setting) after checking every setting with ``ok``."""
        if isinstance(value, Mapping):
            bad = {k: v for k, v in value.items() if not ok(v)}
            if bad:
                raise ValueError(f"{arg}: every value must be {expected}, got {bad}")
            return dict(value)
        if not ok(value):
            raise ValueError(f"{arg}: expected {expected} or a mapping site -> value, got {value!r}")
        return value

    @classmethod
    def _check_density(cls, density):
        def ok(x):
            return not isinstance(x, bool) and isinstance(x, (int, float)) and 0.0 < x <= 1.0

        density = cls._check_per_site("density", density, ok, "a float in (0, 1]")
        return density if isinstance(density, dict) else float(density)

    @staticmethod
    def _check_init_scale(init_scale):
        if isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool):
            if not init_scale > 0:
                raise ValueError(f"init_scale: expected a positive float, got {init_scale!r}")
            return float(init_scale)
        if (
            isinstance(init_scale, (tuple, list))
            and len(init_scale) == 2
            and all(isinstance(v, (int, float)) for v in init_scale)
            and init_scale[1] >= 0
            and abs(init_scale[0]) + init_scale[1] > 0
        ):
            return tuple(float(v) for v in init_scale)
        raise ValueError(f"init_scale: expected a positive float or a pair (mean, std), got {init_scale!r}")

    @classmethod
    def _check_kernels(cls, choice):
        return cls._check_per_site("sparse_kernels", choice, lambda v: v is True or v is False or v == "auto", "'auto', True or False")

    def _active_counts(self, shapes):
        """``{site: k}`` for the model's site ``shapes``: dense sites (``dense_sites``, density 1, sites a mapping
        does not name) keep every coordinate; a mapping's sites their own ``round(d * numel)``; a float
        ``density`` is spread over the other sites by ``allocation``."""
        counts = {n: s.numel() for n, s in shapes.items()}
        if isinstance(self._density, dict):
            named = {n: s for n, s in shapes.items() if n in self._density and n not in self._dense_sites}
            for n, s in named.items():
                counts.update(active_counts({n: s}, self._density[n]))
            return counts
        sparse = {n: s for n, s in shapes.items() if n not in self._dense_sites}
        counts.update(active_counts(sparse, self._density, self.allocation) if sparse else {})
        return counts

    # set-up --------------------------------------------------------------------------
    def setup(self, *args, **kwargs):
        """Trace the model once with these arguments and create the guide's state."""
        if self._sites is None:
            self._setup_prototype(*args, **kwargs)
        return self

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        sites = OrderedDict()
        self.sites = PyroModule()  # sites.<site name>: a SparseSite, nested by the dots of the name as in AutoNormal
        nodes = list(self.prototype_trace.iter_stochastic_nodes())
        reasons = {}
        for name, site in nodes:
            check_transformable(name, site["fn"].support)  # or ValueError: discrete and spherical sites
            reasons[name] = self._dense_reason(name, why_dense(site))
        counts = self._active_counts({name: site["fn"].batch_shape + site["fn"].event_shape for name, site in nodes
                                      if reasons[name] is None})
        for name, site in nodes:
            if reasons[name] is not None:
                sites[name] = self._dense_site(name, site, reasons[name])
                deep_setattr(self.sites, name, sites[name])
                continue
            fn = site["fn"]
            frames = ()
            if fn.batch_shape != torch.Size():
                frames = _plate_local_frames(name, site)  # or ValueError: dims outside plates
            shape = fn.batch_shape + fn.event_shape
            numel, k = shape.numel(), counts[name]
            value = site["value"].detach()
            info = SiteInfo(shape, numel, k, fn.batch_shape)
            index = None if info.full else self._initial_subspace(value, k).sort().values
            loc = value.reshape(-1) if info.full else value.reshape(-1)[index]
            scale = self._draw_scale(k, value, self._init_scale if is_weight(site) else self._dense_init_scale)
            if self._relative_init_scale is not None:
                relative = (self._relative_init_scale * loc.abs()).clamp_min(1e-8)
                scale = torch.where(loc != 0, relative, scale)
            sites[name] = SparseSite.initial(name, info, value, index, scale, self.scale_transform, frames=frames)
            deep_setattr(self.sites, name, sites[name])
        if not sites:
            raise ValueError("model: it has no latent sample site (no PyroSample prior) for the guide to fit")
        unknown = (set(self._density) if isinstance(self._density, dict) else set()) | self._dense_sites
        unknown -= set(sites)
        if unknown:
            raise ValueError(f"density/dense_sites: unknown site names {sorted(unknown)}; the model has {list(sites)}")
        self.kernels.check_site_names(list(sites))
        self._sites = sites
        # Drop the prototype trace: it holds a dense copy of every weight.
        self.prototype_trace = None

    def _dense_reason(self, name, reason):
        """``reason`` (why the site cannot be sparse, or ``None``), after refusing a mapping that asks it to be sparse."""
        if reason is not None and isinstance(self._density, dict) and self._density.get(name, 1.0) < 1.0:
            raise ValueError(f"density: site {name!r} cannot be sparse ({reason}); it is kept dense with AutoNormal's "
                             f"parametrisation: leave it out of the mapping or give it density 1")
        return reason

    def _dense_site(self, name, site, reason):
        """A :class:`~pyro_ssvi.dense_site.DenseSite` starting at the site's initial value, in the unconstrained
        space, at the full size of every subsampled plate (the minibatch's value repeated, as ``AutoNormal``)."""
        fn = site["fn"]
        frames = _plate_local_frames(name, site, subsampled=True) if fn.batch_shape != torch.Size() else ()
        value = site["value"].detach()
        u = to_support(fn.support).inv(value)
        u_event_dim = fn.event_dim + u.dim() - value.dim()
        batch = list(fn.batch_shape)
        for f, full in subsampled_frames(site):
            u = periodic_repeat(u, full, f.dim - u_event_dim).contiguous()
            batch[f.dim] = full
        shape = torch.Size(batch) + fn.event_shape
        info = SiteInfo(shape, shape.numel(), shape.numel(), torch.Size(batch))
        rho = scale_bijection(self.scale_transform).inv(torch.full_like(u, self._dense_init_scale))
        return DenseSite(name, info, fn.support, fn.event_dim, u.clone(), rho, reason, frames, self.scale_transform)

    def _initial_subspace(self, value, k):
        """Flat positions of a site's ``k`` initial active entries (see ``init_subspace``)."""
        if self.init_subspace == "magnitude":
            order = torch.argsort(value.reshape(-1).abs(), descending=True, stable=True)  # ties: lower position first
            return order[:k]
        return torch.randperm(value.numel(), device=value.device)[:k]

    @staticmethod
    def _draw_scale(k, like, init_scale):
        """``k`` initial standard deviations: ``init_scale`` itself (a float), or ``|N(mean, std^2)|`` draws (a pair)."""
        if isinstance(init_scale, float):
            return torch.full((k,), init_scale, dtype=like.dtype, device=like.device)
        mean, std = init_scale
        scale = (mean + std * torch.randn(k, dtype=like.dtype, device=like.device)).abs()
        return scale.clamp_min(1e-8)

    def _require_setup(self, what):
        if self._sites is None:
            raise RuntimeError(
                f"SparseSubspaceGuide.{what}: the guide is not set up yet; call guide(*model_args) "
                "or guide.setup(*model_args) once first"
            )

    # per-site accessors ---------------------------------------------------------------
    @property
    def is_setup(self):
        """Whether the guide has traced its model and created its state."""
        return self._sites is not None

    def site(self, name):
        """The :class:`~pyro_ssvi.site.SparseSite` module that holds site ``name`` 's parameters."""
        return self._site(name, "site")

    def _site(self, name, what="site_info"):
        self._require_setup(what)
        if name not in self._sites:
            raise KeyError(f"site {name!r} is not a latent site of this guide; sites: {list(self._sites)}")
        return self._sites[name]

    def sparse_index(self, name):
        """Active index of ``name`` if it is one of this guide's *sparse* sites, else ``None``.

        ``None`` for dense sites, for names this guide does not hold and before set-up; handlers
        use it to decide whether to restrict a prior (:class:`~pyro_ssvi.handlers.SubspacePriorMessenger`).
        """
        site = self._sites.get(name) if self._sites is not None else None
        return None if site is None else site.sparse_index()

    @property
    def site_names(self):
        self._require_setup("site_names")
        return tuple(self._sites)

    def sparse_site_names(self):
        """Sites with fewer active entries than coordinates (the ones subspace updates touch)."""
        self._require_setup("sparse_site_names")
        return tuple(n for n, s in self._sites.items() if not s.info.full)

    def site_info(self, name):
        """The site's :class:`~pyro_ssvi.site.SiteInfo`: ``shape``, ``numel``, ``k``, ``batch_shape``."""
        return self._site(name).info

    def loc(self, name):
        """The means ``mu`` of the site's slots (the parameter itself, shape ``(k,)``)."""
        return self._site(name).loc

    def unconstrained_scale(self, name):
        """The unconstrained scales ``rho`` of the site's slots (the parameter itself, shape ``(k,)``)."""
        return self._site(name).unconstrained_scale

    def active_index(self, name):
        """Flat positions of the active entries (the stored buffer; ``arange`` for a dense site)."""
        return self._site(name).active_index()

    @property
    def step(self):
        """The SSVI steps this guide has been trained for (its ``ssvi_step`` buffer, checkpointed with it).

        Read from a host-side copy while the buffer is unchanged but for :meth:`advance_step`, so that
        a training step does not wait for the device to read it; loading a state, moving the guide or
        writing the buffer in place (anything its version counter sees: not writes through ``.data``
        or a NumPy view) makes the next read come from the buffer."""
        buffer, cached = self.ssvi_step, self.__dict__.get("_step_seen")
        if cached is None or cached[0] is not buffer or cached[1] != buffer._version:
            cached = self.__dict__["_step_seen"] = (buffer, buffer._version, int(buffer))
        return cached[2]

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_step_seen", None)  # a copy's buffer starts a new version count: read it afresh
        return state

    def advance_step(self):
        """Count one training step (:class:`~pyro_ssvi.SSVI` calls it after each step): entries refilled
        later are born at the new count, and a resumed run continues the schedule from it."""
        now = self.step
        with torch.no_grad():
            self.ssvi_step.add_(1)
        self.__dict__["_step_seen"] = (self.ssvi_step, self.ssvi_step._version, now + 1)

    def entry_births(self, name):
        """Step at which each storage slot of ``name`` was last refilled by a subspace update (0: never).

        ``ssvi_step - births`` is each active entry's age; SSVI uses it to give refilled slots a
        fresh Adam (:func:`pyro_ssvi.fresh_adam_correction`). A dense site has no births (empty).
        """
        return self._site(name).births

    def active_mask(self, name):
        """Boolean tensor shaped like the site, true on the active set."""
        return self._site(name).active_mask()

    @property
    def locs(self):
        """Every site's ``loc``, at ``locs.<site name>`` (a module built on each access, for optimiser
        groups such as ``guide.locs.parameters()``; the parameters themselves live in ``sites``)."""
        return self._field_view("locs", "loc")

    @property
    def unconstrained_scales(self):
        """Every site's ``unconstrained_scale``, at ``unconstrained_scales.<site name>`` (as :attr:`locs`)."""
        return self._field_view("unconstrained_scales", "unconstrained_scale")

    def _field_view(self, what, field):
        if self._sites is None:  # as an attribute the guide does not have yet
            raise AttributeError(f"SparseSubspaceGuide.{what}: the guide is not set up yet")
        view = PyroModule()
        for name, site in self._sites.items():
            deep_setattr(view, name, site._parameters[field])  # the parameter itself, not a pyro.param
        return view

    def transform_scale(self, rho):
        """``sigma = t(rho)`` for this guide's ``scale_transform`` (:func:`~pyro_ssvi.site.scale_bijection`)."""
        return scale_bijection(self.scale_transform)(rho)

    def scale(self, name):
        return self.transform_scale(self.unconstrained_scale(name))

    def get_posterior(self, name):
        """The site's :class:`~pyro_ssvi.distributions.SparseNormal`; for a dense site of ``AutoNormal``'s kind
        (:mod:`pyro_ssvi.dense_site`) the Normal in its unconstrained space pushed through ``biject_to(support)``."""
        site = self._site(name)
        if isinstance(site, DenseSite):
            return site.posterior()
        info = site.info
        index = None if info.full else self.active_index(name)
        return SparseNormal(self.loc(name), self.scale(name), index, info.shape, pattern=self.kernel_pattern(name),
                            event_dim=len(info.event_shape))

    # kernel choice (pyro_ssvi.kernels.KernelSelector) -----------------------------------
    def kernel_pattern(self, name):
        """The site's :class:`~pyro_ssvi.kernels.LinearPattern` (rebuilt when its active set has changed),
        or ``None`` when the site runs dense (see ``sparse_kernels``)."""
        site = self._site(name)
        return self.kernels.pattern(name, site.info, site.active_index())

    def kernel_report(self):
        """``{site: [{"rows", "dtype", "device", "input_grad", "value_grad", "sparse", "dense_s",
        "sparse_s"}, ...]}``: the measured kernel choices of each 2-d sparse site, one entry per call
        shape met so far (plus ``{"sparse": True, "forced": True}`` for a site forced onto the sparse
        kernel). The same table is saved in ``state_dict()`` (see :meth:`kernel_decisions`)."""
        self._require_setup("kernel_report")
        return self.kernels.report()

    def kernel_decisions(self):
        """The sparse-or-dense choice of every site and call shape met, as plain data:
        ``{site: [{"rows", "dtype", "device", "input_grad", "value_grad", "sparse", "dense_s", "sparse_s"}]}``
        (``"follows"``: the measured shape a rule took the choice from, see
        :meth:`~pyro_ssvi.kernels.LinearPattern.use_sparse`).

        ``sparse_kernels="auto"`` times both paths at a site's first training call, so which path runs
        would otherwise depend on the machine's load; every other call shape follows that measurement by
        fixed rules. The table is part of ``state_dict()`` (the module's extra state): a run resumed
        from a checkpoint takes the paths the first run took, whatever the load and whatever shapes it
        meets after the resume, and its float rounding is the same. To fix the choices of a new run,
        pass a table (e.g. from an earlier run) to :meth:`set_kernel_decisions`, or choose per site
        with ``sparse_kernels=True / False``."""
        return self.kernels.decision_table()

    def set_kernel_decisions(self, table):
        """Use the choices of ``table`` (as :meth:`kernel_decisions` returns) instead of measuring
        those call shapes; sites it names lose their other choices. A site the table leaves without a
        measured choice measures at its next training call, as a fresh guide does."""
        self.kernels.set_decision_table(table, list(self._sites or ()))

    def get_extra_state(self):
        """What ``state_dict()`` saves beside the tensors: the allocation and the kernel choices."""
        return {"allocation": self.allocation, "kernel_decisions": self.kernel_decisions()}

    def set_extra_state(self, state):
        self.set_kernel_decisions(state.get("kernel_decisions", {}))

    # Pyro guide ------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Sample every latent site; returns ``{site name: sample}``.

        A sample is the site's dense tensor, or for a 2-d site on sparse kernels a
        :class:`~pyro_ssvi.kernels.SparseWeight` that behaves as that dense tensor. Under ``torch.jit``
        tracing (a JIT ELBO, a traced ``Predictive``) every site runs dense, and the trace holds the
        active sets as constants: a JIT ELBO is right for plain ``SVI`` (no subspace updates), and
        :class:`~pyro_ssvi.SSVI` refuses it."""
        if self._sites is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)  # create_plates: the guide draws the plates' subsamples, as AutoNormal
        result = {}
        for name, site in self._sites.items():
            dense = isinstance(site, DenseSite)
            with contextlib.ExitStack() as stack:  # a plate-local site is drawn inside its plates, as in the model
                for frame in site.frames:
                    plate = plates[frame]
                    if plate.subsample_size != plate.size and not dense:
                        raise ValueError(_subsampled_message(name, frame, plate.subsample_size, plate.size))
                    stack.enter_context(plate)
                result[name] = site.sample() if dense else pyro.sample(name, self.get_posterior(name))
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """Posterior median (= mean) of every site as a dense tensor, exact zeros off the active set
        (a plate-local site: its whole ``plate batch + event`` shape, as ``AutoNormal.median``)."""
        self._require_setup("median")
        return {name: site.median() if isinstance(site, DenseSite) else self.get_posterior(name).mean.detach().clone()
                for name, site in self._sites.items()}

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs):
        """Posterior quantiles: ``{site: tensor of shape (len(quantiles),) + site shape}``.

        Inactive coordinates are point masses at zero, so every quantile there is 0.
        """
        self._require_setup("quantiles")
        out = {}
        for name, site in self._sites.items():
            q = torch.as_tensor(quantiles, dtype=site.loc.dtype, device=site.loc.device).reshape(-1)
            if not ((q > 0) & (q < 1)).all():
                raise ValueError(f"quantiles: expected values in (0, 1), got {quantiles!r}")
            if isinstance(site, DenseSite):
                out[name] = site.quantiles(q)
                continue
            fn = self.get_posterior(name)
            out[name] = site.dense(torch.distributions.Normal(fn.loc, fn.scale).icdf(q.reshape(-1, 1)))
        return out

    # bookkeeping -----------------------------------------------------------------------
    def summary(self):
        """Per-site active counts: ``{site: {"active", "numel", "density", "shape", "dense"}}``; ``"dense"`` says why a
        site keeps every coordinate (``None`` for a sparse site): ``"dense_sites"``, ``"density 1"``, or why it cannot
        be sparse (:func:`~pyro_ssvi.dense_site.why_dense`: it then has ``AutoNormal``'s parametrisation)."""
        self._require_setup("summary")
        return {n: {"active": site.info.k, "numel": site.info.numel, "density": site.info.k / site.info.numel,
                    "shape": tuple(site.info.shape), "dense": self._why_full(n, site)} for n, site in self._sites.items()}

    def _why_full(self, name, site):
        if isinstance(site, DenseSite):
            return site.reason
        if not site.info.full:
            return None
        return "dense_sites" if name in self._dense_sites else "density 1"

    def summary_table(self):
        """The :meth:`summary` as an aligned text table."""
        rows = [(n, str(v["shape"]), str(v["active"]), str(v["numel"]), f"{v['density']:.4f}", v["dense"] or "")
                for n, v in self.summary().items()]
        rows.append(("total", "", str(self.active_params), str(self.dense_params), f"{self.active_params / self.dense_params:.4f}", ""))
        head = ("site", "shape", "active", "numel", "density", "dense because")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(6)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])

    @property
    def active_params(self):
        """Number of random (active) coordinates over all sites."""
        self._require_setup("active_params")
        return sum(s.info.k for s in self._sites.values())

    @property
    def dense_params(self):
        """Number of coordinates the latent sites have in all."""
        self._require_setup("dense_params")
        return sum(s.info.numel for s in self._sites.values())

    def extra_repr(self):
        if self._sites is None:
            return "not set up"
        return f"sites={len(self._sites)}, active={self.active_params}, dense={self.dense_params}"

    @torch.no_grad()
    def replace_entries(self, name, positions, new_index, loc, unconstrained_scale, step=None, sort=False):
        """Put new entries ``new_index`` into storage slots ``positions`` (in place).

        :param loc: value(s) for the new entries' means.
        :param unconstrained_scale: value(s) for their ``rho``.
        :param int step: recorded in :meth:`entry_births` for these slots: the first step the new
            entries take part in, minus one. Default: the current ``ssvi_step`` plus one (the
            update belongs to the step being taken).
        :param bool sort: then reorder the site's slots by flat position, the row-major order the
            sparse kernels read (so they need no permutation of the values), and return the
            permutation ``perm`` applied: slot ``i`` now holds what slot ``perm[i]`` held. Apply it to
            per-slot state kept elsewhere (:func:`~pyro_ssvi.optim.permute_optimizer_state`).
            :class:`~pyro_ssvi.SSVI` does so.
        :returns: ``perm`` when ``sort`` reordered the slots, else ``None``.

            >>> import pyro.distributions as dist
            >>> from pyro.nn import PyroModule, PyroSample
            >>> net = PyroModule[torch.nn.Linear](4, 2, bias=False)
            >>> net.weight = PyroSample(dist.Normal(0., 1.).expand([2, 4]).to_event(2))
            >>> guide = SparseSubspaceGuide(net, density=0.5)
            >>> _ = guide(torch.randn(3, 4))
            >>> index = guide.active_index("weight")
            >>> new = torch.tensor([i for i in range(8) if i not in index.tolist()][-1:])
            >>> kept = index[1:].clone()
            >>> perm = guide.replace_entries("weight", torch.tensor([0]), new, 0.0, -3.0, sort=True)
            >>> torch.equal(index, torch.cat([kept, new.to(index)]).sort().values)  # slots in row-major order
            True
        """
        site = self._site(name)
        if isinstance(site, DenseSite):
            raise ValueError(f"site {name!r} is dense ({site.reason}): it has no active set to replace entries of")
        step = int(self.ssvi_step) + 1 if step is None else int(step)
        if not site.replace(positions, new_index, loc, unconstrained_scale, step):
            return None
        perm = site.sort_slots() if sort else None
        self.kernel_pattern(name)  # the active set changed: rebuild its sparse-kernel structure now, not in the next step
        return perm

    # checkpoints -----------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load a checkpoint of this guide, all or nothing.

        The whole state dict is checked before anything is copied (:meth:`check_state_dict`); on a
        problem a ``ValueError`` names the site and the guide is left exactly as it was. A checkpoint
        written before kernel choices were saved (no ``_extra_state``) loads with none.
        """
        self._require_setup("load_state_dict")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # called for this module before its submodules (also inside an AutoGuideList): check everything first
        self._require_setup("load_state_dict")
        self.check_state_dict(state_dict, prefix, strict=strict)
        state_dict.setdefault(prefix + "_extra_state", {"kernel_decisions": {}})  # a copy made by load_state_dict
        for field, container in STATE_LAYOUT:  # the saved layout -> the module tree, for the site modules to load
            for name in self._sites:
                key = f"{prefix}{container}.{name}"
                if key in state_dict:
                    state_dict[f"{prefix}sites.{name}.{field}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def check_state_dict(self, state_dict, prefix="", strict=True):
        """Raise ``ValueError`` naming the site (or key) if ``state_dict`` (keys under ``prefix``) cannot be
        loaded into this guide: missing or unexpected keys (with ``strict``), a tensor of another shape
        or dtype kind, non-finite means or scales, active indices out of ``[0, numel)`` or repeated,
        negative births, another ``allocation``. Slots may come in any order (SSVI keeps them in row-major
        order; the kernels accept any), each with its own index, mean, scale and birth."""
        self._require_setup("check_state_dict")
        own = self.state_dict()
        given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        extra = given.get("_extra_state")
        saved = extra.get("allocation", "uniform") if isinstance(extra, Mapping) else "uniform"  # older states: uniform
        if saved != self.allocation:
            raise ValueError(f"state_dict: written by a guide with allocation={saved!r}, this guide has "
                             f"allocation={self.allocation!r}; build the guide with the state's allocation")
        if strict:
            missing = [k for k in own if k not in given and k != "_extra_state"]
            unexpected = [k for k in given if k not in own]
            if missing or unexpected:
                raise ValueError(f"state_dict: missing keys {missing}, unexpected keys {unexpected} for this guide "
                                 f"(sites {list(self._sites)})")
        for key, value in given.items():
            if key == "_extra_state" or key not in own:
                continue
            mine = own[key]
            if not torch.is_tensor(value) or value.shape != mine.shape or value.is_floating_point() != mine.is_floating_point():
                got = f"{tuple(value.shape)} {value.dtype}" if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"state_dict: {key!r} is {got}, this guide expects {tuple(mine.shape)} {mine.dtype}"
                                 f"{self._site_hint(key)}")
        step = given.get("ssvi_step", self.ssvi_step)
        if int(step) < 0:
            raise ValueError(f"state_dict: ssvi_step is {int(step)}, expected >= 0")
        for name, site in self._sites.items():
            site.check_state(**{field: given.get(f"{container}.{name}") for field, container in STATE_LAYOUT},
                             names=dict(STATE_LAYOUT))
        if "_extra_state" in given:
            try:
                parse_decision_table(given["_extra_state"].get("kernel_decisions", {}))
            except (AttributeError, TypeError, ValueError) as e:
                raise ValueError(f"state_dict: _extra_state: {e}") from e

    def _site_hint(self, key):
        """``" (site 'x': the checkpoint's active count differs: another density?)"`` for a site's key."""
        for _, container in STATE_LAYOUT:
            part = container + "."
            if key.startswith(part) and key[len(part):] in self._sites:
                name = key[len(part):]
                return f" (site {name!r} with {self._sites[name].info.k} active entries: written with another density or network?)"
        return ""


def _plate_local_frames(name, site, subsampled=False):
    r"""Names of the vectorised plates a site with a batch shape is local to, or ``ValueError``.

    Every batch dim of size above 1 must be the dim of an enclosing ``pyro.plate`` of that size
    (size-1 dims are broadcasting); the site's coordinate set is then ``batch + event`` shape.
    Refused: a batch shape outside any plate, dims that are no plate's (both: declare them as
    event dims), and, unless ``subsampled`` (a dense site's plates), plates that are subsampled
    (:func:`_subsampled_message`).
    """
    fn = site["fn"]
    frames = [f for f in site["cond_indep_stack"] if f.vectorized]
    batch = fn.batch_shape
    if not frames:
        raise ValueError(_batch_shape_message(name, site))
    refused = [] if subsampled else subsampled_frames(site)
    if refused:
        f, full = refused[0]
        raise ValueError(_subsampled_message(name, f.name, f.size, full))
    by_dim = {f.dim: f for f in frames}
    for i in range(-len(batch), 0):
        if batch[i] != 1 and (i not in by_dim or by_dim[i].size != batch[i]):
            plates = ", ".join(f"pyro.plate({f.name!r}) at dim {f.dim}" for f in frames)
            raise ValueError(
                f"site {name!r}: prior has batch shape {tuple(batch)} inside {plates}, but dim {i} (size {batch[i]}) "
                f"is no plate's dim; declare the weight's own dims as event dims with prior.to_event(n), so that "
                f"only plate dims remain batch dims"
            )
    return tuple(f.name for f in frames)


def _subsampled_message(name, plate, subsample_size, size):
    """Why a sparse latent met in a subsampled plate after a set-up on the full plate is refused, and what works."""
    return (
        f"site {name!r}: it is local to pyro.plate({plate!r}), which this call subsamples (subsample_size "
        f"{subsample_size} of {size}) but the guide's set-up call did not, so the site was made sparse; a sparse site "
        f"needs its whole plate. Set the guide up with a subsampled call (guide.setup(*minibatch_args)): a latent of a "
        f"subsampled plate is then kept dense with AutoNormal's parametrisation, subsampled as AutoNormal does"
    )


def _batch_shape_message(name, site):
    """Why a site with a batch shape outside any plate cannot be sparse: dims not declared as event dims."""
    fn = site["fn"]
    return (
        f"site {name!r}: prior has batch shape {tuple(fn.batch_shape)} outside any plate; declare the weight's dims "
        f"as event dims, e.g. prior.to_event({len(fn.batch_shape)})"
    )


def sparse_parts(guide):
    """The :class:`SparseSubspaceGuide` s in ``guide``, in order.

    ``guide`` itself if it is one; the parts of an :class:`~pyro.infer.autoguide.AutoGuideList`
    (nested lists too) that are; ``()`` otherwise.

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoGuideList, AutoNormal
        >>> def model():
        ...     tau = pyro.sample("tau", dist.HalfCauchy(1.))
        ...     pyro.sample("w", dist.Normal(0., tau).expand([10]).to_event(1))
        >>> guide = AutoGuideList(model)
        >>> guide.append(SparseSubspaceGuide(pyro.poutine.block(model, expose=["w"]), density=0.3))
        >>> guide.append(AutoNormal(pyro.poutine.block(model, hide=["w"])))
        >>> [type(g).__name__ for g in sparse_parts(guide)]
        ['SparseSubspaceGuide']
    """
    if isinstance(guide, SparseSubspaceGuide):
        return (guide,)
    if isinstance(guide, AutoGuideList):
        return tuple(p for part in guide for p in sparse_parts(part))
    return ()


def inverse_scale_transform(scale, transform="softplus"):
    """``rho`` such that ``transform(rho) == scale`` (:func:`~pyro_ssvi.site.scale_bijection`'s inverse)."""
    return scale_bijection(transform).inv(torch.as_tensor(scale))


__all__ = ["SparseSubspaceGuide", "init_to_normal", "inverse_scale_transform", "sparse_parts"]
