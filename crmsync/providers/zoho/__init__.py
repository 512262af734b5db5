"""Zoho CRM (API v8): OAuth per data centre, COQL keyset delta pull, upsert-based push.

Facts this package relies on are in shared/reference/zoho.md; the ones that shaped it:

* every account lives in one data centre: the token response names its ``api_domain`` and all API
  calls go there (``settings["api_base_url"]``), the token calls to the ``accounts-server`` the
  authorisation redirect names; the header is ``Zoho-oauthtoken``, and token errors arrive as
  ``{"error": ...}`` with HTTP 200;
* pull reads with COQL on a ``(Modified_Time, id)`` keyset: 2,000 rows a call for 3 credits (list
  pages cost 1 credit per 200 and stop at 100,000 records), no offsets, and a record changed during
  the walk moves behind the cursor instead of shifting a page; Modified_Time has whole seconds, so
  thousands of records share one and the id breaks the tie; a large backlog is walked from both
  ends (descending from the run's upper bound) to halve the round trips, and once the ends have
  read three pages without meeting, the band between them is read as id ranges side by side, each
  range checkpointed; deletions come from ``/deleted``, asked for alongside the walk;
* writes take 100 records, answer per record in input order (201/200, 207, 400 when all failed) and
  run workflows unless ``trigger`` is ``[]``; upsert matches on ``duplicate_check_fields``;
* calls and tasks carry ``crmsync_outcome_id``, a unique custom field: a re-sent call is refused with
  ``DUPLICATE_DATA`` naming the existing record, which is the call we were looking for;
* 429 ``TOO_MANY_REQUESTS`` has no Retry-After: the concurrency kind clears quickly (our backoff),
  the 24-hour credit kind does not (give up).

One concept per module, each a layer of ``ZohoProvider`` that builds on the ones before it, as in the
Odoo package: ``values`` (module names, link fields, COQL limits and text, timestamps, response
bodies), ``auth`` (accounts servers, scopes, the token call), ``api`` (``ZohoPolicy`` and the counted
requests), ``schema`` (field metadata, the unique fields push needs, the org's users),
``partitioned`` (a walk's middle split into id ranges, and COQL's sub-concurrency), ``reads``
(``changes``, ``fetch``, ``list_ids``, ``lookup``: every COQL read of records), ``writes`` (upserts,
calls and tasks), ``channels`` (notification channels) and ``provider`` (the registry's class and the
connect flow); ``webhook`` receives what the channels send.
"""

from crmsync.providers.zoho.api import ZohoPolicy
from crmsync.providers.zoho.auth import ACCOUNTS, DEFAULT_SCOPES, _accounts_server
from crmsync.providers.zoho.provider import ZohoProvider
from crmsync.providers.zoho.values import (
    API_PATH,
    DEAL_KEY,
    MARKER,
    MODULES,
    _nest,
    domain_of,
    parse_ts,
    quote,
    zoho_time,
)

__all__ = [
    "ACCOUNTS",
    "API_PATH",
    "DEAL_KEY",
    "DEFAULT_SCOPES",
    "MARKER",
    "MODULES",
    "ZohoPolicy",
    "ZohoProvider",
    "_accounts_server",
    "_nest",
    "domain_of",
    "parse_ts",
    "quote",
    "zoho_time",
]
