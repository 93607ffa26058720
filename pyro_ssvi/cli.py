"""Helpers for the command-line scripts (examples and benchmarks)."""

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_main(main, argv=None, usage_errors=()):
    """Run ``main(argv)`` as a command: known failures become one line on stderr and exit 1 or 2.

    ``usage_errors`` are exception types the user can fix (exit 2); a
    :class:`~pyro_ssvi.NonFiniteLossError` exits 1; Ctrl-C exits 130.
    """
    from .svi import NonFiniteLossError

    try:
        main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except tuple(usage_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
