import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from conftest import BNN
from pyro_ssvi import SparseSubspaceGuide, metrics


def test_accuracy_nll_brier_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 1, 2])
    assert metrics.accuracy(probs, y) == pytest.approx(1 / 3)
    assert metrics.nll(probs, y) == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(1e-12)) / 3)
    b = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.7**2 + 0.6**2) + (0.5**2 + 0.5**2 + 1.0)) / 3
    assert metrics.brier(probs, y) == pytest.approx(b)


def test_ece_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.55 (correct), 0.3 (wrong): bins (0.867,0.933], (0.533,0.6], (0.267,0.333]
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.55, 0.45], [0.3, 0.7]])
    probs[3] = torch.tensor([0.3, 0.7])
    y = torch.tensor([0, 1, 0, 0])
    # example 4 predicts class 1 with confidence 0.7, wrong
    expected = (2 * abs(0.5 - 0.9) + 1 * abs(1 - 0.55) + 1 * abs(0 - 0.7)) / 4
    assert metrics.ece(probs, y) == pytest.approx(expected)
    d = metrics.reliability_diagram(probs, y)
    assert d["counts"].sum() == 4 and len(d["edges"]) == 16
    assert d["counts"][13] == 2  # 0.9 lies in (13/15, 14/15]


def test_ece_of_a_calibrated_predictor_is_small():
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    n = 20000
    conf = torch.rand(n, generator=g) * 0.5 + 0.5
    correct = torch.rand(n, generator=g) < conf
    probs = torch.stack([conf, 1 - conf], -1)
    y = torch.where(correct, 0, 1)
    # each of ~8 occupied bins has ~2500 points: |acc - conf| ~ sqrt(0.25/2500) = 0.01
    assert metrics.ece(probs, y) < 0.03


def test_entropy_and_mutual_information():
    agree = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert metrics.predictive_entropy(agree).item() == pytest.approx(math.log(2))
    assert metrics.mutual_information(agree).item() == pytest.approx(0.0, abs=1e-9)
    assert metrics.mutual_information(disagree).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("ties", [False, True])
def test_ood_metrics_match_scikit_learn(ties):
    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    s_in = torch.randn(300, generator=g)
    s_out = torch.randn(200, generator=g) + 1.0
    if ties:
        s_in, s_out = s_in.round(), s_out.round()
    labels = np.r_[np.zeros(300), np.ones(200)]
    scores = np.r_[s_in.cpu().numpy(), s_out.cpu().numpy()]
    assert metrics.auroc(s_in, s_out) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.aupr(s_in, s_out) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_fpr_at_95_tpr_by_hand():
    s_in = torch.tensor([0.0, 1.0, 2.0, 3.0])
    s_out = torch.arange(20.0) + 2.5  # 19 of 20 above 3.0, all above 2.0
    # TPR >= 0.95 at threshold 3.5 (19/20): no in-distribution score is >= 3.5
    assert metrics.fpr_at_tpr(s_in, s_out) == 0.0
    s_out = torch.arange(20.0) + 0.5  # 19 of 20 >= 1.5: in-distribution scores 2, 3 lie above
    assert metrics.fpr_at_tpr(s_in, s_out) == pytest.approx(2 / 4)


def test_regression_metrics_by_hand():
    y = torch.tensor([0.0, 1.0])
    assert metrics.rmse(torch.tensor([1.0, 1.0]), y, y_std=2.0) == pytest.approx(math.sqrt(0.5) * 2)
    means = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    ll = metrics.gaussian_test_ll(means, 0.5, y, y_std=2.0)
    assert ll == pytest.approx(torch.distributions.Normal(0.0, 0.5).log_prob(torch.tensor(0.0)).item() - math.log(2.0))
    mixed = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = np.mean([math.log(0.5 * (math.exp(-0.5 * (a / 0.5) ** 2) + math.exp(-0.5 * (b / 0.5) ** 2)) / (0.5 * math.sqrt(2 * math.pi))) for a, b in [(0, 1), (1, 0)]])
    assert metrics.gaussian_test_ll(mixed, 0.5, y) == pytest.approx(expected)


def test_bad_shapes():
    with pytest.raises(ValueError, match="probs"):
        metrics.accuracy(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="y"):
        metrics.accuracy(torch.ones(3, 2), torch.ones(2))


def test_mc_predict_in_batches_matches_shapes_and_mean_predict(digits):
    Xtr, ytr, Xte, _ = digits
    model = BNN()
    guide = SparseSubspaceGuide(model, density=0.1, init_scale=0.1)
    guide(Xtr[:8], ytr[:8])
    out = metrics.mc_predict(model, guide, Xte[:50], num_samples=4, batch_size=16)
    assert out.shape == (4, 50, 10)
    assert not torch.equal(out[0], out[1])  # different weight draws
    mean = metrics.mean_predict(model, guide, Xte[:50])
    med = guide.median()
    ref = torch.relu(Xte[:50] @ med["fc1.weight"].T + model.fc1.bias) @ med["fc2.weight"].T + model.fc2.bias
    torch.testing.assert_close(mean, ref)
    y = torch.zeros(50, dtype=torch.long)
    rep = metrics.classification_report(out, y)
    assert rep == metrics.classification_metrics(out.softmax(-1).mean(0), y)
    assert set(rep) == {"accuracy", "nll", "ece", "brier"}


