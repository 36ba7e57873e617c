"""The machinery of typed step configs: a frozen dataclass whose fields are a step's settings.

A field's name is its flag without ``--`` (``nsamples`` is ``--nsamples`` and the recipe key ``nsamples``; an
underscore is a dash on the command line and in YAML), its default and help text sit on the field (``option``),
its annotation is its type (``Literal[...]`` for choices, ``X | None`` where unset means "the method's own"), and
the rules between fields are the config's own (``Rule``, ``Config.check``), checked once when it is built. From
these, ``add_arguments`` builds a command's flags, ``from_mapping`` reads a recipe step, ``in_effect`` writes it,
and the Python API builds the same config from its keywords. Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar, Literal

from slimlm.errors import SlimlmError, lookup, unknown


class SettingError(SlimlmError):
    """A bad value of one setting: ``str()`` names its flag (``--sparsity: ...``), a recipe names its key path."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{flag(name)}: {reason}")
        self.name, self.reason = name, reason


def option(default, help: str, *, metavar: str | None = None, value_type: type | None = None):
    """A setting: its ``default`` and ``help`` (the flag's --help text). ``value_type``: the type of the values
    of a REGEX -> VALUE mapping (``override``)."""
    return field(default=default, metadata={"help": help, "metavar": metavar, "value_type": value_type})


def never(config) -> bool:
    """A rule's ``applies`` for a setting a step only keeps so that older recipes listing its default still read:
    it is no flag of that step's command (``add_arguments`` leaves it out) and any other value is refused."""
    return False


@dataclass(frozen=True)
class Rule:
    """``options`` (field names) take effect only when ``applies(config)``: one set away from its default where
    it would change nothing is refused, "--opt only applies with <needs>", rather than silently ignored."""

    options: tuple[str, ...]
    applies: Callable[[Any], bool]
    needs: str


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every step config. Subclasses list their ``RULES`` and may add value checks in ``check``."""

    RULES: ClassVar[tuple[Rule, ...]] = ()

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name], f)
            object.__setattr__(self, f.name, value)
        for rule in self.RULES:
            if rule.applies(self):
                continue
            for name in rule.options:
                if getattr(self, name) != default_of(type(self), name):
                    raise SlimlmError(f"{flag(name)} only applies with {rule.needs}")
        self.check()

    def check(self) -> None:
        """Value checks that need no model (ranges, names in registries); raise SlimlmError."""

    def in_effect(self) -> dict:
        """The settings that shaped the result, keyed by flag name without ``--`` (what a manifest records): the
        options of rules that do not apply here are left out."""
        off = {name for rule in self.RULES if not rule.applies(self) for name in rule.options}
        return {k: v for k, v in to_mapping(self).items() if k.replace("-", "_") not in off}


def ordered_fields(cls) -> list:
    """The config's fields, its own first, then each base's (calibration, allocation, grid) in MRO order: the
    order of --help and of a written recipe."""
    mro = [c for c in cls.__mro__ if "__annotations__" in c.__dict__]

    def rank(f):  # the base-most class that declares the field
        return max(i for i, c in enumerate(mro) if f.name in c.__dict__["__annotations__"])

    return sorted(fields(cls), key=rank)


def check_name(name: str, value, registry, what: str) -> None:
    """``value`` of field ``name`` must be a key of ``registry`` (a method or allocator registry)."""
    try:
        lookup(registry, value, what)
    except SlimlmError as e:
        raise SettingError(name, str(e)) from None


def default_of(cls, name: str):
    """A field's default (``MISSING`` for a required one)."""
    return cls.__dataclass_fields__[name].default


# ---------------------------------------------------------------- types

def _parts(hint) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(hint))
    return hint, False


def field_choices(cls, name: str) -> tuple:
    """The choices a config field's ``Literal`` type allows."""
    return choices_of(typing.get_type_hints(cls)[name])


def choices_of(hint) -> tuple | None:
    base, _ = _parts(hint)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def _coerce(value, hint, f):
    """``value`` as the field's type: what the command line, a recipe and Python may each give (a number as
    text, an int for a float, a mapping or pairs for REGEX -> VALUE). A wrong type or choice is a SlimlmError
    naming the flag."""
    base, optional = _parts(hint)
    name = f.name
    if value is None:
        if optional or f.default is None:
            return None
        raise SettingError(name, "a value is required")
    choices = choices_of(base)
    if choices is not None:
        if str(value) not in choices:
            raise SettingError(name, str(unknown('value', value, choices)))
        return str(value)
    if f.metadata.get("value_type") is not None:
        return _pairs(value, f.metadata["value_type"], name)
    if base is bool:
        if not isinstance(value, bool):
            raise SettingError(name, f"expected true or false, got {value!r}")
        return value
    if isinstance(value, (dict, list, tuple, set)) and base in (int, float, str):
        raise SettingError(name, f"expected a single value, got {value!r}")
    if base in (int, float):
        if isinstance(value, bool) or (base is int and isinstance(value, float)):
            raise SettingError(name, f"invalid {base.__name__} value: {value!r}")
        try:
            return base(value)
        except (TypeError, ValueError):
            raise SettingError(name, f"invalid {base.__name__} value: '{value}'") from None
    if base is str:
        return str(value)
    return value  # a union such as str | dict: the config's check() reads it


