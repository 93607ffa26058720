"""Memory and compute accounting for SSVI guides (SPEC section 7)."""

import torch

from .svi import _torch_optimizers


def tensor_bytes(t):
    return t.numel() * t.element_size()


def guide_state_bytes(guide, optim=None):
    """Bytes of the guide's state: parameters, buffers (active indices) and, when ``optim`` is
    given, the optimiser state of the guide's parameters."""
    params = list(guide.parameters())
    total = sum(tensor_bytes(p) for p in params) + sum(tensor_bytes(b) for b in guide.buffers())
    if optim is not None:
        ids = {id(p) for p in params}
        for opt in _torch_optimizers(optim):
            for p, state in opt.state.items():
                if id(p) in ids:
                    total += sum(tensor_bytes(v) for v in state.values() if torch.is_tensor(v))
    return total