def _direct_selective(probs, y, coverages):
    """Selective accuracy and AURC by brute force: sort once, then count for every k."""
    conf = probs.max(-1).values.cpu().numpy()
    order = np.argsort(-conf, kind="stable")
    correct = (probs.argmax(-1) == y).cpu().numpy()[order]
    n = len(correct)
    acc = {c: correct[: int(math.ceil(c * n))].mean() for c in coverages}
    risks = [1.0 - correct[:k].mean() for k in range(1, n + 1)]
    return acc, sum(risks) / n


def test_selective_prediction_matches_a_direct_computation():
    from pyro_ssvi.metrics import aurc, selective_accuracy, selective_metrics

    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    probs = torch.softmax(2 * torch.randn(203, 5, generator=g), -1)
    probs[10:20] = probs[10]  # ties in confidence: broken by input order
    y = torch.randint(0, 5, (203,), generator=g)
    coverages = (0.5, 0.8, 0.9, 0.95, 1.0)
    acc, area = _direct_selective(probs, y, coverages)
    got = selective_accuracy(probs, y, coverages)
    for c in coverages:
        assert got[c] == pytest.approx(acc[c], abs=1e-12)
    assert aurc(probs, y) == pytest.approx(area, abs=1e-12)
    assert got[1.0] == pytest.approx(metrics.accuracy(probs, y))
    m = selective_metrics(probs, y)
    assert set(m) == {"aurc", "accuracy_at_80", "accuracy_at_90", "accuracy_at_95"}
    # rejecting uncertain inputs helps when confidence is informative: a perfectly ranked case
    perfect = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    assert aurc(perfect, torch.tensor([0, 0, 1, 1])) == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)
    with pytest.raises(ValueError, match="coverages"):
        selective_accuracy(probs, y, (0.0,))


def test_ood_report_has_mutual_information_only_with_several_draws():
    from pyro_ssvi.metrics import ood_report

    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    inside = torch.softmax(4 * torch.randn(6, 50, 3, generator=g), -1)
    outside = torch.softmax(0.3 * torch.randn(6, 40, 3, generator=g), -1)
    rep = ood_report(inside, outside)
    assert set(rep) == {"entropy", "mutual_information"}
    assert rep["entropy"]["auroc"] == pytest.approx(metrics.auroc(metrics.predictive_entropy(inside), metrics.predictive_entropy(outside)))
    assert rep["entropy"]["auroc"] > 0.9
    assert set(ood_report(inside[:1], outside[:1])) == {"entropy"}


# temperature scaling --------------------------------------------------------------------------


