"""Command options: dataclass fields that declare one (`option`), and comma-separated values as users
type them (``--batch 1,8,32``, ``--runtime onnxruntime,torch``)."""

from __future__ import annotations

from dataclasses import field

from pah_edge.errors import ConfigError


def option(default, help: str, *flags: str, argument: bool = False):
    """A dataclass field that a command offers (`pah_edge.cli_support.config_options`): ``help`` its
    text, ``flags`` its names (default ``--field-name``), ``argument`` a positional argument instead.
    The default is declared only here."""
    return field(default=default, metadata={"help": help, "flags": flags, "argument": argument})


def names(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def whole_numbers(text: str, option: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``; anything else is a ConfigError naming ``option``."""
    try:
        return tuple(int(part) for part in names(text))
    except ValueError:
        raise ConfigError(f"{option} takes positive whole numbers such as 1,8,32; got {text!r}") from None
