"""Odoo (16 to 19): JSON-RPC ``execute_kw`` or JSON-2, write_date windows, batched creates.

Facts this package relies on are in shared/reference/odoo.md; the ones that shaped it:

* two transports behind one ``_call(model, method, ids, **kwargs)``: JSON-2 (``/json/2``, bearer
  key, HTTP statuses) on 19 and later, JSON-RPC (``/jsonrpc``, the key in the body, errors as
  HTTP 200 bodies keyed on ``error.data.name``, never on ``error.code``) before;
* ``write_date`` is the *transaction start*, read back truncated to the second, sorted on hidden
  microseconds, and compared to whole seconds on 19 only. So pull never trusts a keyset on it:
  each run reads the window ``[previous hi - overlap, server time - settle)`` paged by ``id``,
  and the stored cursor says either "inside this window, after this id" or "the last window
  ended at hi". Re-reading the overlap is harmless (the store drops unchanged records);
* a call is a ``mail.activity`` of the Call type created in one ``create`` per batch and marked
  done with one ``action_done``; on 19 the done activity is archived (pull reads it), up to 18 it
  is deleted and only its chatter message remains (pull reads that). The idempotency marker lives
  in ``x_crmsync_outcome_id`` when the database has it, else as ``[crmsync:<marker>]`` in the note,
  which the "activity done" message copies;
* what a real 19 server answers is recorded in tests/recordings/odoo19: ``GET /web/version`` is
  ``{version_info, version}``, not common.version's ``{server_version_info, ...}``; a note is
  sanitised into HTML (so crmsync sends text as HTML and reads it back as text); an activity
  created without ``user_id`` belongs to nobody (so every one gets an owner: the rep's user from
  ``owner_email``, else the connection's); a JSON-2 call for a missing database is an HTML 404.

One concept per module, each a layer of ``OdooProvider`` that builds on the ones before it:
``values`` (pure value helpers, the "activity done" message parser), ``rpc`` (faults, response
policy, the two transports, authentication, the server's version and clock), ``schema`` (fields,
activity types, stages, owners: per-run caches), ``reads`` (``changes``, ``fetch``, ``list_ids``,
``lookup``), ``writes`` (upserts, activities, markers) and ``provider`` (the registry's class and the
connect flow). Mixins in one straight line rather than collaborator objects: every layer shares the
same ``_call``, caches and lock through ``self``, so the methods moved unchanged, and mypy checks
each call against the layer below without protocols.
"""

from crmsync.providers.odoo.provider import OdooProvider
from crmsync.providers.odoo.rpc import MissingDatabase, OdooFault, OdooPolicy
from crmsync.providers.odoo.values import MODELS, server_version

__all__ = ["MODELS", "MissingDatabase", "OdooFault", "OdooPolicy", "OdooProvider", "server_version"]
