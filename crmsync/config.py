"""Configuration: paths, the YAML config file, and their precedence.

Precedence is flag > environment > config file > default, resolved here once, because a cron
line, a container and an operator's shell each set things in a different place and must
all get the same answer.

Paths: ``CRMSYNC_HOME`` puts everything (config.yaml, crmsync.db, mappings/) in one folder;
otherwise the platform's user config and data directories (platformdirs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crmsync.errors import ConfigError
from crmsync.yamlio import YamlDoc, load_yaml

APP = "crmsync"
ConflictRule = Literal["crm-wins", "outcome-wins", "newest-wins", "fill-empty"]

#: Per-field conflict defaults (issue: owner and lifecycle stay as the CRM has them; names,
#: phone and title are only filled when empty). Keys are ``object.field`` in canonical names.
DEFAULT_CONFLICT_RULES: dict[str, ConflictRule] = {
    "contact.owner_email": "crm-wins",
    "contact.lifecycle_stage": "crm-wins",
    "contact.first_name": "fill-empty",
    "contact.last_name": "fill-empty",
    "contact.phone": "fill-empty",
    "contact.title": "fill-empty",
    "company.name": "fill-empty",
    "deal.owner_email": "crm-wins",
    "deal.stage": "outcome-wins",
    "deal.amount": "outcome-wins",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConnectionSettings(_Model):
    """Per-connection tuning; every key is optional."""

    rate_limit: int | None = Field(default=None, gt=0, description="requests per rate window (HubSpot: per 10 s)")
    search_rate_limit: int | None = Field(default=None, gt=0, description="search requests per second")
    concurrency: int | None = Field(default=None, gt=0, le=64)
    timeout_seconds: float = Field(default=30.0, gt=0)
    deadline_seconds: float = Field(default=300.0, gt=0)
    lookback_seconds: float | None = Field(default=None, ge=0)
    overlap_seconds: float | None = Field(default=None, ge=0)
    trigger_workflows: bool = False
    default_region: str | None = None
    mapping: Path | None = None
    oauth_authorize_url: str | None = None
    oauth_token_url: str | None = None
    #: Pipedrive: the company's plan and seats, which set its daily token budget and burst limit.
    plan: str | None = Field(default=None, pattern=r"^(lite|growth|premium|ultimate)$")
    seats: int | None = Field(default=None, gt=0)
    #: Pipedrive: the share of the daily token budget one push may plan to spend (default 0.5).
    budget_share: float | None = Field(default=None, gt=0, le=1)
    #: Salesforce: the pinned REST API version and the record count above which a first pull uses Bulk API 2.0.
    api_version: str | None = Field(default=None, pattern=r"^\d{2,3}\.0$")
    bulk_threshold: int | None = Field(default=None, ge=0)
    #: Salesforce: a person pushed without a company becomes a Contact (default) or a Lead.
    unknown_person: str | None = Field(default=None, pattern=r"^(contact|lead)$")


class WebhookSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    public_url: str | None = None
    trust_proxy: bool = False
    body_limit: int = Field(default=1_048_576, gt=0)
    max_connections: int = Field(default=64, gt=0, description="connections served at once; beyond, 503")
    request_deadline_seconds: float = Field(default=10.0, gt=0, description="a whole request must arrive within")
    follow_interval_seconds: float = Field(default=5.0, gt=0)
    max_pending_minutes: float = Field(default=15.0, gt=0)


class Config(_Model):
    """The config file's schema (config.example.yaml documents every key)."""

    db: str | None = None
    #: Scale-out: Redis for the worker queue and the rate limits shared by workers (env CRMSYNC_REDIS_URL).
    redis_url: str | None = None
    metrics_file: Path | None = None
    log_retention_days: int = Field(default=90, ge=1)
    default_region: str = "US"
    lock_timeout: float = Field(default=0.0, ge=0)
    max_age_minutes: float = Field(default=15.0, gt=0)
    conflicts: dict[str, ConflictRule] = Field(default_factory=dict)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    connections: dict[str, ConnectionSettings] = Field(default_factory=dict)

    def connection(self, name: str) -> ConnectionSettings:
        return self.connections.get(name) or ConnectionSettings()

    def conflict_rules(self) -> dict[str, ConflictRule]:
        return {**DEFAULT_CONFLICT_RULES, **self.conflicts}


@dataclass
class Paths:
    config_file: Path
    data_dir: Path
    db: str
    mappings_dir: Path
    locks_dir: Path


def resolve_paths(*, config: str | None = None, db: str | None = None, env: dict[str, str] | None = None) -> Paths:
    """Where the config, store and mappings live (flag > env > CRMSYNC_HOME > platform dirs)."""
    env = dict(os.environ) if env is None else env
    home = env.get("CRMSYNC_HOME")
    if home:
        config_dir = data_dir = Path(home).expanduser()
    else:
        import platformdirs

        config_dir = Path(platformdirs.user_config_dir(APP))
        data_dir = Path(platformdirs.user_data_dir(APP))
    config_file = Path(config or env.get("CRMSYNC_CONFIG") or config_dir / "config.yaml").expanduser()
    db_value = db or env.get("CRMSYNC_DB") or str(data_dir / "crmsync.db")
    return Paths(
        config_file=config_file,
        data_dir=data_dir,
        db=db_value,
        mappings_dir=config_dir / "mappings",
        locks_dir=data_dir / "locks",
    )


def load_config(path: Path, *, required: bool = False) -> Config:
    """Read the config file; a missing file is the defaults unless it was asked for by name."""
    if not path.exists():
        if required:
            raise ConfigError(f"{path}: no such config file")
        return Config()
    doc = load_yaml(path, ConfigError)
    return parse_config(doc)


def parse_config(doc: YamlDoc) -> Config:
    """Validate a parsed config; every problem is reported with its key path and line."""
    data: Any = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{doc.path}:{doc.line(())}: the config file must be a mapping of keys")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{doc.where(loc)}: {reason}")
        raise ConfigError("invalid config file:\n  " + "\n  ".join(problems)) from None
