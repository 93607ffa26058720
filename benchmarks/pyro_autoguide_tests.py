"""Pyro's own autoguide tests with ``SparseSubspaceGuide`` beside ``AutoNormal``.

    python benchmarks/pyro_autoguide_tests.py --pyro-tests ~/src/pyro/tests     # a checkout of pyro-ppl/pyro

The tests are Pyro's (``tests/infer/test_autoguide.py`` of a Pyro checkout, not shipped with this project).
They are copied to a temporary folder, and wherever a ``pytest.mark.parametrize`` list of guide classes names
``AutoNormal``, our guide is added beside it at each ``--densities`` value (a subclass that only fixes
``density``). No test's code changes. The copy runs under pytest with a plain conftest (the param store cleared
and the ``init(rng_seed)`` seed set before each test, as Pyro's conftest does), and each of our cases is
classified by its outcome and the first line of its failure. The same tests run with ``AutoNormal`` in the same
call, so that a failure Pyro's own guide shares is told apart.

Writes ``results/pyro_autoguide_tests.{md,json}``: per case, the outcome and message; per cause, the count.
"""

import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, write_results  # noqa: E402

TEST_FILE = pathlib.Path("infer") / "test_autoguide.py"
GUIDE_ARGS = ("auto_class", "continuous_class")

VARIANTS = '''\
import pyro_ssvi


def _variant(density):
    class SparseSubspaceGuide(pyro_ssvi.SparseSubspaceGuide):
        def __init__(self, model, **kwargs):
            super().__init__(model, density=density, **kwargs)

    SparseSubspaceGuide.__qualname__ = SparseSubspaceGuide.__name__ = f"SparseSubspaceGuide_d{density:g}".replace(".", "")
    return SparseSubspaceGuide
'''

CONFTEST = '''\
import pyro
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "init(rng_seed): initialize the RNG using the seed provided.")
    config.addinivalue_line("markers", "stage(NAME): mark test to run when testing stage matches NAME.")


def pytest_runtest_setup(item):
    pyro.clear_param_store()
    marker = item.get_closest_marker("init")
    pyro.set_rng_seed(marker.kwargs["rng_seed"] if marker else 123)
'''

#: first-line patterns of a failure -> the cause the report counts it under
CAUSES = (
    (r"Continuous inference cannot handle discrete", "discrete site refused (Pyro's wording)"),
    (r"JIT|jit", "JIT refused or traced"),
    (r"no latent sample site", "a model without latent sites refused"),
    (r"outside any plate", "batch dims outside any plate refused (declare them with to_event)"),
    (r"subsampled pyro.plate|which this call subsamples", "a sparse site met in a subsampled call refused"),
    (r"_latent'|log_prob_sum", "the test reads another autoguide's internal sites"),
    (r"AssertionError: -?\d+\.\d+ vs -?\d+$", "float32 rounding of a loss difference (test tolerance 1e-7)"),
    (r"assert", "assertion"),
)


def add_variants(source, densities):
    """``source`` with our guide (one name per density) after every ``AutoNormal`` of a guide-class parametrize list."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    names = [f"SparseSubspaceGuide_d{d:g}".replace(".", "") for d in densities]
    inserts = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "parametrize" and len(node.args) >= 2):
            continue
        first, values = node.args[0], node.args[1]
        if not (isinstance(first, ast.Constant) and first.value in GUIDE_ARGS and isinstance(values, ast.List)):
            continue
        for elt in values.elts:
            if isinstance(elt, ast.Name) and elt.id == "AutoNormal":
                inserts.append(offsets[elt.end_lineno - 1] + elt.end_col_offset)
    for pos in sorted(inserts, reverse=True):
        source = source[:pos] + "".join(f", {n}" for n in names) + source[pos:]
    header = "from _ssvi_variants import _variant  # noqa: E402\n" + "".join(
        f"{n} = _variant({d!r})\n" for n, d in zip(names, densities))
    return header + source, len(inserts)


def prepare(pyro_tests, densities, folder):
    """Copy Pyro's test package (``__init__``, ``common``, the autoguide tests) to ``folder``, with our guide added."""
    tests = folder / "tests"
    (tests / "infer").mkdir(parents=True)
    for rel in ("__init__.py", "common.py", "infer/__init__.py"):
        src = pyro_tests / rel
        if src.exists():
            shutil.copy(src, tests / rel)
        else:
            (tests / rel).write_text("")
    source, lists = add_variants((pyro_tests / TEST_FILE).read_text(), densities)
    (tests / TEST_FILE).write_text(source)
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "_ssvi_variants.py").write_text(VARIANTS)
    return lists


