"""Run a set of tests many times in a row and count the runs that fail: a flaky failure (an abort at process exit,
a race) shows up as a rate, not as a one-off.

    python benchmarks/repeat_tests.py                                   # tests/test_cifar_torchrun.py, 20 runs
    python benchmarks/repeat_tests.py --runs 50 tests/test_distributed.py

Each run is ``python -m pytest -q -n 0 -p no:cacheprovider TESTS`` in a fresh process (one at a time, so two runs never
share ports or cores). Prints one line per run and a summary; with a failure, the lines of its output that name an
abort (``terminate called``, ``SIGABRT``, ``Signals.SIGABRT``, ``core dumped``) or a failed test. Writes
``results/repeat_tests.{md,json}``; exit 1 if any run failed.
"""

import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pyro_ssvi.scripts.cli import ArgumentParser, run_main  # noqa: E402
from common import add_common_flags, markdown_table, write_results  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKERS = ("terminate called", "SIGABRT", "core dumped", "FAILED", "ERROR ")


class RepeatFailure(RuntimeError):
    """At least one run failed (exit 1)."""


def run_once(tests):
    """``(passed, seconds, lines naming an abort or a failure)`` of one pytest run of ``tests``."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *tests],
                         capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if any(m in ln for m in MARKERS)]
    return res.returncode == 0, time.perf_counter() - t0, lines


def main(argv=None):
    p = ArgumentParser(description="Run tests many times in a row and count the failing runs.")
    p.add_argument("tests", nargs="*", default=["tests/test_cifar_torchrun.py"], help="pytest paths or node ids")
    p.add_argument("--runs", type=int, default=20, help="runs in a row")
    add_common_flags(p)
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be positive, got {args.runs}")
    missing = [t for t in args.tests if not (ROOT / t.split("::")[0]).exists()]
    if missing:
        p.error(f"tests: no such file {missing[0]!r} (paths are relative to the repository root)")
    rows, failures = [], []
    for i in range(args.runs):
        ok, seconds, lines = run_once(args.tests)
        rows.append({"run": i + 1, "passed": ok, "seconds": seconds, "lines": lines[:20]})
        print(f"run {i + 1}/{args.runs}: {'pass' if ok else 'FAIL'} ({seconds:.0f} s)", flush=True)
        if not ok:
            failures.append(i + 1)
            for line in lines[:20]:
                print("    " + line)
    passed = args.runs - len(failures)
    md = "\n".join([
        "# Repeated test runs\n",
        f"`python benchmarks/repeat_tests.py --runs {args.runs} {' '.join(args.tests)}`: {passed} of {args.runs} runs passed"
        + (f" (failed: runs {', '.join(map(str, failures))})" if failures else "") + ".\n",
        markdown_table(["run", "result", "seconds", "abort / failure lines"],
                       [[r["run"], "pass" if r["passed"] else "FAIL", f"{r['seconds']:.0f}", "<br>".join(r["lines"][:3]) or "–"]
                        for r in rows]),
    ])
    write_results("repeat_tests", md, {"tests": args.tests, "runs": rows, "passed": passed}, args)
    print(f"{passed} of {args.runs} runs passed")
    if failures:
        raise RepeatFailure(f"{len(failures)} of {args.runs} runs failed (runs {', '.join(map(str, failures))})")


if __name__ == "__main__":
    run_main(main, runtime_errors=(RepeatFailure,))
