"""Salesforce: the provider (``provider.py``), auth and token flows (``auth.py``), the answers' limits
(``limits.py``), SOQL (``soql.py``), record shapes (``records.py``) and Bulk API 2.0 backfills (``bulk.py``)."""

from crmsync.providers.salesforce.provider import SalesforceProvider

__all__ = ["SalesforceProvider"]
