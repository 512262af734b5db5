"""Singer's ``tap-hubspot`` reads every contact of the HubSpot emulator, patched only in its host.

A peer's connector is the test a look-alike API cannot fake: the tap discovers its catalog (property
lists old and new, custom-object schemas, owners) and syncs the contacts stream from the emulator as
it would from api.hubapi.com. The only change to the tap is ``tap_hubspot.BASE_URL``, its host.

It runs in a virtual environment of its own, because tap-hubspot pins ``attrs==16.3.0``, which the
test environment's ``hypothesis`` and ``jsonschema`` cannot live with (so this is a script, not a test)::

    python -m benchmarks.tap_hubspot                      # 1,500 contacts, venv in ~/.cache/crmsync-tap-hubspot
    python -m benchmarks.tap_hubspot --contacts 20000 --venv /tmp/tap-venv

Exit 0 when the tap emitted exactly the emulator's contacts (each once), 1 otherwise; either way the
last line on stdout says what it found.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

from crmsync.emulators.hubspot import HubSpotEmulator

TAP = "tap-hubspot==4.5.0"
#: Runs the tap with its BASE_URL (scheme and host) pointed at the emulator, and nothing else changed.
RUNNER = "import sys, tap_hubspot; tap_hubspot.BASE_URL = sys.argv.pop(1); tap_hubspot.main()"


def tap_python(where: Path) -> Path:
    """A virtual environment holding tap-hubspot (made on first use); its python."""
    python = where / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(where)
    check = subprocess.run([python, "-c", "import tap_hubspot"], capture_output=True)
    if check.returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", TAP], check=True)
    return python


def select_contacts(catalog: dict) -> dict:
    """The discovered catalog with only the contacts stream selected (every field, as Singer does)."""
    for stream in catalog["streams"]:
        chosen = stream["tap_stream_id"] == "contacts"
        for entry in stream["metadata"]:
            if entry["breadcrumb"] == []:
                entry["metadata"]["selected"] = chosen
    return catalog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=1500)
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "crmsync-tap-hubspot")
    args = parser.parse_args(argv)

    python = tap_python(args.venv)
    emulator = HubSpotEmulator(seed=1, contacts=args.contacts, companies=max(1, args.contacts // 20))
    server = emulator.serve()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            config = work / "config.json"
            config.write_text(json.dumps({"api_key": emulator.private_app_token, "start_date": "2000-01-01T00:00:00Z"}))
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            discover = subprocess.run(
                [python, "-c", RUNNER, server.url, "--config", str(config), "--discover"],
                capture_output=True,
                text=True,
                env=env,
            )
            if discover.returncode != 0:
                print(discover.stderr[-3000:], file=sys.stderr)
                print(f"tap-hubspot discovery failed (exit {discover.returncode})")
                return 1
            catalog = work / "catalog.json"
            catalog.write_text(json.dumps(select_contacts(json.loads(discover.stdout))))
            sync = subprocess.run(
                [python, "-c", RUNNER, server.url, "--config", str(config), "--properties", str(catalog)],
                capture_output=True,
                text=True,
                env=env,
            )
    finally:
        server.stop()
    if sync.returncode != 0:
        print(sync.stderr[-3000:], file=sys.stderr)
        print(f"tap-hubspot sync failed (exit {sync.returncode})")
        return 1
    ids = [
        str(msg["record"]["id"])
        for line in sync.stdout.splitlines()
        if line.startswith("{") and (msg := json.loads(line)).get("type") == "RECORD" and msg["stream"] == "contacts"
    ]
    expected = {r["id"] for r in emulator.records("contacts")}
    ok = len(ids) == len(set(ids)) and set(ids) == expected
    print(
        f"tap-hubspot emitted {len(ids)} contact records ({len(set(ids))} distinct) of {len(expected)}: "
        + ("all, each once" if ok else "MISMATCH")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
