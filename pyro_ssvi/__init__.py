"""pyro_ssvi: Sparse Subspace Variational Inference (SSVI) for Pyro.

Train Bayesian neural networks whose posterior is sparse from the first step to
the last: write a ``PyroModule`` BNN with ``PyroSample`` priors, fit it with
:class:`SparseSubspaceGuide` and :class:`SSVI` (a drop-in for ``pyro.infer.SVI``).
"""

from . import criteria
from .distributions import SparseNormal, SubspacePrior
from .guide import SparseSubspaceGuide, init_to_normal
from .batched import BatchedLayersMessenger, batched_layers
from .kernels import SparseWeight, sparse_linear
from .handlers import DataGradientMessenger, KLScaleMessenger, SubspacePriorMessenger, subspace_prior
from .lrt import LocalReparameterizationMessenger, local_reparameterization
from .models import BayesianClassifier, bayesianize, cifar_resnet18, clear_pretrained_values, pretrained_init, pretrained_values
from .schedule import SwapSchedule
from .subspace import select_swap
from .optim import fresh_adam_correction, reset_optimizer_state
from .distributed import StructureMismatchError, SubspaceMismatchError
from .finite import NonFiniteLossError
from .svi import SSVI
from .updater import SubspaceUpdater

__version__ = "0.1.0"

__all__ = [
    "SSVI",
    "BayesianClassifier",
    "BatchedLayersMessenger",
    "batched_layers",
    "DataGradientMessenger",
    "KLScaleMessenger",
    "bayesianize",
    "cifar_resnet18",
    "clear_pretrained_values",
    "NonFiniteLossError",
    "StructureMismatchError",
    "SubspaceMismatchError",
    "pretrained_init",
    "pretrained_values",
    "LocalReparameterizationMessenger",
    "local_reparameterization",
    "SparseNormal",
    "SparseSubspaceGuide",
    "SparseWeight",
    "SubspacePrior",
    "SubspacePriorMessenger",
    "SubspaceUpdater",
    "SwapSchedule",
    "criteria",
    "init_to_normal",
    "fresh_adam_correction",
    "reset_optimizer_state",
    "select_swap",
    "sparse_linear",
    "subspace_prior",
]
