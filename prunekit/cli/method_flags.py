"""Command-line flags built from the registered methods' config fields.

Each option of every method's ``Config`` becomes one flag (``--sr``, ``--mask-grads``, ...),
listed under its method in ``prunekit prune --help``; a flag several methods share appears
once. After parsing, :func:`method_overrides` returns the options the user set for the chosen
method, and refuses a flag that belongs to another one.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..methods import get_method, list_methods

__all__ = ["add_method_arguments", "method_overrides"]

_DEST = "method_option__"


@dataclass
class _Flag:
    flag: str
    path: tuple[str, ...]       # the option (and key, for a mapping option) it sets
    kwargs: dict[str, Any]
    help: str
    methods: list[str] = field(default_factory=list)

    @property
    def dest(self) -> str:
        return _DEST + "__".join(self.path)


def _base_type(hint) -> Any:
    """``float | None`` -> float; ``tuple[str, ...]`` -> tuple."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return origin or hint


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _flags_of(f: dataclasses.Field, hint) -> list[_Flag]:
    md = f.metadata
    if not md.get("cli", True):
        return []
    flags = []
    for key, (flag, kind, text) in (md.get("subflags") or {}).items():
        flags.append(_Flag(flag, (f.name, key),
                           {"type": kind, "metavar": {int: "N", float: "X"}.get(kind, "TEXT")},
                           text))
    kind = _base_type(hint)
    if kind is dict:
        return flags
    flag = md.get("flag") or "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    text = md.get("help", "")
    if kind is bool and md.get("invert"):
        kwargs = {"action": "store_const", "const": False}
    elif kind is bool:
        kwargs = {"action": argparse.BooleanOptionalAction}
        text += f" (default {'on' if default else 'off'})"
    elif kind in (tuple, list):
        kwargs = {"type": _comma_list, "metavar": "A,B,..."}
        text += f" (default {','.join(map(str, default))})"
    else:
        kind = kind if kind in (int, float, str) else str
        kwargs = {"type": kind, "metavar": {int: "N", float: "X"}.get(kind, "TEXT")}
        if md.get("choices"):
            kwargs["choices"] = md["choices"]
            del kwargs["metavar"]
        if "(default" not in text:
            text += f" (default {default})"
    flags.append(_Flag(flag, (f.name,), kwargs, text))
    return flags


def _all_flags() -> dict[str, _Flag]:
    flags: dict[str, _Flag] = {}
    for name in list_methods():
        config = get_method(name).Config
        hints = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            for candidate in _flags_of(f, hints.get(f.name)):
                known = flags.setdefault(candidate.flag, candidate)
                if known.path != candidate.path:
                    raise TypeError(f"flag {candidate.flag} of method {name} sets "
                                    f"{candidate.path}, but another method's sets {known.path}")
                known.methods.append(name)
    return flags


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """``--method`` with every registered method, and each method's options as flags."""
    summaries = "; ".join(f"{n}: {get_method(n).summary}" for n in list_methods())
    parser.add_argument("--method", default=None, choices=list_methods(),
                        help=f"the pruning method ({summaries})")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in _all_flags().values():
        owner = flag.methods[0]
        if owner not in groups:
            groups[owner] = parser.add_argument_group(
                f"options of --method {owner}", get_method(owner).summary)
        shared = f" [methods: {', '.join(flag.methods)}]" if len(flag.methods) > 1 else ""
        groups[owner].add_argument(flag.flag, dest=flag.dest, default=None,
                                   help=flag.help + shared, **flag.kwargs)


def method_overrides(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The options of ``method`` set on the command line, as a (nested) config mapping."""
    out: dict[str, Any] = {}
    for flag in _all_flags().values():
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        if method not in flag.methods:
            raise ConfigError(f"{flag.flag} belongs to --method {' / '.join(flag.methods)}, "
                              f"not {method}")
        if len(flag.path) == 1:
            out[flag.path[0]] = value
        else:
            out.setdefault(flag.path[0], {})[flag.path[1]] = value
    return out
