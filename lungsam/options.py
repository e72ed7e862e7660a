"""Click building blocks shared by every ``<layer>/commands.py`` (imports only click and torch-free modules).

* :class:`Command` / :class:`Group`: the one error handler. A :class:`lungsam.errors.LungsamError` becomes
  one ``error: ...`` line on stderr and its exit code (1: the work failed; 2: an option this run cannot take);
  click's own usage errors exit 2; anything else is a programming error and keeps its traceback. It sits on
  the command class (not only the ``lungsam`` group) so a command invoked on its own behaves the same.
* :func:`ranged`: a click type from :data:`lungsam.ranges.RANGES`, so options and configs share one range.
* :func:`verbosity`: ``-q/--quiet``, ``-v/--verbose``, ``--log-file``: the same in every command, mapped to
  the ``lungsam`` logger's level (default INFO: what the command reports as it goes; ``-q`` warnings only and
  no progress bars; ``-v`` debug).
* :data:`TRAIN_DEVICE`, :data:`RUNTIME_DEVICE`: ``--device`` as a choice everywhere.
* :func:`option` / :func:`options_from` / :func:`config_from`: a config dataclass's fields carry their option's
  metadata (help, flag, range, choices, text form), and the click options are generated from them, so a
  setting's default and its help are written once, on the field.
"""
from __future__ import annotations

import logging
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, Callable, Iterable, Sequence

import click

from .errors import LungsamError, MissingExtraError
from .ranges import RANGES, TRAIN_DEVICES, Range

LOGGER = "lungsam"
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class LungsamFailure(click.ClickException):
    """A :class:`LungsamError` on its way out through click: ``error: <message>``, the error's exit code."""

    def __init__(self, error: LungsamError):
        super().__init__(str(error))
        self.exit_code = getattr(error, "exit_code", 1)

    def show(self, file: Any = None) -> None:
        click.secho(f"error: {self.format_message()}", fg="red", err=True, file=file)


def _configure_logging(ctx: click.Context) -> None:
    """Pop ``verbose``/``log_file`` from ``ctx.params`` (when the command has them) and set up the logger."""
    if "verbose" not in ctx.params and "log_file" not in ctx.params:
        return
    verbose = ctx.params.pop("verbose", 0) or 0
    log_file = ctx.params.pop("log_file", None)
    quiet = ctx.params.get("quiet", 0) or 0  # -q: no progress bars; -qq: warnings and errors only
    configure_logging(verbose=verbose, quiet=quiet >= 2, log_file=log_file)


def release_logging() -> None:
    """Detach (and close) the handlers :func:`configure_logging` added; a command does it when it ends."""
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        if getattr(h, "_lungsam_cli", False):
            logger.removeHandler(h)
            h.close()


def configure_logging(verbose: int = 0, quiet: bool = False, log_file: str | None = None) -> logging.Logger:
    """The ``lungsam`` logger: messages as plain lines on stderr at INFO (``quiet``: WARNING, ``verbose``:
    DEBUG), and with ``log_file`` also every DEBUG record, time-stamped, appended to that file."""
    release_logging()
    logger = logging.getLogger(LOGGER)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    err = logging.StreamHandler(click.get_text_stream("stderr"))
    err.setLevel(level)
    err.setFormatter(logging.Formatter("%(message)s"))
    handlers: list[logging.Handler] = [err]
    if log_file:
        f = logging.FileHandler(log_file, encoding="utf-8")
        f.setLevel(logging.DEBUG)
        f.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(f)
    for h in handlers:
        h._lungsam_cli = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    logger.setLevel(logging.DEBUG if log_file else level)
    logger.propagate = False
    return logger


def log_to(name: str) -> Callable[[str], None]:
    """A ``log(message)`` callback for the library's ``log=`` parameters: INFO on ``lungsam.<name>``, WARNING
    for the library's ``"warning: ..."`` lines (so ``-q`` still shows them)."""
    logger = logging.getLogger(f"{LOGGER}.{name}")

    def log(message: str) -> None:
        (logger.warning if message.startswith("warning:") else logger.info)(message)

    return log


#: Optional third-party modules -> the extra of ``pyproject.toml`` that installs them.
EXTRAS: dict[str, str] = {
    "torch": "train", "torchvision": "train", "segment_anything": "train", "monai": "train",
    "safetensors": "train", "matplotlib": "train",
    "onnx": "export", "onnxconverter_common": "export", "psutil": "export",
    "onnxruntime": "cpu",
    "peft": "lora",
    "pydicom": "dicom", "highdicom": "dicom", "pynetdicom": "dicom", "dicomweb_client": "dicom",
    "openvino": "openvino", "nncf": "int8",
    "ray": "ray", "tritonclient": "triton",
    "tensorrt": "trt", "cuda": "trt",
}


