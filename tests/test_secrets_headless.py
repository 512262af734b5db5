"""Secrets on a headless machine, tested as a user meets it: crmsync in child processes with an
empty HOME, no D-Bus session and no PYTHON_KEYRING_BACKEND, so `keyring` finds no backend.

Also the connect-time checks around it: a --base-url without a scheme, a refused connection, a
failed connect leaving nothing behind, and the OAuth loopback listener (state and PKCE).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import keyring
import keyring.errors
import pytest
from keyring.backend import KeyringBackend

from crmsync.app import App
from crmsync.credentials import MemoryKeyring, SecretStore, env_name
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.emulators.zoho import ZohoEmulator
from crmsync.errors import AuthError, ConfigError
from crmsync.oauth import authorize
from crmsync.sync.connect import connect
from tests.e2e import CliResult, ScriptIO
from tests.test_hubspot_e2e import outcome_lines

HEADLESS_PROBE = """
import importlib.util, json, keyring
from keyring.backend import get_all_keyring
from crmsync.credentials import keyring_usable
print(json.dumps({
    "backend": type(keyring.get_keyring()).__module__,
    "usable": keyring_usable(),
    "viable": sorted(type(k).__name__ for k in get_all_keyring()),
    "keyrings_alt": importlib.util.find_spec("keyrings") is not None,
}))
"""


def headless_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An empty HOME, no D-Bus session, no keyring override, no CRMSYNC_* but CRMSYNC_HOME."""
    home = tmp_path / "user"
    home.mkdir(exist_ok=True)
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_RUNTIME_DIR": str(home / "run"),
            "CRMSYNC_HOME": str(tmp_path / "crmsync-data"),  # not created yet: crmsync makes it
            "NO_COLOR": "1",
            "COLUMNS": "200",
        }
    )
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], *, stdin: str | None = None, timeout: float = 120) -> CliResult:
    proc = subprocess.run(
        [sys.executable, "-m", "crmsync", *args], env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def one_line_error(result: CliResult) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def exchange(server_url: str, emu: ZohoEmulator, code: str) -> dict[str, Any]:
    """What Zoho's token endpoint answers for ``code`` now."""
    form = {
        "grant_type": "authorization_code",
        "client_id": emu.client_id,
        "client_secret": emu.client_secret,
        "code": code,
    }
    return dict(httpx.post(f"{server_url}/oauth/v2/token", data=form).json())


@pytest.fixture
def zoho() -> Iterator[tuple[ZohoEmulator, str]]:
    emu = ZohoEmulator(contacts=6, client_secret=f"zs-{secrets.token_hex(16)}")
    with emu.serve() as server:
        yield emu, server.url


def test_the_clean_environment_really_has_no_keyring(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", HEADLESS_PROBE], env=headless_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    found = json.loads(proc.stdout)
    assert found["backend"] == "keyring.backends.fail", found
    assert found["usable"] is False
    assert found["keyrings_alt"] is False  # keyrings.alt would quietly write plaintext files
    assert "MemoryKeyring" not in found["viable"]


def test_the_memory_keyring_is_never_selected_by_keyring_itself() -> None:
    assert MemoryKeyring.viable is False
    assert all(type(k) is not MemoryKeyring for k in keyring.backend.get_all_keyring())


@pytest.mark.slow
def test_connect_without_a_keyring_exits_3_and_spends_no_grant_code(
    tmp_path: Path, zoho: tuple[ZohoEmulator, str]
) -> None:
    emu, url = zoho
    env = headless_env(tmp_path)
    code = emu.grant_code()
    args = ["connect", "zoho", "--name", "z", "--base-url", url, "--client-id", emu.client_id, "--grant-code", code]
    result = run([*args, "--token-stdin"], env, stdin=emu.client_secret + "\n")
    assert result.code == 3
    line = one_line_error(result)
    assert "no usable OS keyring" in line
    assert "--insecure-storage" in line and "CRMSYNC_SECRET_Z" in line
    assert emu.client_secret not in result.stderr + result.stdout
    assert "access_token" in exchange(url, emu, code)  # the single-use code was not spent
    assert run(["status"], env).code == 3  # and no connection was recorded


@pytest.mark.slow
def test_insecure_storage_connects_and_later_processes_find_the_secret(
    tmp_path: Path, zoho: tuple[ZohoEmulator, str]
) -> None:
    emu, url = zoho
    env = headless_env(tmp_path)
    data = Path(env["CRMSYNC_HOME"])
    args = ["connect", "zoho", "-n", "z", "--base-url", url, "--client-id", emu.client_id]
    args += ["--grant-code", emu.grant_code(), "--insecure-storage", "--token-stdin"]
    outputs: list[str] = []
    connected = run(args, env, stdin=emu.client_secret + "\n")
    outputs += [connected.stdout, connected.stderr]
    assert connected.code == 0, connected.stderr
    secret_file = data / "secrets" / "z.json"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    doc = json.loads(secret_file.read_text())
    assert doc["client_secret"] == emu.client_secret and doc["refresh_token"]

    # A later process, no flag: pull, push and status find the secret through the connection.
    pulled = run(["pull", "-c", "z", "--object", "contacts"], env)
    outputs += [pulled.stdout, pulled.stderr]
    assert pulled.code == 0, pulled.stderr
    assert stat.S_IMODE((data / "locks").stat().st_mode) == 0o700
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(3, prefix="headless"))
    pushed = run(["push", str(src), "-c", "z"], env)
    outputs += [pushed.stdout, pushed.stderr]
    assert pushed.code == 0, pushed.stderr
    assert len(emu.records("Calls")) == 3
    status = run(["--json", "status", "-c", "z"], env)
    outputs += [status.stdout, status.stderr]
    assert status.code == 0, status.stderr
    assert status.json()["connections"][0]["auth"]["secret"] == {"storage": "file", "where": str(secret_file)}
    text = run(["status", "-c", "z"], env)
    outputs += [text.stdout, text.stderr]
    assert f"secret: file {secret_file}" in text.stdout

    # An expired access token is refreshed and written back in place, still 0600.
    secret_file.write_text(json.dumps({**doc, "expires_at": 0}))
    again = run(["--verbose", "pull", "-c", "z", "--object", "contacts"], env)  # debug logs too
    outputs += [again.stdout, again.stderr]
    assert again.code == 0, again.stderr
    refreshed = json.loads(secret_file.read_text())
    assert refreshed["access_token"] != doc["access_token"] and refreshed["expires_at"] > time.time()
    assert refreshed["refresh_token"] == doc["refresh_token"]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert not [p for p in secret_file.parent.iterdir() if p != secret_file]  # no temp file left

    values = [v for k, v in {**doc, **refreshed}.items() if k in ("client_secret", "access_token", "refresh_token")]
    for text_out in outputs:
        for value in values:
            assert value not in text_out
    for path in data.rglob("*"):
        if path.is_file() and path != secret_file:
            content = path.read_bytes()  # the SQLite store and its WAL, locks, mappings, logs
            for value in values:
                assert value.encode() not in content, path


@pytest.mark.slow
def test_secret_in_the_environment_serves_connect_and_pull_with_nothing_stored(tmp_path: Path) -> None:
    emulator = HubSpotEmulator(seed=3, contacts=5)
    server = emulator.serve()
    try:
        token = emulator.private_app_token
        env = headless_env(tmp_path, **{env_name("hs"): token})
        connected = run(["connect", "hubspot", "-n", "hs", "--base-url", server.url], env, stdin="")
        assert connected.code == 0, connected.stderr
        data = Path(env["CRMSYNC_HOME"])
        assert not (data / "secrets").exists() or not any((data / "secrets").iterdir())
        pulled = run(["pull", "-c", "hs", "--object", "contacts"], env)
        assert pulled.code == 0, pulled.stderr
        status = run(["--json", "status"], env)
        assert status.json()["connections"][0]["auth"]["secret"] == {
            "storage": "environment",
            "where": "CRMSYNC_SECRET_HS",
        }
        for out in (connected, pulled, status):
            assert token not in out.stdout + out.stderr
        without = run(["pull", "-c", "hs"], {k: v for k, v in env.items() if k != env_name("hs")})
        assert without.code == 3 and "CRMSYNC_SECRET_HS" in one_line_error(without)
    finally:
        server.stop()


@pytest.mark.slow
def test_refreshed_tokens_from_the_environment_last_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoho: tuple[ZohoEmulator, str]
) -> None:
    emu, url = zoho
    env = headless_env(tmp_path)
    monkeypatch.setenv("CRMSYNC_HOME", env["CRMSYNC_HOME"])
    app = App()  # the test's in-memory keyring: only to make the connection row and its tokens
    options = {"client_id": emu.client_id, "grant_code": emu.grant_code()}
    connect(app, provider="zoho", name="z", base_url=url, options=options, io=ScriptIO(emu.client_secret))
    doc = {**(app.secrets.get("z") or {}), "expires_at": 0}
    app.close()
    env[env_name("z")] = json.dumps(doc)
    for _ in range(2):  # each run refreshes for itself; nothing tries to write to a keyring
        pulled = run(["pull", "-c", "z", "--object", "contacts"], env)
        assert pulled.code == 0, pulled.stderr
        assert "Traceback" not in pulled.stderr and doc["refresh_token"] not in pulled.stderr


