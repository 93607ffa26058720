"""The CIFAR-style ResNet-18 of the reference recipe (Li, Miao, Qiu, Zhang, ICLR 2024, arXiv 2402.11025).

:class:`ResNet18` is the plain network (3x3 stem, stride 1, no max-pool); :func:`cifar_resnet18`
builds it as a Bayesian classifier, with ``model.dense_sites`` naming the first convolution, which
the recipe keeps dense::

    model = cifar_resnet18(num_classes=10)
    guide = SparseSubspaceGuide(model, density=0.1, dense_sites=model.dense_sites)
"""

import pyro.distributions as dist
import torch.nn as nn
import torch.nn.functional as F

from .convert import bayesianize
from .likelihood import BayesianClassifier

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem with stride 1, no max-pool, four stages of two blocks."""

    dense_sites = ("conv1.weight",)
    #: the classifier head's weight (``--head-dense`` of the CIFAR example keeps it dense too)
    head_sites = ("linear.weight",)

    def __init__(self, num_classes=10, width=64, in_channels=3):
        super().__init__()
        if num_classes < 2 or width < 1:
            raise ValueError(f"num_classes >= 2 and width >= 1 expected, got {num_classes}, {width}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            blocks = [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet18(num_classes=10, width=64, prior=None, num_data=None):
    """Bayesian CIFAR ResNet-18 (CIFAR-10 head by default; ``num_classes=100`` for CIFAR-100).

    Conv and linear weights get the prior (default ``Normal(0, 0.005)``, the reference recipe);
    batch-norm parameters and the final bias stay deterministic. ``model.dense_sites`` names
    the first convolution, to keep dense under :class:`~pyro_ssvi.SparseSubspaceGuide`.
    """
    prior = dist.Normal(0.0, 0.005) if prior is None else prior
    net = bayesianize(ResNet18(num_classes, width), prior=prior)
    return BayesianClassifier(net, num_data=num_data)


__all__ = ["BasicBlock", "ResNet18", "cifar_resnet18"]
