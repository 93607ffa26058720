r"""``SSVI``: stochastic variational inference with subspace updates (Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025).

A drop-in for :class:`pyro.infer.SVI`::

    for t = 1 .. T:
        one gradient step on the subspace ELBO (active coordinates only)
        if t % update_every == 0 and t < stop_updates_at * T:
            per sparse site: remove the floor(f(t) k) lowest-scoring active entries,
            add as many by the addition criterion, new entries at (new_loc, mean rho),
            reset the optimiser state of every changed slot

Unlike the reference code, the gradient step of an update iteration is *taken*;
its backward pass also provides the dense gradient that ``addition="gradient"``
ranks candidates by: the gradient of the data term alone,
:math:`\partial\, \mathbb E_q[-\log p(D_B \mid \theta)] / \partial \theta`, recorded by
:class:`~pyro_ssvi.DataGradientMessenger` along the model's use of each sample, so
Monte Carlo prior and entropy terms (``Trace_ELBO``, non-Normal priors) never enter
the ranking. It is only kept on update iterations.

:class:`SSVI` is a thin driver over named parts: :func:`training_model` wraps the model with
the handlers a step needs, :class:`~pyro_ssvi.updater.SubspaceUpdater` makes the updates,
:class:`~pyro_ssvi.finite.FiniteGuard` checks every step's loss and gradients, and
:func:`~pyro_ssvi.distributed.synchronise_start` sets up a distributed run.
"""

import contextlib

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuideList
from pyro.infer import TraceTailAdaptive_ELBO
from pyro.infer.elbo import ELBO, ELBOModule
from pyro.infer.util import zero_grads
from pyro.optim import PyroOptim

from .finite import FiniteGuard, NonFiniteLossError
from .distributed import is_distributed, synchronise_start
from .guide import sparse_parts
from .batched import BatchedLayersMessenger
from .handlers import DataGradientMessenger, subspace_prior
from .schedule import SwapSchedule
from .updater import SubspaceUpdater


#: Pyro's compiled ELBOs, refused by SSVI (they trace the loss once, with the active sets of that moment baked in)
JIT_ELBOS = tuple(
    getattr(pyro.infer, n)
    for n in ("JitTrace_ELBO", "JitTraceMeanField_ELBO", "JitTraceGraph_ELBO", "JitTraceEnum_ELBO")
    if hasattr(pyro.infer, n)
)


def check_loss(loss):
    """Raise ``ValueError`` naming the combination if SSVI cannot train with the ELBO ``loss``.

    * JIT ELBOs (``JitTrace_ELBO``, ``JitTraceMeanField_ELBO``...) compile the loss on the first
      step. The active indices are buffers, not inputs, so the compiled graph would keep
      gathering and scattering the *first* active set after every subspace update, and update
      steps hand the model probed samples that the compiled graph cannot see.
    * ``TraceTailAdaptive_ELBO`` needs ``num_particles > 1`` and ``vectorize_particles=True``
      (as in Pyro itself).
    """
    name = type(loss).__name__
    if isinstance(loss, JIT_ELBOS):
        base = name[3:] if name.startswith("Jit") else "the non-JIT ELBO"
        raise ValueError(
            f"loss: SSVI cannot train with {name}: the JIT compiles the loss once, with the active sets of "
            "that step as constants (index buffers are not inputs of the compiled graph), so after the first "
            f"subspace update it would keep using the old active set; use {base}() instead"
        )
    if isinstance(loss, TraceTailAdaptive_ELBO) and not (loss.vectorize_particles and loss.num_particles > 1):
        raise ValueError(
            f"loss: TraceTailAdaptive_ELBO needs num_particles > 1 and vectorize_particles=True, got "
            f"num_particles={loss.num_particles}, vectorize_particles={loss.vectorize_particles}"
        )