def test_connect_from_the_environment_never_spends_a_code_it_cannot_keep(
    tmp_path: Path, zoho: tuple[ZohoEmulator, str]
) -> None:
    emu, url = zoho
    env = headless_env(tmp_path, **{env_name("z"): emu.client_secret})
    code = emu.grant_code()
    args = ["connect", "zoho", "-n", "z", "--base-url", url, "--client-id", emu.client_id, "--grant-code", code]
    result = run(args, env, stdin="")
    assert result.code == 3
    assert "CRMSYNC_SECRET_Z" in one_line_error(result)
    assert "access_token" in exchange(url, emu, code)


@pytest.mark.slow
def test_an_oauth_secret_in_the_environment_is_renewed_at_connect_not_reauthorised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoho: tuple[ZohoEmulator, str]
) -> None:
    emu, url = zoho
    monkeypatch.setenv("CRMSYNC_HOME", str(tmp_path / "elsewhere"))
    made = App()  # the JSON document as crmsync stores it, made on another machine
    options = {"client_id": emu.client_id, "grant_code": emu.grant_code()}
    connect(made, provider="zoho", name="z", base_url=url, options=options, io=ScriptIO(emu.client_secret))
    doc = made.secrets.get("z") or {}
    made.close()
    env = headless_env(tmp_path, **{env_name("z"): json.dumps(doc)})
    connected = run(["connect", "zoho", "-n", "z", "--base-url", url], env, stdin="")
    assert connected.code == 0, connected.stderr
    pulled = run(["pull", "-c", "z", "--object", "contacts"], env)
    assert pulled.code == 0, pulled.stderr
    assert not Path(env["CRMSYNC_HOME"], "secrets").exists()
    for out in (connected, pulled):
        assert doc["refresh_token"] not in out.stdout + out.stderr
        assert doc["client_secret"] not in out.stdout + out.stderr

    hub = HubSpotEmulator(seed=2, contacts=2)
    server = hub.serve()
    try:
        _, refresh = hub.issue_token()
        secret = {"kind": "oauth", "client_id": hub.client_id, "client_secret": hub.client_secret}
        env[env_name("hs")] = json.dumps({**secret, "refresh_token": refresh})
        result = run(["--json", "connect", "hubspot", "-n", "hs", "--base-url", server.url], env, stdin="")
        assert result.code == 0, result.stderr
        assert result.json()["account"] == str(hub.portal_id)
    finally:
        server.stop()


