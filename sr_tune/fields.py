"""The field machinery configs and study files are built with: frozen dataclasses whose fields carry their
help text, bounds and checks (``setting``), built from parsed YAML with every problem collected
(``build_values``), and one ``ConfigError`` that names each key, the bad value and what is allowed. Strict
YAML (a key given twice is an error) and dotted ``section.key=value`` overrides are read here too."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Any, Literal

import yaml

from sr_tune.credentials import redact
from sr_tune.errors import InputError


class ConfigError(InputError):
    """Invalid configuration; ``problems`` lists each one as ``"key: what is wrong"``."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = [redact(problem) for problem in problems]  # a refused secret is not echoed either
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


def setting(
    default: Any,
    help: str,
    check: Callable[[Any], str | None] | None = None,
    *,
    internal: bool = False,
    **bounds: float,
) -> Any:
    """A config field with its help text, optional bounds (``ge``, ``gt``, ``le``, ``lt``) and an optional
    ``check(value) -> problem or None`` for rules a type cannot say. ``...`` as the default: a required key.
    ``internal``: set by a loader (e.g. a study's file path), never a key of the file."""
    metadata = {"help": help, "check": check, "internal": internal, **bounds}
    if default is ...:
        return field(metadata=metadata)
    if isinstance(default, type):  # a section: built on use, after this module has loaded
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def field_problem(f: dataclasses.Field, value: Any) -> str | None:
    """The problem of ``value`` in field ``f``: a failed ``check`` or a number out of its bounds."""
    check = f.metadata.get("check")
    if check is not None and (problem := check(value)):
        return f"{f.name}: {value!r} {problem}"
    bounds = {k: v for k, v in f.metadata.items() if k in _BOUND_TEXT}
    if not bounds or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    within = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
    if all(within[kind](value, bound) for kind, bound in bounds.items()):
        return None
    allowed = " and ".join(f"{_BOUND_TEXT[k]} {b}" for k, b in bounds.items())
    return f"{f.name}: {value!r} is out of range (allowed: {allowed})"


def _field_problems(cls: type, values: Mapping[str, Any]) -> list[str]:
    """Per-field problems of section ``cls``: out-of-range numbers and failed ``check``s."""
    problems = (field_problem(f, values[f.name]) for f in dataclasses.fields(cls) if f.name in values)
    return [problem for problem in problems if problem]


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """{field name: allowed values} for the ``Literal`` fields of section ``cls``."""
    hints = typing.get_type_hints(cls)
    return {name: typing.get_args(tp) for name, tp in hints.items() if typing.get_origin(tp) is Literal}


def validate(instance: Any, extra: Sequence[str] = ()) -> None:
    """Raise one ``ConfigError`` for the section's per-field problems and its cross-field ``extra`` ones. A
    section built in code is held to the same names as one read from a file (``Literal`` fields)."""
    values = {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}
    problems = [
        f"{name}: {values[name]!r} is not valid (expected one of {', '.join(map(repr, allowed))})"
        for name, allowed in _literal_fields(type(instance)).items()
        if values[name] not in allowed
    ]
    problems += _field_problems(type(instance), values) + list(extra)
    if problems:
        raise ConfigError(problems)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


INVALID = object()


def coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Return ``value`` as type ``tp`` or record a problem and return ``INVALID``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected: str | None = None) -> Any:
        problems.append(f"{path}: {value!r} is not valid (expected {expected or type_name(tp)})")
        return INVALID

    if dataclasses.is_dataclass(tp):
        built = build(tp, value, path, problems)
        return INVALID if built is None else built
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        return bad(f"{'did you mean ' + repr(close[0]) + '? ' if close else ''}{type_name(tp)}")
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        scratch: list[str] = []
        for candidate in inner:
            result = coerce(value, candidate, path, scratch)
            if result is not INVALID:
                return result
        return bad()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return bad()
        element_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(element_types) != len(value):
            return bad(f"{len(element_types)} values")
        items = [coerce(v, t, f"{path}[{i}]", problems) for i, (v, t) in enumerate(zip(value, element_types))]
        return INVALID if any(i is INVALID for i in items) else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            return bad("a mapping")
        if args[1] is Any:
            return dict(value)
        # The valid items only (each bad one is a recorded problem): a caller checking relations between
        # sections still sees the good entries of a mapping that has a bad one.
        items = {key: coerce(item, args[1], f"{path}.{key}", problems) for key, item in value.items()}
        return {key: item for key, item in items.items() if item is not INVALID}
    if tp is bool:
        return value if isinstance(value, bool) else bad()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else bad()
    if tp is float:
        if isinstance(value, bool):
            return bad()
        return float(value) if isinstance(value, (int, float)) else bad()
    if tp is str:
        return value if isinstance(value, str) else bad()
    if tp is Any:
        return value
    raise TypeError(f"{path}: config type {tp!r} is not supported")


