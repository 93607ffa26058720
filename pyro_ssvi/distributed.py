r"""SSVI on ``torch.distributed``: every rank keeps the same subspace.

Data-parallel SSVI (Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025) needs, beyond the
usual gradient averaging, that every rank makes the *same* subspace update:

* the guide state (means, scales, active indices) starts equal: broadcast from rank 0;
* gradient-based addition ranks candidates by the data term's dense gradient averaged over
  ranks, :math:`\bar g = \frac1W \sum_r g_r`;
* random addition draws from a generator seeded alike on every rank;
* after every update a checksum of each site's active set is compared across ranks.

These are pure functions of tensors and a process group; :class:`~pyro_ssvi.SSVI` calls them
when ``torch.distributed`` is initialised (or it is given a ``process_group``).
"""

import torch
import torch.distributed as dist


class SubspaceMismatchError(RuntimeError):
    """The ranks of a distributed run hold different active sets for a site."""


def is_distributed(process_group=None):
    """Whether SSVI should synchronise: a group was given, or the default group is initialised."""
    return process_group is not None or (dist.is_available() and dist.is_initialized())


def world_size(process_group=None):
    return dist.get_world_size(process_group)


def broadcast_state(module, process_group=None, src=0):
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s, in place."""
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            dist.broadcast(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor, src, group=process_group)


def average_(tensors, process_group=None):
    """All-reduce ``tensors`` in place to their mean over ranks: one all-reduce per dtype and
    device, over the tensors flattened into one buffer (as DDP's gradient buckets do)."""
    w = world_size(process_group)
    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, group=process_group)
        flat.div_(w)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))
    return tensors


def shared_seed(device, process_group=None, src=0):
    """A seed drawn on rank ``src`` from the global RNG and sent to every rank."""
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dist.get_rank(process_group) == src else torch.zeros((), dtype=torch.int64)
    seed = seed.to(device)
    dist.broadcast(seed, src, group=process_group)
    return int(seed)


def active_set_checksum(index):
    r"""Order-sensitive checksum of an active index: :math:`(\sum_j i_j,\ \sum_j (j + 1)\, i_j)`."""
    i = index.to(torch.int64)
    return torch.stack([i.sum(), (i * torch.arange(1, i.numel() + 1, device=i.device)).sum()])


def check_same_active_sets(indices, step, process_group=None):
    """Raise :class:`SubspaceMismatchError` if any site's active set differs between ranks.

    :param dict indices: ``{site: active index}`` on this rank.
    :param int step: the SSVI step, for the message.

    One all-gather of two int64 numbers per site.
    """
    if not indices:
        return
    names = list(indices)
    local = torch.stack([active_set_checksum(indices[n]) for n in names])
    gathered = [torch.empty_like(local) for _ in range(world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    for j, name in enumerate(names):
        sums = [tuple(g[j].tolist()) for g in gathered]
        if len(set(sums)) > 1:
            groups = {}
            for rank, s in enumerate(sums):
                groups.setdefault(s, []).append(rank)
            ranks = " vs ".join(str(r) for r in groups.values())
            raise SubspaceMismatchError(
                f"step {step}: the active set of site {name!r} differs between ranks {ranks}; every rank must "
                "see the same guide state at set-up and the same averaged dense gradient at each update"
            )


__all__ = [
    "SubspaceMismatchError",
    "active_set_checksum",
    "average_",
    "broadcast_state",
    "check_same_active_sets",
    "is_distributed",
    "shared_seed",
]
