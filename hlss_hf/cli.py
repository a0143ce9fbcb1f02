"""What every program of the project does at its door and on its way out: ``--help`` and settings errors before
torch loads (:func:`check_command_line`), and errors a user can act on as one line ``error: ...`` with an exit
status instead of a traceback (:func:`exit_on_error`; ``--debug`` or ``HLSS_DEBUG=1`` keeps the traceback)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

from hlss_hf import register_auto_classes
from hlss_hf.errors import ConfigError, ConversionError, DatasetError, OutputInUseError, SourceError
from hlss_hf.files import describe_os_error


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """Whether the user asked for full tracebacks: ``--debug`` (``args.debug``) or ``HLSS_DEBUG=1``."""
    return bool(getattr(args, "debug", False)) or os.environ.get("HLSS_DEBUG", "") not in ("", "0")


def describe_error(error: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> str | None:
    """One line for an error the user can act on, or ``None`` for anything else (a bug keeps its traceback).

    Args:
        error (`BaseException`): the error.
        user_errors (`tuple` of exception types): errors whose message is already written for the user (bad input
            naming the item); :class:`SourceError`, :class:`ConversionError` and
            :class:`hlss_hf.errors.DatasetError` always are.
    """
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    hub_errors = (HfHubHTTPError, OfflineModeIsEnabled)
    if isinstance(error, (SourceError, ConversionError, DatasetError, OutputInUseError, *user_errors)):
        message = str(error)
        if "\nOriginal Traceback" in message:  # re-raised from a DataLoader worker: the worker's own line
            last = message.strip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
    elif isinstance(error, hub_errors):
        message = f"Hub: {(str(error).strip().splitlines() or [type(error).__name__])[0]}"
    elif isinstance(error, OSError) and error.errno is not None:
        message = describe_os_error(error)
    elif isinstance(error, OSError):  # a library's own error (e.g. datasets' "no data files"): its first line
        message = f"{type(error).__name__}: {(str(error).strip().splitlines() or ['?'])[0]}"
    else:
        return None
    return " ".join(message.split()) or type(error).__name__  # one line, whatever the message held


@contextlib.contextmanager
def exit_on_error(
    debug: bool = False,
    user_errors: tuple[type[BaseException], ...] = (),
    status: int = 1,
    interrupted: str | None = None,
):
    """Turn the errors a user can act on into one line ``error: ...`` on stderr and exit status `status`.

    Used by the converters (:func:`run_converter`), ``train.py`` and ``python -m hlss_hf.evaluate``: bad input,
    a missing local folder or Hub repo, file-system and Hub errors end the program without a traceback
    (:func:`describe_error`); any other error keeps its traceback. `debug` (``--debug`` or ``HLSS_DEBUG=1``, see
    :func:`debug_requested`) re-raises everything as it is.

    Args:
        debug (`bool`, defaults to `False`): show tracebacks instead.
        user_errors (`tuple` of exception types): further error types whose message is written for the user.
        status (`int`, defaults to 1): the exit status. With 1 the line travels in `SystemExit` (the interpreter
            prints it); with another status it is printed to stderr first.
        interrupted (`str`, *optional*): the line for Ctrl-C; without it Ctrl-C ends with its traceback.
    """
    try:
        yield
    except KeyboardInterrupt:
        if debug or interrupted is None:
            raise
        sys.exit(f"error: {interrupted}")
    except Exception as error:
        if debug:
            raise
        message = describe_error(error, user_errors)
        if message is None:
            raise
        if status == 1:
            raise SystemExit(f"error: {message}") from None
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(status) from None


def check_command_line(
    argv: list[str], parse: Callable[[list[str]], Any], show_help: Callable[[], None]
) -> None:
    """What a program answers before torch and the model code load (seconds; see ``hlss_hf/__init__.py``):
    ``--help`` (`show_help`, then exit 0) and a settings error (`parse` raising :class:`ConfigError`: one line
    ``error: ...``, exit 1; ``--debug`` or ``HLSS_DEBUG=1`` shows the traceback). A valid command line returns,
    with HLSS registered with transformers' Auto classes (which a program of the project defers until now)."""
    if "-h" in argv or "--help" in argv:
        show_help()
        raise SystemExit(0)
    with exit_on_error("--debug" in argv or debug_requested(), user_errors=(ConfigError,)):
        parse([arg for arg in argv if arg != "--debug"])
    register_auto_classes()
