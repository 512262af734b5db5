"""`crmsync worker`, `crmsync enqueue` and `crmsync schedule`: running at scale (the worker extra).

Cron (or any scheduler you already run) decides *when*; `crmsync enqueue` puts a job on the
Redis queue; workers on any number of hosts run it against the shared PostgreSQL store. There is
deliberately no scheduler daemon here: `crmsync schedule` prints the crontab lines instead.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sys
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import typer

from crmsync.cli.options import split_objects
from crmsync.cli.output import emit_json, info
from crmsync.cli.state import STATE
from crmsync.errors import ConfigError, RetriableError, UsageError

JOB_NAMES = ("pull", "push", "backfill")

ConnsOpt = Annotated[
    list[str] | None, typer.Option("--connection", "-c", help="Connection (repeatable; default: all).")
]


def _need_worker_extra() -> None:
    missing = [m for m in ("dramatiq", "redis") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"running at scale needs {', '.join(missing)}", hint="pip install 'crmsync[worker]'")


def masked(url: str) -> str:
    """A URL with its password replaced by ***, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _worker_env(app_: Any, redis_url: str | None) -> dict[str, str]:
    """The environment workers and the queue client see: the CLI's --db/--config/--redis-url included."""
    env = dict(os.environ)
    if STATE.db:
        env["CRMSYNC_DB"] = STATE.db
    if STATE.config:
        env["CRMSYNC_CONFIG"] = STATE.config
    url = redis_url or app_.redis_url
    if url:
        env["CRMSYNC_REDIS_URL"] = url
    return env


def cron_expression(every: str) -> str:
    """An interval like ``5m`` as a crontab schedule; only intervals cron repeats evenly are accepted."""
    from crmsync.timeutil import parse_age

    interval = parse_age(every)
    if interval is None:
        raise UsageError(f"--every {every!r}: use an interval like 1m, 5m, 15m or 1h")
    seconds = int(interval.total_seconds())
    if seconds < 60 or seconds % 60:
        raise UsageError(f"--every {every}: cron counts whole minutes; use 1m or more")
    minutes = seconds // 60
    if minutes < 60 and 60 % minutes == 0:
        return "* * * * *" if minutes == 1 else f"*/{minutes} * * * *"
    if minutes % 60 == 0:
        hours = minutes // 60
        if hours == 24:
            return "0 0 * * *"
        if hours < 24 and 24 % hours == 0:
            return "0 * * * *" if hours == 1 else f"0 */{hours} * * *"
    raise UsageError(
        f"--every {every}: cron cannot repeat that evenly; "
        "use a divisor of an hour (1m…30m) or of a day (1h…12h), or 1d"
    )


def _cron_command(app_: Any, cfg: Any) -> tuple[list[str], list[str]]:
    """The crmsync command line that finds this store and queue from cron's empty environment, and
    what it still cannot carry (a URL with a password stays out of the crontab)."""
    beside = Path(sys.executable).with_name("crmsync")
    exe = str(beside) if beside.exists() else shutil.which("crmsync")
    words = [shlex.quote(exe)] if exe else [shlex.quote(sys.executable), "-m", "crmsync"]
    if os.environ.get("CRMSYNC_HOME"):
        home = Path(os.environ["CRMSYNC_HOME"]).expanduser().resolve()
        words.insert(0, f"CRMSYNC_HOME={shlex.quote(str(home))}")
    config_file = app_.paths.config_file.expanduser().resolve()
    if config_file.exists():
        words += ["--config", shlex.quote(str(config_file))]
    missing = []
    db = STATE.db or os.environ.get("CRMSYNC_DB")
    if db and masked(db) == db:
        words += ["--db", shlex.quote(db)]
    elif not cfg.db:
        missing.append("db")
    redis_env = os.environ.get("CRMSYNC_REDIS_URL")
    if redis_env and masked(redis_env) == redis_env and not cfg.redis_url:
        words.insert(0, f"CRMSYNC_REDIS_URL={shlex.quote(redis_env)}")
    elif not cfg.redis_url:
        missing.append("redis_url")
    return words, missing


