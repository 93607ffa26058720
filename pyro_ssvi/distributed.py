r"""SSVI on ``torch.distributed``: every rank keeps the same subspace.

Data-parallel SSVI (Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025) needs, beyond the
usual gradient averaging, that every rank makes the *same* subspace update:

* the guide state (means, scales, active indices) starts equal: broadcast from rank 0;
* gradient-based addition ranks candidates by the data term's dense gradient averaged over
  ranks, :math:`\bar g = \frac1W \sum_r g_r`;
* random addition draws from a generator seeded alike on every rank;
* after every update a checksum of each site's active set is compared across ranks;
* before any of that, at the first step, every rank's guide and model structure (site names,
  active counts, tensor shapes and dtypes) is compared with one all-gather, so a rank built with
  another ``density`` gets an error naming the site and the ranks instead of a collective that
  hangs or aborts on mismatched sizes.

These are functions of tensors, modules and a process group (:func:`synchronise_start` runs the
first two checks on a guide and model); :class:`~pyro_ssvi.SSVI` calls them when
``torch.distributed`` is initialised (or it is given a ``process_group``).
"""

import torch
import torch.distributed as dist


class SubspaceMismatchError(RuntimeError):
    """The ranks of a distributed run hold different active sets for a site."""


class StructureMismatchError(RuntimeError):
    """The ranks of a distributed run built different guides or models (sites, active counts, shapes)."""


def is_distributed(process_group=None):
    """Whether SSVI should synchronise: a group was given, or the default group is initialised."""
    return process_group is not None or (dist.is_available() and dist.is_initialized())


def world_size(process_group=None):
    return dist.get_world_size(process_group)


def broadcast_state(module, process_group=None, src=0):
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s, in place (entries of
    ``state_dict()`` that are not tensors, such as a module's extra state, are left alone).

    Each tensor is received into a copy and then written with ``copy_``: a collective writing into a
    tensor does not count as a write for its version counter, which what is derived from a buffer
    (a guide's kernel patterns of its active sets, its host copy of the step count) checks."""
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            if torch.is_tensor(tensor):
                received = tensor.detach().clone()
                dist.broadcast(received, src, group=process_group)
                tensor.copy_(received)


def describe_state(module, prefix=""):
    """``{prefix + key: "shape dtype"}`` for every tensor of ``module.state_dict()``: what
    :func:`broadcast_state` needs to agree between ranks."""
    return {
        prefix + key: f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
        for key, t in module.state_dict(keep_vars=True).items()
        if torch.is_tensor(t)
    }


def check_same_structure(description, process_group=None):
    """Raise :class:`StructureMismatchError` on every rank if the ranks' ``description`` differ.

    :param dict description: ``{what: value}`` on this rank, e.g. ``{"site 'fc1.weight'": "740 of
        7400 active"}`` and :func:`describe_state` entries; compared with one ``all_gather_object``.
        The error names the first entry that differs and which ranks hold which value.
    """
    gathered = [None] * world_size(process_group)
    dist.all_gather_object(gathered, description, group=process_group)
    names = list(dict.fromkeys(name for d in gathered for name in d))
    for name in names:
        values = [d.get(name, "absent") for d in gathered]
        if len(set(values)) > 1:
            groups = {}
            for rank, value in enumerate(values):
                groups.setdefault(value, []).append(rank)
            held = "; ".join(f"{value} on ranks {ranks}" for value, ranks in groups.items())
            raise StructureMismatchError(
                f"the ranks built different guides or models: {name}: {held}; every rank must build the same "
                "model and guide (same density, dense_sites, network and dtype)"
            )


def training_structure(sites, guide, model):
    """What every rank must agree on before the first collective: each sparse ``(part, name)`` of
    ``sites`` with its shape and active count, and the shape and dtype of every tensor of the
    guide's (and model's, if a module) state."""
    out = {}
    for part, name in sites:
        info = part.site_info(name)
        out[f"site {name!r}"] = f"{info.k} of {info.numel} entries active, shape {tuple(info.shape)}"
    out.update(describe_state(guide, "guide tensor "))
    if isinstance(model, torch.nn.Module):
        out.update(describe_state(model, "model tensor "))
    return out


def synchronise_start(sites, guide, model, process_group=None):
    """The distributed set-up of a run: the ranks' structures compared (:func:`check_same_structure`,
    one all-gather), then rank 0's guide and model state broadcast to every rank."""
    check_same_structure(training_structure(sites, guide, model), process_group)
    broadcast_state(guide, process_group)
    if isinstance(model, torch.nn.Module):
        broadcast_state(model, process_group)


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


def leave_process_group(finished=True):
    """Destroy every process group of this process (nothing if none is initialised).

    After a normal finish (``finished=True``) every rank first waits at a barrier, so that no rank tears
    down its connections while another still talks to it (a gloo peer that disappears mid-exchange can
    leave the other process to abort at exit). After an error (``finished=False``) at once: a barrier
    would wait for a rank that may be gone (``torchrun`` then stops the others).

        >>> leave_process_group()  # no process group: nothing to do
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    try:
        if finished:
            dist.barrier()
    finally:
        dist.destroy_process_group()


__all__ = [
    "StructureMismatchError",
    "SubspaceMismatchError",
    "check_same_structure",
    "describe_state",
    "active_set_checksum",
    "average_",
    "broadcast_state",
    "check_same_active_sets",
    "is_distributed",
    "leave_process_group",
    "shared_seed",
    "synchronise_start",
    "training_structure",
]
