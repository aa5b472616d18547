"""Method registry: a method is one module defining a `Method` subclass, plus one line in MODULES."""

from __future__ import annotations

import importlib

from harness.errors import unknown_name
from methods.base import Method

MODULES = [
    "methods.manual",
    "methods.gradient",
    "methods.icl",
    "methods.feature_mlp",
    "methods.feature_bilstm",
    "methods.bbt",
]

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    for module in MODULES:  # cached after the first import; importing one method module must not hide the rest
        importlib.import_module(module)
    # in MODULES order (the papers' row order), whichever module happened to be imported first
    rank = {module: i for i, module in enumerate(MODULES)}
    return dict(sorted(_REGISTRY.items(), key=lambda item: rank.get(item[1].__module__, len(rank))))


def get_method(name: str) -> type[Method]:
    methods = registry()
    if name not in methods:
        raise unknown_name("method", name, methods)
    return methods[name]
