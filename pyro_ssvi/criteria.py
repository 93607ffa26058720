r"""Removal and addition scores for subspace updates (Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025).

Every removal score is a pure function ``score(loc, scale) -> Tensor`` of the
active coordinates' posterior ``Normal(loc, scale^2)``; a **higher score means more
important**, and an update removes the lowest-scoring active entries.

With :math:`a = |\mu| / \sigma`, :math:`X = |\theta|` a folded normal and
:math:`\delta(a) = \sqrt{2/\pi}\, e^{-a^2/2} - a\,\mathrm{erfc}(a/\sqrt2) \ge 0`:

====================  ==================================================================
``abs_mean``          :math:`|\mu|`
``snr``               :math:`|\mu| / \sigma`
``abs_expectation``   :math:`E X = |\mu| + \sigma\,\delta(a)`
``snr_abs``           :math:`E X / \sqrt{\mathrm{Var}\,X} = (a + \delta) / \sqrt{1 - 2a\delta - \delta^2}`
``exp_abs``           :math:`\log E e^{\lambda X}` (log space: same ranking, never overflows)
``snr_exp_abs``       :math:`E e^{\lambda X} / \mathrm{sd}(e^{\lambda X}) = 1/\sqrt{\mathrm{expm1}(D)}`,
                      :math:`D = \log E e^{2\lambda X} - 2 \log E e^{\lambda X}`
====================  ==================================================================

The forms above avoid the cancellations of the textbook formulas
(``mu^2 + sigma^2 - (E|theta|)^2`` loses every digit once ``sigma << |mu|``), so no
score is NaN or infinite for ``sigma`` down to 1e-8 and ``|mu|`` up to 1e3; as
``sigma -> 0``, ``abs_expectation -> |mu|`` and the SNRs grow like ``1/sigma``.
Scores are computed in float64 and returned in the input's dtype.

Addition criteria choose which inactive entries enter: :class:`GradientAddition`
(largest ``|d loss / d theta_i|`` of the dense weight on the update's minibatch)
and :class:`RandomAddition` (uniform). A user callable
``fn(grad, candidates) -> scores`` works too; it is given the dense gradient unless
it has an attribute ``needs_gradient = False``.
"""

import math

import torch
from torch.special import log_ndtr

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
#: below this value of ``lam * sigma`` the SNR of ``exp(lam|theta|)`` uses the
#: cumulant expansion ``D ~ lam^2 Var|theta|`` (relative error about ``lam * sigma``).
_SMALL_LAM_SIGMA = 1e-4


def _prep(loc, scale):
    if loc.shape != scale.shape:
        raise ValueError(f"loc and scale must have one shape, got {tuple(loc.shape)} and {tuple(scale.shape)}")
    mu = loc.detach().to(torch.float64).abs()
    sigma = scale.detach().to(torch.float64)
    return mu, sigma, loc.dtype


def _delta(a):
    return _SQRT_2_OVER_PI * torch.exp(-0.5 * a * a) - a * torch.special.erfc(a / _SQRT2)


def _var_ratio(a, delta):
    """``Var|theta| / sigma^2 = 1 - 2 a delta - delta^2`` (exact, no cancellation)."""
    return (1.0 - 2.0 * a * delta - delta * delta).clamp_min(torch.finfo(torch.float64).tiny)


def abs_mean(loc, scale):
    """``|mu|``."""
    mu, _, dtype = _prep(loc, scale)
    return mu.to(dtype)


def snr(loc, scale):
    """Signal-to-noise ratio ``|mu| / sigma``."""
    mu, sigma, dtype = _prep(loc, scale)
    return (mu / sigma).to(dtype)


def abs_expectation(loc, scale):
    """Mean of the folded normal, ``E|theta|``."""
    mu, sigma, dtype = _prep(loc, scale)
    return (mu + sigma * _delta(mu / sigma)).to(dtype)


def snr_abs(loc, scale):
    """``E|theta| / sd|theta|`` (the reference code's default)."""
    mu, sigma, dtype = _prep(loc, scale)
    a = mu / sigma
    d = _delta(a)
    return ((a + d) / _var_ratio(a, d).sqrt()).to(dtype)


def _log_b(a, mu, sigma, t):
    """``log[Phi(a + t sigma) + exp(-2 t |mu|) Phi(t sigma - a)]``."""
    return torch.logaddexp(log_ndtr(a + t * sigma), -2.0 * t * mu + log_ndtr(t * sigma - a))


