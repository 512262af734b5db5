"""Dynamics 365 Sales (Dataverse Web API): the provider, its Entra tokens (``auth.py``), OData details
(``odata.py``), ``$batch`` (``batch.py``) and row shapes (``records.py``)."""

from crmsync.providers.dynamics.provider import DynamicsProvider

__all__ = ["DynamicsProvider"]
