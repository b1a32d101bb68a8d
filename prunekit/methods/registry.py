"""The method registry: every pruning method is a registered descriptor with a config dataclass.

A method is a :class:`PruningMethod` subclass with a ``name``, a one-line ``summary``, a
``Config`` dataclass (its options: each default and help text written once, with
:func:`option`) and ``run(model, context) -> MethodResult``. Registering it
(``@register_method``) is all it takes for ``prunekit prune --method NAME`` to offer it with
its options as flags, and for recipes to validate its section::

    @register_method
    class MyMethod(PruningMethod):
        name = "mine"
        summary = "what it does, in one line"

        @dataclass
        class Config(MethodConfig):
            strength: float = option(0.5, "how hard to prune")

        def run(self, model, context):
            ...
            return MethodResult(plan=plan)

(ModelOpt's prune modes follow the same idea: a registered descriptor naming its config and its
entry point.)
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

from torch import nn

from ..errors import ConfigError
from ..plan import TARGET_KINDS

__all__ = ["MethodConfig", "MethodResult", "PruningMethod", "get_method", "list_methods",
           "option", "register_method"]

METHODS: dict[str, type["PruningMethod"]] = {}


def option(default: Any, help: str, *, flag: str | None = None, invert: bool = False,
           choices: tuple | None = None, cli: bool = True,
           subflags: Mapping[str, tuple[str, type, str]] | None = None) -> Any:
    """A config field with its help text (for ``--help`` and recipes).

    ``flag``: the command-line flag when it is not ``--<name-with-dashes>``; ``invert``: a
    bool option whose flag sets it to False (``--frozen-search`` for ``train_weights``);
    ``choices``: the allowed values; ``cli=False``: recipe-only; ``subflags``: flags that set
    one key of a mapping option (``{"epochs": ("--search-epochs", int, "help")}``).
    """
    metadata = {"help": help, "flag": flag, "invert": invert, "choices": choices, "cli": cli,
                "subflags": dict(subflags or {})}
    if isinstance(default, (dict, list, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class MethodConfig:
    """Base of every method's options. ``from_dict`` is what recipes and the CLI go through."""

    def validate(self) -> None:
        """Checks across fields; raise ConfigError with what to change."""

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(map(repr, choices))}; "
                                  f"got {getattr(self, f.name)!r}")
        self.validate()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, where: str = "method"):
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"{where}: unknown method keys {sorted(unknown)}; valid: "
                              f"{sorted(known)}")
        hints = typing.get_type_hints(cls)
        for key, value in list(values.items()):
            if isinstance(value, list) and typing.get_origin(hints.get(key)) is tuple:
                values[key] = tuple(value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass
class MethodResult:
    """What a method did to the model (in place).

    ``plan``: kept channel indices per group (JSON); ``trained``: the method trained the model
    itself (its training is the fine-tuning: the job measures and saves the model as final);
    ``summary``: the training summary (``fit``'s) for the report's ``finetune`` entry;
    ``extras``: entries added to ``report.json`` (e.g. LFPC's choices); ``group_sizes``: the
    graph's group sizes, when known.
    """

    plan: dict[str, list[int]]
    trained: bool = False
    summary: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    group_sizes: dict[str, int] | None = None


class PruningMethod:
    """A pruning method: ``name``, ``summary``, ``Config`` and ``run``.

    ``trains``: the method trains while it prunes (needs ``--finetune-epochs >= 1``; its
    training replaces the job's fine-tuning). ``target_kinds``: the plan targets it accepts
    (:data:`prunekit.plan.TARGET_KINDS` keys), one of which a run must give; ``()``: the method
    decides what it removes and refuses a target (SWP). The job checks both before any work.
    ``default_criterion``: the criterion used when the run names none. ``rounds_counts``:
    the method honours the target's ``round_to`` (a method that does not refuses one != 1).
    ``allocations``: how it may share a MACs target among groups (``PlanTarget.allocation``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    trains: ClassVar[bool] = False
    target_kinds: ClassVar[tuple[str, ...]] = TARGET_KINDS
    default_criterion: ClassVar[str | None] = None
    rounds_counts: ClassVar[bool] = False
    allocations: ClassVar[tuple[str, ...]] = ("uniform",)

    def __init__(self, config: MethodConfig | Mapping[str, Any] | None = None):
        if config is None or isinstance(config, Mapping):
            config = self.Config.from_dict(config, f"method {self.name}")
        if not isinstance(config, self.Config):
            raise ConfigError(f"method {self.name} takes a {self.Config.__name__}, got "
                              f"{type(config).__name__}")
        self.config = config

    def run(self, model: nn.Module, context) -> MethodResult:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What saved files and reports record as the method: its name and options."""
        return {"name": self.name, **self.config.to_dict()}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available as ``--method cls.name`` and in recipes."""
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)) or not cls.name:
        raise TypeError(f"{cls!r} must be a PruningMethod subclass with a name")
    if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, MethodConfig)):
        raise TypeError(f"{cls.__name__}.Config must be a MethodConfig dataclass")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[PruningMethod]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(list_methods())}")
    return METHODS[name]


def list_methods() -> list[str]:
    """Every registered method name, in registration order."""
    return list(METHODS)

