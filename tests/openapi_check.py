"""Validate HTTP traffic against the CRMs' official OpenAPI specs (``tests/specs/``) with openapi-core.

Use it three ways::

    check = SpecCheck.hubspot()
    problems = check.check(request, response)          # one exchange -> list of problems

    transport = check.wrap(emulator)                    # every exchange through an emulator
    client = httpx.Client(transport=transport, base_url="http://hubspot.test")
    ...
    assert transport.problems == []

    client = httpx.Client(base_url=server.url, event_hooks={"response": [check.hook]})  # loopback

Requests are checked for parameters and body (security is left to the emulators' own tests: the specs
name OAuth scopes and header API keys that openapi-core cannot verify). Responses are checked for the
documented status (or ``default``) and body. Paths no routing entry covers go to ``unchecked``.

Three adjustments to the specs, made when they are loaded and nowhere else:

* HubSpot's shared ``Error`` response is declared as ``*/*``, which openapi-core does not parse; it is
  re-declared as ``application/json`` (what HubSpot sends) so error bodies are validated too.
* An empty ``content: {}`` (HubSpot's 204s) is dropped: it means "no body", but openapi-core would
  otherwise report the missing body.
* Zoho's specs ``$ref`` each other through raw.githubusercontent.com URLs; those are served from the
  sibling files here (tests/specs/zoho/SOURCE.txt), and any other remote reference is refused.

* Pipedrive's answers carry ``null`` for every unset field (``org_id``, ``due_time``, ``address`` …), which
  its specs (YAML) do not declare nullable: every schema of those files is loaded as nullable. Their
  servers end in ``/api/v2`` and ``/v1``, so each route strips its own prefix before the spec's paths
  are matched.

``KNOWN_DEVIATIONS`` lists the places where the real API is documented (by its own docs or observed
bodies) to differ from its spec; exchanges matching one are counted in ``deviations``, not ``problems``.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from jsonschema_path import SchemaPath
from openapi_core.datatypes import RequestParameters
from openapi_core.templating.paths.exceptions import PathError
from openapi_core.validation.request.validators import V30RequestBodyValidator, V30RequestParametersValidator
from openapi_core.validation.response.validators import V30ResponseValidator
from werkzeug.datastructures import Headers, ImmutableMultiDict

SPECS = Path(__file__).resolve().parent / "specs"

#: (path regex, spec file relative to the provider folder). First match wins, so specific entries
#: come before the generic ``{objectType}`` ones.
HUBSPOT_ROUTES: list[tuple[str, str]] = [
    (r"^/crm/v3/objects/contacts(/.*)?$", "crm-objects-v3/contacts.json"),
    (r"^/crm/v3/objects/companies(/.*)?$", "crm-objects-v3/companies.json"),
    (r"^/crm/v3/objects/calls(/.*)?$", "crm-objects-v3/calls.json"),
    (r"^/crm/v3/objects/0-3(/.*)?$", "crm-objects-v3/deals.json"),  # the deals spec uses the id form only
    (r"^/crm/v3/objects/[^/]+(/.*)?$", "crm-objects-v3/objects.json"),
    (r"^/crm/v4/", "associations-v4/associations.json"),
    (r"^/crm/associations/v4/", "associations-v4/associationsSchema.json"),
    (r"^/crm/v3/properties/", "properties-v3/properties.json"),
    (r"^/oauth/v1/(token|access-tokens/|refresh-tokens/)", "oauth-v1/oauth.json"),
    (r"^/oauth/v3/token", "oauth-v3/oauth.json"),
]

ZOHO_ROUTES: list[tuple[str, str]] = [
    (r"^/crm/v8/coql$", "coql.json"),
    (r"^/crm/v8/settings/fields(/.*)?$", "fields.json"),
    (r"^/crm/v8/settings/layouts(/.*)?$", "layouts.json"),
    (r"^/crm/v8/settings/modules(/.*)?$", "modules.json"),
    (r"^/crm/v8/settings/custom_views(/.*)?$", "custom_views.json"),
    (r"^/crm/v8/settings/profiles(/.*)?$", "profiles.json"),
    (r"^/crm/v8/settings/related_lists(/.*)?$", "related_lists.json"),
    (r"^/crm/v8/settings/tags(/.*)?$", "tags.json"),
    (r"^/crm/v8/[^/]+(/[^/]+)?/actions/(add|remove)_tags$", "tags.json"),
    (r"^/crm/v8/users(/.*)?$", "users.json"),
    (r"^/crm/v8/actions/watch$", "notifications.json"),
    (r"^/crm/v8/[^/]+/search$", "module_search.json"),
    (r"^/crm/v8/(?!org$)[^/]+(/.*)?$", "record.json"),
]

#: (path regex, spec file, prefix regex the spec's server already holds).
PIPEDRIVE_ROUTES: list[tuple[str, str, str]] = [
    (r"^/api/v2/", "v2.yaml", r"^/api/v2"),
    (r"^/(api/)?v1/", "v1.yaml", r"^/(api/)?v1"),
]

_VALIDATION_LOCK = threading.RLock()

ZOHO_REMOTE_PREFIX = "https://raw.githubusercontent.com/Zohocorp-Pvt-Ltd/crm-oas/refs/heads/main/v8.0/"


@dataclass(frozen=True)
class Deviation:
    """A documented difference between a real API and its spec: matching exchanges are not problems."""

    path: str  # regex on the request path
    status: int
    why: str
    method: str = ""  # empty = any


HUBSPOT_DEVIATIONS: list[Deviation] = [
    Deviation(
        r".*",
        429,
        "HubSpot's 429 body is {status, message, errorType, correlationId, policyName, groupName}: no `category`, "
        "which the spec's Error requires (reference §6; bodies quoted in HubSpot/hubspot-api-python#117).",
    ),
    Deviation(
        r"^/oauth/v[13]/token$",
        400,
        "OAuth token errors are {status: BAD_AUTH_CODE|BAD_REFRESH_TOKEN|BAD_CLIENT_ID, message, correlationId} "
        "without `category`.",
    ),
]


@dataclass
class _Spec:
    server: str
    body: V30RequestBodyValidator
    params: V30RequestParametersValidator
    response: V30ResponseValidator


def _jsonify_wildcards(node: Any) -> Any:
    """Re-declare ``*/*`` content as JSON and drop empty ``content: {}`` maps (see the module docstring)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "content" and value == {}:
                continue  # "no body": openapi-core would otherwise demand one
            if key == "content" and isinstance(value, dict) and "*/*" in value and "application/json" not in value:
                value = {("application/json" if k == "*/*" else k): v for k, v in value.items()}
            out[key] = _jsonify_wildcards(value)
        return out
    if isinstance(node, list):
        return [_jsonify_wildcards(v) for v in node]
    return node


