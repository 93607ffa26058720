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