def normalise_loss(loss, optim):
    """``(elbo, ddp)``: the Pyro ELBO inside ``loss`` (an ELBO, an ``ELBOModule`` or a
    ``DistributedDataParallel`` around one) and the DDP wrapper or ``None``; ``ValueError`` naming the
    argument for anything SSVI cannot train with ``optim``."""
    ddp = None
    if isinstance(loss, torch.nn.parallel.DistributedDataParallel):
        if not isinstance(loss.module, ELBOModule):
            raise ValueError(
                "loss: a DistributedDataParallel loss must wrap Pyro's ELBOModule, "
                f"DistributedDataParallel(Trace_ELBO()(model, guide)); it wraps {type(loss.module).__name__}"
            )
        if isinstance(optim, PyroOptim):
            raise ValueError("optim: with a DistributedDataParallel loss pass a torch.optim optimiser over its parameters")
        ddp, loss = loss, loss.module
    if isinstance(loss, ELBOModule):
        loss = loss.elbo
    if not isinstance(loss, ELBO):
        raise ValueError(f"loss: expected a pyro.infer ELBO (e.g. Trace_ELBO()), got {type(loss).__name__}")
    check_loss(loss)
    if not isinstance(optim, (PyroOptim, torch.optim.Optimizer)):
        raise ValueError(f"optim: expected a pyro.optim optimiser or a torch.optim.Optimizer, got {type(optim).__name__}")
    if isinstance(optim, PyroOptim) and pyro.settings.get("module_local_params"):
        raise ValueError(
            "optim: with pyro.settings module_local_params=True, Pyro's param store does not see module "
            "parameters; pass a torch.optim optimiser over Trace_ELBO()(model, guide).parameters()"
        )
    return loss, ddp


def training_model(model, guide, *, lrt=None, batched=None, data_gradient=None):
    """The model as one SSVI step runs it, innermost first:

    * priors restricted to the guide's active sets (:class:`~pyro_ssvi.SubspacePriorMessenger`);
    * on update steps, ``data_gradient`` (a :class:`~pyro_ssvi.DataGradientMessenger`) records the
      data term's dense gradient;
    * ``lrt`` (a :class:`~pyro_ssvi.LocalReparameterizationMessenger`), scoped to the model's run;
    * ``batched`` (a :class:`~pyro_ssvi.BatchedLayersMessenger`) for vectorised particles: LRT's
      interception sits inside it, so it sees each layer call first.
    """
    model = subspace_prior(model, guide)
    if data_gradient is not None:
        model = data_gradient(model)
    if lrt is not None:
        model = lrt.scope_to(model)
    return batched(model) if batched is not None else model


