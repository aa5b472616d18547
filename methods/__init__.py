"""Method registry: a method is one module defining a `Method` subclass, plus one line in MODULES."""

from __future__ import annotations

import importlib

from harness.errors import unknown_name
from methods.base import Method

MODULES = [
    "methods.manual",
    "methods.gradient",
]

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    if not _REGISTRY:
        for module in MODULES:
            importlib.import_module(module)
    return _REGISTRY


def get_method(name: str) -> type[Method]:
    methods = registry()
    if name not in methods:
        raise unknown_name("method", name, methods)
    return methods[name]