def register(app: typer.Typer) -> None:
    @app.command()
    def worker(
        processes: Annotated[int, typer.Option("--processes", "-p", min=1, help="Worker processes.")] = 2,
        threads: Annotated[int, typer.Option("--threads", "-t", min=1, help="Jobs run at once per process.")] = 4,
        redis_url: Annotated[
            str | None, typer.Option("--redis-url", help="The job queue [env CRMSYNC_REDIS_URL; config redis_url].")
        ] = None,
    ) -> None:
        """Run workers that execute queued pull, push and backfill jobs (Dramatiq on Redis).

        Run it on as many hosts as you like, all pointing at one PostgreSQL store and one Redis.
        Example: CRMSYNC_DB=postgresql+psycopg://crmsync@db/crmsync crmsync worker -p 2 -t 4
        """
        _need_worker_extra()
        a = STATE.app()
        env = _worker_env(a, redis_url)
        # Migrate once here, so a fleet of new workers does not start by racing for the schema.
        _ = a.store
        from crmsync.scaleout import redis_client

        url = env.get("CRMSYNC_REDIS_URL") or "redis://127.0.0.1:6379/0"
        try:
            redis_client(url).ping()
        except Exception as exc:
            raise RetriableError(f"cannot reach the job queue at {masked(url)}: {type(exc).__name__}") from None
        a.close()
        info(
            f"crmsync worker: {processes} process(es) x {threads} thread(s), "
            f"queue {masked(url)}, store {masked(a.paths.db)}"
        )
        sys.stdout.flush()
        argv = [
            sys.executable,
            "-m",
            "dramatiq",
            "crmsync.worker",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--queues",
            "crmsync",
        ]
        # exec: Dramatiq's master gets the signals itself (SIGTERM finishes running jobs, then exits).
        os.execvpe(sys.executable, argv, env)

    @app.command()
    def enqueue(
        job: Annotated[str, typer.Argument(help="pull, push or backfill.")],
        connection: ConnsOpt = None,
        objects: Annotated[
            str | None, typer.Option("--object", help="backfill: contacts,companies,… (one job each; default all).")
        ] = None,
        delay: Annotated[
            str | None, typer.Option("--delay", help="Run no earlier than this from now (e.g. 10m).")
        ] = None,
        redis_url: Annotated[
            str | None, typer.Option("--redis-url", help="The job queue [env CRMSYNC_REDIS_URL; config redis_url].")
        ] = None,
    ) -> None:
        """Put jobs on the worker queue: one per connection (every connection when none is named).

        Example (crontab, every 5 minutes): */5 * * * * crmsync --quiet enqueue pull
        """
        from crmsync.timeutil import parse_age

        if job not in JOB_NAMES:
            raise UsageError(f"unknown job {job!r}; choose pull, push or backfill")
        if objects and job != "backfill":
            raise UsageError("--object only applies to backfill")
        wait = parse_age(delay) if delay else None
        if delay and wait is None:
            raise UsageError(f"--delay {delay!r}: use an age like 30s, 10m or 2h")
        _need_worker_extra()
        a = STATE.app()
        names = [c.name for c in a.connections(connection)]
        env = _worker_env(a, redis_url)
        if env.get("CRMSYNC_REDIS_URL"):
            os.environ["CRMSYNC_REDIS_URL"] = env["CRMSYNC_REDIS_URL"]
        from crmsync.worker import JOBS, broker_url

        actor: Any = JOBS[job]  # a Dramatiq actor (typed loosely by Dramatiq)
        queued: list[dict[str, Any]] = []
        args_list: list[tuple[Any, ...]] = []
        for name in names:
            if job == "backfill":
                wanted: list[str | None] = [*(split_objects(objects) or ())] or [None]
                args_list.extend((name, obj) for obj in wanted)
            else:
                args_list.append((name,))
        try:
            for args in args_list:
                options: dict[str, Any] = {"delay": int(wait.total_seconds() * 1000)} if wait else {}
                message = actor.send_with_options(args=args, **options)
                queued.append(
                    {
                        "job": job,
                        "connection": args[0],
                        "object": args[1] if len(args) > 1 else None,
                        "message_id": message.message_id,
                    }
                )
        except Exception as exc:
            import redis

            if isinstance(exc, redis.RedisError):
                raise RetriableError(
                    f"cannot reach the job queue at {masked(broker_url())}: {type(exc).__name__}"
                ) from None
            raise
        if STATE.json:
            emit_json({"queued": queued})
            return
        for q in queued:
            what = f"{q['job']} {q['connection']}" + (f" {q['object']}" if q["object"] else "")
            info(f"queued {what} (message {q['message_id']})")

    @app.command()
    def schedule(
        every: Annotated[str, typer.Option("--every", help="How often, e.g. 1m, 5m, 1h.")] = "5m",
        jobs: Annotated[str, typer.Option("--jobs", help="Which jobs to enqueue: pull, push or both.")] = "pull,push",
        connection: ConnsOpt = None,
    ) -> None:
        """Print the crontab lines that enqueue jobs every INTERVAL (cron decides when; workers do the work).

        Install them on ONE host with `crontab -e`: enqueueing is cheap, and a pull that is already
        running makes the next one a no-op, so a missed or doubled tick does no harm.
        Example: crmsync schedule --every 5m --jobs pull   (paste the lines into `crontab -e`)
        """
        spec = cron_expression(every)
        wanted = [j.strip() for j in jobs.split(",") if j.strip()]
        bad = [j for j in wanted if j not in ("pull", "push")]
        if bad or not wanted:
            raise UsageError(
                f"--jobs {jobs!r}: choose pull, push or pull,push (backfills are one-off: crmsync enqueue backfill)"
            )
        a = STATE.app()
        cfg = a.config
        words, missing = _cron_command(a, cfg)
        conns = "".join(f" -c {shlex.quote(c)}" for c in connection or [])
        lines = [f"{spec} {' '.join(words)} --quiet enqueue {j}{conns}" for j in wanted]
        if STATE.json:
            emit_json({"schedule": spec, "cron": lines, "config_missing": missing})
            return
        out = [f"# crmsync: enqueue {' and '.join(wanted)} every {every} (install on one host; workers run the jobs)"]
        if missing:
            where = a.paths.config_file if a.paths.config_file.exists() else "a config file (--config)"
            out.append(f"# cron starts with an almost empty environment: {where} must set {' and '.join(missing)}")
        sys.stdout.write("\n".join(out + lines) + "\n")
