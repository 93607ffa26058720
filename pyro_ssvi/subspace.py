"""One subspace update of one site, as a pure function of tensors (Li et al., ICLR 2024, arXiv 2402.11025).

Given a site's active ``index`` (flat positions, length ``k``), its removal scores
and a way to score candidates for addition, :func:`select_swap` decides

* ``removed``: the ``n`` active entries with the lowest removal score;
* ``added``: the ``n`` best-scoring entries among those *not kept*
  (inactive entries and the removed ones);
* which storage slots change: an entry removed and re-added keeps its slot, so its
  values and optimiser state survive; every other added entry takes the slot of a
  removed one that was not re-added.

The active count never changes.
"""

from typing import NamedTuple

import torch


class SwapDecision(NamedTuple):
    positions: torch.Tensor  #: storage slots (0..k-1) that receive a new entry
    new_index: torch.Tensor  #: flat positions of the new entries, aligned with ``positions``
    removed: torch.Tensor  #: flat positions removed (before re-adding)
    added: torch.Tensor  #: flat positions chosen for addition (may include removed ones)


def top_n(scores, n, sample_size=4096):
    """Positions of the ``n`` largest ``scores`` (a 1-d tensor), as ``torch.topk(scores, n).indices`` (unsorted).

    ``torch.topk`` on a CPU tensor of ``N`` entries allocates an ``N``-entry work buffer (16 MB for a
    million-entry weight). When ``n`` is small against ``N``, a threshold read off a fixed random
    sample of ``sample_size`` scores (at the ``1 - 2 n / N`` quantile) first cuts the candidates to
    about ``2 n``; ``topk`` runs on those. The result is the same set (ties at the boundary aside, which
    ``topk`` breaks arbitrarily too); when the cut keeps fewer than ``n`` or more than ``4 n`` entries,
    it falls back on ``topk`` over all scores.

        >>> top_n(torch.arange(10.0), 3).sort().values
        tensor([7, 8, 9])
    """
    numel = scores.numel()
    if numel <= 4 * sample_size or 4 * n > numel:
        return torch.topk(scores, n, sorted=False).indices
    generator = torch.Generator(scores.device).manual_seed(0)  # a fixed sample: the global RNG is untouched
    sample = scores[torch.randint(numel, (sample_size,), generator=generator, device=scores.device)]
    threshold = torch.quantile(sample.double(), 1.0 - 2.0 * n / numel)
    kept = (scores >= threshold).nonzero().squeeze(1)
    if not n <= kept.numel() <= 4 * n:
        return torch.topk(scores, n, sorted=False).indices
    return kept[torch.topk(scores[kept], n, sorted=False).indices]


def select_swap(index, removal_scores, n, numel, addition_scores, overwrite_scores=False):
    """Choose the swap of ``n`` entries for one site.

    :param torch.Tensor index: active flat positions (an integer tensor), shape ``(k,)``.
    :param torch.Tensor removal_scores: shape ``(k,)``, higher = keep.
    :param int n: entries to remove and add, ``0 <= n <= k``.
    :param int numel: the site's dense size.
    :param callable addition_scores: ``candidates (bool, shape (numel,)) -> scores (numel,)``;
        only entries where ``candidates`` is true can be added.
    :param bool overwrite_scores: the scores ``addition_scores`` returns are a fresh tensor that
        may be overwritten (saves a dense copy; the built-in criteria say so with ``fresh_scores``).
    :rtype: SwapDecision
    """
    index = index.long()
    k = index.numel()
    if not 0 <= n <= k:
        raise ValueError(f"n: expected 0 <= n <= {k}, got {n}")
    empty = index[:0]
    if n == 0:
        return SwapDecision(empty, empty, empty, empty)
    remove_pos = torch.topk(removal_scores, n, largest=False, sorted=False).indices
    removed = index[remove_pos]
    candidates = torch.ones(numel, dtype=torch.bool, device=index.device)
    candidates[index] = False
    candidates[removed] = True
    scores = addition_scores(candidates).reshape(-1)
    if not scores.is_floating_point():
        scores = scores.float()
    # scores are as large as the weight (gradient addition): fill in place when allowed
    not_candidates = ~candidates
    scores = scores.masked_fill_(not_candidates, -float("inf")) if overwrite_scores else scores.masked_fill(not_candidates, -float("inf"))
    added = top_n(scores, n)
    readded = torch.isin(removed, added)
    positions = remove_pos[~readded]
    new_index = added[~torch.isin(added, removed)]
    return SwapDecision(positions, new_index, removed, added)


__all__ = [
    "SwapDecision",
    "select_swap",
    "top_n",
]
