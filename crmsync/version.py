"""The package's version: a leaf module, so the CLI can name it without importing the package root."""

from __future__ import annotations

__version__ = "0.1.0"
