"""Model registry: ``@register_model`` builders, ``create_model(name, scale=...)`` and ``list_models()``.

A builder is a plain function named after the model, ``builder(scale: int, **typed_kwargs) -> nn.Module``;
its signature is the model's public argument list (the config layer validates ``model.kwargs``
against it before anything is built). An argument with a lower bound says so in its type:
``m: Annotated[int, AtLeast(1)]`` (``Count``), checked by the config layer and by ``create_model``.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from sr_tune.errors import InputError

ModelBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class AtLeast:
    """The lowest value a builder argument accepts; ``exclusive``: the bound itself is refused too;
    ``maximum``: the highest it accepts (model arguments come from files, checkpoints included)."""

    minimum: float
    exclusive: bool = False
    maximum: float | None = None

    def problem(self, value: object) -> str | None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None  # a wrong type is reported by the type check
        low_ok = value > self.minimum or (value == self.minimum and not self.exclusive)
        if low_ok and (self.maximum is None or value <= self.maximum):
            return None
        allowed = f"{'>' if self.exclusive else '>='} {self.minimum:g}"
        if self.maximum is not None:
            allowed += f" and <= {self.maximum:g}"
        return f"{value!r} is out of range (allowed: {allowed})"


# Layers, blocks, channels: a network needs at least one, and a count from a file (a crafted checkpoint.json
# too) is bounded before anything is built; the parameter count is bounded as well (``MAX_PARAMETERS``).
MAX_COUNT = 1024
Count = Annotated[int, AtLeast(1, maximum=MAX_COUNT)]
# The largest network a config may build: 100 M parameters (400 MB of float32 weights, 2.3x EDSR's full
# model), far above the zoo's largest (SRResNet x4, 1.5 M) yet far below what exhausts a machine's memory.
MAX_PARAMETERS = 100_000_000

_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(builder: ModelBuilder) -> ModelBuilder:
    """Register ``builder`` under its function name; a name can be registered once."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    if "scale" not in inspect.signature(builder).parameters:
        raise TypeError(f"model builder {name!r} must take a 'scale' argument")
    _BUILDERS[name] = builder
    return builder


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_BUILDERS)


def get_builder(name: str) -> ModelBuilder:
    """The builder registered as ``name``; an unknown name fails listing the valid ones."""
    try:
        return _BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def argument_bounds(name: str) -> dict[str, AtLeast]:
    """{argument: its lower bound} for the bounded arguments of model ``name``."""
    hints = typing.get_type_hints(get_builder(name), include_extras=True)
    return {key: marks[0] for key, hint in hints.items() if (marks := _bounds(hint))}


def _bounds(hint: object) -> list[AtLeast]:
    """The ``AtLeast`` marks of a hint, also inside a union (``Count | None``)."""
    if typing.get_origin(hint) is Annotated:
        return [mark for mark in getattr(hint, "__metadata__", ()) if isinstance(mark, AtLeast)]
    return [bound for arg in typing.get_args(hint) for bound in _bounds(arg)]


def out_of_range(name: str, kwargs: Mapping[str, object]) -> list[str]:
    """``"key: value is out of range (...)"`` for each argument of model ``name`` below its bound."""
    bounds = argument_bounds(name)
    problems = (
        f"{key}: {problem}"
        for key, value in kwargs.items()
        if key in bounds and (problem := bounds[key].problem(value))
    )
    return list(problems)


@contextlib.contextmanager
def _shapes_only() -> Iterator[None]:
    """Modules built on PyTorch's meta device (shapes, no memory) with ``torch.nn.init``'s in-place
    initialisers skipped: meta tensors hold no values, and ``normal_`` on one imports torch's compiler stack
    (VDSR's He initialisation: seconds for a check that otherwise takes milliseconds)."""
    initialisers = {name: getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and name[0] != "_"}
    try:
        for name in initialisers:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, function in initialisers.items():
            setattr(nn.init, name, function)


def size_problem(name: str, *, scale: int, **kwargs: object) -> str | None:
    """Why model ``name`` with valid ``kwargs`` is too large to build (None when it is not), found by building
    it on PyTorch's meta device: shapes only, no memory for its weights."""
    try:
        with _shapes_only():
            count = sum(p.numel() for p in create_model(name, scale=scale, **kwargs).parameters())
    except (TypeError, ValueError) as error:  # a rule of the builder's own, e.g. VDSR's depth >= 2
        return f"is refused by the model: {error}"
    if count <= MAX_PARAMETERS:
        return None
    return f"builds {count:,} parameters, more than the {MAX_PARAMETERS:,} allowed"


def create_model(name: str, *, scale: int, **kwargs: object) -> nn.Module:
    """Build model ``name`` for an integer upscaling factor ``scale`` with builder-specific ``kwargs``."""
    builder = get_builder(name)
    accepted = set(inspect.signature(builder).parameters) - {"scale"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"model {name!r} got unknown argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(sorted(accepted)) or 'nothing but scale'}"
        )
    if problems := out_of_range(name, kwargs):
        raise InputError(f"model {name!r}: {'; '.join(problems)}")
    return builder(scale=scale, **kwargs)
