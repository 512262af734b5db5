"""The harness: command line, child processes, lower bounds, results and the report.

Every measured run happens in a child process (``python -m benchmarks.worker``) so that its peak
RSS and CPU seconds are its own: the emulator that plays the CRM stays in this (the parent)
process, as a remote CRM would be a different machine. The child times the operation itself
(imports and set-up excluded); ``os.wait4`` gives the child's rusage.

The lower bound of a networked scenario is computed from the fewest requests a perfect client
needs, per rate-limit bucket, under the emulator's limits and latency (see ``lower_bound``);
ratio = bound / wall time, so 1.0 is perfect.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# -- child processes -----------------------------------------------------------------------------
@dataclass
class Child:
    """One finished child process: its JSON answer and what the kernel says it cost."""

    data: dict[str, Any]
    seconds: float
    peak_rss_mb: float
    cpu_seconds: float
    code: int
    stderr: str


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: the repo importable, no OS keyring, no stray crmsync settings.

    Bytecode is cached as for an installed crmsync (pip compiles on install): with
    PYTHONDONTWRITEBYTECODE set, as on some CI machines, every child compiled crmsync from source.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
            "NO_COLOR": "1",
        }
    )
    env.update(extra or {})
    return env


# A tiny launcher between us and the measured command. Linux carries a process's peak RSS across
# fork and exec (the pre-exec high-water mark is kept), so a child forked straight from this
# parent, which holds the emulator's data, would report the parent's size. The launcher is a
# bare ``python -S`` (about 9 MB), so a measured Python process always exceeds it.
_LAUNCHER = r"""
import os, sys, time, json
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
os.environ["CRMSYNC_BENCH_T0"] = repr(time.monotonic())  # the worker times its set-up from the fork
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
seconds = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"seconds": seconds, "maxrss_kb": ru.ru_maxrss, "cpu": ru.ru_utime + ru.ru_stime,
               "code": os.waitstatus_to_exitcode(status)}, f)
