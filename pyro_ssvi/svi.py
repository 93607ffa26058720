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
"""

import contextlib
import math

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuideList
from pyro.infer import TraceTailAdaptive_ELBO
from pyro.infer.elbo import ELBO, ELBOModule
from pyro.infer.util import zero_grads
from pyro.optim import PyroOptim

from .criteria import RandomAddition, get_addition, get_removal, needs_gradient
from .finite import NonFiniteLossError, gradient_max_abs, is_data_error
from .distributed import (
    average_, broadcast_state, check_same_active_sets, check_same_structure, describe_state, is_distributed, shared_seed,
)
from .guide import inverse_scale_transform, sparse_parts
from .batched import BatchedLayersMessenger
from .handlers import DataGradientMessenger, SubspacePriorMessenger
from .optim import adam_param_groups, fresh_adam_correction, permute_optimizer_state, reset_optimizer_state
from .schedule import SwapSchedule
from .subspace import select_swap


#: Pyro's compiled ELBOs: they trace the loss once, with the active sets of that moment baked in
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


class _CallModel(torch.nn.Module):
    """A callable (SSVI's wrapped model) as a module, to stand in for an ELBOModule's model."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class SSVI:
    """Sparse Subspace Variational Inference: ``pyro.infer.SVI`` plus subspace updates.

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
        set the guide up first (``guide(*args)``) so its parameters exist.
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
        self._ddp = None
        if isinstance(loss, torch.nn.parallel.DistributedDataParallel):
            if not isinstance(loss.module, ELBOModule):
                raise ValueError(
                    "loss: a DistributedDataParallel loss must wrap Pyro's ELBOModule, "
                    f"DistributedDataParallel(Trace_ELBO()(model, guide)); it wraps {type(loss.module).__name__}"
                )
            if isinstance(optim, PyroOptim):
                raise ValueError("optim: with a DistributedDataParallel loss pass a torch.optim optimiser over its parameters")
            self._ddp, loss = loss, loss.module
        if isinstance(loss, ELBOModule):
            loss = loss.elbo
        if not isinstance(loss, ELBO):
            raise ValueError(f"loss: expected a pyro.infer ELBO (e.g. Trace_ELBO()), got {type(loss).__name__}")
        check_loss(loss)
        if not isinstance(optim, (PyroOptim, torch.optim.Optimizer)):
            raise ValueError(
                f"optim: expected a pyro.optim optimiser or a torch.optim.Optimizer, got {type(optim).__name__}"
            )
        if isinstance(optim, PyroOptim) and pyro.settings.get("module_local_params"):
            raise ValueError(
                "optim: with pyro.settings module_local_params=True, Pyro's param store does not see module "
                "parameters; pass a torch.optim optimiser over Trace_ELBO()(model, guide).parameters()"
            )
        self.schedule = SwapSchedule(total_steps, update_every, removal_fraction, stop_updates_at)
        self.removal = get_removal(removal)
        self.addition = get_addition(addition)
        if isinstance(new_loc, bool) or not isinstance(new_loc, (int, float)) or not math.isfinite(new_loc):
            raise ValueError(f"new_loc: expected a finite float, got {new_loc!r}")
        if not (new_scale == "mean" or (isinstance(new_scale, (int, float)) and not isinstance(new_scale, bool) and new_scale > 0)):
            raise ValueError(f"new_scale: expected 'mean' or a positive float, got {new_scale!r}")
        self.new_loc, self.new_scale = float(new_loc), new_scale
        if dense_grad_hook is not None and not callable(dense_grad_hook):
            raise ValueError(f"dense_grad_hook: expected a callable (site, grad) -> grad, got {dense_grad_hook!r}")
        self.dense_grad_hook = dense_grad_hook
        if optimizer_reset not in ("fresh", "zero"):
            raise ValueError(f"optimizer_reset: expected 'fresh' or 'zero', got {optimizer_reset!r}")
        self.optimizer_reset = optimizer_reset
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        self._prior_model = SubspacePriorMessenger(guide)(model)
        # vectorised particles arrive as a leading batch dim of every weight: batched F.linear / F.conv*
        self._batched = BatchedLayersMessenger(model) if getattr(loss, "vectorize_particles", False) else None
        self.local_reparameterization = bool(local_reparameterization)
        self._lrt = None
        if self.local_reparameterization:
            from .lrt import LocalReparameterizationMessenger

            self._lrt = LocalReparameterizationMessenger()
        self._model = self._wrap(self._prior_model)
        self.history = []
        self.process_group = process_group
        self.distributed = is_distributed(process_group)
        self._synced = False

    @property
    def step_count(self):
        """Steps taken so far (stored in the guide's ``ssvi_step`` buffer, so it is checkpointed)."""
        return int(self.sparse_guides[0].ssvi_step)

    def _wrap(self, model):
        # LRT's interception sits inside the batched layers', so it sees each call first
        model = self._lrt.scope_to(model) if self._lrt is not None else model
        return self._batched(model) if self._batched is not None else model

    def _context(self):
        return self._lrt if self._lrt is not None else contextlib.nullcontext()

    def step(self, *args, **kwargs):
        """One gradient step (and, on schedule, a subspace update). Returns the loss as a float
        (``inf`` under ``TraceTailAdaptive_ELBO``, which computes only a surrogate, as in ``pyro.infer.SVI``)."""
        t = self.step_count + 1
        with self._guard(t):
            self._setup(*args, **kwargs)
        if self.distributed and not self._synced:
            self._sync_initial_state()
        sparse = [name for _, name in self._sparse_sites()]
        update = bool(sparse) and self.schedule.is_update_step(t)
        # on update steps the model is handed probed samples: the probes' gradient is the data term's
        capture = DataGradientMessenger(sparse) if update and needs_gradient(self.addition) else None
        model = self._wrap(capture(self._prior_model)) if capture is not None else self._model
        with self._context(), self._guard(t):
            if isinstance(self.optim, PyroOptim):
                with poutine.trace(param_only=True) as param_capture:
                    loss = self.loss.loss_and_grads(model, self.guide, *args, **kwargs)
                # in trace (name) order, so that every rank all-reduces the same tensors in the same order
                params = list(dict.fromkeys(site["value"].unconstrained() for site in param_capture.trace.nodes.values()))
                self._checked_gradients(t, loss, params, average=self.distributed)
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
                loss = self._checked_gradients(t, loss_t, params, average=self.distributed and self._ddp is None)
                self.optim.step()
            self._after_optimizer_step()
        if update:
            self._update(t, capture.grads() if capture is not None else {})
        for guide in self.sparse_guides:
            guide.ssvi_step.add_(1)
        return loss

    def _setup(self, *args, **kwargs):
        if all(g.is_setup for g in self.sparse_guides):
            return
        if self.guide is self.sparse_guides[0]:
            self.guide.setup(*args, **kwargs)
        else:  # a guide list sets its parts up on its first call
            with poutine.block():
                self.guide(*args, **kwargs)
        if not all(g.is_setup for g in self.sparse_guides):
            raise RuntimeError("guide: a SparseSubspaceGuide part was not set up by calling the guide list once")
        counts = {int(g.ssvi_step) for g in self.sparse_guides}
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

    def _sync_initial_state(self):
        """Distributed set-up: the ranks' structures compared, then rank 0's guide and model state
        everywhere; random addition seeded alike."""
        check_same_structure(self._structure(), self.process_group)
        broadcast_state(self.guide, self.process_group)
        if isinstance(self.model, torch.nn.Module):
            broadcast_state(self.model, self.process_group)
        sites = self._sparse_sites()
        if sites and isinstance(self.addition, RandomAddition) and self.addition.generator is None:
            guide, name = sites[0]
            device = guide.active_index(name).device  # where candidates are scored
            generator = torch.Generator(device)
            generator.manual_seed(shared_seed(device, self.process_group))
            self.addition = RandomAddition(generator)
        self._synced = True

    def _structure(self):
        """What every rank must agree on before the first collective: each sparse site's shape and
        active count, and the shape and dtype of every tensor of the guide's (and model's) state."""
        out = {}
        for guide, name in self._sparse_sites():
            info = guide.site_info(name)
            out[f"site {name!r}"] = f"{info.k} of {info.numel} entries active, shape {tuple(info.shape)}"
        out.update(describe_state(self.guide, "guide tensor "))
        if isinstance(self.model, torch.nn.Module):
            out.update(describe_state(self.model, "model tensor "))
        return out

    def _sparse_sites(self):
        """``(part, site name)`` for every sparse site of every sparse part."""
        return [(g, name) for g in self.sparse_guides for name in g.sparse_site_names()]

    def _after_optimizer_step(self):
        """With ``optimizer_reset="fresh"``, refilled slots under Adam step like a fresh Adam."""
        if self.optimizer_reset != "fresh" or not self.history:  # nothing refilled yet
            return
        groups = adam_param_groups(self.optim)
        if not groups:
            return
        for guide, name in self._sparse_sites():
            params = (guide.loc(name), guide.unconstrained_scale(name))
            fresh_adam_correction(self.optim, params, guide.entry_births(name), groups)

    def differentiable_loss(self, *args, **kwargs):
        """The loss SSVI optimises, as a differentiable tensor, without a step or update.

        The same model SSVI trains: priors restricted to the active sets, local
        reparameterisation and batched layers (vectorised particles) as configured.
        """
        with self._guard(self.step_count + 1):
            self._setup(*args, **kwargs)
        with self._context():
            return self.loss.differentiable_loss(self._model, self.guide, *args, **kwargs)

    def evaluate_loss(self, *args, **kwargs):
        """The loss on ``args`` without a gradient step or update."""
        self._setup(*args, **kwargs)
        with torch.no_grad(), self._context():
            return float(self.loss.loss(self._model, self.guide, *args, **kwargs))

    def _non_finite_sites(self, params=()):
        """Names of what is not finite: sparse sites' parameters and gradients, other guide parts'
        parameters, and the gradients of ``params`` (the step's parameters) named where they can be."""
        bad = []
        for guide in self.sparse_guides:
            if not guide.is_setup:
                continue
            for name in guide.site_names:
                for what, p in (("loc", guide.loc(name)), ("scale", guide.unconstrained_scale(name))):
                    if not torch.isfinite(p).all():
                        bad.append(f"{name} ({what})")
                    elif p.grad is not None and not torch.isfinite(p.grad).all():
                        bad.append(f"{name} ({what} gradient)")
                with torch.no_grad():
                    if torch.isfinite(guide.unconstrained_scale(name)).all() and not (guide.scale(name) > 0).all():
                        bad.append(f"{name} (scale underflowed to 0)")
        known = {id(p) for g in self.sparse_guides for p in g.parameters()}
        names = self._parameter_names()
        for p in params:
            if id(p) not in known and p.grad is not None and not torch.isfinite(p.grad).all():
                bad.append(f"{names.get(id(p), 'an unnamed parameter')} (gradient)")
                known.add(id(p))
        other = [n for n, p in self.guide.named_parameters() if id(p) not in known and not torch.isfinite(p).all()]
        return bad + [f"{n} (other guide part)" for n in other]

    def _parameter_names(self):
        """``{id(parameter): name}`` for the guide's, the model's and Pyro's param store's parameters."""
        names = {id(p): n for n, p in pyro.get_param_store().named_parameters()}
        if isinstance(self.model, torch.nn.Module):
            names.update({id(p): f"model {n}" for n, p in self.model.named_parameters()})
        names.update({id(p): f"guide {n}" for n, p in self.guide.named_parameters()})
        return names

    def _fail(self, t, what, cause=None, params=()):
        bad = self._non_finite_sites(params)
        if bad:
            where = f"non-finite: {', '.join(bad)}. Training stopped; lower the learning rate or check the model and data"
        else:
            where = ("every guide parameter and gradient is finite, so the model or the data produced it: check "
                     "the inputs and the model's computation. Training stopped")
        raise NonFiniteLossError(f"step {t}: {what}; {where} (no parameter was changed by this step)") from cause

    def _checked_gradients(self, t, loss, params, average):
        """Average the gradients over ranks (when ``average``), then make sure that the loss and every
        gradient are finite before the optimiser may use them (one fused reduction, one synchronisation).

        Returns this rank's loss as a float. On a non-finite value the gradients are cleared and
        :class:`NonFiniteLossError` names the step and the sites; the parameters are unchanged. Under
        ``torch.distributed`` the check reads the averaged values, so every rank decides alike.
        """
        grads = [p.grad for p in params if p.grad is not None]
        check_loss = not isinstance(self.loss, TraceTailAdaptive_ELBO)  # it reports a surrogate's loss as inf
        local = loss.detach().reshape(1) if torch.is_tensor(loss) else torch.tensor([float(loss)])
        shared = local.to(grads[0], copy=True) if grads else local.clone()
        if average:  # the loss travels in the gradients' bucket: no extra collective
            average_(grads + [shared], self.process_group)
        # one transfer: the gradients' largest magnitude, the (averaged) loss and this rank's loss
        grad_max, shared_loss, value = torch.stack(
            [gradient_max_abs(grads).to(local).reshape(()), shared.to(local).reshape(()), local.reshape(())]
        ).tolist()
        lost = check_loss and not math.isfinite(shared_loss)
        if lost or not math.isfinite(grad_max):
            try:
                self._fail(t, f"the loss is {value}" if lost else "a gradient is not finite", params=params)
            finally:
                for p in params:
                    p.grad = None
        return value

    @contextlib.contextmanager
    def _guard(self, t):
        """Turn Pyro's validation errors about non-finite parameters into a :class:`NonFiniteLossError`;
        data errors (an observed value outside its support) and every other error pass unchanged."""
        try:
            yield
        except ValueError as e:
            if "invalid values" not in str(e) or is_data_error(e):
                raise
            self._fail(t, "a distribution got non-finite values: " + str(e).splitlines()[0], e)

    @torch.no_grad()
    def _update(self, t, grads):
        record = {"step": t, "fraction": self.schedule.fraction(t), "scheduled": {}, "swapped": {}, "abs_mean_overlap": {}}
        if self.distributed:  # one bucketed all-reduce, in site order (the same on every rank)
            average_([grads[name] for _, name in self._sparse_sites() if name in grads], self.process_group)
        for guide, name in self._sparse_sites():
            info = guide.site_info(name)
            n = self.schedule.num_swaps(info.k, t)
            record["scheduled"][name] = n
            record["swapped"][name] = 0
            if n == 0:
                continue
            loc, rho, index = guide.loc(name), guide.unconstrained_scale(name), guide.active_index(name)
            scores = self.removal(loc.detach(), guide.transform_scale(rho.detach()))
            if not torch.is_tensor(scores) or scores.shape != loc.shape:
                raise ValueError(f"removal: the criterion returned shape {getattr(scores, 'shape', None)} for site {name!r}, expected {tuple(loc.shape)}")
            grad = grads.pop(name, None)  # released after this site: one dense gradient alive at a time
            if grad is not None and self.dense_grad_hook is not None:
                grad = self.dense_grad_hook(name, grad)
            if grad is None and needs_gradient(self.addition):
                raise RuntimeError(
                    f"site {name!r}: no dense gradient was recorded on step {t}; the model does not use the "
                    "sampled value differentiably. Use addition='random' for such sites."
                )
            decision = select_swap(index, scores, n, info.numel, lambda cand: self.addition(grad, cand),
                                   overwrite_scores=getattr(self.addition, "fresh_scores", False))
            abs_removed = index[torch.topk(loc.abs(), n, largest=False, sorted=False).indices]
            overlap = torch.isin(decision.removed, abs_removed).sum().item() / n
            if self.new_scale == "mean":
                new_rho = rho.mean()
            else:
                new_rho = inverse_scale_transform(self.new_scale, guide.scale_transform).to(rho)
            # slots stay in the sparse kernels' (row-major) order: the optimiser state, reset at the refilled
            # slots (numbered as before the update), follows the guide's reordering
            perm = guide.replace_entries(name, decision.positions, decision.new_index, self.new_loc, new_rho, step=t, sort=True)
            reset_optimizer_state(self.optim, (loc, rho), decision.positions)
            if perm is not None:
                permute_optimizer_state(self.optim, (loc, rho), perm)
            record["swapped"][name] = int(decision.positions.numel())
            record["abs_mean_overlap"][name] = overlap
        self.history.append(record)
        if self.distributed:
            check_same_active_sets({name: g.active_index(name) for g, name in self._sparse_sites()}, t, self.process_group)

    def replaced_fraction(self):
        """Entries that actually changed over entries scheduled to swap, over all updates so far.

        An entry removed and re-added in the same update is scheduled but not replaced; a
        value near 0 means the addition criterion keeps choosing what removal just took out.
        Returns ``nan`` before the first update that schedules a swap.
        """
        scheduled = sum(sum(h.get("scheduled", {}).values()) for h in self.history)
        swapped = sum(sum(h["swapped"].values()) for h in self.history)
        return swapped / scheduled if scheduled else float("nan")

    def state_dict(self):
        """SSVI's own state: the update history and which sites use local reparameterisation.

        The step counter and active sets live in the guide's ``state_dict()``.
        """
        lrt = dict(self._lrt.eligible) if self._lrt is not None else {}
        return {"history": list(self.history), "lrt_eligible": lrt}

    def load_state_dict(self, state):
        self.history = list(state["history"])
        if self._lrt is not None:
            self._lrt.eligible.update(state.get("lrt_eligible", {}))


__all__ = [
    "JIT_ELBOS",
    "NonFiniteLossError",
    "SSVI",
    "check_loss",
]
