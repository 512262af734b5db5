"""Reading call outcomes: JSONL, CSV or a JSON array, from a file or stdin, streamed.

Nothing here holds the whole input: JSONL and CSV go line by line, a JSON array is decoded one
element at a time from a sliding buffer. Every problem becomes an ``InputError`` naming
file, line and field (``outcomes.jsonl:17: contact.email: not an email address``).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from crmsync.errors import InputError, UsageError
from crmsync.model import CallOutcome

FORMATS = ("auto", "jsonl", "csv", "json")
MAX_LINE = 16 * 1024 * 1024  # a line longer than this is refused rather than buffered


@dataclass
class Parsed:
    """One input record: the outcome or the error, with where it came from."""

    line: int
    raw: str
    outcome: CallOutcome | None = None
    error: InputError | None = None


def detect_format(source: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    suffix = Path(source).suffix.lower()
    return {".csv": "csv", ".json": "json"}.get(suffix, "jsonl")


def open_binary(source: str) -> IO[bytes]:
    if source == "-":
        return sys.stdin.buffer
    try:
        return open(source, "rb")
    except OSError as exc:
        raise UsageError(f"{source}: cannot open: {exc.strerror}") from None


def _validate(obj: Any, name: str, line: int, raw: str) -> Parsed:
    if not isinstance(obj, dict):
        return Parsed(line, raw, error=InputError("each record must be a JSON object", path=name, line=line))
    try:
        return Parsed(line, raw, outcome=CallOutcome.model_validate(obj))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        elif err["type"] == "missing":
            reason = "required"
        elif err["type"] == "enum":
            reason = f"unknown value {err.get('input')!r}; expected one of: {err.get('ctx', {}).get('expected', '')}"
        elif err["type"] == "string_too_long":
            reason = f"too long (at most {err.get('ctx', {}).get('max_length')} characters)"
        more = len(exc.errors()) - 1
        if more:
            reason += f" (and {more} more problem{'s' if more > 1 else ''})"
        return Parsed(line, raw, error=InputError(reason, path=name, line=line, field=loc))


def _lines(stream: IO[bytes], name: str) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text or None when not UTF-8, raw text for rejects) with BOM and CRLF removed."""
    decoder = codecs.getincrementaldecoder("utf-8")
    for number, chunk in enumerate(stream, start=1):
        if number == 1 and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8) :]
        try:
            text = decoder().decode(chunk, final=True)
        except UnicodeDecodeError as exc:
            yield number, None, chunk.decode("utf-8", "replace").rstrip("\r\n") + f"\x00{exc.start}"
            continue
        yield number, text.rstrip("\r\n"), text.rstrip("\r\n")


def read_jsonl(stream: IO[bytes], name: str) -> Iterator[Parsed]:
    for number, text, raw in _lines(stream, name):
        if text is None:
            raw_text, _, pos = raw.rpartition("\x00")
            yield Parsed(
                number,
                raw_text,
                error=InputError(f"not UTF-8 text (bad byte at column {int(pos) + 1})", path=name, line=number),
            )
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Parsed(
                number, text, error=InputError(f"invalid JSON: {exc.msg} at column {exc.colno}", path=name, line=number)
            )
            continue
        yield _validate(obj, name, number, text)


def _unflatten(row: dict[str, str]) -> dict[str, Any]:
    """CSV headers like ``contact.email`` become nested objects; empty cells are absent."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key is None or value is None or value == "":
            continue
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    if "duration_seconds" in out:
        try:
            out["duration_seconds"] = int(out["duration_seconds"])
        except ValueError:
            pass
    if "deal" in out and "amount" in out["deal"]:
        try:
            out["deal"]["amount"] = float(out["deal"]["amount"])
        except ValueError:
            pass
    return out


def read_csv(stream: IO[bytes], name: str) -> Iterator[Parsed]:
    text_stream = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="strict", newline="")
    try:
        reader = csv.DictReader(text_stream)
        try:
            header = reader.fieldnames
        except UnicodeDecodeError:
            yield Parsed(1, "", error=InputError("not UTF-8 text", path=name, line=1))
            return
        if not header:
            return
        line = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                yield Parsed(line + 1, "", error=InputError("not UTF-8 text", path=name, line=line + 1))
                return
            except csv.Error as exc:
                yield Parsed(
                    reader.line_num, "", error=InputError(f"invalid CSV: {exc}", path=name, line=reader.line_num)
                )
                return
            line = reader.line_num
            raw = json.dumps(row, ensure_ascii=False)
            if None in row:
                yield Parsed(line, raw, error=InputError("more cells than header columns", path=name, line=line))
                continue
            yield _validate(_unflatten(row), name, line, raw)
    finally:
        text_stream.detach()


def read_json_array(stream: IO[bytes], name: str) -> Iterator[Parsed]:
    """Decode ``[ {...}, {...} ]`` one element at a time (line numbers are where each starts)."""
    decoder = json.JSONDecoder()
    reader = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="strict")
    buf, line, index, started, eof = "", 1, 0, False, False

    def fill() -> bool:
        nonlocal buf
        try:
            chunk = reader.read(1 << 16)
        except UnicodeDecodeError:
            raise InputError("not UTF-8 text", path=name, line=line) from None
        buf += chunk
        return bool(chunk)

    try:
        while True:
            stripped = buf.lstrip()
            line += buf[: len(buf) - len(stripped)].count("\n")
            buf = stripped
            if not buf:
                if eof or not fill():
                    eof = True
                    if not started:
                        return
                    yield Parsed(
                        line,
                        "",
                        error=InputError("the JSON array is not closed (truncated input?)", path=name, line=line),
                    )
                    return
                continue
            if not started:
                if buf[0] != "[":
                    yield Parsed(
                        line,
                        buf[:80],
                        error=InputError("a JSON input must be an array of objects", path=name, line=line),
                    )
                    return
                started, buf = True, buf[1:]
                continue
            if buf[0] == "]":
                return
            if buf[0] == ",":
                buf = buf[1:]
                continue
            try:
                obj, end = decoder.raw_decode(buf)
            except json.JSONDecodeError as exc:
                if not eof and len(buf) < MAX_LINE and fill():
                    continue
                yield Parsed(
                    line, buf[:200], error=InputError(f"invalid JSON: {exc.msg}", path=name, line=line + exc.lineno - 1)
                )
                return
            raw = buf[:end]
            index += 1
            yield _validate(obj, name, line, raw)
            line += raw.count("\n")
            buf = buf[end:]
    except InputError as exc:
        yield Parsed(line, "", error=exc)
    finally:
        reader.detach()


def read_outcomes(source: str, fmt: str = "auto") -> Iterator[Parsed]:
    """Every record of ``source`` ('-' for stdin), validated, in input order."""
    kind = detect_format(source, fmt)
    name = "<stdin>" if source == "-" else source
    stream = open_binary(source)
    reader = {"jsonl": read_jsonl, "csv": read_csv, "json": read_json_array}[kind]
    try:
        yield from reader(stream, name)
    finally:
        if source != "-":
            stream.close()
