"""The one exception type for mistakes a user can fix, and how a script reports it: one line, no traceback."""
import sys

EXIT_STATUS = 2  # what `python -m nli` and argparse exit with on a user's mistake
OS_ERROR_STATUS = 1  # and on the machine's refusal: a full disk, a read-only folder, a path through a file


class UserError(Exception):
    """A problem with the user's input, files or setup, with a message saying what to do."""


def first_line(error):
    """The sentence of an exception's message: MXNet's own line ("Check failed: ..."), which MXNet 1.9.1 puts after
    a C++ stack trace, else the first non-empty line, else the exception's type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    mxnet = [line.split("MXNetError: ", 1)[1] for line in lines if "MXNetError: " in line]
    if mxnet:
        return mxnet[-1]
    return lines[0] if lines else type(error).__name__


def describe_os_error(error):
    """The system's own sentence for an OSError, after the path it concerns: `data/x: Read-only file system`."""
    return f"{error.filename + ': ' if error.filename else ''}{error.strerror or error}"


def report_user_errors():
    """Make this script print an uncaught UserError or OSError as `python -m nli` does: `error: ...`, exit status
    2 (or 1 for the OSError).

    Chapter scripts run top to bottom like a notebook, so there is no main() to wrap; the hook sees
    what escapes the script. Other exceptions keep their traceback, and Jupyter, which does not call
    sys.excepthook, shows its own.
    """
    previous = sys.excepthook

    def excepthook(kind, error, traceback):
        if not issubclass(kind, (UserError, OSError)):
            return previous(kind, error, traceback)
        sys.stdout.flush()
        user_error = issubclass(kind, UserError)
        print(f"error: {error if user_error else describe_os_error(error)}", file=sys.stderr)
        raise SystemExit(EXIT_STATUS if user_error else OS_ERROR_STATUS)  # as if the script had raised it

    sys.excepthook = excepthook
