"""Every command's arguments must be UTF-8 text, except those naming a file or directory.

Linux hands a program its arguments as bytes; Python decodes bytes that are not UTF-8 to
lone surrogates ("\\udcff"), which nothing can encode again. Such a `--name`, `--reason` or
session id reached the control request's encoder and ended `cluster session create` in a
traceback (`UnicodeEncodeError: ... surrogates not allowed`), and any other text argument
could as well. Checked as each argument is parsed, for every command at once, so a command
added later is covered too: `argument --name: not valid UTF-8: b'\\xff'`, exit 2.

A file or directory may have any name the OS takes: those arguments are passed as given
(`Path`, `data_dir_arg`, `text_or_path`); the OS takes the bytes back unchanged.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.commands._process import data_dir_arg


def text_or_path(text: str) -> str:
    """`type=` of an argument that may be a file's path (`cluster worker --master`): kept as
    given, and exempt from the UTF-8 check like any path."""
    return text


#: Converters of arguments that name a file or directory.
_FILE_NAMES: tuple[Callable[[str], Any], ...] = (Path, data_dir_arg, text_or_path)


def require_utf8(parser: argparse.ArgumentParser) -> None:
    """Make every argument of `parser` and its subcommands' parsers (except file names)
    refuse text that is not UTF-8, before its own conversion and checks."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                require_utf8(sub)
        elif action.nargs != 0 and action.type not in _FILE_NAMES:
            action.type = _utf8_then(parser._registry_get("type", action.type, action.type))


def _utf8_then(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def check(text: str) -> Any:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise argparse.ArgumentTypeError(f"not valid UTF-8: {_as_typed(text)}") from None
        return convert(text)

    # argparse names the converter in its own refusals ("invalid int value: 'x'").
    check.__name__ = getattr(convert, "__name__", repr(convert))
    return check


def _as_typed(text: str) -> str:
    """The argument's bytes as the shell took them (b'\\xff'), where they can be had."""
    try:
        return repr(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a surrogate no undecodable byte makes (given from Python)
        return repr(text.encode("utf-8", "backslashreplace"))