def _tempered_data(t0, n=20000, c=10, seed=0):
    """Logits ``z = 3 * N(0, 1)`` in float64 and labels drawn from ``softmax(z / t0)``."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    z = 3.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.multinomial((z / t0).softmax(-1), 1, generator=g).squeeze(-1)
    return z, y


def _scaled_nll(z, y, t):
    return -(z / t).log_softmax(-1).gather(-1, y.unsqueeze(-1)).mean().item()


def _asymptotic_se(z, t0):
    """Standard error of the MLE of T: in beta = 1/T the Fisher information per example is
    Var_{softmax(beta z)}(z) (the second derivative of the NLL), so se(beta) = 1/sqrt(N E[Var]),
    and by the delta method se(T) = T^2 se(beta)."""
    p = (z / t0).softmax(-1)
    var = (p * z**2).sum(-1) - (p * z).sum(-1) ** 2
    return t0**2 / math.sqrt(len(z) * var.mean().item())


@pytest.mark.parametrize("t0", [0.5, 1.0, 2.0])
def test_fit_temperature_recovers_a_known_temperature(t0):
    z, y = _tempered_data(t0)
    t = metrics.fit_temperature(z, y)
    se = _asymptotic_se(z, t0)
    # N = 20000, C = 10: se is 0.25% of T0 at 0.5, 0.75% at 1 and 2, so 4 se (a 6e-5 two-sided
    # tail under the model) keeps the check tight, within 3% of T0, yet not seed-sensitive
    assert abs(t - t0) < 4 * se and abs(t - t0) < 0.05 * t0
    # the fit is the MLE: its NLL is no larger than at the true temperature or at T = 1
    assert _scaled_nll(z, y, t) <= _scaled_nll(z, y, t0) + 1e-12
    assert _scaled_nll(z, y, t) <= _scaled_nll(z, y, 1.0) + 1e-12
    # probabilities give the same fit: log softmax(z) differs from z by a constant per row
    probs = z.softmax(-1)
    assert metrics.fit_temperature(probs, y) == pytest.approx(t, rel=1e-6)
    assert metrics.fit_temperature(probs.float(), y, from_probs=True) == pytest.approx(t, rel=1e-4)
    torch.testing.assert_close(metrics.apply_temperature(probs, t), (z / t).softmax(-1))


def test_fit_temperature_on_an_mc_predictive_lowers_the_nll():
    # S = 8 draws of overconfident logits around a shared signal: the averaged predictive is the input
    g = torch.Generator(torch.get_default_device()).manual_seed(2)
    base = 2.0 * torch.randn(5000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial(base.softmax(-1), 1, generator=g).squeeze(-1)
    draws = 3.0 * (base + 0.5 * torch.randn(8, 5000, 5, generator=g, dtype=torch.float64))
    probs = draws.softmax(-1).mean(0)
    t = metrics.fit_temperature(probs, y)
    calibrated = metrics.apply_temperature(probs, t)
    assert t > 1.5  # the draws were sharpened about 3x
    assert metrics.nll(calibrated, y) < metrics.nll(probs, y) - 0.05
    assert metrics.ece(calibrated, y) < metrics.ece(probs, y)
    assert torch.equal(calibrated.argmax(-1), probs.argmax(-1))  # the ranking of classes is kept
    torch.testing.assert_close(calibrated.sum(-1), torch.ones(5000, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(6))
def test_fitted_nll_never_exceeds_the_nll_at_one(seed):
    # small, noisy and degenerate cases: random logits and labels, perfectly separable data (T -> 0)
    # and labels opposite to the prediction (T -> infinity)
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    n, c = [(5, 2), (30, 3), (200, 10), (1, 4), (50, 2), (50, 2)][seed]
    z = torch.randn(n, c, generator=g) * (seed + 1)
    y = torch.randint(0, c, (n,), generator=g)
    if seed == 4:
        y = z.argmax(-1)
    if seed == 5:
        y = z.argmin(-1)
    t = metrics.fit_temperature(z, y)
    assert t > 0 and math.isfinite(t)
    assert _scaled_nll(z.double(), y, t) <= _scaled_nll(z.double(), y, 1.0) + 1e-12
    if seed == 4:
        assert t < 1
    if seed == 5:
        assert t > 1


def test_apply_temperature_by_hand():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    out = metrics.apply_temperature(z, 2.0)
    e = torch.exp(torch.tensor([1.0, 0.0, -0.5]))
    torch.testing.assert_close(out, (e / e.sum())[None])
    assert out.dtype == torch.float32
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([0.5, 0.25, 0.25]) ** 0.5
    torch.testing.assert_close(metrics.apply_temperature(p, 2.0), (q / q.sum())[None])
    torch.testing.assert_close(metrics.apply_temperature(p, 1.0), p)
    # a row that sums to 1 is read as logits when told so
    torch.testing.assert_close(metrics.apply_temperature(p, 1.0, from_probs=False), p.softmax(-1))
    torch.testing.assert_close(metrics.apply_temperature(p, torch.tensor(1.0)), p)


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: metrics.fit_temperature(torch.randn(5), torch.zeros(5, dtype=torch.long)), "logits_or_probs"),
        (lambda: metrics.fit_temperature(torch.randn(5, 1), torch.zeros(5, dtype=torch.long)), "logits_or_probs"),
        (lambda: metrics.fit_temperature(torch.ones(5, 3, dtype=torch.long), torch.zeros(5, dtype=torch.long)), "logits_or_probs"),
        (lambda: metrics.fit_temperature(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, dtype=torch.long)), "logits_or_probs"),
        (lambda: metrics.fit_temperature(torch.tensor([[0.0, -float("inf")]]), torch.zeros(1, dtype=torch.long), from_probs=False), "logits_or_probs"),
        (lambda: metrics.fit_temperature(torch.tensor([[0.7, 0.7]]), torch.zeros(1, dtype=torch.long), from_probs=True), "from_probs=True"),
        (lambda: metrics.fit_temperature(torch.randn(5, 3), torch.zeros(4, dtype=torch.long)), "labels"),
        (lambda: metrics.fit_temperature(torch.randn(5, 3), torch.zeros(5)), "labels"),
        (lambda: metrics.fit_temperature(torch.randn(5, 3), torch.full((5,), 3)), "labels"),
        (lambda: metrics.fit_temperature(torch.randn(5, 3), torch.full((5,), -1)), "labels"),
        (lambda: metrics.fit_temperature(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), from_probs="yes"), "from_probs"),
        (lambda: metrics.fit_temperature(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), max_iter=0), "max_iter"),
        (lambda: metrics.apply_temperature(torch.randn(5, 3), 0.0), "T"),
        (lambda: metrics.apply_temperature(torch.randn(5, 3), float("inf")), "T"),
        (lambda: metrics.apply_temperature(torch.randn(5, 3), "2"), "T"),
        (lambda: metrics.apply_temperature(torch.randn(3, 5, 3), 2.0), "logits_or_probs"),
    ],
)
def test_temperature_scaling_refuses_bad_inputs(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()
