"""The one exception type for mistakes a user can fix, and how a script reports it: one line, no traceback."""
import sys

EXIT_STATUS = 2  # what `python -m nli` and argparse exit with on a user's mistake


class UserError(Exception):
    """A problem with the user's input, files or setup, with a message saying what to do."""


def first_line(error):
    """The first line of an exception's message: MXNet's go on with a C++ stack trace."""
    return (str(error).strip().splitlines() or [""])[0]


def report_user_errors():
    """Make this script print an uncaught UserError as `python -m nli` does: `error: ...`, exit status 2.

    Chapter scripts run top to bottom like a notebook, so there is no main() to wrap; the hook sees
    what escapes the script. Other exceptions keep their traceback, and Jupyter, which does not call
    sys.excepthook, shows its own.
    """
    previous = sys.excepthook

    def excepthook(kind, error, traceback):
        if not issubclass(kind, UserError):
            return previous(kind, error, traceback)
        sys.stdout.flush()
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_STATUS)  # Python exits with it, as if the script had raised it

    sys.excepthook = excepthook