def _log_mgf_abs(mu, sigma, t):
    """``log E exp(t |theta|)`` for ``theta ~ N(mu, sigma^2)``, ``mu >= 0``."""
    a = mu / sigma
    return 0.5 * (t * sigma) ** 2 + t * mu + _log_b(a, mu, sigma, t)


def exp_abs(loc, scale, lam=1.0):
    """``log E exp(lam |theta|)``: the ``exp_abs`` score in log space (identical ranking)."""
    mu, sigma, dtype = _prep(loc, scale)
    return _log_mgf_abs(mu, sigma, lam).to(dtype)


def _log_expm1(x):
    return torch.where(x > 1.0, x + torch.log(-torch.expm1(-x)), torch.log(torch.expm1(x.clamp_max(1.0))))


def snr_exp_abs(loc, scale, lam=1.0):
    """``E exp(lam|theta|) / sd(exp(lam|theta|))``."""
    mu, sigma, dtype = _prep(loc, scale)
    a = mu / sigma
    ls = lam * sigma
    d_exact = ls * ls + _log_b(a, mu, sigma, 2.0 * lam) - 2.0 * _log_b(a, mu, sigma, lam)
    delta = _delta(a)
    d_small = ls * ls * _var_ratio(a, delta)
    d = torch.where(ls < _SMALL_LAM_SIGMA, d_small, d_exact)
    d = d.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.exp(-0.5 * _log_expm1(d)).to(dtype)


#: the removal criteria by name (``SSVI(removal=...)``)
REMOVAL_CRITERIA = {
    "abs_mean": abs_mean,
    "snr": snr,
    "abs_expectation": abs_expectation,
    "snr_abs": snr_abs,
    "exp_abs": exp_abs,
    "snr_exp_abs": snr_exp_abs,
}


def get_removal(criterion):
    """Resolve a removal criterion given by name or as a callable ``(loc, scale) -> score``."""
    if callable(criterion):
        return criterion
    if isinstance(criterion, str) and criterion in REMOVAL_CRITERIA:
        return REMOVAL_CRITERIA[criterion]
    raise ValueError(
        f"removal: unknown criterion {criterion!r}; expected one of {sorted(REMOVAL_CRITERIA)} "
        "or a callable (loc, scale) -> score"
    )


class GradientAddition:
    r"""Score candidates by the data term's gradient at the dense weight (Li et al., ICLR 2024).

    .. math:: s_i = \left| \frac{\partial}{\partial \theta_i} \, \mathbb E_q[-\log p(D_B \mid \theta)] \right|

    on the update step's minibatch ``D_B``. :class:`~pyro_ssvi.SSVI` supplies the gradient through
    :class:`~pyro_ssvi.DataGradientMessenger`, so prior and entropy terms never enter it.
    """

    needs_gradient = True
    fresh_scores = True  #: returns a new tensor, which select_swap may overwrite

    def __call__(self, grad, candidates):
        return grad.abs()

    def __repr__(self):
        return "GradientAddition()"


class RandomAddition:
    """Score candidates uniformly at random (no dense gradient needed).

    :param torch.Generator generator: optional source of randomness; by default the
        global torch RNG (seeded by ``pyro.set_rng_seed``).
    """

    needs_gradient = False
    fresh_scores = True  #: returns a new tensor, which select_swap may overwrite

    def __init__(self, generator=None):
        self.generator = generator

    def __call__(self, grad, candidates):
        return torch.rand(candidates.shape, generator=self.generator, device=candidates.device)

    def __repr__(self):
        return "RandomAddition()"


ADDITION_CRITERIA = {"gradient": GradientAddition, "random": RandomAddition}


def get_addition(criterion):
    """Resolve an addition criterion: ``"gradient"``, ``"random"`` or a callable."""
    if isinstance(criterion, str):
        if criterion in ADDITION_CRITERIA:
            return ADDITION_CRITERIA[criterion]()
    elif callable(criterion):
        return criterion
    raise ValueError(
        f"addition: unknown criterion {criterion!r}; expected one of {sorted(ADDITION_CRITERIA)} "
        "or a callable (grad, candidates) -> scores"
    )


def needs_gradient(criterion):
    """Whether an addition criterion wants the dense gradient."""
    return bool(getattr(criterion, "needs_gradient", True))


__all__ = [
    "REMOVAL_CRITERIA",
    "ADDITION_CRITERIA",
    "abs_mean",
    "snr",
    "abs_expectation",
    "snr_abs",
    "exp_abs",
    "snr_exp_abs",
    "get_removal",
    "get_addition",
    "GradientAddition",
    "RandomAddition",
]
