"""Helpers for the command-line scripts (examples and benchmarks)."""

import argparse
import os
import sys
import tempfile


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line on stderr and exit code 2.

    It also checks, before any work is done, that the files a run will write can be written.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def check_output_file(self, flag, path):
        """Refuse ``path`` (given by ``flag``) unless a file can be written there; missing folders are made."""
        problem = output_file_problem(path)
        if problem:
            self.error(f"{flag} {path}: {problem}")

    def check_image_file(self, flag, path):
        """:meth:`check_output_file`, and refuse a file type that matplotlib cannot write (or no matplotlib)."""
        problem = image_file_problem(path) or output_file_problem(path)
        if problem:
            self.error(f"{flag} {path}: {problem}")

    def check_distinct_files(self, files):
        """Refuse two flags of ``files`` (``(flag, path)`` pairs; ``None`` paths skipped) naming the same file."""
        seen = {}
        for flag, path in files:
            if path is None:
                continue
            key = os.path.realpath(path)
            if key in seen:
                self.error(f"{flag} {path}: the same file as {seen[key]}; pick another path")
            seen[key] = flag


def output_file_problem(path):
    """Why no file can be written at ``path`` (``None`` if one can); creates the missing parent folders.

    The folder is tested by creating and removing a temporary file in it.
    """
    folder = os.path.dirname(path) or "."  # not normalised: "a/b/../c" needs a/b too
    if os.path.isdir(path):
        return "is a folder; expected a file path"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file is read-only"
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except (FileExistsError, NotADirectoryError):
        return "a folder on its path is a file"
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror or e})"
    return None


def image_file_problem(path):
    """Why matplotlib cannot save an image at ``path`` (``None`` if it can): no matplotlib, or an unknown extension."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return "saving images needs matplotlib: pip install 'pyro-ssvi[examples]' (or matplotlib)"
    types = sorted(FigureCanvasBase.get_supported_filetypes())
    extension = os.path.splitext(path)[1].lower()
    if extension[1:] not in types:
        what = f"{extension} files" if extension else "a file name without an extension"
        return f"matplotlib cannot write {what}; end the name with one of " + " ".join("." + t for t in types)
    return None


def run_main(main, argv=None, usage_errors=(), runtime_errors=()):
    """Run ``main(argv)`` as a command: known failures become one line on stderr and exit 1 or 2.

    ``usage_errors`` are exception types the user can fix by changing the command (exit 2);
    ``runtime_errors`` are failures of the run itself, such as a full disk, and a
    :class:`~pyro_ssvi.NonFiniteLossError` is one too (exit 1); Ctrl-C exits 130, and output
    piped into a reader that stopped early (``| head``) ends quietly with 141, as a shell's SIGPIPE.
    """
    from ..finite import NonFiniteLossError

    try:
        main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # the reader is gone: point stdout at /dev/null so that Python's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except tuple(usage_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLossError, *runtime_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


__all__ = [
    "ArgumentParser",
    "image_file_problem",
    "output_file_problem",
    "run_main",
]
