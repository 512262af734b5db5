"""Pipedrive OAuth through the CLI: the code flow on a loopback redirect, refresh, and ``api_domain`` as base URL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from crmsync.emulators.pipedrive import PipedriveEmulator
from crmsync.providers.pipedrive.auth import api_domain
from tests.e2e import cli_env, run_cli


def _connect_by_browser(env: dict[str, str], base_url: str, client_id: str, client_secret: str) -> tuple[int, str, str]:
    """`crmsync connect pipedrive --oauth` with the client secret on stdin; the 'browser' (this test)
    opens the URL it prints, whose redirect reaches the loopback listener."""
    args = ["--json", "connect", "pipedrive", "--name", "pd", "--base-url", base_url, "--oauth", "--client-id"]
    args += [client_id, "--no-browser", "--token-stdin", "--insecure-storage"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "crmsync", *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stderr is not None and proc.stdout is not None
    proc.stdin.write(client_secret + "\n")
    proc.stdin.flush()
    seen: list[str] = []
    deadline = time.monotonic() + 30
    url = ""
    while time.monotonic() < deadline and not url:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "/oauth/authorize?" in line:
            url = line.strip()
    assert url, "".join(seen)
    assert "code_challenge" not in url  # Pipedrive documents no PKCE
    landed = httpx.get(url, follow_redirects=True, timeout=10)
    assert landed.status_code == 200 and "Authorisation received" in landed.text
    out, err = proc.communicate("\n", timeout=60)  # nothing pasted: the listener already has the code
    return proc.returncode, out, "".join(seen) + err


@pytest.mark.slow
def test_oauth_connect_through_the_cli_uses_api_domain_and_refreshes(home: Path) -> None:
    emulator = PipedriveEmulator(limits=False)
    server = emulator.serve()
    try:
        # The company's host as the token answer names it: the same server under another name.
        emulator.api_domain = server.url.replace("127.0.0.1", "localhost")
        env = cli_env(home)
        code, out, err = _connect_by_browser(env, server.url, emulator.client_id, emulator.client_secret)
        assert code == 0, err
        doc = json.loads(out)
        assert doc["base_url"] == emulator.api_domain
        assert doc["account"] == str(emulator.company_id)
        assert "deals:full" in doc["scopes"]
        assert emulator.client_secret not in out + err
        first = set(emulator.oauth_tokens)
        # Every access token dies: the next run refreshes once and goes on.
        emulator.oauth_tokens.clear()
        result = run_cli(["pull", "-c", "pd", "--object", "contacts"], env, timeout=60)
        assert result.code == 0, result.stderr
        assert len(emulator.oauth_tokens) == 1 and not set(emulator.oauth_tokens) & first
        again = run_cli(["pull", "-c", "pd", "--object", "contacts"], env, timeout=60)
        assert again.code == 0 and len(emulator.oauth_tokens) == 1  # the refreshed token was kept
    finally:
        server.stop()


@pytest.mark.slow
def test_oauth_connect_with_a_wrong_client_secret_fails_in_one_line(home: Path) -> None:
    emulator = PipedriveEmulator(limits=False)
    server = emulator.serve()
    try:
        code, out, err = _connect_by_browser(cli_env(home), server.url, emulator.client_id, "not-the-secret")
        assert code != 0 and out == ""
        assert "refused the token request" in err and "Traceback" not in err
        assert emulator.client_secret not in err
    finally:
        server.stop()


def test_oauth_connect_without_a_client_id_is_a_usage_error(home: Path) -> None:
    result = run_cli(
        [
            "connect",
            "pipedrive",
            "-n",
            "pd",
            "--base-url",
            "http://127.0.0.1:9",
            "--oauth",
            "--token-stdin",
            "--insecure-storage",
        ],
        cli_env(home),
        stdin="secret\n",
        timeout=60,
    )
    assert result.code == 2 and "--client-id" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_redirect_with_another_state_is_refused_and_the_real_one_still_accepted(home: Path) -> None:
    emulator = PipedriveEmulator(limits=False)
    server = emulator.serve()
    try:
        env = cli_env(home)
        args = ["connect", "pipedrive", "--name", "pd", "--base-url", server.url, "--oauth", "--client-id"]
        args += [emulator.client_id, "--no-browser", "--token-stdin", "--insecure-storage"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "crmsync", *args],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(emulator.client_secret + "\n")
        proc.stdin.flush()
        url = ""
        while not url:
            line = proc.stderr.readline()
            assert line, "the CLI ended before printing the URL"
            url = line.strip() if "/oauth/authorize?" in line else ""
        redirect = httpx.get(url, follow_redirects=False).headers["location"]
        forged = redirect.split("?")[0] + "?code=stolen&state=guess"
        assert httpx.get(forged).status_code == 400
        assert httpx.get(redirect).status_code == 200
        _out, err = proc.communicate("\n", timeout=60)
        assert proc.returncode == 0, err
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("value", "https", "expected"),
    [
        ("https://acme.pipedrive.com", True, "https://acme.pipedrive.com"),
        ("https://acme.pipedrive.com/", True, "https://acme.pipedrive.com"),
        ("http://acme.pipedrive.com", True, None),  # never downgrade the real service to clear text
        ("http://127.0.0.1:8080", False, "http://127.0.0.1:8080"),
        ("javascript:alert(1)", True, None),
        ("", True, None),
        (None, True, None),
        (["https://x"], True, None),
    ],
)
def test_api_domain_is_taken_only_as_an_http_origin(value: object, https: bool, expected: str | None) -> None:
    assert api_domain(value, https=https) == expected


@pytest.mark.slow
def test_an_oauth_secret_in_the_environment_is_renewed_without_a_browser(home: Path) -> None:
    emulator = PipedriveEmulator(limits=False)
    server = emulator.serve()
    try:
        redirect = "http://127.0.0.1:8719/callback"
        code = httpx.URL(emulator.authorize(redirect, "s")).params["code"]
        tokens = httpx.post(
            f"{server.url}/oauth/token",
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect},
            auth=(emulator.client_id, emulator.client_secret),
        ).json()
        secret = {
            "kind": "oauth",
            "client_id": emulator.client_id,
            "client_secret": emulator.client_secret,
            "refresh_token": tokens["refresh_token"],
        }
        env = cli_env(home, "pd", json.dumps(secret))
        result = run_cli(["--json", "connect", "pipedrive", "-n", "pd", "--base-url", server.url], env, timeout=60)
        assert result.code == 0, result.stderr
        assert json.loads(result.stdout)["account"] == str(emulator.company_id)
        assert len(emulator.oauth_tokens) == 2  # the code's token, and the one the refresh gave
        assert "/oauth/authorize" not in result.stderr  # renewed by its refresh token: no browser
    finally:
        server.stop()
