"""Pipedrive: the provider (``provider.py``), its record shapes (``records.py``) and token budget (``budget.py``)."""

from crmsync.providers.pipedrive.provider import PipedriveProvider

__all__ = ["PipedriveProvider"]
