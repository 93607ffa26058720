r"""Predictive quality and uncertainty metrics, and batched Monte Carlo prediction.

Classification (``probs``: predictive class probabilities, shape ``(N, C)``; ``y``: labels ``(N,)``):

* :func:`~pyro_ssvi.metrics.accuracy`, :func:`nll` (mean ``-log p(y|x)``), :func:`brier` (mean over examples of
  :math:`\sum_c (p_c - 1[y=c])^2`),
* :func:`ece`: expected calibration error with 15 equal-width bins on the top-label confidence,
  :math:`\sum_b \frac{|B_b|}{N} |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`, and
  :func:`reliability_diagram` (the per-bin data behind it; :func:`pyro_ssvi.scripts.plots.plot_reliability` draws it).
* :func:`fit_temperature` / :func:`apply_temperature`: post-hoc temperature scaling (Guo et al.
  2017), one temperature fitted on validation logits or on an MC predictive's probabilities.

Uncertainty from MC samples (``sample_probs``: ``(S, N, C)``):

* :func:`predictive_entropy` :math:`H[\bar p]`, :func:`mutual_information`
  :math:`H[\bar p] - \frac1S \sum_s H[p_s]` (the epistemic part),
* :func:`ood_metrics`: AUROC, AUPR (out-of-distribution = positive class) and FPR at 95% TPR
  from any score that is higher for OOD inputs; :func:`pyro_ssvi.scripts.plots.plot_uncertainty_histograms` draws the
  score distributions.

Selective prediction (reject the most uncertain inputs, by default those with the lowest
top-label confidence :math:`\max_c p_c`):

* :func:`selective_accuracy`: accuracy on the ``ceil(c N)`` most confident inputs, coverage ``c``;
* :func:`aurc`: area under the risk-coverage curve, :math:`\frac1N \sum_{k=1}^N \mathrm{err}_k`,
  :math:`\mathrm{err}_k` the error rate of the ``k`` most confident inputs (Geifman et al. 2019).

Regression (targets normalised for training; metrics in the original units):

* :func:`rmse`, :func:`gaussian_test_ll` (log of the MC mixture of Gaussians per test point).

:func:`mc_predict` runs a guide and a model for ``num_samples`` weight draws over data batches
while holding only one weight sample at a time, returning the model's return value per draw.
"""

import math

import pyro.poutine as poutine
import torch

_EPS = 1e-12


def _check(probs, y):
    if probs.dim() != 2:
        raise ValueError(f"probs: expected shape (N, C), got {tuple(probs.shape)}")
    if y.shape != probs.shape[:1]:
        raise ValueError(f"y: expected shape ({probs.shape[0]},), got {tuple(y.shape)}")


def accuracy(probs, y):
    _check(probs, y)
    return (probs.argmax(-1) == y).double().mean().item()


def nll(probs, y):
    """Mean negative log-likelihood of the labels (probabilities clamped at 1e-12)."""
    _check(probs, y)
    p = probs.gather(-1, y.long().unsqueeze(-1)).squeeze(-1).double()
    return -(p.clamp_min(_EPS).log()).mean().item()


def brier(probs, y):
    """Multi-class Brier score: mean over examples of ``sum_c (p_c - onehot_c)^2``."""
    _check(probs, y)
    onehot = torch.nn.functional.one_hot(y.long(), probs.shape[-1]).to(torch.float64)
    return ((probs.double() - onehot) ** 2).sum(-1).mean().item()


