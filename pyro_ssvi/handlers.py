"""Effect handlers (poutine messengers) used by SSVI.

* :class:`SubspacePriorMessenger` (``subspace_prior``): restricts the model's
  priors on a guide's sparse sites to the active coordinates, so a Monte Carlo
  ELBO estimates the subspace ELBO ``E log p(D|theta) - KL(q || p_S)`` (Li, Miao,
  Qiu, Zhang, ICLR 2024, arXiv 2402.11025).
* :class:`DataGradientMessenger`: records the gradient of the loss along the
  model's use of chosen latent sites, i.e. of the data term alone, which is what
  gradient-based addition ranks candidates by.
* :class:`KLScaleMessenger`: weights the KL term (latent sites) of an ELBO.
"""

from collections.abc import Mapping

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_messenger import TraceMessenger

from .distributions import SubspacePrior
from .guide import sparse_parts
from .modes import handler_stack


class SubspacePriorMessenger(Messenger):
    r"""Replace each sparse site's prior ``p`` by ``p_S = prod_{i in S} p_i``.

    ``S`` is read from the guide's ``indices`` buffers at every site, so the
    handler follows subspace updates. Dense sites and observed sites are untouched.
    The prior's parameters may depend on other latent sites (a hierarchical prior such as
    ``Normal(0, tau * lambda)``): it is restricted to ``S`` afresh at every site, with
    whatever values they have in that pass. A plate-local site (inside a ``pyro.plate``, batch
    shape ``B``) is restricted over its whole coordinate set ``B + E``, and ``log p_S`` keeps one
    value per batch element, as the guide's ``log q`` and KL do.

    Wrap the model, not the guide::

        model_s = SubspacePriorMessenger(guide)(model)
        loss = Trace_ELBO().differentiable_loss(model_s, guide, x, y)

    :class:`~pyro_ssvi.SSVI` does this for you.

    :param guide: a :class:`~pyro_ssvi.SparseSubspaceGuide` or an ``AutoGuideList`` holding
        one or more of them (see :func:`~pyro_ssvi.guide.sparse_parts`).
    """

    def __init__(self, guide):
        super().__init__()
        self.guides = sparse_parts(guide)
        if not self.guides:
            raise ValueError(
                f"guide: expected a SparseSubspaceGuide or an AutoGuideList holding one, got {type(guide).__name__}"
            )

    def _pyro_sample(self, msg):
        if msg["is_observed"] or isinstance(msg["fn"], SubspacePrior):
            return
        for guide in self.guides:
            index = guide.sparse_index(msg["name"])
            if index is not None:
                msg["fn"] = SubspacePrior(msg["fn"], index, guide.site_info(msg["name"]).shape)
                return


def subspace_prior(fn, guide):
    """Functional form of :class:`SubspacePriorMessenger`: ``fn`` with its sparse priors restricted."""
    return SubspacePriorMessenger(guide)(fn)


