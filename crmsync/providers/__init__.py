"""The closed registry of providers: name -> class, imported only when used (fast start-up)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from crmsync.errors import UsageError

if TYPE_CHECKING:
    from crmsync.providers.base import Provider

#: Every provider crmsync ships. A new CRM is one file plus one line here.
REGISTRY: dict[str, str] = {
    "hubspot": "crmsync.providers.hubspot.provider:HubSpotProvider",
    "zoho": "crmsync.providers.zoho.provider:ZohoProvider",
    "odoo": "crmsync.providers.odoo.provider:OdooProvider",
    "pipedrive": "crmsync.providers.pipedrive:PipedriveProvider",
    "salesforce": "crmsync.providers.salesforce:SalesforceProvider",
    "dynamics": "crmsync.providers.dynamics:DynamicsProvider",
}
#: The CRM `crmsync demo` runs against, through its emulator's sandbox.
DEMO = "hubspot"


def provider_names() -> list[str]:
    return sorted(REGISTRY)


def get_provider(name: str) -> type[Provider]:
    """The provider class for ``name``; an unknown name is a usage error naming the valid ones."""
    target = REGISTRY.get(name.lower())
    if target is None:
        raise UsageError(f"unknown provider {name!r}; choose one of: {', '.join(provider_names())}")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        raise UsageError(f"provider {name!r} is not available in this build ({exc.name})") from None
    return cls