def _required(cls: type, name: str) -> bool:
    f = cls.__dataclass_fields__[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def build_values(cls: type, data: Any, path: str, problems: list[str]) -> dict[str, Any] | None:
    """The fields of dataclass ``cls`` that ``data`` sets validly, each coerced (sections built); every
    problem (prefixed with ``path``) goes to ``problems``. Fields marked ``internal`` in their metadata are
    set by loaders, never by a file: they are not offered as keys. None when ``data`` is not a mapping.

    Callers that check relations between sections (a study's objective against its base config) use the
    valid part to report those problems in the same round as the rest."""
    prefix = f"{path}." if path else ""
    if not isinstance(data, Mapping):
        problems.append(f"{path or '(top level)'}: expected a mapping of keys, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{prefix}{key}: unknown key ({hint}allowed: {', '.join(names)})")
    problems.extend(f"{prefix}{name}: required" for name in names if _required(cls, name) and name not in data)
    valid = {}
    for f in dataclasses.fields(cls):
        if f.name not in names or f.name not in data:
            continue
        value = coerce(data[f.name], hints[f.name], f"{prefix}{f.name}", problems)
        problem = None if value is INVALID else field_problem(f, value)
        if problem:
            problems.append(f"{prefix}{problem}")
        elif value is not INVALID:
            valid[f.name] = value
    return valid


def build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, adding every problem (prefixed with ``path``) to ``problems``."""
    before = len(problems)
    values = build_values(cls, data, path, problems)
    if values is None or len(problems) > before:  # a bad value here or inside a nested section
        return None
    try:
        return cls(**values)
    except ConfigError as error:
        prefix = f"{path}." if path else ""
        problems.extend(f"{prefix}{p}" for p in error.problems)
        return None


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML silently keeps the last) and reads
    ``1e-3`` and ``-.5`` as numbers, as YAML 1.2 does (PyYAML's YAML 1.1 wants ``1.0e-3`` and ``-0.5`` and would
    give the texts "1e-3" and "-.5")."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first_lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable) and key in first_lines:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first_lines[key]})", key_node.start_mark
            )
        first_lines.setdefault(key, key_node.start_mark.line + 1)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9_]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"),
)


def parse_yaml(text: str, source: str) -> Any:
    """YAML ``text`` of file ``source``; a syntax error or a duplicate key raises ``ConfigError`` with its line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({error.context})" if error.context else ""
        raise ConfigError([f"not valid YAML: {where}{error.problem}{context}"], source) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"not valid YAML: {error}"], source) from None


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def with_values(data: Mapping[str, Any], values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Set dotted keys (``{"optimizer.lr": 1e-3}``) in a nested dict copy.

    Returns the new dict and the problems (a key that is not dotted, or a parent that is not a section).
    """
    result = plain(dict(data))
    problems = []
    for key, value in values.items():
        if not key or any(not part for part in key.split(".")):
            problems.append(f"{key!r}: expected section.key")
            continue
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{key}: {part!r} is not a section")
                break
            node = child
        else:
            node[leaf] = plain(value)
    return result, problems


def parse_override(override: str) -> tuple[str, Any] | None:
    """``key=value`` as (key, value parsed as YAML, else the text); None without a key or ``=``."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        return None
    try:
        return key, yaml.load(raw, Loader=_StrictLoader) if raw else ""
    except yaml.YAMLError:
        return key, raw
