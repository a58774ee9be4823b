"""Names -> implementations, for every config group, filled through entry points.

A plugin is a dataclass whose fields are its hyper-parameters. Registering it with
``@plugin("solver", "dpo")`` does three things:

* the class becomes selectable as ``solver=dpo``;
* a Hydra schema (the same fields plus ``_target_``) is stored in the ConfigStore, so a
  wrong type fails at composition time;
* its import path joins the allow-list that :func:`instantiate` enforces (Hydra 1.4 will
  require one), so a config can never instantiate an arbitrary callable.

Range checks live in field metadata (see :func:`param`) and run in :func:`validate`
before any work starts. Built-in plugins are registered by the package
``comalkit_plugins`` through the entry-point group ``comalkit.plugins``, exactly as a
third-party package would register its own.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import pkgutil
import typing
import warnings
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

ENTRY_POINT_GROUP = "comalkit.plugins"
#: The config groups whose options are plugins. ``trainer`` and ``experiment`` are plain YAML.
PLUGIN_GROUPS = (
    "task",
    "solver",
    "oracle",
    "reference",
    "model",
    "data",
    "logger",
    "game",
    "pairs",
    "sampler",
)

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def param(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: Iterable[Any] | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with a help text and range limits checked by :func:`validate`."""
    meta = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le}
    meta["choices"] = tuple(choices) if choices is not None else None
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def closest(name: str, options: Iterable[str]) -> str:
    """A 'did you mean' hint for ``name`` among ``options`` (empty when nothing is close)."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


class Registry:
    """Config group -> option name -> plugin class."""

    def __init__(self) -> None:
        self._plugins: dict[str, dict[str, type]] = {g: {} for g in PLUGIN_GROUPS}
        self._extra_targets: set[str] = set()
        self.loaded_entry_points: list[str] = []
        self.failed_entry_points: dict[str, str] = {}

    # -- registration -------------------------------------------------------------------------
    def add(self, group: str, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register ``cls`` as option ``name`` of config group ``group``."""
        if group not in self._plugins:
            raise ConfigError(f"unknown plugin group '{group}'.{closest(group, self._plugins)}")

        def decorator(cls: type[T]) -> type[T]:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"plugin {_qualname(cls)} must be a dataclass of its hyper-parameters")
            known = self._plugins[group].get(name)
            if known is not None and _qualname(known) != _qualname(cls):
                raise ConfigError(
                    f"{group}={name} is registered twice: {_qualname(known)} and {_qualname(cls)}"
                )
            self._plugins[group][name] = cls
            return cls

        return decorator

    def allow_target(self, target: str | Callable[..., Any]) -> None:
        """Allow a non-plugin ``_target_`` (for example an optimizer class) in :func:`instantiate`."""
        self._extra_targets.add(target if isinstance(target, str) else _qualname(target))

    # -- lookup ---------------------------------------------------------------------------------
    def names(self, group: str) -> list[str]:
        return sorted(self._plugins.get(group, {}))

    def get(self, group: str, name: str) -> type:
        options = self._plugins.get(group)
        if options is None:
            raise ConfigError(f"unknown plugin group '{group}'.{closest(group, self._plugins)}")
        if name not in options:
            raise ConfigError(
                f"unknown {group} '{name}'. Available {group} options: {', '.join(self.names(group)) or '(none)'}."
                + closest(name, options)
            )
        return options[name]

    def allowed_targets(self) -> set[str]:
        plugin_targets = {_qualname(c) for opts in self._plugins.values() for c in opts.values()}
        return plugin_targets | self._extra_targets

    def schema(self, group: str, name: str) -> type:
        """The Hydra schema of a plugin: its own fields plus ``_target_``."""
        cls = self.get(group, name)
        target = dataclasses.field(default=_qualname(cls))
        fields = [("_target_", str, target)]
        hints = typing.get_type_hints(cls)  # resolves inherited string annotations in their own modules
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            spec = dataclasses.field(
                default=f.default, default_factory=f.default_factory, metadata=f.metadata
            )
            fields.append((f.name, hints.get(f.name, f.type), spec))
        schema = dataclasses.make_dataclass(f"{cls.__name__}Config", fields, kw_only=True)
        schema.__module__ = cls.__module__  # so string annotations resolve in the plugin's module
        return schema

    def store(self) -> None:
        """Put every plugin's schema into Hydra's ConfigStore as ``group/name``, and the defaults of
        each :data:`SCHEMA_GROUPS` schema as ``<group>_defaults``, which ``conf/<group>/default.yaml``
        extends: the dataclass is the one source of those defaults."""
        from hydra.core.config_store import ConfigStore

        cs = ConfigStore.instance()
        for group, options in self._plugins.items():
            for name in options:
                cs.store(group=group, name=name, node=self.schema(group, name))
        for group, (module, name) in SCHEMA_GROUPS.items():
            schema = getattr(importlib.import_module(module), name)
            # a plain dict, not the dataclass: the node stays untyped, checked by validate() as before
            cs.store(name=f"{group}_defaults", node=dataclasses.asdict(schema()))

    # -- entry points ---------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load every ``comalkit.plugins`` entry point once; a broken plugin package is skipped.

        An entry point may name a module or package (importing it runs its ``@plugin``
        decorators; a package's submodules are imported too) or a callable that takes the
        registry. comalkit's own entry points load first, so a third-party package cannot
        take a built-in name; if they fail, that is a bug in comalkit and raises ``ImportError``.
        Any other package that fails to load (an import error, an exception in
        its callable, or a name another package already registered) contributes nothing: its
        partial registrations are rolled back, one :class:`PluginLoadWarning` names its
        distribution, entry point and error, and :attr:`failed_entry_points` keeps the message.
        """
        eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: _distribution(ep) != "comalkit")
        for ep in eps:
            if ep.value in self.loaded_entry_points or ep.value in self.failed_entry_points:
                continue
            saved = {group: dict(options) for group, options in self._plugins.items()}
            saved_targets = set(self._extra_targets)
            try:
                obj = ep.load()
                if isinstance(obj, ModuleType):
                    import_submodules(obj)
                elif callable(obj):
                    obj(self)
            except Exception as exc:  # any error inside a third-party package: report it, keep the rest
                where = f"plugin package '{_distribution(ep)}' (entry point '{ep.name} = {ep.value}')"
                if _distribution(ep) == "comalkit":  # the built-ins failing is a bug in comalkit itself
                    raise ImportError(f"comalkit: {where} failed to load: {exc}") from exc
                for group, options in saved.items():  # in place: a half-loaded package leaves nothing
                    self._plugins[group] = options
                self._extra_targets.intersection_update(saved_targets)
                message = f"comalkit: {where} failed to load and is skipped: {type(exc).__name__}: {exc}"
                self.failed_entry_points[ep.value] = message
                warnings.warn(message, PluginLoadWarning, stacklevel=2)
                continue
            self.loaded_entry_points.append(ep.value)


class PluginLoadWarning(UserWarning):
    """A ``comalkit.plugins`` entry point failed to load; the other plugins still work."""


def _distribution(ep: Any) -> str:
    """The name of the distribution that declares ``ep`` (``?`` when metadata does not say)."""
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "?"


def import_submodules(package: ModuleType) -> None:
    """Import every submodule of ``package`` so that its ``@plugin`` decorators run."""
    for info in pkgutil.walk_packages(getattr(package, "__path__", []), prefix=package.__name__ + "."):
        importlib.import_module(info.name)


registry = Registry()


def plugin(group: str, name: str) -> Callable[[type[T]], type[T]]:
    """Register a dataclass as option ``name`` of config group ``group`` (see :class:`Registry`)."""
    return registry.add(group, name)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Build an object from a config node, allowing only registered targets."""
    from hydra.utils import instantiate as hydra_instantiate

    target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
    if target is None:
        raise ConfigError(
            f"config node has no _target_: {OmegaConf.to_yaml(node) if isinstance(node, DictConfig) else node}"
        )
    allowed = registry.allowed_targets()
    if target not in allowed:
        raise ConfigError(
            f"_target_ '{target}' is not a registered comalkit plugin; register it with @plugin or "
            f"registry.allow_target().{closest(target, allowed)}"
        )
    from hydra.errors import InstantiationException

    try:
        return hydra_instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, ConfigError):  # the plugin's own message names the key or file
            raise exc.__cause__ from None
        raise


