"""What every program of the project does at its door and on its way out: its settings, read from YAML and the
command line (:class:`Config` of :class:`Section` dataclasses, :func:`parse`, on jsonargparse), ``--help`` and
settings errors before torch loads (:func:`check_command_line`), and errors a user can act on as one line
``error: ...`` with an exit status instead of a traceback (:func:`exit_on_error`; ``--debug`` or ``HLSS_DEBUG=1``
keeps the traceback). The spellings it accepts are described in docs/training.md."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import json
import os
import re
import sys
import types
import typing
from argparse import Action, ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import yaml
from jsonargparse import ArgumentParser, DefaultHelpFormatter, set_parsing_settings

from hlss_hf import register_auto_classes
from hlss_hf.errors import ConfigError, ConversionError, DatasetError, OutputInUseError, SourceError
from hlss_hf.files import describe_os_error


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """Whether the user asked for full tracebacks: ``--debug`` (``args.debug``) or ``HLSS_DEBUG=1``."""
    return bool(getattr(args, "debug", False)) or os.environ.get("HLSS_DEBUG", "") not in ("", "0")


def describe_error(error: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> str | None:
    """One line for an error the user can act on, or ``None`` for anything else (a bug keeps its traceback).
    `user_errors`: further types whose message is written for the user, as :class:`SourceError`'s is."""
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
    """Turn the errors a user can act on (:func:`describe_error`) into one line ``error: ...`` on stderr and
    exit status `status` (1: the line travels in `SystemExit`; another: printed first); any other error keeps
    its traceback, and `debug` (:func:`debug_requested`) re-raises everything. `interrupted`: the line for
    Ctrl-C (without it Ctrl-C ends with its traceback)."""
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
    """``--help`` (`show_help`, exit 0) and settings errors (`parse` raising :class:`ConfigError`: one line,
    exit 1; ``--debug`` keeps the traceback), answered before torch and the model load (hlss_hf/__init__.py).
    A valid command line returns with HLSS registered with transformers' Auto classes, deferred until now."""
    if "-h" in argv or "--help" in argv:
        show_help()
        raise SystemExit(0)
    with exit_on_error("--debug" in argv or debug_requested(), user_errors=(ConfigError,)):
        parse([arg for arg in argv if arg != "--debug"])
    register_auto_classes()


# ---------------------------------------------------------------------------------------------------------------
# Settings: sections of dataclasses, read from YAML and the command line by jsonargparse (docs/training.md)

# Field help comes from each field's attribute docstring.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

