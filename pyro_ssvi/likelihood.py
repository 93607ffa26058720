"""The classification likelihood around a Bayesian network."""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

class BayesianClassifier(PyroModule):
    """A classification likelihood around a (bayesianized) network.

    ``forward(x, y=None)`` returns the logits and observes ``y`` at the ``Categorical`` site
    ``obs`` inside ``pyro.plate("data")``. With ``num_data`` set, the minibatch log-likelihood
    is scaled by ``num_data / batch`` so the ELBO refers to the whole training set.

    Site names of the network's weights are prefixed by ``net.``.
    """

    def __init__(self, net, num_data=None):
        super().__init__()
        self.net = net
        self.num_data = num_data

    def forward(self, x, y=None):
        logits = self.net(x)
        n = x.shape[0]
        size = self.num_data if self.num_data is not None else n
        with pyro.plate("data", size=size, subsample=torch.arange(n, device=x.device)):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits

    @property
    def dense_sites(self):
        """The network's ``dense_sites`` (sites to keep dense in a sparse guide), as this model's site names."""
        return tuple(f"net.{s}" for s in getattr(self.net, "dense_sites", ()))

    @property
    def head_sites(self):
        """The network's ``head_sites`` (the classifier head's weight sites), as this model's site names."""
        return tuple(f"net.{s}" for s in getattr(self.net, "head_sites", ()))


__all__ = ["BayesianClassifier"]
