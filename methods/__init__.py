"""Method registry: a method is a `Method` subclass decorated with `@register`, found without a hand-kept list.

Two places are searched: every module of this package, and every installed package that declares an entry point
in the `bbt_harness.methods` group (its value a module, whose `@register` runs on import, or a `Method` subclass):

    [project.entry-points."bbt_harness.methods"]
    my-method = "my_package.my_method:MyMethod"

Methods are listed in their `rank` order (the papers' row order for the built-in ones, plug-ins after).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from importlib.metadata import entry_points

from harness.errors import HarnessError, unknown_name
from methods.base import Method

ENTRY_POINT_GROUP = "bbt_harness.methods"

_REGISTRY: dict[str, type[Method]] = {}
_discovered = False


def register(cls: type[Method]) -> type[Method]:
    known = _REGISTRY.get(cls.name)  # the same class again (a module re-imported) simply replaces itself
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise HarnessError(f"two methods are named '{cls.name}': {known.__module__}.{known.__qualname__} and "
                           f"{cls.__module__}.{cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as exc:
            raise HarnessError(f"the '{entry.name}' method entry point ({entry.value}, from package "
                               f"{entry.dist.name if entry.dist else '?'}) failed to load: {exc}") from exc
        if inspect.isclass(loaded):
            if not issubclass(loaded, Method):
                raise HarnessError(f"the '{entry.name}' method entry point ({entry.value}) is not a Method subclass")
            register(loaded)
    _discovered = True


def registry() -> dict[str, type[Method]]:
    _discover()
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].rank, item[0])))


def get_method(name: str) -> type[Method]:
    methods = registry()
    if name not in methods:
        raise unknown_name("method", name, methods)
    return methods[name]
