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


def select_swap(index, removal_scores, n, numel, addition_scores):
    """Choose the swap of ``n`` entries for one site.

    :param torch.Tensor index: active flat positions (an integer tensor), shape ``(k,)``.
    :param torch.Tensor removal_scores: shape ``(k,)``, higher = keep.
    :param int n: entries to remove and add, ``0 <= n <= k``.
    :param int numel: the site's dense size.
    :param callable addition_scores: ``candidates (bool, shape (numel,)) -> scores (numel,)``;
        only entries where ``candidates`` is true can be added.
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
    scores = addition_scores(candidates).reshape(-1).to(torch.float64)
    scores = torch.where(candidates, scores, torch.full_like(scores, -float("inf")))
    added = torch.topk(scores, n, sorted=False).indices
    readded = torch.isin(removed, added)
    positions = remove_pos[~readded]
    new_index = added[~torch.isin(added, removed)]
    return SwapDecision(positions, new_index, removed, added)