"""


def _kill_command(launcher: int) -> None:
    """SIGKILL the command the launcher runs (not the launcher, which still reports its usage)."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def run_process(
    cmd: Sequence[str], *, env: dict[str, str], timeout: float = 7200.0, kill_after: float | None = None
) -> Child:
    """Run a command through the launcher; return its output, wall time, peak RSS and CPU seconds.

    ``kill_after``: SIGKILL the command that many seconds in (its exit code is then -9).
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r", suffix=".json") as usage,
    ):
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCHER, usage.name, *cmd],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        killer = threading.Timer(timeout, lambda: os.killpg(proc.pid, 9))
        killer.start()
        sigkill = threading.Timer(kill_after, _kill_command, args=(proc.pid,)) if kill_after is not None else None
        if sigkill is not None:
            sigkill.start()
        try:
            proc.wait()
        finally:
            killer.cancel()
            if sigkill is not None:
                sigkill.cancel()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        try:
            ru = json.load(usage)
        except ValueError:
            ru = {"seconds": 0.0, "maxrss_kb": 0, "cpu": 0.0, "code": proc.returncode}
    data: dict[str, Any] = {}
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            break
    return Child(
        data=data,
        seconds=float(ru["seconds"]),
        peak_rss_mb=ru["maxrss_kb"] / 1024.0,  # Linux reports KiB
        cpu_seconds=float(ru["cpu"]),
        code=int(ru["code"]),
        stderr=stderr[-4000:],
    )


def run_worker(
    op: str,
    spec: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 7200.0,
    kill_after: float | None = None,
) -> Child:
    """Run one ``benchmarks.worker`` operation in a child; raise with its stderr when it crashed
    (unless it was killed on purpose: ``kill_after`` seconds in)."""
    cmd = [sys.executable, "-m", "benchmarks.worker", op, json.dumps(spec)]
    child = run_process(cmd, env=env or child_env(), timeout=timeout, kill_after=kill_after)
    if not child.data and not (kill_after is not None and child.code == -signal.SIGKILL):
        raise RuntimeError(f"worker {op} failed (exit {child.code}):\n{child.stderr}")
    return child


# -- lower bounds --------------------------------------------------------------------------------
def window_seconds(requests: int, limit: int, window: float) -> float:
    """Earliest time the last of ``requests`` can be sent when at most ``limit`` fit in any rolling ``window``.

    A perfect client sends ``limit`` at once, then the next ``limit`` as soon as the first ones
    leave the window: request k (0-based) goes out at ``window * (k // limit)``.
    """
    if requests <= 0:
        return 0.0
    return window * ((requests - 1) // limit)


@dataclass
class Bound:
    """A scenario's lower bound: the requests a perfect client needs and the time they take."""

    requests: dict[str, int]  # per rate-limit bucket
    seconds: float
    formula: str

    @property
    def total(self) -> int:
        return sum(self.requests.values())


def lower_bound(
    requests: dict[str, int],
    *,
    limits: dict[str, tuple[int, float] | None],
    latency: float,
    concurrency: int | None = None,
    chain: int = 1,
    formula: str = "",
) -> Bound:
    """max(rate-limit time per bucket + one latency, concurrency-limited time, a dependency chain x latency).

    ``concurrency`` is the CRM's cap on requests in flight (None: no cap); ``chain`` the longest
    sequence of requests where each needs the previous reply (page cursors, ids to associate).
    """
    terms = [chain * latency]
    for bucket, n in requests.items():
        limit = limits.get(bucket) or limits.get("default")
        if limit and n:
            terms.append(window_seconds(n, limit[0], limit[1]) + latency)
    total = sum(requests.values())
    if concurrency and total:
        terms.append(math.ceil(total / concurrency) * latency)
    return Bound(requests=dict(requests), seconds=max(terms), formula=formula)


# -- results -------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    value: float | None
    limit: float
    higher_is_better: bool = False

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def describe(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        shown = "n/a" if self.value is None else f"{self.value:.3g}"
        verdict = {True: "met", False: "MISSED", None: "n/a"}[self.met]
        return f"{self.name}: {shown} (target {op} {self.limit:g}) {verdict}"


@dataclass
class Result:
    """One scenario on one provider."""

    scenario: str
    provider: str
    size: int
    unit: str
    wall: float | None = None  # the command's work, timed in the child (imports excluded)
    wall_start: float | None = None  # from process start to exit: what a user waits for
    bound: float | None = None  # the honest bound: the best any client could do under the CRM's limits
    bound_requests: int | None = None
    bound_formula: str = ""
    pattern: float | None = None  # the narrower bound of crmsync's own access pattern, where useful
    pattern_formula: str = ""
    requests: int | None = None
    retries: int | None = None
    client_429: int | None = None
    earned_429: int | None = None
    injected_5xx: int | None = None
    peak_rss_mb: float | None = None
    cpu_seconds: float | None = None
    baseline_wall: float | None = None
    baseline_measured: int | None = None
    baseline_requests: int | None = None
    baseline_note: str = ""
    failed: int = 0
    restarts: int = 0
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Honest bound / time from process start (1.0 is perfect)."""
        wall = self.wall_start or self.wall
        return self.bound / wall if self.bound is not None and wall else None

    @property
    def pattern_ratio(self) -> float | None:
        wall = self.wall_start or self.wall
        return self.pattern / wall if self.pattern is not None and wall else None

    @property
    def requests_per_record(self) -> float | None:
        return self.requests / self.size if self.requests is not None and self.size else None

    @property
    def speedup(self) -> float | None:
        return self.baseline_wall / self.wall if self.baseline_wall and self.wall else None

    @property
    def records_per_second(self) -> float | None:
        return self.size / self.wall if self.wall else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = [{**asdict(t), "met": t.met} for t in self.targets]
        d.update(
            ratio=self.ratio,
            pattern_ratio=self.pattern_ratio,
            requests_per_record=self.requests_per_record,
            speedup=self.speedup,
            records_per_second=self.records_per_second,
        )
        return d


# -- the report ----------------------------------------------------------------------------------
def _f(value: float | None, fmt: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, fmt)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
                break
    except OSError:
        pass
    commit = os.environ.get("CRMSYNC_BENCH_COMMIT", "")
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "crmsync"], cwd=REPO, capture_output=True, text=True
        )
        changed = len(dirty.stdout.splitlines())
        if head.returncode == 0 and not commit:
            commit = head.stdout.strip() + (f" + {changed} uncommitted files under crmsync/" if changed else "")
    except OSError:
        pass
    return {
        "commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


COLUMNS = (
    "scenario",
    "provider",
    "size",
    "start s",
    "work s",
    "bound s",
    "ratio",
    "pattern s",
    "requests",
    "429s",
    "retries",
    "RSS MB",
    "CPU s",
    "naive s",
    "speed-up",
)


def summary_row(r: Result) -> list[str]:
    size = f"{r.size:,}"
    return [
        r.scenario,
        r.provider,
        size,
        _f(r.wall_start),
        _f(r.wall),
        _f(r.bound),
        _f(r.ratio),
        _f(r.pattern),
        _f(r.requests, ",d") if r.requests is not None else "n/a",
        _f(r.client_429, "d") if r.client_429 is not None else "n/a",
        _f(r.retries, "d") if r.retries is not None else "n/a",
        _f(r.peak_rss_mb, ".0f"),
        _f(r.cpu_seconds, ".1f"),
        _f(r.baseline_wall, ".1f"),
        _f(r.speedup, ".1f"),
    ]


def render(results: list[Result], *, out: Callable[[str], None] = print) -> None:
    """A plain-text table (one line per scenario) plus each scenario's targets and notes."""
    rows = [list(COLUMNS)] + [summary_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for n, row in enumerate(rows):
        out("  ".join(cell.rjust(widths[i]) if i > 1 else cell.ljust(widths[i]) for i, cell in enumerate(row)))
        if n == 0:
            out("  ".join("-" * w for w in widths))
    out("")
    for r in results:
        lines = []
        if r.bound_formula:
            lines.append(f"honest bound: {r.bound_formula}")
        if r.pattern_formula:
            lines.append(f"pattern bound (crmsync's access pattern): {r.pattern_formula}")
        if r.baseline_note:
            lines.append(f"naive: {r.baseline_note}")
        if r.earned_429 is not None or r.injected_5xx is not None:
            lines.append(
                f"emulator: {r.earned_429 or 0} 429s earned (rate/concurrency), "
                f"{r.injected_5xx or 0} 5xx injected, 0 429s injected"
            )
        if r.failed or r.restarts or r.errors:
            lines.append(f"failed {r.failed}, restarts {r.restarts}: {'; '.join(r.errors[:3])}")
        for key, value in r.extra.items():
            if key.startswith("_"):
                continue
            lines.append(f"{key}: {value}")
        lines.extend(t.describe() for t in r.targets)
        if r.note:
            lines.append(r.note)
        out(f"[{r.scenario} / {r.provider}]")
        for line in lines:
            out(f"  {line}")
    out("")


# -- the command line ----------------------------------------------------------------------------
def _rerun_from_snapshot(argv: list[str]) -> int:
    """Copy the code aside and run the same command from the copy (children and all)."""
    import shutil

    base = Path(tempfile.mkdtemp(prefix="crmsync-bench-code-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("crmsync", "benchmarks"):
        shutil.copytree(REPO / package, base / package, ignore=ignore)
    env = {**os.environ, "PYTHONPATH": str(base), "CRMSYNC_BENCH_COMMIT": machine()["commit"] + " (snapshot)"}
    rest = [a for a in argv if a != "--snapshot"]
    print(f"benchmarks: running a snapshot of the code in {base}", file=sys.stderr, flush=True)
    try:
        return subprocess.call([sys.executable, "-m", "benchmarks", *rest], env=env, cwd=base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks [SCENARIO] [--quick] [--provider ...] [--latency-ms 150] [--json]``."""
    from benchmarks import scenarios

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "scenario", nargs="?", default="all", help=f"one of: all, {', '.join(scenarios.SCENARIOS)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (under 5 minutes in all)")
    parser.add_argument(
        "--provider",
        default=None,
        help="hubspot, zoho, odoo, pipedrive, salesforce, dynamics or a comma-separated list (default: all)",
    )
    parser.add_argument(
        "--latency-ms", type=float, default=150.0, help="how long each emulated answer takes (network and server)"
    )
    parser.add_argument(
        "--error-rate", type=float, default=0.01, help="share of requests answered with a transient 5xx"
    )
    parser.add_argument(
        "--baseline-cap",
        type=int,
        default=None,
        help="most outcomes/records the naive baseline really runs (extrapolated per record above it); 0 = no cap",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the naive baselines (crmsync alone, while iterating)"
    )
    parser.add_argument(
        "--profile", metavar="DIR", default=None, help="profile each crmsync run with pyinstrument into DIR"
    )
    parser.add_argument(
        "--size", type=int, default=None, help="records/outcomes/events per scenario instead of the default sizes"
    )
    parser.add_argument(
        "--account-limits",
        action="store_true",
        help="backfill at the emulated account's own limits (HubSpot 100/10 s + search 5/s) instead of raised ones",
    )
    parser.add_argument(
        "--kills", type=int, default=3, help="SIGKILLs of the backfill-1m run before the run that finishes (default 3)"
    )
    parser.add_argument(
        "--lifted",
        action="store_true",
        help="backfill with every limit lifted (emulator and crmsync): where the client's CPU binds",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument(
        "--save", metavar="FILE", default=None, help="also write the results as JSON to FILE (after every scenario)"
    )
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="copy crmsync/ and benchmarks/ aside first and run that copy (a long run measures one version)",
    )
    args = parser.parse_args(argv)
    if args.snapshot:
        return _rerun_from_snapshot(list(sys.argv[1:] if argv is None else argv))

    names = list(scenarios.SCENARIOS) if args.scenario == "all" else [args.scenario]
    unknown = [n for n in names if n not in scenarios.SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from all, {', '.join(scenarios.SCENARIOS)}")
    providers = scenarios.pick_providers(args.provider)
    options = scenarios.Options(
        quick=args.quick,
        latency=args.latency_ms / 1000.0,
        error_rate=args.error_rate,
        baseline_cap=args.baseline_cap,
        baseline=not args.no_baseline,
        profile_dir=Path(args.profile) if args.profile else None,
        single=args.scenario != "all",
        toy=args.size,
        account_limits=args.account_limits,
        lifted=args.lifted,
        kills=args.kills,
    )

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    results: list[Result] = []
    info = {
        "machine": machine(),
        "quick": args.quick,
        "latency_ms": args.latency_ms,
        "error_rate": args.error_rate,
        "seconds": 0.0,
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    payload: dict[str, Any] = {"run": info, "results": []}
    for name in names:
        # One provider at a time: a crash (the code under test changing, a bug) costs one row, not the run.
        groups = [[k] for k in providers] if name in scenarios.PER_PROVIDER else [providers]
        for group in groups:
            try:
                results.extend(scenarios.SCENARIOS[name](group, options, log))
            except Exception as exc:  # report it and go on with the next
                import traceback

                log(traceback.format_exc())
                provider = group[0].name if len(group) == 1 else "-"
                results.append(
                    Result(
                        scenario=name,
                        provider=provider,
                        size=0,
                        unit="-",
                        note=f"failed: {type(exc).__name__}: {str(exc)[:300]}",
                    )
                )
            info["seconds"] = round(time.perf_counter() - started, 1)
            payload["results"] = [r.as_dict() for r in results]
            if args.save:
                Path(args.save).write_text(json.dumps(payload, indent=2, default=str))
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps(payload, default=str))
    else:
        m = info["machine"]
        print(
            f"crmsync benchmarks ({'quick' if args.quick else 'full'}) on {m['cpu']}, {m['cores']} cores, "
            f"{m['memory']}, Python {m['python']}, {m['date']}; latency {args.latency_ms:g} ms, "
            f"{args.error_rate:.0%} injected 5xx; {elapsed:.0f} s in all"
        )
        render(results)
    return 0
