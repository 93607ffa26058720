"""Messengers that intercept torch calls while they are active.

Local reparameterisation (:class:`~pyro_ssvi.LocalReparameterizationMessenger`) and batched
layers (:class:`~pyro_ssvi.BatchedLayersMessenger`) change what ``F.linear`` / ``F.conv*``
compute while a model runs. Both are Pyro messengers that install a PyTorch
:class:`~torch.overrides.TorchFunctionMode` for as long as they are active;
:class:`TorchModeMessenger` is that shell, written once.

:func:`handler_stack` is the one place the package reads Pyro's stack of active handlers
(``pyro.poutine.runtime._PYRO_STACK``: Pyro has no public accessor for it).
"""

import functools

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK

__all__ = ["TorchModeMessenger", "handler_stack"]


def handler_stack():
    """The active Pyro handlers, outermost first, as a tuple (a snapshot of Pyro's handler stack).

        >>> import pyro
        >>> plate = pyro.plate("data", 3)
        >>> with plate:
        ...     plate in handler_stack()
        True
        >>> plate in handler_stack()
        False
    """
    return tuple(_PYRO_STACK)


class TorchModeMessenger(Messenger):
    """A re-entrant messenger with a ``TorchFunctionMode`` active from its outermost entry to its
    outermost exit.

    Subclasses override :meth:`make_mode` (the mode to install, or ``None`` for none) and the hooks
    :meth:`begin` / :meth:`end`, which run at the outermost entry and exit only. It is re-entrant
    in the sense of Pyro's ``ReentrantMessenger``: entering an instance that is already active only
    counts the depth, and only the outermost entry puts it on Pyro's stack.

        >>> import torch
        >>> from torch.overrides import TorchFunctionMode
        >>> class Double(TorchFunctionMode):
        ...     def __torch_function__(self, func, types, args=(), kwargs=None):
        ...         out = func(*args, **(kwargs or {}))
        ...         return out * 2 if func is torch.add else out
        >>> class Doubling(TorchModeMessenger):
        ...     def make_mode(self):
        ...         return Double()
        >>> with Doubling():
        ...     torch.add(torch.tensor(1.), 1.)
        tensor(4.)
    """

    def __init__(self):
        super().__init__()
        self._depth = 0
        self._mode = None

    @property
    def active(self):
        """Whether the messenger is entered (at any depth)."""
        return self._depth > 0

    def make_mode(self):
        """The ``TorchFunctionMode`` installed at the outermost entry, or ``None``."""
        return None

    def begin(self):
        """Called at the outermost entry, before the mode is installed."""

    def end(self):
        """Called at the outermost exit, after the mode is removed (also when the block raised)."""

    def __call__(self, fn):
        return functools.wraps(fn)(super().__call__(fn))

    def __enter__(self):
        if self._depth == 0:
            self.begin()
            self._mode = self.make_mode()
            if self._mode is not None:
                self._mode.__enter__()
            try:
                super().__enter__()
            except BaseException:  # nothing stays installed: not the mode, and the depth stays 0
                mode, self._mode = self._mode, None
                if mode is not None:
                    mode.__exit__(None, None, None)
                self.end()
                raise
        self._depth += 1
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self._depth -= 1
        if self._depth == 0:
            try:
                return super().__exit__(exc_type, exc_value, traceback)
            finally:
                mode, self._mode = self._mode, None
                try:
                    if mode is not None:
                        mode.__exit__(exc_type, exc_value, traceback)
                finally:
                    self.end()
        return None
