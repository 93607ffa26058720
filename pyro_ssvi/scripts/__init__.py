"""Helpers for the example and benchmark scripts, not part of the method.

* :mod:`pyro_ssvi.scripts.cli`: an ``argparse`` parser whose errors are one line and exit 2,
  up-front checks of the files a run will write, and :func:`~pyro_ssvi.scripts.cli.run_main`
  (known errors as one line, no traceback);
* :mod:`pyro_ssvi.scripts.plots`: reliability diagrams and uncertainty histograms (needs
  matplotlib, the ``examples`` extra).

Nothing in :mod:`pyro_ssvi` imports this subpackage.
"""
