"""The machinery under the argument parser: one-line usage errors, help text laid out as
written, flag defaults read from the config dataclasses, the examples epilog."""

from __future__ import annotations

import argparse
import dataclasses

from actclust.errors import UserError


class Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph prose (descriptions); keeps laid-out text (epilogs) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in the project's one-line form."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def default(cls: type, name: str):
    """The default of config field ``name`` of dataclass ``cls``."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def examples(*lines: str) -> str:
    return "examples:\n" + "".join(f"  {line}\n" for line in lines)


def version() -> str:
    import importlib.metadata as md

    try:
        return md.version("actclust")
    except md.PackageNotFoundError:  # run from a source tree that is not installed
        from actclust import __version__
        return __version__