def _local_handler(folder: Path) -> Callable[[str], Any]:
    """A jsonschema-path URI handler that serves the Zoho cross-file refs from ``folder``."""

    def handle(uri: str) -> Any:
        if uri.startswith(ZOHO_REMOTE_PREFIX):
            name = uri[len(ZOHO_REMOTE_PREFIX) :].split("#", 1)[0]
            return _jsonify_wildcards(json.loads((folder / name).read_text()))
        if uri.startswith("file:"):
            return _jsonify_wildcards(json.loads(Path(urlsplit(uri).path).read_text()))
        raise ValueError(f"refusing to fetch {uri!r}: specs are validated offline")

    return handle


def _nullable(node: Any) -> Any:
    """Every schema (a dict with ``type``) declared nullable (Pipedrive: see the module docstring)."""
    if isinstance(node, dict):
        out = {k: _nullable(v) for k, v in node.items()}
        if (isinstance(out.get("type"), str) and out.get("type") != "object") or "properties" in out:
            out["nullable"] = True
        return out
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@functools.cache
def _load(path: Path) -> _Spec:
    """Load one spec file once per process (loading and ref resolution are the slow part)."""
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = _nullable(
            _jsonify_wildcards(yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
        )
    else:
        data = _jsonify_wildcards(json.loads(path.read_text()))
    handler = _local_handler(path.parent)
    handlers = {"<all_urls>": handler, "http": handler, "https": handler, "file": handler}
    spec = SchemaPath.from_dict(data, base_uri=path.as_uri(), handlers=handlers)
    server = (data.get("servers") or [{"url": "https://example.invalid"}])[0]["url"].rstrip("/")
    return _Spec(
        server,
        V30RequestBodyValidator(spec),
        V30RequestParametersValidator(spec),
        V30ResponseValidator(spec),
    )


class _Request:
    """An httpx.Request seen through openapi-core's Request protocol, rebased onto the spec's server."""

    def __init__(self, request: httpx.Request, host_url: str, path: str) -> None:
        self.host_url = host_url
        self.path = path
        self.method = request.method.lower()
        self.body: bytes | None = request.content or None
        self.content_type = request.headers.get("Content-Type", "")
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(list(request.url.params.multi_items())),
            header=Headers(list(request.headers.items())),
            cookie=ImmutableMultiDict(),
        )