def _pairs(value, value_type: type, name: str) -> tuple[tuple[str, Any], ...]:
    """REGEX -> VALUE as a tuple of pairs (the config stays hashable); each regex must compile."""
    if isinstance(value, dict):
        value = list(value.items())
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        raise SettingError(name, f"expected a mapping REGEX: VALUE, got {value!r}")
    pairs = []
    for regex, v in value:
        try:
            re.compile(regex)
        except re.error as e:
            raise SettingError(name, f"bad regular expression '{regex}': {e}") from None
        try:
            pairs.append((str(regex), value_type(v)))
        except (TypeError, ValueError):
            raise SettingError(name, f"invalid {value_type.__name__} value '{v}' for '{regex}'") from None
    return tuple(pairs) or None


# ---------------------------------------------------------------- recipes and the command line

def from_mapping(cls, data, path: str = ""):
    """A config from a recipe step's mapping (keys: flag names without ``--``; ``_`` read as ``-``); an unknown key
    names its path and the closest valid one, a bad value its path."""
    if not isinstance(data, dict):
        raise SlimlmError(f"{path or 'recipe'}: expected a mapping of settings, got {data!r}")
    names = {f.name.replace("_", "-"): f.name for f in fields(cls)}
    values = {}
    for key, value in data.items():  # a null value means the default, as a missing key does
        name = str(key).replace("_", "-")
        if name not in names:
            raise SlimlmError(f"{path + '.' if path else ''}{key}: {unknown('key', key, names)}")
        if value is not None:
            values[names[name]] = value
    missing = [f.name for f in fields(cls) if f.name not in values and default_of(cls, f.name) is MISSING]
    if missing:
        raise SlimlmError(f"{path + '.' if path else ''}{missing[0].replace('_', '-')}: a value is required")
    try:
        return cls(**values)
    except SettingError as e:  # one key's value: named by its path, as the recipe spells the key
        key = {name.replace("-", "_"): str(k) for k in data for name in [str(k).replace("_", "-")]}.get(e.name, e.name)
        raise SlimlmError(f"{path + '.' if path else ''}{key}: {e.reason}") from None
    except SlimlmError as e:  # a rule between keys: named by the step, flags without --
        raise SlimlmError(f"{path or 'recipe'}: {str(e).replace('--', '')}") from None


def to_mapping(config) -> dict:
    """Every setting, defaults included, keyed by flag name without ``--``: what a recipe step lists."""
    return {f.name.replace("_", "-"): _plain(getattr(config, f.name), f) for f in ordered_fields(type(config))}


def _plain(value, f):
    if f.metadata.get("value_type") is not None:  # REGEX -> VALUE pairs, as a mapping ({} for none)
        return {regex: v for regex, v in value or ()}
    return value


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), defaults: dict | None = None):
    """``cls``'s settings as ``parser``'s flags (``skip``: fields the command leaves out; ``defaults``: other
    defaults for this command). Values are parsed by the config itself (``from_namespace``), so the parser keeps
    them as text; --help shows each field's help, choices and default."""
    hints = typing.get_type_hints(cls)
    skip = (*skip, *(name for rule in cls.RULES if rule.applies is never for name in rule.options))
    for f in ordered_fields(cls):
        if f.name in skip:
            continue
        base, _ = _parts(hints[f.name])
        default = (defaults or {}).get(f.name, f.default)
        kwargs: dict[str, Any] = {"help": f.metadata.get("help"), "dest": f.name}
        if default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if base is bool:
            parser.add_argument(flag(f.name), action="store_true", **kwargs)
            continue
        if f.metadata.get("value_type") is not None:
            parser.add_argument(flag(f.name), action="append", type=_regex_value, metavar="REGEX=VALUE", **kwargs)
            continue
        if choices_of(base) is not None:
            kwargs["choices"] = list(choices_of(base))
        elif base in (int, float):
            kwargs["type"] = base
        parser.add_argument(flag(f.name), metavar=f.metadata.get("metavar"), **kwargs)


def _regex_value(text: str) -> tuple[str, str]:
    regex, sep, value = text.rpartition("=")
    if not sep or not regex:
        raise argparse.ArgumentTypeError(f"expected REGEX=VALUE, got '{text}'")
    return regex, value


def from_namespace(cls, namespace: argparse.Namespace):
    """The config of a parsed command line (the fields the namespace has; the rest keep their defaults)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})
