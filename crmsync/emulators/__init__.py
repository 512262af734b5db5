"""Emulators: each CRM's API as an httpx transport that can also serve on loopback (test doubles, sandbox, demo)."""
