"""A small SSVI run, interrupted and resumed, for the processor-path tests (``tests/test_processor_paths.py``).

Run as a script (``python tests/determinism_case.py``) it prints one JSON line: whether an uninterrupted run and the
same run checkpointed after step 4 and resumed in fresh objects agree bit for bit (every loss, the posterior-mean and
MC predictions on a batch of a size first met after the resume), the CPU kernel path PyTorch took
(``ATEN_CPU_CAPABILITY``) and the thread count. The first runs' kernel measurement is fixed (sparse for the linear
layer); the resumed objects measure the opposite, as a loaded machine might, and must still take the saved choices.
"""

import json
import os
import sys

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample

from pyro_ssvi import SSVI, SparseSubspaceGuide, kernels
from pyro_ssvi.metrics import mc_predict, mean_predict

STEPS, RESUME_AT, BATCH = 8, 4, 16


class Net(PyroModule):
    """A convolution (dense: below the minimum work) and a linear read-out (measured), Normal priors."""

    def __init__(self):
        super().__init__()
        self.conv = PyroModule[torch.nn.Conv2d](3, 6, 3, padding=1)
        self.conv.weight = PyroSample(dist.Normal(0.0, 1.0).expand([6, 3, 3, 3]).to_event(4))
        self.fc = PyroModule[torch.nn.Linear](6 * 8 * 8, 10)
        self.fc.weight = PyroSample(dist.Normal(0.0, 0.1).expand([10, 6 * 8 * 8]).to_event(2))

    def forward(self, x, y=None):
        logits = self.fc(torch.relu(self.conv(x)).flatten(1))
        with pyro.plate("data", 64, subsample=torch.arange(x.shape[0])):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def fixed_measurement(sparse):
    return lambda *a, **k: {"sparse": sparse, "dense_s": 2.0 if sparse else 1.0, "sparse_s": 1.0 if sparse else 2.0}


def build():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = Net()
    guide = SparseSubspaceGuide(model, density=0.2)
    x, y = data()
    guide(x[:2], y[:2])
    optim = torch.optim.SGD(list(guide.parameters()) + list(model.parameters()), lr=0.05, momentum=0.9)
    svi = SSVI(model, guide, optim, pyro.infer.TraceMeanField_ELBO(), total_steps=STEPS, update_every=2, removal_fraction=0.3)
    return model, guide, optim, svi


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)


def steps(svi, start, stop):
    x, y = data()
    losses = []
    for step in range(start, stop):
        pyro.set_rng_seed(100 + step)
        i = (step * BATCH) % 64
        losses.append(svi.step(x[i : i + BATCH], y[i : i + BATCH]))
    return losses


def predictions(model, guide):
    x, _ = data()
    pyro.set_rng_seed(7)
    return mean_predict(model, guide, x[:40]), mc_predict(model, guide, x[:40], num_samples=2).detach()


def main():
    kernels.measure = fixed_measurement(True)
    model, guide, optim, svi = build()
    losses = steps(svi, 0, STEPS)
    full = (losses, *predictions(model, guide), guide.kernel_decisions())

    model, guide, optim, svi = build()
    first = steps(svi, 0, RESUME_AT)
    saved = {"model": model.state_dict(), "guide": guide.state_dict(), "optim": optim.state_dict(), "svi": svi.state_dict()}
    kernels.measure = fixed_measurement(False)  # the resumed process would measure the opposite
    model, guide, optim, svi = build()
    model.load_state_dict(saved["model"])
    guide.load_state_dict(saved["guide"])
    optim.load_state_dict(saved["optim"])
    svi.load_state_dict(saved["svi"])
    resumed = (first + steps(svi, RESUME_AT, STEPS), *predictions(model, guide), guide.kernel_decisions())

    identical = full[0] == resumed[0] and all(torch.equal(a, b) for a, b in zip(full[1:3], resumed[1:3]))
    new_shapes = [r["rows"] for r in full[3]["fc.weight"] if "follows" in r]
    print(json.dumps({"identical": identical, "decisions_equal": full[3] == resumed[3], "new_shapes": new_shapes,
                      "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                      "env_capability": os.environ.get("ATEN_CPU_CAPABILITY")}))
    return 0 if identical else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    sys.exit(main())