@pytest.mark.slow
def test_demo_runs_in_an_empty_home_without_a_keyring_daemon(tmp_path: Path) -> None:
    env = headless_env(tmp_path)
    result = run(["demo", "--contacts", "20"], env, timeout=300)
    assert result.code == 0, result.stderr
    assert not Path(env["CRMSYNC_HOME"], "secrets").exists()


def test_base_url_without_a_scheme_is_a_usage_error(tmp_path: Path) -> None:
    args = ["connect", "hubspot", "-n", "x", "--base-url", "localhost:1", "--token-stdin"]
    result = run(args, headless_env(tmp_path), stdin="pat-na1-x\n")
    assert result.code == 2
    assert "http://localhost:1" in one_line_error(result)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_a_refused_connection_fails_fast_naming_the_host(tmp_path: Path) -> None:
    port = closed_port()
    env = headless_env(tmp_path)
    args = ["connect", "hubspot", "-n", "x", "--base-url", f"http://127.0.0.1:{port}"]
    started = time.monotonic()
    assert run(["connect", "--help"], env).code == 0  # what starting crmsync costs on this machine now
    startup = time.monotonic() - started
    started = time.monotonic()
    result = run([*args, "--token-stdin", "--insecure-storage"], env, stdin="pat-na1-secret-token\n")
    assert time.monotonic() - started - startup < 5
    assert result.code == 75
    assert f"127.0.0.1:{port}" in one_line_error(result)
    assert "pat-na1-secret-token" not in result.stderr
    secrets_dir = Path(env["CRMSYNC_HOME"], "secrets")
    assert not secrets_dir.exists() or not any(secrets_dir.iterdir())