def reliability_diagram(probs, y, n_bins=15):
    """Per-bin top-label confidence, accuracy and count for equal-width bins on [0, 1]."""
    _check(probs, y)
    conf, pred = probs.double().max(-1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 joins bin 0
    bins = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(bins, minlength=n_bins).double()
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    nonempty = counts > 0
    mean_conf = torch.where(nonempty, conf_sum / counts.clamp_min(1), torch.full_like(counts, float("nan")))
    mean_acc = torch.where(nonempty, acc_sum / counts.clamp_min(1), torch.full_like(counts, float("nan")))
    return {"edges": edges, "confidence": mean_conf, "accuracy": mean_acc, "counts": counts}


def ece(probs, y, n_bins=15):
    """Top-label expected calibration error with ``n_bins`` equal-width bins."""
    d = reliability_diagram(probs, y, n_bins)
    nonempty = d["counts"] > 0
    gaps = (d["accuracy"][nonempty] - d["confidence"][nonempty]).abs()
    return (d["counts"][nonempty] * gaps).sum().item() / d["counts"].sum().item()


def _sorted_correct(probs, y, confidence):
    _check(probs, y)
    conf = probs.max(-1).values if confidence is None else torch.as_tensor(confidence).reshape(-1)
    if conf.shape != y.shape:
        raise ValueError(f"confidence: expected shape {tuple(y.shape)}, got {tuple(conf.shape)}")
    order = torch.sort(conf.double(), descending=True, stable=True).indices  # ties: input order
    return (probs.argmax(-1) == y)[order].double()


def selective_accuracy(probs, y, coverages=(0.8, 0.9, 0.95), confidence=None):
    """Accuracy on the most confident ``ceil(c N)`` inputs for each coverage ``c`` in ``(0, 1]``.

    :param confidence: per-input score, higher = more confident (default: top-label probability);
        pass e.g. ``-predictive_entropy(sample_probs)`` to reject by entropy.
    :returns: ``{c: accuracy}``.

        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]])
        >>> selective_accuracy(probs, torch.tensor([0, 1, 1, 0]), coverages=(0.5, 1.0))
        {0.5: 1.0, 1.0: 0.75}
    """
    correct = _sorted_correct(probs, y, confidence)
    n = correct.numel()
    out = {}
    for c in coverages:
        if not 0 < c <= 1:
            raise ValueError(f"coverages: expected values in (0, 1], got {c!r}")
        k = max(1, math.ceil(c * n - 1e-9))
        out[c] = correct[:k].mean().item()
    return out


def aurc(probs, y, confidence=None):
    """Area under the risk-coverage curve (lower is better): mean over ``k`` of the error rate
    of the ``k`` most confident inputs. ``confidence`` as in :func:`selective_accuracy`."""
    errors = 1.0 - _sorted_correct(probs, y, confidence)
    risk = errors.cumsum(0) / torch.arange(1, errors.numel() + 1, dtype=torch.float64)
    return risk.mean().item()


def selective_metrics(probs, y, coverages=(0.8, 0.9, 0.95), confidence=None):
    """``{"aurc": ..., "accuracy_at_80": ..., ...}``: :func:`aurc` and :func:`selective_accuracy`."""
    out = {"aurc": aurc(probs, y, confidence)}
    for c, acc in selective_accuracy(probs, y, coverages, confidence).items():
        out[f"accuracy_at_{round(100 * c):d}"] = acc
    return out


def _entropy(p):
    p = p.double()
    return -(p * p.clamp_min(_EPS).log()).sum(-1)


def predictive_entropy(sample_probs):
    """Entropy of the MC-averaged predictive, per example; input ``(S, N, C)``."""
    return _entropy(sample_probs.mean(0))


def mutual_information(sample_probs):
    """Mutual information between label and weights (BALD), per example; input ``(S, N, C)``."""
    return (_entropy(sample_probs.mean(0)) - _entropy(sample_probs).mean(0)).clamp_min(0.0)


def uncertainty_scores(sample_probs):
    """Per-example scores, higher = more uncertain, from ``(S, N, C)`` probabilities:
    ``{"entropy": ..., "mutual_information": ...}``; with one draw (``S == 1``, e.g. a posterior
    mean or a deterministic network) the mutual information is 0 and left out."""
    out = {"entropy": predictive_entropy(sample_probs)}
    if sample_probs.shape[0] > 1:
        out["mutual_information"] = mutual_information(sample_probs)
    return out


def ood_report(sample_probs_in, sample_probs_out):
    """:func:`ood_metrics` by every score of :func:`uncertainty_scores`: ``{score: {"auroc", "aupr", "fpr95"}}``."""
    scores_in, scores_out = uncertainty_scores(sample_probs_in), uncertainty_scores(sample_probs_out)
    return {name: ood_metrics(scores_in[name], scores_out[name]) for name in scores_in}


def _binary_scores(scores_in, scores_out):
    scores = torch.cat([scores_in.reshape(-1), scores_out.reshape(-1)]).double()
    labels = torch.cat([torch.zeros(scores_in.numel()), torch.ones(scores_out.numel())]).double()
    return scores, labels


def _pr_points(scores, labels):
    """Precision and recall at each distinct threshold, from the highest score down."""
    order = scores.argsort(descending=True)
    s, l = scores[order], labels[order]
    tps = torch.cumsum(l, 0)
    fps = torch.cumsum(1 - l, 0)
    last_of_run = torch.ones_like(s, dtype=torch.bool)
    last_of_run[:-1] = s[1:] != s[:-1]
    return tps[last_of_run], fps[last_of_run]


def auroc(scores_in, scores_out):
    """Area under the ROC curve with OOD as the positive class (trapezoids: ties count one half)."""
    scores, labels = _binary_scores(scores_in, scores_out)
    n_pos, n_neg = labels.sum(), (1 - labels).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc: needs at least one in-distribution and one OOD score")
    tps, fps = _pr_points(scores, labels)
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tps / n_pos])
    fpr = torch.cat([zero, fps / n_neg])
    return torch.trapezoid(tpr, fpr).item()