_NULL = ("null", "~")


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` ``config key 'KEY': MESSAGE`` unless `condition`."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def _alternatives(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _takes(annotation: Any, kind: type = list) -> bool:
    """Whether `annotation` admits a `kind` (``list`` or ``dict``)."""
    return any(a is kind or typing.get_origin(a) is kind for a in _alternatives(annotation))


@functools.cache
def _value_parser(annotation: Any) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=annotation)
    return parser


def convert(value: Any, annotation: Any, key: str) -> Any:
    """`value` (from YAML, the command line or Python) as type `annotation`; :class:`ConfigError` naming `key`.

    Text is read as YAML (``"1e-4"`` -> 0.0001, ``"null"`` -> None, ``"{p: 1}"`` -> a mapping); a number given for
    text is its spelling, and one name given for a list is a list of one."""
    alternatives = _alternatives(annotation)
    if annotation is Any or type(value) in alternatives:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and str in alternatives:
        return str(value)
    if isinstance(value, str) and _takes(annotation) and value.strip()[:1] != "[" and value not in _NULL:
        value = [value]
    try:
        return _value_parser(annotation).parse_object({"value": value}).value
    except ArgumentError as err:
        raise ConfigError(one_line(err, key)) from None


def one_line(error: BaseException, key: str | None = None) -> str:
    """jsonargparse's message (several lines) as one: ``config key 'K': expected T, got 'V'``."""
    text = str(error)
    found = re.search(r'Parser key "([^"]+)"', text)
    got = re.search(r"(?:Got value|Given value): (.*)", text)
    if found and got:
        wanted = re.findall(r"Expected a (?:<class '(\w+)'>|(typing\.Literal\[.*\]))", text)
        # A Literal reads as its choices, as users write them: "one of ['run', 'reference']".
        wanted = [w[0] or "one of [" + w[1].removeprefix("typing.Literal[") for w in wanted]
        wanted = " or ".join(dict.fromkeys(w.replace("NoneType", "null") for w in wanted)) or "another value"
        key = key if key is not None and found.group(1) == "value" else found.group(1)
        verb = "must be" if wanted.startswith("one of") and " or " not in wanted else "expected"
        return f"config key '{key}': {verb} {wanted}, got {got.group(1).strip()!r}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@dataclasses.dataclass
class Section:
    """One section of a config (``model``, ``data``, ``training``, ...); values are converted and checked on
    construction (:meth:`validate`), and every error names ``section.key``."""

    section: ClassVar[str] = ""
    #: Fields without a usable default: ``--help`` shows them as required, :meth:`validate` checks them.
    required: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.validate()

    def key(self, name: str) -> str:
        """The full key of field ``name``: ``section.name``."""
        return f"{self.section}.{name}"

    def validate(self) -> None:
        """Convert every field to its declared type, then check the values (subclasses add their checks)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, convert(getattr(self, f.name), hints[f.name], self.key(f.name)))
        for name in self.required:
            check(getattr(self, name) not in (None, ""), self.key(name), "is required (see --help)")


@dataclasses.dataclass
class Config:
    """A whole configuration: one field per :class:`Section`; cross-section checks in :meth:`validate`."""

    #: Old key -> (its new key, a note): an old key answers with the new one.
    renamed: ClassVar[dict[str, tuple[str, str]]] = {}
    #: The key a command line's one bare value sets (a converter's ``source.root``), if any.
    positional: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def sections(cls) -> dict[str, type[Section]]:
        """Section name -> section class."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        """Check each section, then the settings that span sections (subclasses add those)."""
        for name, cls in self.sections().items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ConfigError(f"config key '{name}' must be a {cls.__name__}, got {type(value).__name__}")
            value.validate()

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (YAML / JSON serialisable)."""
        return dataclasses.asdict(self)


def config_keys(config_class: type[Config]) -> dict[str, Any]:
    """``section.field`` -> type annotation, in declaration order."""
    keys = {}
    for section, cls in config_class.sections().items():
        hints = typing.get_type_hints(cls)
        keys.update({f"{section}.{f.name}": hints[f.name] for f in dataclasses.fields(cls)})
    return keys


def _owners(config_class: type[Config]) -> dict[str, list[str]]:
    """Field name -> the full keys that end in it (one owner: the bare name works alone)."""
    owners: dict[str, list[str]] = {}
    for key in config_keys(config_class):
        owners.setdefault(key.split(".", 1)[1], []).append(key)
    return owners


def _nearest(name: str, config_class: type[Config]) -> str | None:
    owners, field_name = _owners(config_class), name.rsplit(".", 1)[-1]
    if field_name in owners:  # the right key in the wrong section
        return owners[field_name][0]
    close = difflib.get_close_matches(name, list(config_keys(config_class)), n=1)
    if close:
        return close[0]
    # A bare or mis-sectioned name: match the field part, answer with its full key.
    close = difflib.get_close_matches(field_name, list(owners), n=1)
    return owners[close[0]][0] if close else None


def resolve_key(name: str, config_class: type[Config], where: str) -> str:
    """``section.field`` or a bare ``field`` (dashes allowed) as the full key; :class:`ConfigError` naming the
    nearest key (or the new name of a renamed one) otherwise."""
    name = name.replace("-", "_")
    keys = config_keys(config_class)
    if name in keys:
        return name
    owners = _owners(config_class).get(name, [])
    if len(owners) == 1:
        return owners[0]
    if len(owners) > 1:
        raise ConfigError(f"config key '{name}' is ambiguous in {where}: write one of {owners}")
    renamed = config_class.renamed
    new, note = renamed.get(name) or renamed.get(name.rsplit(".", 1)[-1], (None, ""))
    if new in keys:
        raise ConfigError(f"config key '{name}' in {where} is now '{new}'{note}")
    hint = _nearest(name, config_class)
    hint = f" (did you mean '{hint}'?)" if hint else ""
    raise ConfigError(f"unknown config key '{name}'{hint} in {where}")


def _options(argv: list[str], config_class: type[Config], strict: bool = True):
    """``(key, value)`` for each option of `argv` (``--section.key`` or the bare ``--key``, dashes or
    underscores, ``--key=value``, ``config_class.positional``'s bare value; a bare boolean flag is true, a
    list's several values one YAML list); ``--config`` gives ``("config", path)``. Not `strict`: what cannot
    be read is skipped."""
    keys, i, positional_given = config_keys(config_class), 0, False
    while i < len(argv):
        token, i = argv[i], i + 1
        if not token.startswith("--") and config_class.positional and not positional_given:
            positional_given = True
            yield config_class.positional, token
            continue
        if not token.startswith("--") or token == "--":
            if strict:
                raise ConfigError(f"unexpected argument {token!r}: options are written --section.key value")
            continue
        name, eq, inline = token[2:].partition("=")
        values = [inline] if eq else []
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if name == "config":
            yield "config", values[0] if values else None
            continue
        try:
            key = resolve_key(name, config_class, "the command line")
        except ConfigError:
            if strict:
                raise
            continue
        if not values and _alternatives(keys[key])[0] is bool:
            values = ["true"]  # a bare --cpu
        if len(values) > 1 and not _takes(keys[key]):
            if strict:
                raise ConfigError(f"config key '{key}': one value expected, got {values}")
            continue
        if _takes(keys[key]) and not (
            len(values) == 1 and values[0].strip()[:1] == "[" or values == ["null"]
        ):
            values = [yaml.safe_dump(values, default_flow_style=True, width=float("inf")).strip()]
        if not values:
            if strict:
                raise ConfigError(f"config key '{key}': needs a value")
            continue
        if _takes(keys[key], dict) and values[0].strip()[:1] == "{":
            # Read as YAML reads it (jsonargparse refuses `{num_patients:12}`, which YAML reads as one key), so
            # the section's own check can name the key it does not know.
            with contextlib.suppress(yaml.YAMLError):
                values = [json.dumps(yaml.safe_load(values[0]))]
        yield key, values[0]


def command_line_value(argv: list[str], key: str, config_class: type[Config]) -> Any:
    """The value `argv` gives config key `key` (any spelling), read as the config reads it, or None; nothing
    else is checked (:func:`parse` does that)."""
    given = dict(_options([str(a) for a in argv], config_class, strict=False))
    if given.get(key) is None:
        return None
    try:
        return convert(given[key], config_keys(config_class)[key], key)
    except ConfigError:
        return given[key]


def config_file(argv: list[str], config_class: type[Config]) -> str | None:
    """The ``--config`` file a command line names (``--config F`` or ``--config=F``), or None."""
    return dict(_options([str(a) for a in argv], config_class, strict=False)).get("config")


def read_config_file(path: str | os.PathLike, config_class: type[Config]) -> dict[str, Any]:
    """A YAML config file as ``{section.field: value}``; sectioned or flat keys; unknown keys named with the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        # PyYAML's message spans lines; keep its reason and where (1-based line and column).
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: not valid YAML ({reason})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    sections = config_class.sections()
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping with sections {list(sections)}")
    values: dict[str, Any] = {}
    for top, value in raw.items():
        top = str(top)
        if top in sections and (isinstance(value, dict) or value is None):
            for name, item in (value or {}).items():
                key = f"{top}.{name}"
                if key not in config_keys(config_class):
                    resolve_key(key, config_class, str(path))  # raises, naming the nearest key
                values[key] = item
        elif top in sections and top not in config_class.renamed:
            raise ConfigError(f"config key '{top}' in {path} must be a mapping of its keys")
        else:
            values[resolve_key(top, config_class, str(path))] = value
    return values


def _show(value: Any) -> str:
    """A value as one would write it on the command line (YAML flow style)."""
    if value is None:
        return "null"
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False).strip()
    return text.removesuffix("...").strip()


class _HelpFormatter(DefaultHelpFormatter):
    """Each key as ``--section.key, --key (default VALUE)`` (VALUE as YAML), then its help."""

    aliases: ClassVar[dict[str, str]] = {}
    required: ClassVar[set[str]] = set()

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=6, width=110)

    def _format_action_invocation(self, action: Action) -> str:
        if action.dest not in self.aliases:
            return super()._format_action_invocation(action)
        alias = f", --{self.aliases[action.dest]}" if self.aliases[action.dest] else ""
        shown = "required" if action.dest in self.required else f"default {_show(action.default)}"
        return f"--{action.dest}{alias} ({shown})"

    def _get_help_string(self, action: Action) -> str:
        return action.help or ""


def build_parser(
    config_class: type[Config], description: str | None = None, prog: str | None = None
) -> ArgumentParser:
    """The jsonargparse parser of `config_class`: one group per section, one ``--section.key`` per field."""
    owners = _owners(config_class)
    aliases = {
        key: (key.split(".", 1)[1] if len(owners[key.split(".", 1)[1]]) == 1 else "")
        for key in config_keys(config_class)
    }
    required = {f"{s}.{name}" for s, cls in config_class.sections().items() for name in cls.required}
    formatter = type("HelpFormatter", (_HelpFormatter,), {"aliases": aliases, "required": required})
    parser = ArgumentParser(
        prog=prog,
        exit_on_error=False,
        description=description,
        formatter_class=formatter,
        usage="%(prog)s "
        + (f"{config_class.positional.split('.')[-1].upper()} " if config_class.positional else "")
        + "[--config FILE] [--section.key VALUE ...]",
    )
    for section, cls in config_class.sections().items():
        parser.add_class_arguments(cls, section, instantiate=False, fail_untyped=False)
    for action in parser._actions:  # the sections' own `--model CONFIG_FILE`: --config reads the whole file
        if action.dest in config_class.sections():
            action.help = argparse.SUPPRESS
    return parser


def format_help(
    config_class: type[Config],
    config_file: str | os.PathLike | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> str:
    """Every config key with the default the run uses (`config_file`'s value where it sets one) and its help."""
    source = f" (defaults: {Path(config_file).name}, else the built-in ones)" if config_file else ""
    keys = (
        f"Config keys{source}. Set in a YAML file (--config FILE, sections {' / '.join(config_class.sections())}) "
        "or as --section.key value; the bare --key works when one section has it. Values are read as YAML."
    )
    parser = build_parser(config_class, f"{description}\n\n{keys}" if description else keys, prog)
    if config_file is not None:
        parser.set_defaults(read_config_file(config_file, config_class))
    return parser.format_help()


def parse(
    config_class: type[Config],
    argv: list[str] | None = None,
    default_config: str | os.PathLike | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> Config:
    """`config_class` from ``--config FILE`` (or `default_config`) and ``--key value`` overrides, validated
    (:class:`ConfigError` names the key); ``-h`` / ``--help`` prints :func:`format_help` and exits."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if "-h" in argv or "--help" in argv:
        given = dict(_options(argv, config_class, strict=False))
        print(format_help(config_class, given.get("config") or default_config, prog, description))
        raise SystemExit(0)
    options = list(_options(argv, config_class))
    config_file = dict(options).get("config") or default_config
    parser = build_parser(config_class)
    if config_file is not None:
        # The file's values become the parser's defaults, below the command line's.
        parser.set_defaults(read_config_file(config_file, config_class))
    try:
        namespace = parser.parse_args(
            [a for key, value in options if key != "config" for a in (f"--{key}", value)]
        )
    except ArgumentError as err:
        raise ConfigError(one_line(err)) from None
    values = namespace.as_dict()
    return config_class(**{name: cls(**values[name]) for name, cls in config_class.sections().items()})


def flatten_config(config: Config) -> dict[str, Any]:
    """``{"section.field": value}`` with scalars only (lists / mappings as JSON), for trackers' hparams."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if value is None or isinstance(value, bool | int | float | str):
                flat[f"{section}.{key}"] = value if value is not None else "null"
            else:
                flat[f"{section}.{key}"] = json.dumps(value, sort_keys=True)
    return flat