@pytest.mark.parametrize("insecure_storage", [False, True], ids=["keyring", "file"])
def test_a_failed_connect_leaves_no_secret_behind(isolated: MemoryKeyring, insecure_storage: bool) -> None:
    emulator = HubSpotEmulator(seed=1, scopes=["crm.objects.contacts.read"])  # too few scopes
    server = emulator.serve()
    try:
        app = App()
        for token in ("pat-na1-wrong", emulator.private_app_token):
            with pytest.raises(AuthError):
                connect(
                    app,
                    provider="hubspot",
                    name="x",
                    base_url=server.url,
                    options={},
                    io=ScriptIO(token),
                    insecure_storage=insecure_storage,
                )
            assert isolated.entries == {}
            assert not any(app.secrets_dir.glob("*")) if app.secrets_dir.exists() else True
        assert app.store.connections.get("x") is None
    finally:
        server.stop()


class LockedKeyring(KeyringBackend):
    """An OS keyring that exists but will not open (locked, no prompt possible)."""

    priority = 0  # type: ignore[assignment]
    viable = False  # type: ignore[assignment]

    def get_password(self, service: str, username: str) -> str | None:
        raise keyring.errors.KeyringLocked("Failed to unlock the collection!")

    def set_password(self, service: str, username: str, password: str) -> None:
        raise keyring.errors.KeyringLocked("Failed to unlock the collection!")

    def delete_password(self, service: str, username: str) -> None:
        raise keyring.errors.KeyringLocked("Failed to unlock the collection!")


def test_a_locked_keyring_fails_connect_before_any_request() -> None:
    emulator = HubSpotEmulator(seed=1)
    keyring.set_keyring(LockedKeyring())  # conftest puts its own back
    seen: list[httpx.Request] = []

    def transport(name: str) -> httpx.BaseTransport:
        return httpx.MockTransport(lambda request: seen.append(request) or emulator(request))

    app = App(transport=transport)
    with pytest.raises(ConfigError, match="KeyringLocked"):
        connect(app, provider="hubspot", name="x", base_url=None, options={}, io=ScriptIO(emulator.private_app_token))
    assert seen == []


def test_secret_store_reads_the_file_first_and_moves_between_storages(tmp_path: Path, isolated: MemoryKeyring) -> None:
    store = SecretStore(secrets_dir=tmp_path / "secrets", env={})
    store.set("a", {"token": "in-keyring"}, storage="keyring")
    assert str(store.locate("a")) == "keyring"
    store.set("a", {"token": "in-file"}, storage="file")
    assert isolated.entries == {}  # moved, not copied
    assert store.get("a") == {"token": "in-file"} and store.locate("a").storage == "file"
    store.update("a", webhook_secret="w")  # later writes follow the secret to its file
    assert json.loads((tmp_path / "secrets" / "a.json").read_text()) == {"token": "in-file", "webhook_secret": "w"}
    store.delete("a")
    assert store.get("a") is None and not (tmp_path / "secrets" / "a.json").exists()


# -- the OAuth loopback listener ------------------------------------------------------------------
class BrowserIO(ScriptIO):
    """Plays the browser: first a redirect with a wrong state, then the real one."""

    def __init__(self, secret: str, authorize_with: Any) -> None:
        super().__init__(secret)
        self.authorize_with = authorize_with
        self.url = ""
        self.pages: list[tuple[int, str]] = []
        self.browser: threading.Thread | None = None

    def open_url(self, url: str) -> bool:
        self.url = url

        def browse() -> None:
            location = self.authorize_with(url)
            parts = urllib.parse.urlsplit(location)
            query = dict(urllib.parse.parse_qsl(parts.query))
            forged = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode({**query, "state": "x"})))
            for target in (forged, location):
                r = httpx.get(target)
                self.pages.append((r.status_code, r.text))

        self.browser = threading.Thread(target=browse, daemon=True)
        self.browser.start()
        return True

    def browsed(self) -> list[int]:
        """The statuses the listener answered the browser with, once the browser is done."""
        assert self.browser is not None
        self.browser.join(10)
        return [status for status, _ in self.pages]


