"""Optional provider capabilities: what a CRM can do beyond the ``Provider`` interface.

A capability is an object a provider class hands out (``Provider.webhooks()``), or None when the
CRM lacks it; callers decide on its presence, never on a provider's name. Each implementation
lives inside its provider's package (``providers/<crm>/webhook.py``).

Webhooks: the generic receiver (``crmsync/webhooks.py``) routes ``/hooks/<provider>/<connection>``,
reads the connection's stored values (``secret_keys``), asks the capability to verify the request
(before the body is read where the CRM allows it, then with the raw body), and stores the
``Event`` rows the capability parses. ``webhook subscribe`` asks it to register the receiver's
URL with the CRM, after storing whatever it generated (``prepare_secret``).
"""

from __future__ import annotations

import hmac
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from crmsync.errors import UsageError
from crmsync.jsonlimits import loads as json_loads

if TYPE_CHECKING:
    from crmsync.providers.base import Provider


class VerificationFailed(Exception):
    """A request failed verification; the reason is for logs and never goes into a response."""


class MalformedEvent(ValueError):
    """The body is JSON but not a notification we understand (answered 400)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One stored row: a hint that one record changed (pull fetches it fresh)."""

    dedupe_key: str
    object: str
    remote_id: str
    event_type: str  # creation | update | deletion | restore | merge
    occurred_at: datetime | None
    payload: dict[str, Any] = field(hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """What a verification sees of a request (the body is passed on its own)."""

    method: str
    #: The absolute URI the CRM called (and may have signed): the public URL's scheme and host.
    uri: str
    headers: Mapping[str, str]  # lower-cased names
    query: Mapping[str, Sequence[str]]
    now: float  # epoch seconds, for signed timestamps
    max_age: float  # seconds a signed timestamp may be off


def same(expected: str, given: str) -> bool:
    """Constant-time comparison of two strings (any bytes the client sent are compared, never decoded)."""
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogateescape"))


def json_body(body: bytes) -> Any:
    """The body as JSON, nesting bounded; anything else is a ``MalformedEvent``."""
    try:
        return json_loads(body)
    except ValueError as exc:  # TooDeep and UnicodeDecodeError are ValueErrors too
        detail = f": {exc}" if "nested" in str(exc) else ""
        raise MalformedEvent(f"the body is not JSON{detail}") from None


def ms_datetime(value: Any, what: str) -> tuple[int, datetime]:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise MalformedEvent(f"{what} must be epoch milliseconds")
    ms = int(value)
    try:
        return ms, datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        raise MalformedEvent(f"{what} is out of range") from None


def remote_id(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or str(value) == "":
        raise MalformedEvent(f"{what} must be an id")
    return str(value)


class WebhookSupport(ABC):
    """A CRM's webhooks: how its calls are verified and parsed, and how the receiver is registered."""

    #: Keys of the connection's secret document that verification reads.
    secret_keys: ClassVar[tuple[str, ...]]
    #: Of those, the ones whose values are secret (masked in every log line).
    hidden_keys: ClassVar[tuple[str, ...]]
    #: What `webhook secret` reads from stdin (a secret the CRM gave); None: crmsync generates it.
    secret_prompt: ClassVar[str | None] = None
    #: `webhook subscribe` registers the receiver with the CRM's API (else it is done in the CRM's UI).
    subscribes: ClassVar[bool] = False
    #: Subscriptions expire: `webhook serve --follow` renews them (hourly).
    renews: ClassVar[bool] = False

    def __init__(self, label: str) -> None:
        self.label = label  # the CRM's name for messages

    def check_before_body(self, secret: Mapping[str, str], request: WebhookRequest) -> None:
        """What the caller proves before its body is read (e.g. a secret in the URL). Default: nothing.

        Raises:
            VerificationFailed: the request is refused unread.
        """

    @abstractmethod
    def verify(self, secret: Mapping[str, str], request: WebhookRequest, body: bytes) -> None:
        """Check the request with the raw body, before anything parses it further.

        Raises:
            VerificationFailed: a missing or wrong signature or credential (answered 401).
            MalformedEvent: the body had to be read to verify and is not a notification (400).
        """

    @abstractmethod
    def events(self, doc: Any) -> list[Event]:
        """The verified body (parsed JSON) as stored rows; kinds crmsync does not sync are left out.

        Raises:
            MalformedEvent: not a notification of this CRM (nothing is stored then).
        """

    def hook_query(self, secret: Mapping[str, str], *, reveal: bool) -> str:
        """The query string the hook URL carries (``?k=v``), with its secrets masked unless ``reveal``."""
        return ""

    def accept_secret(self, value: str, existing: Mapping[str, Any], *, channel_id: str | None) -> dict[str, str]:
        """The values to store for a secret read by `webhook secret` (``secret_prompt``)."""
        raise UsageError(f"crmsync generates the {self.label} webhook credentials: run `crmsync webhook subscribe`")

    def prepare_secret(self, existing: Mapping[str, Any]) -> dict[str, str]:
        """What must be stored before subscribing (generated once, kept when already there)."""
        return {}

    def subscribe(
        self, provider: Provider, secret: Mapping[str, str], hook_url: str, *, renew_within: timedelta
    ) -> dict[str, Any]:
        """Register ``hook_url`` (secrets revealed) with the CRM, or renew what exists.

        Returns:
            A JSON-able report with a one-line ``summary`` for people.
        """
        raise UsageError(f"{self.label} webhooks are registered in {self.label} itself, not by crmsync")

    def subscribed(self, secret: Mapping[str, Any]) -> bool:
        """Whether `webhook subscribe` made a subscription for this connection (one to renew)."""
        return False
