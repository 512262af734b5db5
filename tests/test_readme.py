"""Every crmsync command line in README.md and in each command's `Example:` help line is one the CLI
accepts: known commands, known options, valid values (Click parses each one, nothing runs)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command

from crmsync.cli import app

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
CRON_SPEC = re.compile(r"^\s*(?:@\w+|(?:[\d*/,-]+\s+){5})")
SEPARATORS = {"|", "||", "&&", ";", "(", ")", "&", ">", ">>", "<", "2>"}


def crmsync_argvs(line: str) -> list[list[str]]:
    """The argument lists of every crmsync command in one shell or crontab line (pipes, $(…), env prefixes)."""
    lexer = shlex.shlex(CRON_SPEC.sub("", line, count=1), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    found: list[list[str]] = []
    at_command = True
    argv: list[str] | None = None
    for token in tokens:
        if token in SEPARATORS:
            if argv is not None:
                found.append(argv)
            argv, at_command = None, token not in (">", ">>", "<", "2>")
            if token in (">", ">>", "<", "2>"):
                at_command = False
            continue
        if "$(" in token:  # a command substitution inside quotes: check what it runs
            found.extend(crmsync_argvs(token[token.index("$(") + 2 :].rstrip(")")))
            if argv is not None:
                argv.append(token)
            continue
        if argv is not None:
            argv.append(token)
        elif at_command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", token):
            continue  # VAR=value before the command
        elif at_command and token.rsplit("/", 1)[-1] == "crmsync":
            argv = []
        else:
            at_command = False
    if argv is not None:
        found.append(argv)
    return found


def readme_command_lines() -> list[str]:
    """Shell and cron lines from README's fenced blocks (commented cron lines included) and inline
    code spans that are a whole crmsync command."""
    lines: list[str] = []
    in_block, lang = False, ""
    for raw in README.read_text().splitlines():
        fence = re.match(r"^\s*```(\w*)", raw)
        if fence:
            in_block, lang = not in_block, fence.group(1)
            continue
        if in_block and lang in ("sh", "cron", "bash", "console"):
            text = raw.strip()
            if text.startswith("#"):  # a comment counts when it shows a crontab line to paste
                text = text.lstrip("#").strip()
                if not CRON_SPEC.match(text):
                    continue
            if crmsync_argvs(text):
                lines.append(text)
        elif not in_block:
            for span in re.findall(r"`(crmsync [^`]+)`", raw):
                if not re.search(r"[\[…]|\|", span):  # a synopsis, not a command line
                    lines.append(span)
    return lines


def help_example_lines() -> list[tuple[str, str]]:
    """(command path, example text) for every `Example:` line in the help texts."""
    out: list[tuple[str, str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        for line in (cmd.help or "").splitlines():
            match = re.match(r"\s*Example[^:]*:\s*(.+)$", line)
            if match:
                # "(prompts for …)" after two spaces is a remark, not part of the command
                out.append((" ".join(path), re.split(r"\s{2,}\(", match.group(1))[0]))
        for name, child in (getattr(cmd, "commands", None) or {}).items():
            walk(child, [*path, name])

    walk(get_command(app), ["crmsync"])
    return out


# Options that act while being parsed (install a completion script, print and exit): they are checked
# to exist, then left out, so that parsing runs nothing.
ACTING = ("--install-completion", "--show-completion", "--version", "--help", "-h")


@pytest.fixture(autouse=True)
def _no_real_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should an acting option slip through, it writes under tmp_path, not the user's home."""
    monkeypatch.setenv("HOME", str(tmp_path))


def parse(argv: list[str]) -> None:
    """Resolve and parse argv exactly as `crmsync` would, down to the leaf command, running nothing."""
    root = get_command(app)
    root_options = {name for p in root.params for name in p.opts}
    for acting in set(argv) & set(ACTING[:3]):
        assert acting in root_options, f"{argv}: {acting} is not an option"
    args = [a for a in argv if a not in ACTING]
    if not args:
        return
    ctx = root.make_context("crmsync", args)  # the root group moves global options, as in a real run
    command, rest = root, [*ctx._protected_args, *ctx.args]
    while getattr(command, "commands", None):
        assert rest, f"{argv}: no subcommand"
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None, f"{argv}: unknown command {name}"
        ctx = sub.make_context(name, rest, parent=ctx)
        command, rest = sub, [*ctx._protected_args, *ctx.args] if getattr(sub, "commands", None) else ctx.args
    assert not rest, f"{argv}: unexpected arguments {rest}"


def crontab_example_lines() -> list[str]:
    """The lines of examples/crontab, which the README points to for pasting."""
    text = (ROOT / "examples" / "crontab").read_text()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


README_LINES = readme_command_lines() + crontab_example_lines()
HELP_LINES = help_example_lines()


def test_the_readme_and_help_have_command_lines_to_check() -> None:
    assert len(README_LINES) >= 20
    assert len(HELP_LINES) >= 20
    assert any("enqueue pull" in line for line in README_LINES)  # the commented crontab lines count too


@pytest.mark.parametrize("line", README_LINES)
def test_readme_command_line_parses(line: str) -> None:
    argvs = crmsync_argvs(line)
    assert argvs, f"no crmsync command found in {line!r}"
    for argv in argvs:
        parse(argv)


@pytest.mark.parametrize(("command", "line"), HELP_LINES)
def test_help_example_parses(command: str, line: str) -> None:
    argvs = crmsync_argvs(line)
    assert argvs, f"{command}: no crmsync command in its example {line!r}"
    for argv in argvs:
        parse(argv)


def test_the_checker_rejects_what_the_cli_rejects() -> None:
    from typer._click.exceptions import UsageError

    for bad in (
        "crmsync pull --no-such-option",
        "crmsync nosuchcommand",
        "crmsync --log-format yaml status",
        "crmsync map nosuch -c prod",
        "crmsync status --max-age",
    ):
        with pytest.raises((UsageError, AssertionError)):
            for argv in crmsync_argvs(bad):
                parse(argv)


def test_the_extractor_finds_commands_where_a_shell_runs_them() -> None:
    assert crmsync_argvs('$EDITOR "$(crmsync map path -c prod)"') == [["map", "path", "-c", "prod"]]
    assert crmsync_argvs("my-export | crmsync push - -c prod --json > r.jsonl") == [
        ["push", "-", "-c", "prod", "--json"]
    ]
    assert crmsync_argvs("EDITOR=nano crmsync map edit -c prod") == [["map", "edit", "-c", "prod"]]
    assert crmsync_argvs('crmsync status --check || logger -t crmsync "failed"') == [["status", "--check"]]


def test_readme_names_no_file_outside_the_repository() -> None:
    text = README.read_text()
    assert "../" not in text
    for path in re.findall(r"`((?:examples|tests|crmsync|benchmarks|\.ci)/[\w./-]+)`", text):
        assert (ROOT / path).exists() or "<" in path, path


def test_the_readme_shows_the_connect_line_sandbox_serve_prints() -> None:
    from crmsync.cli.sandbox import make_sandbox
    from crmsync.emulators.sandbox import SandboxOptions

    name, box = make_sandbox("hubspot", SandboxOptions(contacts=0, companies=0, deals=0))
    assert box.connect_command(name, "http://127.0.0.1:8080") in README.read_text()