#: Config groups that are not plugins but have a schema: ``group -> (module, dataclass)``. The
#: dataclass's fields are the group's defaults (:meth:`Registry.store`) and its checks (:func:`validate`).
SCHEMA_GROUPS = {"trainer": ("comalkit.training", "TrainerConfig")}
#: Top-level keys besides the groups.
TOP_LEVEL_KEYS = ("seed",)


def _check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    if value is None:
        return
    _check_finite(key, value)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{key}={value!r}: expected one of {list(choices)}.{closest(str(value), map(str, choices))}"
        )
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    limits = (
        ("gt", lambda v, b: v > b, ">"),
        ("ge", lambda v, b: v >= b, ">="),
        ("lt", lambda v, b: v < b, "<"),
        ("le", lambda v, b: v <= b, "<="),
    )
    for name, ok, sign in limits:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{key}={value!r}: expected a value {sign} {bound}.")


def _check_finite(key: str, value: Any) -> None:
    """No hyper-parameter may be nan or inf, at any depth (lists such as ``reference.strengths`` too)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value}: expected a finite number.")
    if isinstance(value, (list, tuple, ListConfig)):
        for i, item in enumerate(value):
            _check_finite(f"{key}[{i}]", item)
    elif isinstance(value, (dict, DictConfig)):
        for name, item in value.items():
            _check_finite(f"{key}.{name}", item)


def validate(cfg: DictConfig) -> None:
    """Check a composed config before any work: known top-level keys, every plugin field's type
    limits (ranges, choices, finite numbers, no missing value) and the ``trainer`` schema."""
    choices = current_choices()
    known = (*PLUGIN_GROUPS, *SCHEMA_GROUPS, *TOP_LEVEL_KEYS)
    for key in cfg:
        if key not in known:
            raise ConfigError(
                f"unknown top-level key '{key}' (from +{key}=...?): expected one of {sorted(known)}."
                + closest(str(key), known)
            )
    _check_finite("seed", cfg.get("seed"))
    for group in PLUGIN_GROUPS:
        node = cfg.get(group)
        if node is None or not isinstance(node, DictConfig):
            continue
        target = node.get("_target_")
        cls = next((c for c in registry._plugins[group].values() if _qualname(c) == target), None)
        if cls is None:
            chosen = choices.get(group, "?")
            raise ConfigError(f"{group}={chosen} has no registered _target_ (got {target!r}).")
        validate_dataclass(group, cls, node)
    for group, (module, name) in SCHEMA_GROUPS.items():
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            validate_dataclass(group, getattr(importlib.import_module(module), name), node, strict=True)


def validate_dataclass(prefix: str, cls: type, node: DictConfig, strict: bool = False) -> None:
    """Field checks of one node; ``strict`` also rejects keys the dataclass does not have (plugin
    nodes need no such check: Hydra's schema in the ConfigStore already rejects them)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if strict:
        for name in node:
            if name not in fields:
                raise ConfigError(
                    f"{prefix}.{name}: unknown key; {prefix} has {sorted(fields)}."
                    + closest(str(name), fields)
                )
    present = set(node.keys())  # ``in`` is False for a missing (???) value; keys() lists it
    for f in fields.values():
        if f.name not in present:
            continue
        key = f"{prefix}.{f.name}"
        if OmegaConf.is_missing(node, f.name):
            help_text = f.metadata.get("help") if f.metadata else ""
            raise ConfigError(f"{key} has no value: set {key}=..." + (f" ({help_text})" if help_text else ""))
        value = node[f.name]
        if (
            isinstance(value, DictConfig)
            and isinstance(f.default_factory, type)
            and dataclasses.is_dataclass(f.default_factory)
        ):
            validate_dataclass(key, f.default_factory, value, strict)
        else:
            _check_value(key, value, dict(f.metadata))


def current_choices() -> dict[str, str]:
    """The option chosen for each config group in the running Hydra job ({} outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def current_choice(group: str) -> str:
    """The option chosen for ``group`` (``"?"`` if unknown), for error messages."""
    return current_choices().get(group) or "?"
