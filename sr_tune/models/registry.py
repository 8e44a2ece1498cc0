"""Model registry: ``@register_model`` builders, ``create_model(name, scale=...)`` and ``list_models()``.

A builder is a plain function named after the model, ``builder(scale: int, **typed_kwargs) -> nn.Module``;
its signature is the model's public argument list (the config layer validates ``model.kwargs``
against it before anything is built).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]

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
    return builder(scale=scale, **kwargs)
