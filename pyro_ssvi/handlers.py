"""Effect handlers (poutine messengers) used by SSVI.

* :class:`SubspacePriorMessenger` (``subspace_prior``): restricts the model's
  priors on a guide's sparse sites to the active coordinates (SPEC section 2), so
  a Monte Carlo ELBO estimates ``E log p(D|theta) - KL(q || p_S)``.
* :class:`KLScaleMessenger`: weights the KL term (latent sites) of an ELBO.
"""

from pyro.poutine.messenger import Messenger

from .distributions import SubspacePrior


class SubspacePriorMessenger(Messenger):
    r"""Replace each sparse site's prior ``p`` by ``p_S = prod_{i in S} p_i``.

    ``S`` is read from the guide's ``indices`` buffers at every site, so the
    handler follows subspace updates. Dense sites and observed sites are untouched.

    Wrap the model, not the guide::

        model_s = SubspacePriorMessenger(guide)(model)
        loss = Trace_ELBO().differentiable_loss(model_s, guide, x, y)

    :class:`~pyro_ssvi.SSVI` does this for you.
    """

    def __init__(self, guide):
        super().__init__()
        self.guide = guide

    def _pyro_sample(self, msg):
        if msg["is_observed"] or self.guide._sites is None:
            return
        info = self.guide._sites.get(msg["name"])
        if info is None or info.full or isinstance(msg["fn"], SubspacePrior):
            return
        msg["fn"] = SubspacePrior(msg["fn"], self.guide.active_index(msg["name"]))


def subspace_prior(fn, guide):
    """Functional form of :class:`SubspacePriorMessenger`: ``fn`` with its sparse priors restricted."""
    return SubspacePriorMessenger(guide)(fn)


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
