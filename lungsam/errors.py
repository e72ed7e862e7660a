"""The package's error base (torch-free; imported by every layer, the runtime included).

Every error a user can cause (a bad file, an option this run cannot honour, a missing extra) derives from
:class:`LungsamError`; ``lungsam.cli`` turns it into one ``error: ...`` line and exit code
:attr:`LungsamError.exit_code` (1: the work failed). :class:`ArgumentError` (exit 2, like click's usage
errors) is for what only the library can tell is wrong with the command line: a combination of options, or an
option this machine or this run cannot take. Anything else (``ValueError`` from a bug, ``TypeError``, ...) is
a programming error and keeps its traceback.

Subclasses keep a builtin second base (``class DataError(LungsamError, ValueError)``) so callers that catch
``ValueError`` or ``RuntimeError`` keep working.
"""
from __future__ import annotations


class LungsamError(Exception):
    """A failure the user can act on; the CLI prints ``error: <message>`` and exits with :attr:`exit_code`."""

    exit_code = 1


class ArgumentError(LungsamError, ValueError):
    """An option (or a combination of options) this command cannot take here; exit 2, like a usage error."""

    exit_code = 2


class ConfigError(ArgumentError):
    """A configuration value outside its range (:mod:`lungsam.ranges`), raised where the config is built."""


class UnsupportedHereError(ArgumentError, RuntimeError):
    """An option this machine cannot honour (``--device cuda`` without CUDA, ``--cpu-bf16`` without native
    bfloat16); refused before any work, never downgraded silently."""


class OutputExistsError(ArgumentError, FileExistsError):
    """``--out`` already holds a run or results that this command would mix with its own."""


class MissingExtraError(LungsamError, ImportError):
    """A command or feature needs an optional dependency group (``pip install 'lungsam[EXTRA]'``)."""

    def __init__(self, what: str, extra: str, missing: str | None = None):
        self.extra = extra
        self.missing = missing
        why = f" ({missing} is not installed)" if missing else ""
        super().__init__(f"{what} needs the '{extra}' extra{why}: pip install 'lungsam[{extra}]' "
                         f"(or, from a source tree, pip install -e '.[{extra}]')")
