"""A connection's secret through the real OS keyring: GNOME Keyring's Secret Service on D-Bus.

The test runs crmsync in a child process inside a private D-Bus session with an unlocked
keyring (what a headless server with gnome-keyring looks like), so it uses keyring's real
SecretService backend, not an in-memory one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.keyring_os

NEEDS = ("dbus-run-session", "gnome-keyring-daemon")


@pytest.mark.skipif(
    any(shutil.which(t) is None for t in NEEDS),
    reason="needs gnome-keyring and dbus-run-session "
    "(apt-get install gnome-keyring dbus-daemon dbus-user-session; .ci/run installs them)",
)
def test_secret_round_trip_through_gnome_keyring(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent("""
        import json, sys
        import keyring
        from crmsync.credentials import SecretStore, keyring_usable
        kr = keyring.get_keyring()
        chain = getattr(kr, "backends", [kr])
        backend = ",".join(type(b).__module__ for b in chain)
        assert keyring_usable(), backend
        assert "SecretService" in backend, backend
        store = SecretStore()
        store.set("prod", {"kind": "private_app", "token": "pat-na1-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"})
        again = SecretStore().get("prod")
        assert again == {"kind": "private_app", "token": "pat-na1-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"}, again
        raw = keyring.get_password("crmsync", "prod")
        assert json.loads(raw)["token"].startswith("pat-na1-")
        store.delete("prod")
        assert SecretStore().get("prod") is None
        print("ok", backend)
    """)
    )
    home = tmp_path / "home"
    (home / ".local" / "share" / "keyrings").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON_KEYRING_BACKEND", "DBUS_SESSION_BUS_ADDRESS")}
    env.update({"HOME": str(home), "XDG_DATA_HOME": str(home / ".local" / "share"), "XDG_RUNTIME_DIR": str(tmp_path)})
    cmd = (
        f"echo -n crmsync-test | gnome-keyring-daemon --unlock --components=secrets >/dev/null 2>&1; "
        f"{sys.executable} {script}"
    )
    proc = subprocess.run(
        ["dbus-run-session", "--", "sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok")


@pytest.mark.skipif(
    any(shutil.which(t) is None for t in NEEDS),
    reason="needs gnome-keyring and dbus-run-session "
    "(apt-get install gnome-keyring dbus-daemon dbus-user-session; .ci/run installs them)",
)
@pytest.mark.slow
def test_cli_connect_keeps_the_token_in_gnome_keyring_and_a_failed_connect_keeps_nothing(tmp_path: Path) -> None:
    from crmsync.emulators.hubspot import HubSpotEmulator

    emulator = HubSpotEmulator(seed=1, contacts=3)
    server = emulator.serve()
    token = emulator.private_app_token
    check = tmp_path / "check.py"
    check.write_text(
        textwrap.dedent("""
        import json, sys
        import keyring
        assert json.loads(keyring.get_password("crmsync", "prod"))["token"] == sys.argv[1]
        assert keyring.get_password("crmsync", "bad") is None
        assert keyring.get_password("crmsync", "crmsync-probe") is None
        print("keyring ok")
    """)
    )
    crmsync = f"{sys.executable} -m crmsync"
    cmd = (
        "echo -n crmsync-test | gnome-keyring-daemon --unlock --components=secrets >/dev/null 2>&1; "
        f"echo {token} | {crmsync} connect hubspot --name prod --base-url {server.url} --token-stdin || exit 11; "
        f"echo pat-na1-wrong | {crmsync} connect hubspot --name bad --base-url {server.url} --token-stdin; "
        "test $? -eq 3 || exit 12; "
        f"{crmsync} pull -c prod --object contacts >/dev/null || exit 13; "
        f"{crmsync} --json status -c prod || exit 14; "
        f"{sys.executable} {check} {token}"
    )
    home = tmp_path / "home"
    (home / ".local" / "share" / "keyrings").mkdir(parents=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHON_KEYRING_BACKEND", "DBUS_SESSION_BUS_ADDRESS") and not k.startswith("CRMSYNC_SECRET")
    }
    env.update(
        {
            "HOME": str(home),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_RUNTIME_DIR": str(tmp_path),
            "CRMSYNC_HOME": str(tmp_path / "data"),
            "NO_COLOR": "1",
        }
    )
    try:
        proc = subprocess.run(
            ["dbus-run-session", "--", "sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=180
        )
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert status["connections"][0]["auth"]["secret"] == {"storage": "keyring", "where": None}
    assert proc.stdout.rstrip().endswith("keyring ok")
    assert token not in proc.stdout + proc.stderr
    assert not (tmp_path / "data" / "secrets").exists()


def test_headless_without_keyring_gives_options_not_a_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_SECRET")}
    env.update({"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring", "CRMSYNC_HOME": str(tmp_path)})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "crmsync",
            "connect",
            "hubspot",
            "--name",
            "prod",
            "--token-stdin",
            "--base-url",
            "http://127.0.0.1:9",
        ],
        input="pat-na1-x\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "CRMSYNC_SECRET_PROD" in proc.stderr and "keyring" in proc.stderr
    assert "pat-na1-x" not in proc.stderr
