"""Results that must not depend on the processor: a resumed run is bit-identical to an uninterrupted one on every CPU
kernel path PyTorch can take here (``ATEN_CPU_CAPABILITY``: the non-vectorised ``default`` and each vector width the
processor has) and with 1 or 2 threads. Each case runs ``tests/determinism_case.py`` in a fresh process (the kernel
path is fixed when torch loads). The heavier resume tests carry the ``determinism`` mark: run them on another path with
``ATEN_CPU_CAPABILITY=default python -m pytest -q -m determinism`` (and ``PYRO_SSVI_TEST_THREADS=2``)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

CASE = pathlib.Path(__file__).resolve().parent / "determinism_case.py"
#: PyTorch's CPU kernel paths, narrowest first; a processor runs those up to its own
PATHS = ("default", "avx2", "avx512")
AVAILABLE = PATHS[: PATHS.index(torch.backends.cpu.get_cpu_capability().lower()) + 1] if torch.backends.cpu.get_cpu_capability().lower() in PATHS else ("default",)

pytestmark = pytest.mark.determinism


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("capability", AVAILABLE)
def test_a_resumed_run_is_bit_identical_on_every_cpu_kernel_path(capability, threads):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    res = subprocess.run([sys.executable, str(CASE), str(threads)], capture_output=True, text=True, env=env, timeout=300)
    lines = res.stdout.strip().splitlines()
    assert lines, res.stderr[-2000:]
    out = json.loads(lines[-1])
    assert out["capability"] == capability.upper() and out["threads"] == threads  # the path really was taken
    assert out["new_shapes"], "the resumed process must meet a call shape first after the checkpoint"
    assert out["decisions_equal"], "a shape first met after the resume took another kernel than the uninterrupted run"
    assert out["identical"] and res.returncode == 0, out
