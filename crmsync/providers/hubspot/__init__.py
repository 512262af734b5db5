"""HubSpot (CRM v3 API): private-app tokens or OAuth 2.0, search-based incremental pull, batch writes.

Facts this package relies on are in shared/reference/hubspot.md; the ones that shaped it:

* search returns at most 10,000 results per query (HTTP 400 beyond) and 200 per page, and lags
  the writes by a few seconds: pull re-anchors its window before the cap, slices a timestamp
  that more than 10,000 records share by ``hs_object_id``, and looks back a little;
* search has its own 5/s limit, the rest 100 requests per rolling 10 s (private apps, Free/Starter):
  a first walk (backfill, first pull) reads the lowest ids down the list chain and the rest as
  ``hs_object_id`` ranges over search side by side (``providers.partitions``), spending both;
* batch endpoints take 100 inputs and answer 207 with per-input errors;
* calls and tasks carry ``crmsync_outcome_id``, a unique property created on first push, so a call
  whose reply was lost is read back by that id (batch read by idProperty, strongly consistent)
  instead of being created twice.

One concept per module, each a layer of ``HubSpotProvider`` that builds on the ones before it, as in the
Odoo and Zoho packages: ``values`` (API constants, timestamps, association inputs), ``api``
(``HubSpotPolicy``, the token call, the state every layer shares), ``schema`` (properties and owners),
``pages`` (list and search requests, associations), ``partitioned`` (a first walk split by id),
``reads`` (``changes``, ``fetch``, ``list_ids``, ``lookup``), ``writes`` (upserts, calls) and
``provider`` (the registry's class and the connect flow); ``webhook`` receives HubSpot's webhooks.
"""

from crmsync.providers.hubspot.api import HubSpotPolicy, _token_request
from crmsync.providers.hubspot.provider import HubSpotProvider
from crmsync.providers.hubspot.values import (
    API,
    ASSOC_BATCH,
    ASSOC_TYPES,
    AUTHORIZE_URL,
    BATCH,
    COMPANY_KEY,
    DEAL_KEY,
    DEFAULT_OAUTH_SCOPES,
    IN_MAX,
    LIST_PAGE,
    MARKER,
    MAX_SEARCH_RANGES,
    MODIFIED,
    OWNERS_PAGE,
    PARTITION_MIN,
    PULL_ASSOCIATIONS,
    PUSH_SCOPES,
    REQUIRED_SCOPES,
    SEARCH_AHEAD,
    SEARCH_CAP,
    SEARCH_PAGE,
    _inline_associations,
    _plural,
    _prop_ms,
    log,
    modified_prop,
    parse_ts,
    to_ms,
)

__all__ = [
    "API",
    "ASSOC_BATCH",
    "ASSOC_TYPES",
    "AUTHORIZE_URL",
    "BATCH",
    "COMPANY_KEY",
    "DEAL_KEY",
    "DEFAULT_OAUTH_SCOPES",
    "IN_MAX",
    "LIST_PAGE",
    "MARKER",
    "MAX_SEARCH_RANGES",
    "MODIFIED",
    "OWNERS_PAGE",
    "PARTITION_MIN",
    "PULL_ASSOCIATIONS",
    "PUSH_SCOPES",
    "REQUIRED_SCOPES",
    "SEARCH_AHEAD",
    "SEARCH_CAP",
    "SEARCH_PAGE",
    "HubSpotPolicy",
    "HubSpotProvider",
    "_inline_associations",
    "_plural",
    "_prop_ms",
    "_token_request",
    "log",
    "modified_prop",
    "parse_ts",
    "to_ms",
]