def cause_of(message):
    for pattern, cause in CAUSES:
        if re.search(pattern, message):
            return cause
    return message.split(":")[0][:60] or "other"


def outcomes(junit):
    """``{test id: (outcome, first line of the message)}`` from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name")
        for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            child = case.find(tag)
            if child is not None:
                message = (child.get("message") or child.text or "").strip().splitlines()
                out[name] = (outcome, message[0] if message else "")
                break
        else:
            out[name] = ("passed", "")
    return out


def run(args):
    pyro_tests = pathlib.Path(os.path.expanduser(args.pyro_tests)).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        lists = prepare(pyro_tests, args.densities, folder)
        junit = folder / "report.xml"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), str(pathlib.Path(__file__).resolve().parents[1])]))
        cmd = [sys.executable, "-m", "pytest", "tests/infer/test_autoguide.py", "-q", "-p", "no:cacheprovider",
               "-k", "SparseSubspaceGuide or AutoNormal", f"--junitxml={junit}", "-o", "junit_family=xunit1"]
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
        if not junit.exists():
            raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        results = outcomes(junit)
    return lists, results


def summarise(results, densities):
    ours = {k: v for k, v in results.items() if "SparseSubspaceGuide" in k}
    rows, causes = [], {}
    for name, (outcome, message) in sorted(ours.items()):
        twin = re.sub(r"SparseSubspaceGuide_d\w+?(?=[-\]])", "AutoNormal", name)
        auto = results.get(twin, ("–", ""))[0]
        if outcome in ("failed", "error"):
            cause = cause_of(message)
            causes[cause] = causes.get(cause, 0) + 1
        rows.append({"test": name, "outcome": outcome, "autonormal": auto, "message": message[:300]})
    per_density = {}
    for d in densities:
        tag = f"SparseSubspaceGuide_d{d:g}".replace(".", "")
        mine = [r for r in rows if tag in r["test"]]
        per_density[f"{d:g}"] = {"cases": len(mine), "passed": sum(r["outcome"] == "passed" for r in mine),
                                 "skipped or xfail": sum(r["outcome"] == "skipped" for r in mine)}
    return rows, causes, per_density


def parse_args(argv):
    p = ArgumentParser(description="Pyro's autoguide tests with SparseSubspaceGuide beside AutoNormal.")
    p.add_argument("--pyro-tests", required=True, help="the tests/ folder of a pyro-ppl/pyro checkout (holds infer/test_autoguide.py)")
    p.add_argument("--densities", default="1,0.5", help="comma-separated densities of our guide to add (each in (0, 1])")
    add_common_flags(p)
    args = p.parse_args(argv)
    path = pathlib.Path(os.path.expanduser(args.pyro_tests))
    if not (path / TEST_FILE).is_file():
        p.error(f"--pyro-tests: {path} holds no {TEST_FILE}; pass the tests/ folder of a Pyro checkout")
    try:
        args.densities = [float(d) for d in args.densities.split(",") if d.strip()]
    except ValueError:
        p.error(f"--densities: expected comma-separated numbers, got {args.densities!r}")
    if not args.densities or not all(0 < d <= 1 for d in args.densities):
        p.error(f"--densities: every density must lie in (0, 1], got {args.densities}")
    return args


def main(argv=None):
    args = parse_args(argv)
    lists, results = run(args)
    rows, causes, per_density = summarise(results, args.densities)
    head = [f"# Pyro's autoguide tests with SparseSubspaceGuide\n",
            f"`benchmarks/pyro_autoguide_tests.py`: our guide added beside `AutoNormal` in {lists} parametrize lists of "
            "Pyro's `tests/infer/test_autoguide.py` (test code unchanged).\n",
            markdown_table(["density", "cases", "passed", "skipped or xfail"],
                           [[d, v["cases"], v["passed"], v["skipped or xfail"]] for d, v in per_density.items()]), "",
            "## Failures by cause\n",
            markdown_table(["cause", "cases"], sorted(causes.items(), key=lambda kv: -kv[1])) if causes else "none", "",
            "## Every case\n",
            markdown_table(["test", "ours", "AutoNormal", "message"],
                           [[r["test"], r["outcome"], r["autonormal"], r["message"].replace("|", "\\|")[:160]] for r in rows])]
    md = "\n".join(head)
    write_results("pyro_autoguide_tests", md, {"lists": lists, "per_density": per_density, "causes": causes, "cases": rows}, args)
    print("\n".join(head[:4]))
    return per_density


if __name__ == "__main__":
    run_main(main, usage_errors=(), runtime_errors=(RuntimeError,))