class _CallModel(torch.nn.Module):
    """A callable (SSVI's wrapped model) as a module, to stand in for an ELBOModule's model."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class SSVI:
    """Sparse Subspace Variational Inference: ``pyro.infer.SVI`` plus subspace updates.

    It has ``SVI``'s interface (``step``, ``evaluate_loss``, ``model``, ``guide``, ``optim``,
    ``loss``) but is not a subclass: ``SVI`` refuses ``torch.optim`` optimisers and steps the
    optimiser right after the backward pass, where SSVI first averages the gradients over ranks
    and checks them (:class:`~pyro_ssvi.finite.FiniteGuard`).

        >>> import pyro.distributions as dist
        >>> from pyro.nn import PyroModule, PyroSample
        >>> from pyro_ssvi import SparseSubspaceGuide
        >>> pyro.clear_param_store()
        >>> class Regression(PyroModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = PyroSample(dist.Normal(0., 1.).expand([50]).to_event(1))
        ...     def forward(self, x, y=None):
        ...         mean = x @ self.w
        ...         with pyro.plate("data", x.shape[0]):
        ...             pyro.sample("y", dist.Normal(mean, 0.1), obs=y)
        >>> model = Regression()
        >>> guide = SparseSubspaceGuide(model, density=0.1)  # 5 of the 50 coefficients are random at any time
        >>> svi = SSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.TraceMeanField_ELBO(),
        ...            total_steps=40, update_every=10)
        >>> x = torch.randn(64, 50)
        >>> y = 2 * x[:, 7] + 0.1 * torch.randn(64)
        >>> losses = [svi.step(x, y) for _ in range(40)]
        >>> len(svi.history), guide.active_index("w").numel()   # updates at steps 10 and 20 (< 0.75 * 40)
        (2, 5)
        >>> pyro.clear_param_store()

    :param model: the Pyro model.
    :param guide: a :class:`~pyro_ssvi.SparseSubspaceGuide`, or an
        :class:`~pyro.infer.autoguide.AutoGuideList` (nested lists too) holding one or more of them
        next to other autoguides (``AutoNormal`` for a hierarchical prior's scales, ``AutoDelta``...).
        Every sparse part gets subspace updates and optimiser resets; the other parts train as
        under ``pyro.infer.SVI``.
    :param optim: a :class:`pyro.optim.PyroOptim` (e.g. ``pyro.optim.Adam({"lr": 1e-2})``) or a
        :class:`torch.optim.Optimizer` over the guide's (and model's) parameters; in the latter case
        set the guide up first (``guide(*args)``) so its parameters exist. ``pyro.optim`` keeps one
        optimiser per parameter, two per site; ``torch.optim.Adam(params, fused=True)`` steps them all
        in one kernel, and subspace updates reset and correct its state as they do ``pyro.optim``'s.
    :param loss: a Pyro ELBO (``Trace_ELBO()``, ``TraceMeanField_ELBO()``, ``TraceGraph_ELBO()``,
        ``RenyiELBO()``, ``TraceTailAdaptive_ELBO(num_particles=P, vectorize_particles=True)``), with
        ``num_particles`` sequential or vectorised, or the ``ELBOModule`` that ``elbo(model, guide)``
        returns, or ``DistributedDataParallel(elbo(model, guide))`` (Pyro's pattern with
        ``pyro.settings.set(module_local_params=True)`` and a ``torch.optim`` optimiser; DDP then
        averages the gradients). The JIT ELBOs are refused: a compiled loss would keep the active set it was
        traced with.
    :param int total_steps: ``T``, the number of steps the run will take.
    :param int update_every: ``DeltaT`` (default 100).
    :param float removal_fraction: ``alpha`` (default 0.3).
    :param float stop_updates_at: fraction of ``T`` after which the subspace is frozen (0.75).
    :param removal: a name from :data:`pyro_ssvi.criteria.REMOVAL_CRITERIA` or a callable
        ``(loc, scale) -> score`` (higher = keep). Default ``"snr_abs"``.
    :param addition: ``"gradient"`` (default), ``"random"`` or a callable ``(grad, candidates) -> scores``.
    :param float new_loc: mean of entries that enter the active set (default 0).
    :param new_scale: ``"mean"`` (default: the site's mean ``rho`` over its active entries,
        as the reference code) or a positive float, the new entries' standard deviation.
    :param callable dense_grad_hook: optional ``(site, grad) -> grad`` applied to each site's dense
        gradient before ``addition`` ranks candidates (under ``torch.distributed`` it receives the
        gradient already averaged over ranks).
    :param str optimizer_reset: what a refilled slot's optimiser state becomes. ``"fresh"``
        (default): zeroed, and with ``torch.optim.Adam`` / ``AdamW`` (also through ``pyro.optim``)
        the slot then steps exactly like a fresh Adam, its own bias correction included
        (:func:`~pyro_ssvi.fresh_adam_correction`). ``"zero"``: zeroed only; Adam's shared step
        count then makes the slot's first steps about 3x ``lr``.
    :param process_group: a ``torch.distributed`` process group. When one is given, or the
        default group is initialised, SSVI keeps every rank's subspace identical: it broadcasts
        the guide (and model) state from rank 0 at set-up, averages the gradients over ranks
        before each optimiser step, averages the dense gradients that ``addition="gradient"``
        ranks by, seeds ``addition="random"`` alike on every rank, and after each update checks
        that the active sets agree (:class:`~pyro_ssvi.distributed.SubspaceMismatchError` names
        the site and ranks otherwise). Each rank passes its own shard of the data to ``step``.
        A single process behaves exactly as without this argument.
    :param bool local_reparameterization: sample pre-activations instead of weights in
        ``F.linear``/``F.conv*`` (see :class:`pyro_ssvi.LocalReparameterizationMessenger`).
        Default ``False``: plain weight sampling, exactly what ``pyro.infer.SVI`` does.
    """

    def __init__(
        self,
        model,
        guide,
        optim,
        loss,
        *,
        total_steps,
        update_every=100,
        removal_fraction=0.3,
        stop_updates_at=0.75,
        removal="snr_abs",
        addition="gradient",
        new_loc=0.0,
        new_scale="mean",
        dense_grad_hook=None,
        optimizer_reset="fresh",
        local_reparameterization=False,
        process_group=None,
    ):
        self.sparse_guides = sparse_parts(guide)
        if not self.sparse_guides:
            if isinstance(guide, AutoGuideList):
                parts = ", ".join(type(p).__name__ for p in guide) or "none"
                raise ValueError(
                    f"guide: the AutoGuideList holds no SparseSubspaceGuide (parts: {parts}); SSVI needs at "
                    "least one sparse part (use pyro.infer.SVI for dense guides)"
                )
            raise ValueError(
                f"guide: expected a SparseSubspaceGuide or an AutoGuideList holding one, got {type(guide).__name__}"
            )
        loss, self._ddp = normalise_loss(loss, optim)
        self.updater = SubspaceUpdater(
            SwapSchedule(total_steps, update_every, removal_fraction, stop_updates_at), removal, addition,
            new_loc, new_scale, dense_grad_hook, optimizer_reset, process_group,
        )
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        # vectorised particles arrive as a leading batch dim of every weight: batched F.linear / F.conv*
        self._batched = BatchedLayersMessenger(model) if getattr(loss, "vectorize_particles", False) else None
        self.local_reparameterization = bool(local_reparameterization)
        self.lrt = None
        if self.local_reparameterization:
            from .lrt import LocalReparameterizationMessenger

            self.lrt = LocalReparameterizationMessenger()
        self._model = training_model(model, guide, lrt=self.lrt, batched=self._batched)
        self.process_group = process_group
        self.distributed = is_distributed(process_group)
        self.guard = FiniteGuard(self.sparse_guides, guide, model, check_loss=not isinstance(loss, TraceTailAdaptive_ELBO),
                                 process_group=process_group)
        self._synced = False

    @property
    def history(self):
        """One record per subspace update so far (see :meth:`SubspaceUpdater.update`)."""
        return self.updater.history

    @property
    def schedule(self):
        return self.updater.schedule

    @property
    def step_count(self):
        """Steps taken so far (stored in the guide's ``ssvi_step`` buffer, so it is checkpointed)."""
        return self.sparse_guides[0].step

    def sparse_sites(self):
        """``(part, site name)`` for every sparse site of every sparse part."""
        return [(g, name) for g in self.sparse_guides for name in g.sparse_site_names()]

    def _context(self):
        return self.lrt if self.lrt is not None else contextlib.nullcontext()

    def step(self, *args, **kwargs):
        """One gradient step (and, on schedule, a subspace update). Returns the loss as a float
        (``inf`` under ``TraceTailAdaptive_ELBO``, which computes only a surrogate, as in ``pyro.infer.SVI``)."""
        t = self.step_count + 1
        with self.guard.catching(t):
            self.setup(*args, **kwargs)
        sites = self.sparse_sites()
        if self.distributed and not self._synced:
            synchronise_start(sites, self.guide, self.model, self.process_group)
            if sites:  # random addition seeded alike on every rank, on the device candidates are scored
                self.updater.seed_alike(sites[0][0].active_index(sites[0][1]).device)
            self._synced = True
        update = bool(sites) and self.updater.is_update_step(t)
        # on update steps the model is handed probed samples: the probes' gradient is the data term's
        capture = None
        if update and self.updater.needs_gradient:  # each site's gradient over its whole coordinate set
            capture = DataGradientMessenger({name: g.site_info(name).numel for g, name in sites})
        model = self._model
        if capture is not None:
            model = training_model(self.model, self.guide, lrt=self.lrt, batched=self._batched, data_gradient=capture)
        with self._context(), self.guard.catching(t):
            if isinstance(self.optim, PyroOptim):
                with poutine.trace(param_only=True) as param_capture:
                    loss = self.loss.loss_and_grads(model, self.guide, *args, **kwargs)
                # in trace (name) order, so that every rank all-reduces the same tensors in the same order
                params = list(dict.fromkeys(site["value"].unconstrained() for site in param_capture.trace.nodes.values()))
                self.guard.checked_gradients(t, loss, params, average=self.distributed)
                self.optim(params)
                zero_grads(params)
            else:
                self.optim.zero_grad()
                if self._ddp is not None:  # through DDP's forward, so its reducer averages the gradients
                    loss_t = self._ddp_loss(model, *args, **kwargs)
                else:
                    loss_t = self.loss.differentiable_loss(model, self.guide, *args, **kwargs)
                loss_t.backward()
                params = [p for g in self.optim.param_groups for p in g["params"]]
                loss = self.guard.checked_gradients(t, loss_t, params, average=self.distributed and self._ddp is None)
                self.optim.step()
            self.updater.after_optimizer_step(sites, self.optim)
        if update:
            self.updater.update(t, sites, capture.grads() if capture is not None else {}, self.optim)
        for guide in self.sparse_guides:
            guide.advance_step()
        return loss

    def setup(self, *args, **kwargs):
        """Set the guide (every sparse part) up on a batch, without a step; done by the first step anyway."""
        if all(g.is_setup for g in self.sparse_guides):
            return
        if self.guide is self.sparse_guides[0]:
            self.guide.setup(*args, **kwargs)
        else:  # a guide list sets its parts up on its first call
            with poutine.block():
                self.guide(*args, **kwargs)
        if not all(g.is_setup for g in self.sparse_guides):
            raise RuntimeError("guide: a SparseSubspaceGuide part was not set up by calling the guide list once")
        counts = {g.step for g in self.sparse_guides}
        if len(counts) > 1:
            raise ValueError(f"guide: the sparse parts disagree on ssvi_step ({sorted(counts)}); load them from one checkpoint")

    def _ddp_loss(self, model, *args, **kwargs):
        """``ddp(*args)``, with the ELBOModule running SSVI's wrapped model in place of the user's."""
        elbo_module = self._ddp.module
        original = elbo_module.model
        elbo_module.model = _CallModel(model)
        try:
            return self._ddp(*args, **kwargs)
        finally:
            elbo_module.model = original

    def differentiable_loss(self, *args, **kwargs):
        """The loss SSVI optimises, as a differentiable tensor, without a step or update.

        The same model SSVI trains: priors restricted to the active sets, local
        reparameterisation and batched layers (vectorised particles) as configured.
        """
        with self.guard.catching(self.step_count + 1):
            self.setup(*args, **kwargs)
        with self._context():
            return self.loss.differentiable_loss(self._model, self.guide, *args, **kwargs)

    def evaluate_loss(self, *args, **kwargs):
        """The loss on ``args`` without a gradient step or update."""
        self.setup(*args, **kwargs)
        with torch.no_grad(), self._context():
            return float(self.loss.loss(self._model, self.guide, *args, **kwargs))

    def replaced_fraction(self):
        """Entries that actually changed over entries scheduled to swap, over all updates so far
        (:meth:`SubspaceUpdater.replaced_fraction`)."""
        return self.updater.replaced_fraction()

    def state_dict(self):
        """SSVI's own state: the update history and which sites use local reparameterisation.

        The step counter and active sets live in the guide's ``state_dict()``.
        """
        lrt = dict(self.lrt.eligible) if self.lrt is not None else {}
        return {**self.updater.state_dict(), "lrt_eligible": lrt}

    def load_state_dict(self, state):
        self.updater.load_state_dict(state)
        if self.lrt is not None:
            self.lrt.eligible.update(state.get("lrt_eligible", {}))


__all__ = [
    "JIT_ELBOS",
    "NonFiniteLossError",
    "SSVI",
    "check_loss",
    "normalise_loss",
    "training_model",
]
