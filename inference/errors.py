"""The one exception type that means "the user gave us something wrong".

Commands catch it at the top and print its message (no traceback) with a non-zero exit. The message is one line
naming what was wrong and where (file, line, field); a recipe with several problems lists them one per line, so
that all of them are reported at once.
"""


import sys
from typing import Callable


class UserError(Exception):
    """A bad input the user can fix: the message is shown to them verbatim."""


def run_command(action: Callable[[], None]) -> int:
    """Run a command-line action: a UserError becomes one ``error: ...`` line and exit 2, Ctrl-C exit 130."""
    try:
        action()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
