"""Notification channels (``/actions/watch``): subscribe, and renew before Zoho's week runs out."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from crmsync.errors import FatalProviderError, UsageError
from crmsync.providers.zoho.values import MODULES, _json, parse_ts, zoho_time
from crmsync.providers.zoho.writes import ZohoWrites

CHANNEL_TTL = timedelta(days=7) - timedelta(hours=1)  # Zoho: at most a week, else one hour
CHANNEL_TOKEN_MAX = 50


class ZohoChannels(ZohoWrites):
    """What ``crmsync webhook`` asks of Zoho; receiving the notifications is ``webhook.py``'s part."""

    def subscribe(
        self,
        *,
        channel_id: str,
        notify_url: str,
        token: str,
        events: Sequence[str] | None = None,
        expiry: datetime | None = None,
    ) -> datetime:
        """Enable a notification channel (``POST /actions/watch``); returns when it expires."""
        if len(token) > CHANNEL_TOKEN_MAX:
            raise UsageError(f"a Zoho channel token holds at most {CHANNEL_TOKEN_MAX} characters")
        if not str(channel_id).isdigit():
            raise UsageError("a Zoho channel id is a number")
        events = list(events or [f"{MODULES[o]}.all" for o in ("contacts", "companies", "deals")])
        until = min(expiry or datetime.now(UTC) + CHANNEL_TTL, datetime.now(UTC) + CHANNEL_TTL)
        item = {
            "channel_id": str(channel_id),
            "events": events,
            "notify_url": notify_url,
            "token": token,
            "channel_expiry": zoho_time(until),
            "return_affected_field_values": False,
        }
        return self._watch("POST", item)

    def renew_if_needed(
        self, *, channel_id: str, within: timedelta = timedelta(days=1), now: datetime | None = None
    ) -> datetime | None:
        """Push the channel's expiry a week out when less than ``within`` is left; None if it is gone."""
        now = now or datetime.now(UTC)
        self._spend(1)
        r = self.http.get("/actions/watch", params={"channel_id": str(channel_id)}, endpoint="/actions/watch")
        channels = _json(r).get("watch") or []
        if not channels:
            return None
        expiry = min(parse_ts(c.get("channel_expiry")) or now for c in channels)
        if expiry - now > within:
            return expiry
        events = [e for c in channels for e in c.get("events") or []]
        return self._watch(
            "PATCH", {"channel_id": str(channel_id), "events": events, "channel_expiry": zoho_time(now + CHANNEL_TTL)}
        )

    def _watch(self, method: str, item: dict[str, Any]) -> datetime:
        self._spend(1)
        r = self.http.request(method, "/actions/watch", json={"watch": [item]}, endpoint="/actions/watch")
        results = _json(r).get("watch") or [{}]
        result = results[0]
        if result.get("status") != "success":
            raise FatalProviderError(f"zoho {method} /actions/watch: {result.get('code')}: {result.get('message')}")
        events = (result.get("details") or {}).get("events") or []
        expiries = [parse_ts(e.get("channel_expiry")) for e in events]
        return (
            min(e for e in expiries if e)
            if any(expiries)
            else parse_ts(item.get("channel_expiry")) or datetime.now(UTC)
        )
