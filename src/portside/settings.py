"""Where settings come from: defaults < ``--config`` file < ``PORTSIDE_...`` variables < flags.

All of it is derived from the declarations in ``config.py``: the flags (and their help), the
environment variable names, the TOML keys and the docs table. ``python -m portside.settings``
prints that table (``docs/settings.md`` is its output; a test keeps the two equal).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from portside.config import (
    CONFIG_CLASSES,
    ListenerConfig,
    ProcessConfig,
    RelayConfig,
    ServerConfig,
    Setting,
    Switch,
    default_of,
    settings_of,
)
from portside.errors import ConfigError

CONFIG_ENV = "PORTSIDE_CONFIG"
#: Variables portside sets for itself (workers, upgrades and the sockets they hand over, socket
#: activation), not settings, but not unknown either (a test finds every PORTSIDE_ name in the
#: source here).
INTERNAL_ENV = frozenset({"PORTSIDE_WORKER", "PORTSIDE_LISTEN_FDS", "PORTSIDE_UPGRADE_FD",
                          "PORTSIDE_CONTROL_FD", "PORTSIDE_METRICS_FD"})
SECTION_TITLES = {ProcessConfig: "The process", ListenerConfig: "Every listener",
                  ServerConfig: "The engine"}


def all_settings() -> list[tuple[type[Any], Setting]]:
    return [(cls, declared) for cls in CONFIG_CLASSES for declared in settings_of(cls)]


def _flag_type(declared: Setting) -> Any:
    def parse(text: str) -> Any:
        try:
            return declared.kind.parse(text)
        except (ValueError, ConfigError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = declared.name  # argparse names the type in some messages
    return parse


def add_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Every declared setting as a flag; unset flags leave no attribute (argparse.SUPPRESS),
    so that the file and the environment can fill them in."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"read settings from this TOML file (keys are the setting names "
                             f"below, with - or _; also ${CONFIG_ENV})")
    for cls, declared in all_settings():
        if declared.name in skip:
            continue
        default = default_of(cls, declared.name)
        shown = declared.show_default(default)
        help_text = f"{declared.help} (default: {shown})".replace("%", "%%")
        flags = [declared.flag, *declared.aliases]
        if isinstance(declared.kind, Switch):
            parser.add_argument(*flags, dest=declared.name, default=argparse.SUPPRESS,
                                action=argparse.BooleanOptionalAction, help=help_text)
        elif declared.repeatable:
            parser.add_argument(*flags, dest=declared.name, default=argparse.SUPPRESS,
                                action="append", type=_flag_type(declared),
                                metavar=declared.kind.metavar, help=help_text)
        else:
            parser.add_argument(*flags, dest=declared.name, default=argparse.SUPPRESS,
                                type=_flag_type(declared), metavar=declared.kind.metavar,
                                help=help_text)


def read_file(path: str) -> dict[str, Any]:
    """The settings in a TOML file; unknown keys and bad values are a one-line ConfigError."""
    import tomllib

    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets the codec's error out
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path}: line {line}: byte 0x{exc.object[exc.start]:02x} "
                          "is not valid UTF-8 (a TOML file is UTF-8)") from None
    known = {declared.name: declared for _, declared in all_settings()}
    values: dict[str, Any] = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        declared = known.get(name)
        if declared is None:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        try:
            values[name] = declared.kind.coerce(value)
        except (ValueError, ConfigError) as exc:  # the message quotes the value already
            raise ConfigError(f"config file {path}: {key} {exc}") from None
        rule = declared.kind.check(values[name])
        if rule is not None:
            raise ConfigError(f"config file {path}: {key} {rule}, got {value!r}")
    return values


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``PORTSIDE_<NAME>`` variables (``PORTSIDE_LISTEN`` may hold several
    addresses separated by spaces)."""
    values: dict[str, Any] = {}
    for _, declared in all_settings():
        text = environ.get(declared.env)
        if text is None:
            continue
        try:
            if declared.repeatable:
                values[declared.name] = declared.kind.coerce(text.split())
            else:
                values[declared.name] = declared.kind.parse(text)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{declared.env}: {exc}") from None
    return values


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """One warning per ``PORTSIDE_...`` variable that is no setting (a typo is otherwise
    ignored without a word), naming the closest setting's variable."""
    import difflib

    known = ({declared.env for _, declared in all_settings()}
             | {declared.env for declared in settings_of(RelayConfig)}  # portside relay's own
             | {CONFIG_ENV})
    warnings = []
    for name in sorted(environ):
        if not name.startswith("PORTSIDE_") or name in known or name in INTERNAL_ENV:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"ignoring unknown environment variable {name}{hint}")
    return warnings


@dataclass(frozen=True)
class Resolved:
    """The settings of one start (or reload), from every source, checked."""

    process: ProcessConfig
    listener: dict[str, Any]  # the per-listener settings, applied to every listener
    server: ServerConfig


def resolve(flags: argparse.Namespace, environ: Mapping[str, str]) -> Resolved:
    """Merge the sources (flags win, then the environment, then the file) and check."""
    values: dict[str, Any] = {}
    config_path = getattr(flags, "config", None) or environ.get(CONFIG_ENV)
    if config_path:
        values.update(read_file(config_path))
    values.update(read_environment(environ))
    for _, declared in all_settings():
        if hasattr(flags, declared.name):
            value = getattr(flags, declared.name)
            if declared.repeatable:  # a list of one-item tuples from action="append"
                value = tuple(item for group in value for item in group)
            values[declared.name] = value

    def pick(cls: type[Any]) -> dict[str, Any]:
        return {declared.name: values[declared.name] for declared in settings_of(cls)
                if declared.name in values}

    listener = pick(ListenerConfig)
    ListenerConfig(**listener)  # checked once here, so that a bad value fails before any bind
    return Resolved(ProcessConfig(**pick(ProcessConfig)), listener, ServerConfig(**pick(
        ServerConfig)))


def table() -> str:
    """The docs table of every setting (Markdown), derived from the declarations."""
    lines = ["# Settings", "",
             "Generated from `src/portside/config.py` by `python -m portside.settings`; do not",
             "edit by hand. Every setting can be given as a flag, as an environment variable, or",
             "as a key in the TOML file named by `--config` (or `$PORTSIDE_CONFIG`). Flags win",
             "over the environment, which wins over the file.", ""]
    for cls in CONFIG_CLASSES:
        lines += [f"## {SECTION_TITLES[cls]}", "",
                  "| Flag | Environment / file key | Value | Default | Meaning |",
                  "|---|---|---|---|---|"]
        for declared in settings_of(cls):
            flags = ", ".join(f"`{flag}`" for flag in (declared.flag, *declared.aliases))
            default = declared.show_default(default_of(cls, declared.name))
            lines.append(f"| {flags} | `{declared.env}` / `{declared.name}` | "
                         f"{declared.kind.describe()} | `{default}` | "
                         f"{declared.help.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(), end="")
