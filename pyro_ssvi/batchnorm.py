"""Batch-norm statistics of a Bayesian network at its posterior mean."""

import pyro
import torch
import torch.nn as nn

class _AtPosteriorMean(nn.Module):
    """``model(x)`` with every latent site fixed at the guide's posterior mean (for ``update_bn``)."""

    def __init__(self, model, guide):
        super().__init__()
        self.model = model
        self._conditioned = pyro.poutine.block(pyro.poutine.condition(model, data=guide.median()))

    def forward(self, x):
        return self._conditioned(x)


def recalibrate_batchnorm(model, guide, batches):
    """Recompute batch-norm running statistics at the guide's posterior mean.

    Running statistics accumulated during training mix many weight samples, and after a short
    run still carry their initial values (variance 1 decays only as ``0.9^steps``); a pass over
    a few training batches in train mode, averaging with equal weights, fixes both. This is
    PyTorch's ``torch.optim.swa_utils.update_bn`` (Izmailov et al., UAI 2018) run on the model with
    its latent sites conditioned on ``guide.median()``. Returns the number of batch-norm layers
    recalibrated. ``batches`` is an iterable of model inputs.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if layers:
        torch.optim.swa_utils.update_bn(batches, _AtPosteriorMean(model, guide))
    return len(layers)


__all__ = ["recalibrate_batchnorm"]