class _Response:
    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.data: bytes | None = response.content or None
        self.headers = Headers(list(response.headers.items()))
        self.content_type = response.headers.get("Content-Type", "")


def _describe(exc: BaseException) -> str:
    """One readable line for an openapi-core error (its detail hides in __cause__ and schema_errors)."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        schema_errors = getattr(seen, "schema_errors", None)
        if schema_errors:
            details = []
            for err in schema_errors:
                where = "/".join(str(p) for p in getattr(err, "absolute_path", []))
                details.append(f"{where or '<root>'}: {getattr(err, 'message', err)}")
            return f"{type(exc).__name__}: {'; '.join(details)}"[:2000]
        text = str(seen)
        if text and text not in texts:
            texts.append(text)
        seen = seen.__cause__ or seen.__context__
    return ": ".join([type(exc).__name__, *texts])[:2000]


@dataclass
class CheckResult:
    """What ``check`` found for one exchange."""

    covered: bool
    problems: list[str] = field(default_factory=list)
    deviation: Deviation | None = None


class SpecCheck:
    """Checks exchanges against a provider's spec folder, routed by path regex."""

    def __init__(
        self,
        folder: Path | str,
        routes: Sequence[tuple[str, str]] | Sequence[tuple[str, str, str]],
        *,
        deviations: Iterable[Deviation] = (),
        prefix: str = "",
    ) -> None:
        self.folder = Path(folder)
        self.routes = [(re.compile(route[0]), self.folder / route[1]) for route in routes]
        #: Per spec file: the part of a request path that the spec's server URL already holds.
        self.strip = {self.folder / route[1]: re.compile(route[2]) for route in routes if len(route) > 2}
        self.deviations = list(deviations)
        self.prefix = prefix.rstrip("/")  # stripped from request paths before routing (emulator mounts)

    @classmethod
    def hubspot(cls, *, deviations: Iterable[Deviation] = ()) -> SpecCheck:
        """The HubSpot specs with HubSpot's routing table and known deviations."""
        return cls(SPECS / "hubspot", HUBSPOT_ROUTES, deviations=[*HUBSPOT_DEVIATIONS, *deviations])

    @classmethod
    def zoho(cls, *, prefix: str = "", deviations: Iterable[Deviation] = ()) -> SpecCheck:
        """The Zoho CRM v8 specs (server https://zohoapis.com, paths /crm/v8/...)."""
        return cls(SPECS / "zoho", ZOHO_ROUTES, prefix=prefix, deviations=deviations)

    @classmethod
    def pipedrive(cls, *, deviations: Iterable[Deviation] = ()) -> SpecCheck:
        """Pipedrive's v2 spec (and v1 for the routes v2 lacks: users, activityTypes, webhooks)."""
        return cls(SPECS / "pipedrive", PIPEDRIVE_ROUTES, deviations=deviations)

    def spec_for(self, path: str) -> Path | None:
        """The spec file that covers a request path, if any."""
        for pattern, spec in self.routes:
            if pattern.search(path):
                return spec
        return None

    def _path(self, request: httpx.Request) -> str:
        path = request.url.path
        if self.prefix and path.startswith(self.prefix):
            path = path[len(self.prefix) :] or "/"
        return path

    def evaluate(self, request: httpx.Request, response: httpx.Response) -> CheckResult:
        """Check one exchange; ``covered`` is False when no spec covers the path."""
        path = self._path(request)
        spec_path = self.spec_for(path)
        if spec_path is None:
            return CheckResult(covered=False)
        with _VALIDATION_LOCK:  # openapi-core's lazy ref resolution is not documented as thread-safe
            return self._evaluate(request, response, path, spec_path)

    def _evaluate(self, request: httpx.Request, response: httpx.Response, path: str, spec_path: Path) -> CheckResult:
        spec = _load(spec_path)
        where = f"{request.method} {path} -> {response.status_code} [{spec_path.relative_to(self.folder)}]"
        host = spec.server
        if spec_path in self.strip:
            # The spec's server URL holds the version prefix: match on its origin plus its own path.
            server = urlsplit(spec.server)
            host = f"{server.scheme}://{server.netloc}"
            path = server.path.rstrip("/") + (self.strip[spec_path].sub("", path, count=1) or "/")
        problems: list[str] = []
        oreq = _Request(request, host, path)
        errors = list(spec.params.iter_errors(oreq))
        if errors and isinstance(errors[0], PathError):
            return CheckResult(True, [f"{where}: operation not in the spec ({_describe(errors[0])})"])
        errors += list(spec.body.iter_errors(oreq))
        problems += [f"{where}: request: {_describe(e)}" for e in errors]
        for deviation in self.deviations:
            if (
                deviation.status == response.status_code
                and (not deviation.method or deviation.method == request.method)
                and re.search(deviation.path, path)
            ):
                return CheckResult(True, problems, deviation)
        problems += [f"{where}: response: {_describe(e)}" for e in spec.response.iter_errors(oreq, _Response(response))]
        return CheckResult(True, problems)

    def check(self, request: httpx.Request, response: httpx.Response) -> list[str]:
        """Problems with one exchange (request params/body, response body for its status)."""
        return self.evaluate(request, response).problems

    def wrap(self, emulator: Any) -> CheckedTransport:
        """A transport that answers from ``emulator`` and validates every exchange."""
        return CheckedTransport(self, emulator.transport())

    def hook(self, response: httpx.Response) -> None:
        """An httpx response event hook: raises AssertionError on problems (for loopback clients)."""
        response.read()
        problems = self.check(response.request, response)
        if problems:
            raise AssertionError("\n".join(problems))


class CheckedTransport(httpx.MockTransport):
    """``httpx.MockTransport`` over an emulator that records spec problems per exchange."""

    def __init__(self, checker: SpecCheck, inner: httpx.MockTransport) -> None:
        self.checker = checker
        self.inner = inner
        self.problems: list[str] = []
        self.unchecked: list[str] = []
        self.deviations: list[tuple[str, Deviation]] = []
        self.checked = 0
        self._lock = threading.Lock()
        super().__init__(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        response.read()  # the body stays cached for the client after the check reads it
        result = self.checker.evaluate(request, response)
        with self._lock:
            if not result.covered:
                self.unchecked.append(f"{request.method} {request.url.path}")
                return response
            self.checked += 1
            self.problems.extend(result.problems)
            if result.deviation is not None:
                self.deviations.append(
                    (f"{request.method} {request.url.path} {response.status_code}", result.deviation)
                )
        return response