def test_a_wrong_state_gets_an_error_page_and_the_real_redirect_still_completes() -> None:
    def authorize_with(url: str) -> str:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        return f"{query['redirect_uri']}?code=good&state={query['state']}"

    io = BrowserIO("", authorize_with)
    grant = authorize(io, authorize_url="https://crm.example/oauth", params={"client_id": "c"}, timeout=10)
    assert grant.code == "good"
    assert io.browsed() == [400, 200]
    assert "state" in io.pages[0][1] and "<script" not in io.pages[0][1]


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def recording(emulator: Any, seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return emulator(request)  # type: ignore[no-any-return]

    return httpx.MockTransport(handle)


def follow_authorize(emulator: Any) -> Any:
    """The browser step: ask the emulator's authorize endpoint, return where it redirects."""

    def go(url: str) -> str:
        return str(emulator(httpx.Request("GET", url)).headers["location"])

    return go


@pytest.mark.parametrize("crm", ["hubspot", "zoho"])
def test_oauth_code_flows_use_pkce_s256(crm: str) -> None:
    seen: list[httpx.Request] = []
    if crm == "hubspot":
        emulator: Any = HubSpotEmulator(seed=1, contacts=1)
        options: dict[str, Any] = {"oauth": True, "client_id": emulator.client_id}
        token_path = "/oauth/v3/token"
    else:
        emulator = ZohoEmulator()
        options = {"client_id": emulator.client_id}
        token_path = "/oauth/v2/token"
    app = App(transport=lambda name: recording(emulator, seen))
    io = BrowserIO(emulator.client_secret, follow_authorize(emulator))
    connect(app, provider=crm, name="o", base_url=None, options=options, io=io)
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(io.url).query))
    assert query["code_challenge_method"] == "S256"
    exchange_form = next(
        dict(urllib.parse.parse_qsl(r.content.decode()))
        for r in seen
        if r.url.path == token_path and b"authorization_code" in r.content
    )
    assert s256(exchange_form["code_verifier"]) == query["code_challenge"]
    assert 43 <= len(exchange_form["code_verifier"]) <= 128
    assert io.browsed() == [400, 200]  # the forged redirect did not end the flow


@pytest.mark.parametrize("insecure_storage", [False, True], ids=["keyring", "file"])
def test_an_odoo_connect_to_a_wrong_database_leaves_no_secret_behind(
    isolated: MemoryKeyring, insecure_storage: bool
) -> None:
    from crmsync.emulators.odoo import OdooEmulator
    from crmsync.errors import CrmsyncError

    emu = OdooEmulator(version=17)
    app = App(transport=lambda _n: emu.transport())
    options = {"db": f"{emu.db}-typo", "user": emu.login}
    with pytest.raises(CrmsyncError):
        connect(
            app,
            provider="odoo",
            name="o",
            base_url="http://odoo.test",
            options=options,
            io=ScriptIO(emu.api_key),
            insecure_storage=insecure_storage,
        )
    assert isolated.entries == {}
    assert not app.secrets_dir.exists() or not any(app.secrets_dir.iterdir())
    assert app.store.connections.get("o") is None


def test_a_data_directory_that_cannot_be_created_is_one_line_exit_3(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = headless_env(tmp_path, CRMSYNC_HOME=str(blocker / "data"))
    result = run(["connect", "hubspot", "-n", "x", "--token-stdin", "--insecure-storage"], env, stdin="pat-na1-x\n")
    assert result.code == 3
    assert str(blocker / "data") in one_line_error(result)


@pytest.mark.slow
def test_two_runs_refreshing_a_file_secret_at_once_refresh_it_once(
    tmp_path: Path, zoho: tuple[ZohoEmulator, str]
) -> None:
    emu, url = zoho
    env = headless_env(tmp_path)
    args = ["connect", "zoho", "-n", "z", "--base-url", url, "--client-id", emu.client_id]
    args += ["--grant-code", emu.grant_code(), "--insecure-storage", "--token-stdin"]
    assert run(args, env, stdin=emu.client_secret + "\n").code == 0
    secret_file = Path(env["CRMSYNC_HOME"], "secrets", "z.json")
    secret_file.write_text(json.dumps({**json.loads(secret_file.read_text()), "expires_at": 0}))
    token_calls = emu.stats.by_route["POST oauth.token"]
    cmd = [sys.executable, "-m", "crmsync", "pull", "-c", "z", "--object", "contacts", "--lock-timeout", "60"]
    runs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in runs]
    assert [code for code, _ in results] == [0, 0], results
    assert emu.stats.by_route["POST oauth.token"] == token_calls + 1  # the second run used the first's token
    assert json.loads(secret_file.read_text())["expires_at"] > time.time()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
