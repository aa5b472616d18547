"""A method's settings from outside: `--set method.field=value`, a `--config` YAML file, and the profile's values,
resolved into the method's config dataclass and checked before anything loads.

Layering, lowest first: the config's defaults, the method's own values for the profile (and task), the user's
settings. A bad key names the valid fields; a bad value names the field, its type and what was given.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from harness.errors import HarnessError
from harness.profiles import Profile

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """`["bbt.budget=2000", "bbtv2.sigma=0.2"]` -> {"bbt": {"budget": "2000"}, "bbtv2": {"sigma": "0.2"}} (values
    stay text here; `coerce` reads them by the field's type)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not (eq and dot and method and name):
            raise HarnessError(f"--set '{item}': expected METHOD.FIELD=VALUE, for example bbt.budget=2000")
        out.setdefault(method, {})[name.strip()] = value.strip()
    return out


def _describe_type(kind) -> str:
    return getattr(kind, "__name__", str(kind)).replace("NoneType", "none")


def coerce(where: str, kind, value):
    """`value` (text from the command line, or a YAML value) as the field's type, or a HarnessError naming both."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union else ()
    if options:  # e.g. int | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(where, option, value)
            except HarnessError as exc:
                errors.append(str(exc))
        raise HarnessError(errors[0] if errors else f"{where}: cannot be {value!r}")
    wanted = _describe_type(kind)
    bad = HarnessError(f"{where}: expected {'an' if wanted[0] in 'aeiou' else 'a'} {wanted}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE + FALSE:
            return value.lower() in TRUE
        raise bad
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if kind is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if out != out or out in (float("inf"), float("-inf")):
            raise bad
        return out
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad
    if typing.get_origin(kind) is list:  # e.g. list[str]: a YAML list, or comma-separated text
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise bad
        (item_kind,) = typing.get_args(kind) or (str,)
        return [coerce(where, item_kind, item) for item in items]
    return value  # a type this reader does not know: the method's own check_config judges it


def make_config(cls, values: dict, who: str):
    """The method's config from `values` (field -> value as text or YAML), checked: unknown fields name the valid
    ones, each value is read as its field's type, then the method's own check runs."""
    config_class = cls.config_class
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise HarnessError(
            f"{who}: method '{cls.name}' has no setting(s) {unknown}; its settings are: {', '.join(sorted(known))} "
            f"(harness list --method {cls.name} shows each with its default)"
        )
    hints = typing.get_type_hints(config_class)
    typed = {name: coerce(f"{who}: {cls.name}.{name}", hints[name], value) for name, value in values.items()}
    config = config_class(**typed)
    cls.check_config(config)
    return config


def method_config(method: str, profile: Profile, task: str | None = None, settings: dict | None = None):
    """The config a run of `method` on `task` uses: defaults < the method's profile values < the user's settings
    (`settings`, else the profile's own `method_overrides`, which carry the user's --set and --config)."""
    from methods import get_method

    cls = get_method(method)
    user = (settings if settings is not None else profile.method_overrides).get(method, {})
    values = {**cls.config_class.for_profile(profile.name, task), **user}
    return make_config(cls, values, "settings")


def check_settings(settings: dict, methods: list[str], tasks: list[str], profile: Profile) -> None:
    """Every setting names a method being run and a field it has, with a value of the field's type: checked for
    every (method, task) before any data or backbone loads."""
    from methods import get_method

    for method in settings:
        get_method(method)  # an unknown method name lists the known ones
        if method not in methods:
            raise HarnessError(f"settings for '{method}', which is not among the methods run ({', '.join(methods)})")
    for method in methods:
        for task in tasks:
            method_config(method, profile, task, settings)


CONFIG_KEYS = ("methods", "tasks", "datasets", "seeds", "profile", "backbone", "dtype", "eval_cap", "settings")


def read_config_file(path: str) -> dict:
    """A run's settings in YAML: any of methods, tasks (or datasets), seeds, profile, backbone, dtype, eval_cap,
    and settings: {method: {field: value}}. Unknown keys are refused; the command line wins over the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise HarnessError(f"--config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise HarnessError(f"--config {path} is not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise HarnessError(f"--config {path}: expected a mapping of {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise HarnessError(f"--config {path}: unknown key(s) {unknown}; known: {', '.join(CONFIG_KEYS)}")
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise HarnessError(f"--config {path}: settings must map each method to {{field: value}}")
    out = dict(raw)
    for key in ("methods", "tasks", "datasets", "seeds"):  # lists or comma-separated text, as on the command line
        if isinstance(out.get(key), list):
            out[key] = ",".join(str(v) for v in out[key])
    if "datasets" in out:
        out["tasks"] = out.pop("datasets")
    return out


def merge_settings(*layers: dict) -> dict:
    """Later layers win, field by field."""
    out: dict[str, dict] = {}
    for layer in layers:
        for method, values in layer.items():
            out.setdefault(method, {}).update(values)
    return out


def settings_table(cls, profiles: list[str]) -> list[dict]:
    """One row per setting: name, default, each profile's value where the method sets one, help."""
    rows = []
    for name, default, help in cls.config_class.describe():
        row = {"setting": name, "default": default}
        for profile in profiles:
            values = cls.config_class.profiles.get(profile, {})
            per_task = {t: v[name] for t, v in cls.config_class.task_profiles.get(profile, {}).items() if name in v}
            shown = values.get(name, "")
            if per_task:
                shown = ", ".join([*([str(shown)] if shown != "" else []), *(f"{t}: {v}" for t, v in per_task.items())])
            row[profile] = shown
        row["help"] = help
        rows.append(row)
    return rows