class DataGradientMessenger(Messenger):
    r"""Record :math:`\partial \mathcal L / \partial \theta` along the model's use of the sites ``names``.

    A latent site's sample :math:`\theta` enters an ELBO three times: through the model's
    computation (the data term :math:`\log p(D \mid \theta)`), and, for Monte Carlo
    ELBOs, through :math:`\log p(\theta)` and :math:`-\log q(\theta)`. Only the first
    says which *inactive* weight would help the fit; the other two add about
    :math:`\epsilon / \sigma` at active entries (Li et al., ICLR 2024, arXiv 2402.11025,
    gradient-based addition). This handler hands the model
    :math:`\theta + \delta` with a zero probe :math:`\delta` that requires grad, *after*
    the ELBO's trace has recorded :math:`\theta`, so after ``backward()``

    .. math:: \delta.\mathrm{grad} = \frac{\partial \mathcal L}{\partial \theta}\Big|_{\text{model's use}}

    whatever the ELBO (``Trace_ELBO``, ``TraceMeanField_ELBO``, ``TraceGraph_ELBO``,
    ``RenyiELBO``...) and prior. Values are unchanged (``theta + 0``). Under
    :class:`~pyro_ssvi.LocalReparameterizationMessenger` the probe shifts the mean
    path, so the gradient is :math:`\partial \mathcal L / \partial \mu` of the dense mean.

    Apply it to the *model*, so it sits below the ELBO's trace::

        >>> import pyro, pyro.distributions as dist, torch
        >>> def model(x):
        ...     w = pyro.sample("w", dist.Normal(0., 1.).expand([3]).to_event(1))
        ...     pyro.sample("y", dist.Normal((x * w).sum(-1), 1.), obs=torch.tensor(1.))
        >>> def guide(x):
        ...     loc = pyro.param("loc", torch.zeros(3))
        ...     pyro.sample("w", dist.Normal(loc, 0.1).to_event(1))
        >>> probe = DataGradientMessenger(["w"])
        >>> pyro.infer.Trace_ELBO().differentiable_loss(probe(model), guide, torch.ones(3)).backward()
        >>> probe.grads()["w"].shape
        torch.Size([3])

    A site's gradient is flattened over its coordinate set: the event shape, or for a plate-local
    site (one of a :class:`~pyro_ssvi.SparseSubspaceGuide`'s, inside ``pyro.plate`` s) the whole
    ``plate batch + event`` shape, which the handler reads from the site's restricted prior
    (:class:`~pyro_ssvi.SubspacePrior`, as :class:`SubspacePriorMessenger` sets it) or from ``names``
    given as a mapping. Dims left of it (particles) are summed.

    :param names: latent site names to probe, or a mapping ``name -> number of coordinates``
        (``guide.site_info(name).numel``).
    """

    def __init__(self, names):
        super().__init__()
        self._numels = dict(names) if isinstance(names, Mapping) else {}
        self.names = frozenset(names)
        self._probes = []

    def _pyro_post_sample(self, msg):
        if msg["is_observed"] or msg["name"] not in self.names:
            return
        value = msg["value"]
        if not (torch.is_tensor(value) and value.requires_grad):
            return
        stack = handler_stack()
        here = stack.index(self)
        if not any(isinstance(f, TraceMessenger) for f in stack[:here]):
            raise RuntimeError(
                f"DataGradientMessenger: site {msg['name']!r} is not traced outside this handler; apply "
                "the handler to the model (probe(model)) and run the ELBO on it"
            )
        if any(isinstance(f, TraceMessenger) for f in stack[here + 1 :]):
            raise RuntimeError(
                f"DataGradientMessenger: site {msg['name']!r} is traced inside this handler, so the probe "
                "would reach log p and log q too; apply the handler to the model, not around the ELBO"
            )
        probe = torch.zeros(value.shape, dtype=value.dtype, device=value.device, requires_grad=True)
        msg["value"] = value + probe
        self._probes.append((msg["name"], probe, self._coordinate_numel(msg)))

    def _coordinate_numel(self, msg):
        numel = self._numels.get(msg["name"])
        if numel is None:
            numel = getattr(msg["fn"], "coordinate_numel", None)  # a SubspacePrior knows the site's plate dims
        return int(numel) if numel is not None else msg["fn"].event_shape.numel()

    def grads(self):
        """``{site: flat dense gradient}`` summed over every pass (particle) since the last call."""
        out = {}
        for name, probe, numel in self._probes:
            if probe.grad is not None:
                g = probe.grad.reshape(-1, numel)
                g = g[0] if g.shape[0] == 1 else g.sum(0)  # one pass: no dense copy
                out[name] = out[name] + g if name in out else g
        self._probes = []
        return out


class KLScaleMessenger(Messenger):
    """Multiply the log-density scale of every *latent* sample site by ``scale``.

    Applied around an ELBO step it weights the KL term (analytic or Monte Carlo) by ``scale``
    and leaves the likelihood alone, e.g. the reference recipe's ``kl_scale`` and warm-up::

        with KLScaleMessenger(0.01 * min(2 * t / T, 1.0)):
            svi.step(x, y)

    ``scale = 1`` is the true ELBO. ``scale`` may be changed between steps (``.scale = ...``).
    """

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and self.scale != 1.0:
            msg["scale"] = msg["scale"] * self.scale


__all__ = [
    "DataGradientMessenger",
    "KLScaleMessenger",
    "SubspacePriorMessenger",
    "subspace_prior",
]
