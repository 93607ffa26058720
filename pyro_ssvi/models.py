"""Model builders, in one import (each idea has its own module):

* :mod:`pyro_ssvi.convert`: :func:`bayesianize` (an ``nn.Module``'s weights as ``PyroSample``
  sites, priors that follow the device) and the pretrained values it keeps
  (:func:`pretrained_values`, :func:`pretrained_init`, :func:`clear_pretrained_values`);
* :mod:`pyro_ssvi.likelihood`: :class:`BayesianClassifier`, a ``Categorical`` likelihood in a
  ``pyro.plate`` over the minibatch, scaled to the full data set when ``num_data`` is set;
* :mod:`pyro_ssvi.resnet`: the CIFAR ResNet-18 of the reference recipe (:class:`ResNet18`,
  :func:`cifar_resnet18`);
* :mod:`pyro_ssvi.batchnorm`: :func:`recalibrate_batchnorm`, ``update_bn`` at the posterior mean.
"""

from .batchnorm import recalibrate_batchnorm
from .convert import DevicePrior, bayesianize, clear_pretrained_values, distribution_to, pretrained_init, pretrained_values
from .likelihood import BayesianClassifier
from .resnet import BasicBlock, ResNet18, cifar_resnet18

__all__ = [
    "BasicBlock",
    "BayesianClassifier",
    "DevicePrior",
    "ResNet18",
    "bayesianize",
    "cifar_resnet18",
    "clear_pretrained_values",
    "distribution_to",
    "pretrained_init",
    "pretrained_values",
    "recalibrate_batchnorm",
]