def aupr(scores_in, scores_out):
    """Average precision with OOD as positive: ``sum_n (R_n - R_{n-1}) P_n``."""
    scores, labels = _binary_scores(scores_in, scores_out)
    tps, fps = _pr_points(scores, labels)
    precision = tps / (tps + fps)
    recall = tps / labels.sum()
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
    return ((recall - prev) * precision).sum().item()


def fpr_at_tpr(scores_in, scores_out, tpr=0.95):
    """False positive rate at the lowest threshold whose true positive rate reaches ``tpr``."""
    scores, labels = _binary_scores(scores_in, scores_out)
    tps, fps = _pr_points(scores, labels)
    tpr_curve = tps / labels.sum()
    i = int(torch.nonzero(tpr_curve >= tpr - 1e-12)[0])
    return (fps[i] / (1 - labels).sum()).item()


def ood_metrics(scores_in, scores_out):
    """AUROC, AUPR and FPR at 95% TPR; scores must be higher for out-of-distribution inputs."""
    return {
        "auroc": auroc(scores_in, scores_out),
        "aupr": aupr(scores_in, scores_out),
        "fpr95": fpr_at_tpr(scores_in, scores_out, 0.95),
    }


def rmse(pred_mean, y, y_std=1.0):
    """Root mean squared error in original units (``pred_mean``, ``y`` normalised by ``y_std``)."""
    return (((pred_mean - y).double() ** 2).mean().sqrt() * y_std).item()


def gaussian_test_ll(sample_means, noise_std, y, y_std=1.0):
    r"""Average predictive log-likelihood in original units.

    For each test point: :math:`\log \frac1S \sum_s \mathcal N(y; \mu_s, \sigma^2) - \log y_{std}`,
    where ``sample_means`` is ``(S, N)`` and ``noise_std`` a scalar or ``(S,)``/``(S, N)`` tensor,
    all in normalised units.
    """
    mu = sample_means.double()
    sd = torch.as_tensor(noise_std, dtype=torch.float64)
    while sd.dim() < mu.dim():
        sd = sd.unsqueeze(-1)
    lp = torch.distributions.Normal(mu, sd).log_prob(y.double())
    ll = torch.logsumexp(lp, 0) - math.log(mu.shape[0]) - math.log(y_std)
    return ll.mean().item()


