"""Sphinx configuration of the pyro_ssvi documentation (``sphinx-build -W -n docs docs/_build``)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "pyro_ssvi"
author = "pyro_ssvi developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.doctest", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
html_theme = "furo" if __import__("importlib").util.find_spec("furo") else "alabaster"
exclude_patterns = ["_build"]
nitpicky = True
# names of other packages (no intersphinx: the build runs offline)
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|pyro|numpy|np|typing|collections|numba|argparse|nn)(\..*)?"),
    (r"py:class", r"(callable|optional|tuple|dict|list|int|float|str|string|bool|Module|Tensor|Distribution|ExpandedDistribution)"),
    (r"py:meth", r"(register_kl|state_dict|load_state_dict)"),
]


def _resolve_reexports(app, env, node, contnode):
    """``pyro_ssvi.Name`` (a name the package re-exports) -> its page in the module that defines it."""
    import importlib

    target = node.get("reftarget", "")
    if node.get("refdomain") != "py":
        return None
    head, _, rest = (target[len("pyro_ssvi."):] if target.startswith("pyro_ssvi.") else target).partition(".")
    obj = getattr(importlib.import_module("pyro_ssvi"), head, None)
    module = getattr(obj, "__module__", None)
    if obj is None or module is None or not module.startswith("pyro_ssvi.") or module == target.rpartition(".")[0]:
        return None
    node["reftarget"] = f"{module}.{head}" + (f".{rest}" if rest else "")
    return env.domains["py"].resolve_xref(env, node["refdoc"], app.builder, node["reftype"], node["reftarget"], node, contnode)


def setup(app):
    app.connect("missing-reference", _resolve_reexports)
