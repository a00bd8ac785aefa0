"""What every `pah-edge` command shares: the Typer app and common options, one-line errors, options
derived from config dataclasses, printing a report, logging, and the entry point's usage errors."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import sys
import typing
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from pah_edge.atomic import STORAGE_ERRNOS, storage_error
from pah_edge.errors import PahEdgeError
from pah_edge.report import Report

err_console = Console(stderr=True)
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

BUNDLE_HELP = "Bundle directory written by `pah-edge export`."
BUNDLE_ARGUMENT = typer.Argument(..., help=BUNDLE_HELP)
BUNDLE_OPTION = typer.Option(Path("bundle"), help=BUNDLE_HELP)
JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON (and nothing else) on stdout.")
PROGRESS_OPTION = typer.Option(True, "--progress/--no-progress", help="Show progress bars (on stderr).")


def user_errors(command):
    """Print a PahEdgeError, or a storage fault outside the bundle's own writes (a read, a scratch
    copy, a library's file), as one line and exit 1; anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PahEdgeError as exc:
            print_error(str(exc))
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            print_error(str(storage_error(exc, Path(exc.filename or "a file"), writing=False)))
        raise typer.Exit(1)

    return wrapper


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, never wrapped."""
    # escape: a message quoting `pip install 'pah-edge[tensorrt]'` must not lose "[tensorrt]" as markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def show(report: Report, as_json: bool = False, *args) -> None:
    """The report as one line of JSON (and nothing else) or as its text lines (``args`` go to ``lines``)."""
    text = json.dumps(report.to_dict()) if as_json else "\n".join(report.lines(*args))
    typer.echo(text)


def config_options(**configs: type):
    """Offer each field of the ``configs`` dataclasses declared with `pah_edge.options.option` as an
    option (or argument) of the command, so that default and help are declared once, on the field.
    The command receives the built dataclasses as keyword arguments named like ``configs``' keys."""

    def decorate(command):
        hints = typing.get_type_hints(command)
        offered = {key: [f for f in dataclasses.fields(cls) if "help" in f.metadata] for key, cls in configs.items()}
        params = []
        for key, cls in configs.items():
            types = typing.get_type_hints(cls)
            for f in offered[key]:
                meta = f.metadata
                info = (typer.Argument(f.default, help=meta["help"]) if meta["argument"] else
                        typer.Option(f.default, *(meta["flags"] or (f"--{f.name.replace('_', '-')}",)),
                                     help=meta["help"]))
                params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                                annotation=_click_type(types[f.name])))
        params += [p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY)
                   for p in inspect.signature(command).parameters.values() if p.name not in configs]

        @functools.wraps(command)
        def wrapper(**kwargs):
            built = {key: cls(**{f.name: _field_value(kwargs.pop(f.name)) for f in offered[key]})
                     for key, cls in configs.items()}
            return command(**kwargs, **built)

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _click_type(annotation):
    # A repeatable option arrives as a list; frozen dataclasses keep sequences as tuples.
    return list[typing.get_args(annotation)[0]] if typing.get_origin(annotation) is tuple else annotation


def _field_value(value):
    return tuple(value) if isinstance(value, list) else value


def setup_logging() -> None:
    """INFO from rank 0 only; Rich formatting on a terminal, plain unwrapped lines in logs and pipes."""
    rank = os.environ.get("RANK", "0")
    if err_console.is_terminal:
        handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
        fmt = "%(message)s"
    else:
        handler, fmt = logging.StreamHandler(), "%(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, format=fmt, handlers=[handler])


def run_app(app: typer.Typer) -> None:
    """Run ``app`` as the console entry point: every user error, usage errors included, is one line
    and exit code 1."""
    setup_logging()
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        code = 1
    except Exception as exc:
        # Typer vendors Click's UsageError (exit code 2); match it by shape, not by a private import.
        if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
            raise
        message = exc.format_message().rstrip(".")
        if not message:  # bare `pah-edge`: the help text was the answer
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        print_error(f"{message}; see `{ctx.command_path if ctx else 'pah-edge'} --help`")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
