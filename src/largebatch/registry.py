"""Name registries: engines, tasks, datasets and models register the names the config accepts.

Each registry maps a config value (``engine.name=ddp``) to a factory. The packages that own the
implementations register their built-in names when imported (``largebatch.engines`` registers
``single``, ``ddp`` and ``deepspeed``); a registry imports its *provider* packages the first
time it is asked, so the config's allowed values always include them without the config
importing any of those packages. User code extends a registry the same way::

    from largebatch.registry import DATASETS
    DATASETS.register("my_faces", "my_project.data:my_faces_spec")   # lazy "module:attr"

An unknown name is one ``ConfigError`` line naming the key and every registered name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from largebatch.errors import ConfigError

Factory = Union[Callable[..., Any], str]


@dataclass
class Entry:
    """One registered name: its factory (or a lazy ``module:attr`` path) and its traits."""

    factory: Factory
    traits: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Callable[..., Any]:
        """The factory itself (a lazy path is imported once)."""
        if isinstance(self.factory, str):
            module, _, attr = self.factory.partition(":")
            self.factory = getattr(importlib.import_module(module), attr)
        return self.factory


class Registry:
    """Names of one config key and what builds each.

    Args:
        key: the config key the names are values of (e.g. ``engine.name``).
        providers: modules that register the built-in names; imported on first use.
        extra: accepted values that are not entries (e.g. ``auto``).
    """

    def __init__(self, key: str, providers: tuple[str, ...] = (),
                 extra: tuple[str, ...] = ()) -> None:
        self.key = key
        self.extra = extra
        self._providers = list(providers)
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, factory: Factory, **traits: Any) -> None:
        """Make ``name`` a valid value of ``self.key``; ``factory`` may be ``"module:attr"``
        (imported when first used). ``traits`` are facts other packages may ask about the
        name without importing it (e.g. that an engine fixes its batch at start)."""
        self._entries[name] = Entry(factory, dict(traits))

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and plugins that undo their registration)."""
        self._load_providers()
        self._entries.pop(name, None)

    def _load_providers(self) -> None:
        while self._providers:
            importlib.import_module(self._providers.pop(0))

    def names(self) -> tuple[str, ...]:
        """Every accepted value, the extra ones first, then the registered ones in order."""
        self._load_providers()
        return (*self.extra, *self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def check(self, name: Any) -> None:
        """Raise the one-line error for a value that is not registered."""
        if name not in self.names():
            raise ConfigError(f"{self.key}={name!r} is not one of {'|'.join(self.names())}")

    def get(self, name: str) -> Callable[..., Any]:
        """The factory of ``name``.

        Raises:
            ConfigError: ``name`` is not registered (the message lists every name).
        """
        self.check(name)
        if name not in self._entries:
            raise ConfigError(f"{self.key}={name!r} must be resolved before it is built")
        return self._entries[name].load()

    def trait(self, name: str, trait: str, default: Optional[Any] = None) -> Any:
        """A trait of ``name`` (``default`` when the name or the trait is unknown)."""
        self._load_providers()
        entry = self._entries.get(name)
        return default if entry is None else entry.traits.get(trait, default)


#: ``engine.name``: how ranks wrap, synchronise and step (``largebatch.engines``).
ENGINES = Registry("engine.name", providers=("largebatch.engines",), extra=("auto",))
#: ``task.name``: what is trained and how it is scored (``largebatch.tasks``).
TASKS = Registry("task.name", providers=("largebatch.tasks",))
#: ``data.name``: datasets with their sizes and rank-sharded loaders (``largebatch.data``).
DATASETS = Registry("data.name", providers=("largebatch.data",))
#: ``model.name``: the networks (``largebatch.models``).
MODELS = Registry("model.name", providers=("largebatch.models",))

#: The registries by the config key whose values they hold (what validation checks).
BY_KEY: dict[str, Registry] = {r.key: r for r in (ENGINES, TASKS, DATASETS, MODELS)}
