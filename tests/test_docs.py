"""The documentation site builds from the docstrings with no warning: every cross-reference resolves (nitpicky)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import sphinx"]).returncode != 0, reason="sphinx is not installed (the docs extra)")
def test_the_docs_build_with_warnings_as_errors(tmp_path):
    res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    api = (tmp_path / "api.html").read_text()
    import pyro_ssvi

    for name in pyro_ssvi.__all__:  # every public name of the package has its entry
        obj = getattr(pyro_ssvi, name)
        target = f"module-{obj.__name__}" if isinstance(obj, type(pyro_ssvi)) else f"{obj.__module__}.{name}"
        assert f'id="{target}"' in api, target