@torch.no_grad()
def mc_predict(model, guide, x, *args, num_samples=10, batch_size=None, **kwargs):
    """Model return values for ``num_samples`` guide draws: a tensor ``(num_samples, N, ...)``.

    Data go through in batches of ``batch_size`` (all at once when ``None``); for each batch and
    draw the guide is sampled once and the model replayed on it, so one weight sample is alive at
    a time. Extra ``args``/``kwargs`` are passed to both after ``x``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    n = x.shape[0]
    batch_size = n if batch_size is None else batch_size
    out = []
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size]
        draws = []
        for _ in range(num_samples):
            trace = poutine.trace(guide).get_trace(xb, *args, **kwargs)
            draws.append(poutine.block(poutine.replay(model, trace=trace))(xb, *args, **kwargs))
        out.append(torch.stack(draws))
    return torch.cat(out, dim=1)


@torch.no_grad()
def mean_predict(model, guide, x, *args, **kwargs):
    """The model's return value with every latent site at the guide's median (posterior mean)."""
    return poutine.block(poutine.condition(model, data=guide.median()))(x, *args, **kwargs)


def classification_metrics(probs, y):
    """Accuracy, NLL, ECE and Brier of predictive probabilities ``(N, C)``."""
    return {"accuracy": accuracy(probs, y), "nll": nll(probs, y), "ece": ece(probs, y), "brier": brier(probs, y)}


def classification_report(sample_logits, y):
    """:func:`classification_metrics` of the MC-averaged predictive from logits ``(S, N, C)``."""
    return classification_metrics(sample_logits.softmax(-1).mean(0), y)


# post-hoc temperature scaling ---------------------------------------------------------------

#: rows of an input taken as probabilities must sum to 1 within this (float32 averages of MC
#: softmax draws are off by about 1e-7 per row)
_PROBS_ATOL = 1e-4


def _looks_like_probs(x):
    """Whether every entry of ``x`` lies in [0, 1] and every row sums to 1 (within ``_PROBS_ATOL``)."""
    return bool((x >= 0).all() and (x <= 1).all() and ((x.sum(-1) - 1).abs() <= _PROBS_ATOL).all())


def _temperature_logits(logits_or_probs, from_probs, arg="logits_or_probs"):
    """``(N, C)`` float64 logits for temperature scaling, after checking the input.

    Probabilities ``p`` (``from_probs=True``, or detected when ``None``) become ``log max(p, 1e-12)``:
    up to a constant per row these are logits of ``p``, so ``softmax(log p / T)`` is proportional
    to ``p^(1/T)`` (and equals ``p`` at ``T = 1``, up to the 1e-12 floor that :func:`nll` uses too).
    """
    x = torch.as_tensor(logits_or_probs)
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 2:
        raise ValueError(f"{arg}: expected shape (N, C) with N >= 1 and C >= 2, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{arg}: expected a floating tensor, got dtype {x.dtype}")
    if from_probs is not None and not isinstance(from_probs, bool):
        raise ValueError(f"from_probs: expected None (detect), True or False, got {from_probs!r}")
    x = x.detach().to(torch.float64)
    if torch.isnan(x).any() or torch.isposinf(x).any():
        raise ValueError(f"{arg}: contains NaN or +inf")
    if from_probs is None:
        from_probs = _looks_like_probs(x)
    if from_probs:
        if not _looks_like_probs(x):
            raise ValueError(f"{arg}: from_probs=True, but the rows are not probabilities (entries in [0, 1] summing to 1)")
        return x.clamp_min(_EPS).log()
    if torch.isinf(x).any():
        raise ValueError(f"{arg}: logits contain -inf; pass probabilities with from_probs=True instead")
    return x


def _check_labels(labels, n, c):
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"labels: expected shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels: expected integer class indices, got dtype {y.dtype}")
    if n and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"labels: expected class indices in [0, {c}), got values in [{int(y.min())}, {int(y.max())}]")
    return y.long()


def _scaled_nll(z, y, log_t):
    """Mean NLL ``-1/N sum_i log softmax(z_i / T)_{y_i}`` at ``T = exp(log_t)``."""
    return -(z / log_t.exp()).log_softmax(-1).gather(-1, y.unsqueeze(-1)).mean()


def fit_temperature(logits_or_probs, labels, *, from_probs=None, max_iter=100):
    r"""Fit the temperature of post-hoc temperature scaling on held-out (validation) data.

    Temperature scaling (Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural
    Networks", ICML 2017) divides the logits by one scalar :math:`T > 0`, fitted by maximum
    likelihood on data the network was not trained on:

    .. math:: T^* = \arg\min_{T > 0} -\frac1N \sum_{i=1}^N \log \mathrm{softmax}(z_i / T)_{y_i}

    It changes confidence, never the predicted class. The minimisation runs over :math:`\log T`
    (unconstrained) with ``torch.optim.LBFGS`` (``line_search_fn="strong_wolfe"``) in float64,
    from :math:`T = 1`; :math:`T = 1` is returned whenever the fit would not lower the NLL, so
    the NLL at the result never exceeds the NLL at :math:`T = 1`. In :math:`\beta = 1/T` the
    objective is convex (a log-sum-exp of functions linear in :math:`\beta`), so the minimum
    is unique when it exists; without one (every label predicted with a margin: :math:`T \to 0`;
    predictions worse than uniform: :math:`T \to \infty`) the fit stops once the gradient is
    negligible and returns a small or a large :math:`T`.

    **Probabilities.** For a Bayesian network the predictive is an average of softmax draws,
    :math:`\bar p = \frac1S \sum_s \mathrm{softmax}(z^{(s)})`, not a softmax of one logit
    vector. The standard choice for MC predictives and ensembles, taken here, scales the log of
    the averaged predictive: :math:`\log \bar p` plays the logits, and the calibrated predictive
    is :math:`\mathrm{softmax}(\log \bar p / T) \propto \bar p^{1/T}` (probabilities are floored
    at 1e-12 before the log, as in :func:`nll`).

    :param logits_or_probs: ``(N, C)`` logits (any finite reals) or predictive probabilities
        (entries in ``[0, 1]``, rows summing to 1), e.g. ``sample_logits.softmax(-1).mean(0)``.
    :param labels: ``(N,)`` integer class indices in ``[0, C)``.
    :param from_probs: ``True`` for probabilities, ``False`` for logits; ``None`` (default) takes
        the input as probabilities exactly when every row looks like one (logits rarely do, but
        pass the flag when in doubt).
    :param int max_iter: LBFGS iterations (each with its line search); 1-D, so few are needed.
    :returns: the temperature ``T`` (a float); use it with :func:`apply_temperature`.

        >>> z = torch.tensor([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
        >>> T = fit_temperature(z, torch.tensor([0, 0, 1, 1]))  # one confident mistake in four
        >>> T > 1 and nll(apply_temperature(z, T), torch.tensor([0, 0, 1, 1])) < nll(z.softmax(-1), torch.tensor([0, 0, 1, 1]))
        True
    """
    z = _temperature_logits(logits_or_probs, from_probs)
    y = _check_labels(labels, *z.shape).to(z.device)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected a positive int, got {max_iter!r}")
    log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _scaled_nll(z, y, log_t)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        at_one = _scaled_nll(z, y, torch.zeros_like(log_t))
        fitted = _scaled_nll(z, y, log_t)
    if not (torch.isfinite(log_t) and torch.isfinite(fitted)) or fitted > at_one:
        return 1.0
    return float(log_t.detach().exp())


def apply_temperature(logits_or_probs, T, *, from_probs=None):
    r"""Calibrated probabilities :math:`\mathrm{softmax}(z / T)`, ``(N, C)``.

    ``logits_or_probs`` and ``from_probs`` as in :func:`fit_temperature`: probabilities :math:`p`
    are scaled through their log, giving :math:`p^{1/T}` renormalised. The result has the input's
    floating dtype (computed in float64) and device.

        >>> apply_temperature(torch.tensor([[2.0, 0.0]]), 2.0)
        tensor([[0.7311, 0.2689]])
    """
    if torch.is_tensor(T) and T.numel() == 1:
        T = T.item()
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not (math.isfinite(T) and T > 0):
        raise ValueError(f"T: expected a positive finite temperature, got {T!r}")
    x = torch.as_tensor(logits_or_probs)
    z = _temperature_logits(x, from_probs)
    return (z / T).softmax(-1).to(x.dtype)


__all__ = [
    "accuracy",
    "apply_temperature",
    "aupr",
    "auroc",
    "aurc",
    "brier",
    "classification_metrics",
    "classification_report",
    "ece",
    "fit_temperature",
    "fpr_at_tpr",
    "gaussian_test_ll",
    "mc_predict",
    "mean_predict",
    "mutual_information",
    "nll",
    "ood_metrics",
    "ood_report",
    "predictive_entropy",
    "reliability_diagram",
    "rmse",
    "selective_accuracy",
    "selective_metrics",
    "uncertainty_scores",
]
