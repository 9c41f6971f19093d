"""The run command's output for the user: lines on stdout (say), above the one progress bar while one is shown.
Standard library only (the progress bar itself, tqdm, is made by the caller in the environment)."""

import contextlib
import sys

_bar = None  # the progress bar while one is shown: say() prints above it


def say(text):
    """The command's output for the user (stdout): what is made, with which settings, where it went."""
    if _bar is not None:
        _bar.write(text, file=sys.stdout)
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def show(bar):
    """say() prints above this progress bar from now on (None: no bar)."""
    global _bar
    _bar = bar
    return bar


def ascii_only(stream):
    """Whether a console can't show the progress bar's block characters (a gbk or ascii console)."""
    try:
        "▏█".encode(stream.encoding or "ascii")
        return False
    except (UnicodeEncodeError, LookupError):
        return True


def utf8_console():
    """Never crash on a character the console can't show (a Chinese prompt on a gbk or ascii console)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError):
                stream.reconfigure(errors="replace")
