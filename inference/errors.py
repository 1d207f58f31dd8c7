"""The one exception type that means "the user gave us something wrong".

Commands catch it at the top and print its message (no traceback) with a non-zero exit. The message is one line
naming what was wrong and where (file, line, field); a recipe with several problems lists them one per line, so
that all of them are reported at once.
"""


import signal
import sys
import threading
from typing import Callable


class UserError(Exception):
    """A bad input the user can fix: the message is shown to them verbatim."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is (as Ctrl-C raises KeyboardInterrupt), so that a terminated command
    cleans up and records its state (run.json, MLflow, work directories) exactly as an interrupted one does."""


def _terminate(signum, frame):
    raise Terminated()


def run_command(action: Callable[[], int | None]) -> int:
    """Run a command-line action: its own exit status if it returns one (else 0); a UserError becomes one
    ``error: ...`` line and exit 2, Ctrl-C exit 130, SIGTERM (:class:`Terminated`) exit 143, each with a line saying
    so."""
    main = threading.current_thread() is threading.main_thread()   # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        return action() or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