def missing_extra(error: ModuleNotFoundError, command: str,
                  stack: str | None = None) -> MissingExtraError | None:
    """The :class:`MissingExtraError` for a missing optional module, or ``None`` (then it is a bug).
    ``stack``: the command's own extra, named instead of ``train``/``export`` (it includes them)."""
    top = (error.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    if stack and extra in ("train", "export"):
        extra = stack
    if extra == "cpu":
        return MissingExtraError(command, "cpu",
                                 "onnxruntime (choose one: lungsam[cpu], or lungsam[gpu] on an NVIDIA GPU)")
    return MissingExtraError(command, extra, top)


class Command(click.Command):
    """A click command with the package's error handler and logging set-up (see the module docstring)."""

    def __init__(self, *args: Any, extra: str | None = None, **kwargs: Any):
        """``extra``: the extra that installs this command's stack (``train``, ``export``); named when one of
        torch and its companions is missing."""
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        super().__init__(*args, **kwargs)
        self.extra = extra

    def invoke(self, ctx: click.Context) -> Any:
        _configure_logging(ctx)
        try:
            return super().invoke(ctx)
        except LungsamError as e:
            raise LungsamFailure(e) from e
        except ModuleNotFoundError as e:
            words = ctx.command_path.split()[1:] if ctx.parent else [ctx.info_name or self.name or ""]
            extra = missing_extra(e, " ".join(["lungsam", *words]), self.extra)
            if extra is None:
                raise
            raise LungsamFailure(extra) from e
        finally:
            release_logging()


class Group(click.Group):
    """A click group whose commands default to :class:`Command`, with the same error handler."""

    command_class = Command

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LungsamError as e:
            raise LungsamFailure(e) from e


Group.group_class = Group


class RangeType(click.ParamType):
    """A click type that parses an int or float and checks it against a :class:`lungsam.ranges.Range`."""

    def __init__(self, rng: Range):
        self.rng = rng
        self.name = "integer" if rng.kind is int else "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = int(value) if self.rng.kind is int else float(value)
            except ValueError:
                what = "an integer" if self.rng.kind is int else "a number"
                self.fail(f"{value!r} is not {what}", param, ctx)
        elif self.rng.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        why = self.rng.problem(value)
        if why:
            self.fail(why, param, ctx)
        return value

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "INTEGER" if self.rng.kind is int else "FLOAT"

    def __repr__(self) -> str:
        return f"RangeType({self.rng.describe()})"


def ranged(name: str) -> RangeType:
    """The click type of setting ``name`` (a key of :data:`lungsam.ranges.RANGES`)."""
    return RangeType(RANGES[name])


def int_list(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback parsing comma-separated integers, each within ``RANGES[name]``."""
    rng = RANGES[name]

    def parse(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or not isinstance(value, str):
            return value
        try:
            items = tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            msg = f"expected comma-separated integers, got {value!r}"
            raise click.BadParameter(msg, ctx, param) from None
        for v in items:
            why = rng.problem(v)
            if why:
                raise click.BadParameter(f"every item {why}", ctx, param)
        return items

    return parse


TRAIN_DEVICE = click.Choice(list(TRAIN_DEVICES))
RUNTIME_DEVICE = click.Choice(["cpu", "cuda"])


def verbosity(f: Callable) -> Callable:
    """``-q/--quiet`` (passed on as ``quiet``), ``-v/--verbose``, ``--log-file`` (read by ``Command``)."""
    f = click.option("--log-file", type=click.Path(dir_okay=False, writable=True), default=None,
                     help="Also append every message, time-stamped and at debug level, to this file.")(f)
    f = click.option("-v", "--verbose", count=True, help="More detail (debug messages).")(f)
    f = click.option("-q", "--quiet", count=True,
                     help="No progress bars; twice (-qq) also no messages but warnings and errors.")(f)
    return f


def examples(*lines: str) -> str:
    """A command's ``epilog``: its ``--help`` ends with these example command lines, kept verbatim."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


#: The key of a config field's ``metadata`` under which :func:`option` stores its :class:`OptionSpec`.
OPTION_KEY = "lungsam.option"


@dataclass(frozen=True)
class OptionSpec:
    """How a config dataclass field appears on the command line (see :func:`option`)."""

    help: str
    flag: str | None = None
    range: str | None = None
    choices: tuple[str, ...] | None = None
    path: str | None = None
    parse: Callable[[str], Any] | None = None
    text: Callable[[Any], str] | None = None
    multiple: bool = False
    metavar: str | None = None


def option(help: str, *, flag: str | None = None, range: str | None = None, choices: Sequence[str] | None = None,
           path: str | None = None, parse: Callable[[str], Any] | None = None, text: Callable[[Any], str] | None = None,
           multiple: bool = False, metavar: str | None = None) -> dict:
    """The ``metadata`` of a config field that is also a command-line option, for ``dataclasses.field``.

    Args:
        help: the option's help sentence. flag: its name (default ``--`` + the field name with dashes).
        range: a key of :data:`lungsam.ranges.RANGES` (the option's type is then :func:`ranged`).
        choices: the allowed strings. path: ``"file"`` (an existing file) or ``"dir"`` (a folder to write).
        parse: text -> value (raises ``ValueError`` with the reason); text: value -> the text shown as the
            default (both for a field whose value is not what one types, like a tuple).
        multiple: the option may be repeated (a list field). metavar: the value's name in ``--help``.
    """
    spec = OptionSpec(help, flag, range, tuple(choices) if choices is not None else None, path, parse, text,
                      multiple, metavar)
    return {OPTION_KEY: spec}


def option_fields(cls: type, exclude: Iterable[str] = ()) -> list[Field]:
    """The fields of dataclass ``cls`` that carry an :func:`option` (in field order), less ``exclude``."""
    skip = set(exclude)
    unknown = skip - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    return [f for f in fields(cls) if OPTION_KEY in f.metadata and f.name not in skip]


def field_default(f: Field) -> Any:
    """The default value of dataclass field ``f`` (its factory called), ``None`` when it has none."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _click_type(spec: OptionSpec, default: Any) -> Any:
    if spec.range is not None:
        return ranged(spec.range)
    if spec.choices is not None:
        return click.Choice(list(spec.choices))
    if spec.path == "file":
        return click.Path(exists=True, dir_okay=False)
    if spec.path == "dir":
        return click.Path(file_okay=False)
    if spec.parse is not None or spec.multiple:
        return None if spec.parse is not None else click.STRING
    return type(default) if default is not None else click.STRING


def _parser(spec: OptionSpec) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running ``spec.parse`` on text values (click's usage error on ``ValueError``)."""

    def parse(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return spec.parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx, param) from None

    return parse


def click_option(f: Field) -> Callable[[Callable], Callable]:
    """The ``click.option`` decorator of config field ``f`` (which carries an :func:`option`)."""
    spec: OptionSpec = f.metadata[OPTION_KEY]
    default = field_default(f)
    flag = spec.flag or "--" + f.name.replace("_", "-")
    kw: dict[str, Any] = {"help": spec.help}
    if isinstance(default, bool):
        return click.option(flag, f.name, is_flag=True, **({"default": True} if default else {}), **kw)
    if spec.multiple:
        kw.update(default=list(default or []), show_default=True, multiple=True)
    elif default is not None:
        kw.update(default=spec.text(default) if spec.text is not None else default, show_default=True)
    if (t := _click_type(spec, default)) is not None:
        kw["type"] = t
    if spec.parse is not None:
        kw["callback"] = _parser(spec)
    if spec.metavar is not None:
        kw["metavar"] = spec.metavar
    return click.option(flag, f.name, **kw)


def options_from(cls: type, exclude: Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per :func:`option` field of dataclass ``cls`` (in field order), each
    with the field's default, help, range and choices; ``exclude``: fields the command does not offer."""
    decorators = [click_option(f) for f in option_fields(cls, exclude)]

    def add(fn: Callable) -> Callable:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return add


def config_values(cls: type, params: dict[str, Any], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The values of ``cls``'s option fields in a command's ``params`` (repeated options as lists)."""
    out = {}
    for f in option_fields(cls, exclude):
        value = params[f.name]
        out[f.name] = list(value) if f.metadata[OPTION_KEY].multiple else value
    return out


def explicit_params(ctx: click.Context, names: Iterable[str]) -> set[str]:
    """Which of ``names`` the user gave on the command line (or in the environment), not left at the default."""
    default = click.core.ParameterSource.DEFAULT
    return {n for n in names if ctx.get_parameter_source(n) not in (default, None)}
