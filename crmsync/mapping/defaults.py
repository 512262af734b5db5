"""The mapping each provider ships: ``crmsync/mappings/<provider>.yaml``, keyed by its registry name.

A new provider brings its default by adding that one file; nothing here lists providers.
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable

from crmsync.errors import MappingError
from crmsync.providers import provider_names


def _resource(provider: str) -> Traversable:
    return resources.files("crmsync").joinpath("mappings").joinpath(f"{provider}.yaml")


def has_default(provider: str) -> bool:
    """True when ``provider`` is registered and ships a default mapping."""
    return provider in provider_names() and _resource(provider).is_file()


def default_text(provider: str) -> str:
    """The built-in mapping file of ``provider`` (what ``map init`` writes)."""
    if not has_default(provider):
        shipped = ", ".join(name for name in provider_names() if has_default(name))
        raise MappingError(f"no built-in mapping for provider {provider!r} (one of {shipped})")
    return _resource(provider).read_text(encoding="utf-8")
