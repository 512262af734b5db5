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
import re
import sys
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from crmsync.errors import InputError, UsageError
from crmsync.jsonlimits import MAX_DEPTH, TooDeep, first_too_deep, value_end
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
    for number, chunk in enumerate(stream, start=1):
        if number == 1 and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8) :]
        try:
            text = chunk.decode("utf-8").rstrip("\r\n")  # a whole line: no decoder state to carry
        except UnicodeDecodeError as exc:
            yield number, None, chunk.decode("utf-8", "replace").rstrip("\r\n") + f"\x00{exc.start}"
            continue
        yield number, text, text


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
        deep = first_too_deep(text)
        if deep is not None:
            reason = str(TooDeep(MAX_DEPTH, deep + 1))
            yield Parsed(number, text, error=InputError(f"invalid JSON: {reason}", path=name, line=number))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Parsed(
                number, text, error=InputError(f"invalid JSON: {exc.msg} at column {exc.colno}", path=name, line=number)
            )
            continue
        yield _validate(obj, name, number, text)


def _unflatten(row: dict[str, str], *, decimal_comma: bool = False) -> dict[str, Any]:
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
        amount = out["deal"]["amount"]
        if decimal_comma and _DECIMAL_COMMA.fullmatch(amount):
            amount = amount.replace(",", ".")  # Excel writes 12,5 where it writes ; between cells
        try:
            out["deal"]["amount"] = float(amount)
        except ValueError:
            pass
    return out


#: ``--delimiter`` values; without one, the header line decides among these.
DELIMITERS = {",": ",", ";": ";", "\t": "\t", "tab": "\t", "|": "|"}
_DECIMAL_COMMA = re.compile(r"-?\d+,\d+")
_QUOTED = re.compile(r'"[^"]*"?')
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8


def sniff_delimiter(header: str) -> str:
    """The candidate delimiter found most often outside quotes in the header line (comma on a tie)."""
    bare = _QUOTED.sub("", header)
    counts = {d: bare.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts.values())
    return "," if best == 0 or counts[","] == best else max(counts, key=lambda d: counts[d])


def _text_lines(stream: IO[bytes]) -> Generator[tuple[int, str, bool], None, None]:
    """(line number, text with its line ending, False when the line is not UTF-8) without the BOM.

    Lines end at CRLF, LF or a lone CR (old Mac Excel); bad bytes spoil only their own line.
    """
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    try:
        for number, line in enumerate(text, start=1):
            if _UNDECODABLE.search(line) is None:
                yield number, line, True
            else:
                yield number, line.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), False
    finally:
        text.detach()


class _Feed:
    """The lines the csv module reads, remembering which ones the current record took.

    Lines can be given back: after an unclosed quote, the lines it swallowed are read again
    as rows of their own instead of being lost in one runaway field.
    """

    def __init__(self, lines: Iterator[tuple[int, str, bool]]) -> None:
        self._lines = lines
        self.back: deque[tuple[int, str, bool]] = deque()
        self.taken: list[tuple[int, str, bool]] = []

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        item = self.back.popleft() if self.back else next(self._lines)
        self.taken.append(item)
        return item[1]

    def give_back_all_but_first(self) -> None:
        self.back.extendleft(reversed(self.taken[1:]))


def _swallowed_rows(lines: list[tuple[int, str, bool]], sep: str, columns: int) -> bool:
    """True when a line inside a quoted field has a whole row's worth of delimiters."""
    return columns > 1 and any(text.count(sep) >= columns - 1 for _, text, _ in lines)


def read_csv(stream: IO[bytes], name: str, delimiter: str | None = None) -> Iterator[Parsed]:
    """Rows of a CSV file (comma, semicolon, tab or pipe; Excel's BOM and CRLF are fine).

    Records are numbered by the line they start on. A quote that is never closed is that row's
    error, and the lines after it are read as rows again.
    """
    lines = _text_lines(stream)
    try:
        yield from _csv_records(lines, name, delimiter)
    finally:
        lines.close()  # gives the stream back before its owner closes it


def _csv_records(lines: Iterator[tuple[int, str, bool]], name: str, delimiter: str | None) -> Iterator[Parsed]:
    first = next(lines, None)
    if first is None:
        return
    _, header_line, utf8 = first
    if not utf8:
        yield Parsed(1, header_line.rstrip("\r\n"), error=InputError("not UTF-8 text", path=name, line=1))
        return
    if not header_line.strip():
        return
    sep = DELIMITERS[delimiter] if delimiter else sniff_delimiter(header_line)
    try:
        header = [h.strip() for h in next(csv.reader([header_line], delimiter=sep, strict=True))]
    except csv.Error as exc:
        yield Parsed(1, header_line.rstrip("\r\n"), error=InputError(f"invalid CSV header: {exc}", path=name, line=1))
        return
    feed = _Feed(lines)
    reader = csv.reader(feed, delimiter=sep, strict=True)
    while True:
        feed.taken.clear()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            taken = feed.taken
            if not taken:
                return
            start, text = taken[0][0], taken[0][1].rstrip("\r\n")
            too_long = "field larger" in str(exc)
            if "end of data" in str(exc) or (
                len(taken) > 1 and (not too_long or _swallowed_rows(taken[1:], sep, len(header)))
            ):
                feed.give_back_all_but_first()
                reason = "unclosed quote: a quoted field starts on this line and is not closed where it should be"
            elif too_long:
                reason = f"a cell longer than {csv.field_size_limit()} characters"
            else:
                reason = f"invalid CSV: {exc}"
            yield Parsed(start, text, error=InputError(reason, path=name, line=start))
            continue
        taken = list(feed.taken)
        if not taken or not any(cells):
            continue  # a blank line
        start = taken[0][0]
        raw_text = "".join(t for _, t, _ in taken).rstrip("\r\n")
        if len(taken) > 1 and (len(cells) != len(header) or _swallowed_rows(taken[1:], sep, len(header))):
            # A runaway quote that happened to close before a delimiter: the row shape gives it away.
            feed.give_back_all_but_first()
            reason = "unclosed quote: a quoted field starts on this line and is not closed where it should be"
            yield Parsed(start, taken[0][1].rstrip("\r\n"), error=InputError(reason, path=name, line=start))
            continue
        bad = next((n for n, _, ok in taken if not ok), None)
        if bad is not None:
            yield Parsed(bad, raw_text, error=InputError("not UTF-8 text", path=name, line=bad))
            continue
        row = dict(zip(header, cells, strict=False))
        raw = json.dumps(row, ensure_ascii=False)
        if len(cells) > len(header):
            yield Parsed(start, raw, error=InputError("more cells than header columns", path=name, line=start))
            continue
        yield _validate(_unflatten(row, decimal_comma=sep != ","), name, start, raw)


class _JsonArrayText:
    """What ``read_json_array`` has read of its input and not consumed yet, and the line it starts on."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.reader = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="strict")
        self.name = name
        self.buf, self.line, self.eof = "", 1, False

    def fill(self) -> bool:
        """Read more; False at the end of the input."""
        try:
            chunk = self.reader.read(1 << 16)
        except UnicodeDecodeError:
            raise InputError("not UTF-8 text", path=self.name, line=self.line) from None
        self.buf += chunk
        return bool(chunk)

    def skip_space(self) -> None:
        stripped = self.buf.lstrip()
        self.line += self.buf[: len(self.buf) - len(stripped)].count("\n")
        self.buf = stripped

    def consume(self, end: int) -> str:
        """Take the first ``end`` characters (an element), counting its lines."""
        raw = self.buf[:end]
        self.line += raw.count("\n")
        self.buf = self.buf[end:]
        return raw

    def element(self, decoder: json.JSONDecoder) -> tuple[str, Parsed | None]:
        """The next element: ("ok", it), ("more", None) to read on, ("skip", its error) or ("stop", the error)."""
        buf, line = self.buf, self.line
        if buf[0] in "[{" and buf.count("[") + buf.count("{") > MAX_DEPTH:
            end, deep = value_end(buf, 0)
            if deep and end is None and not self.eof and len(buf) < MAX_LINE and self.fill():
                return "more", None  # skip the whole element, not just what has arrived of it
            if deep:
                error = InputError(f"invalid JSON: nested deeper than {MAX_DEPTH} levels", path=self.name, line=line)
                if end is None:
                    return "stop", Parsed(line, buf[:200], error=error)
                self.consume(end)
                return "skip", Parsed(line, buf[:200], error=error)
        try:
            obj, end = decoder.raw_decode(buf)
        except json.JSONDecodeError as exc:
            if not self.eof and len(buf) < MAX_LINE and self.fill():
                return "more", None
            error = InputError(f"invalid JSON: {exc.msg}", path=self.name, line=line + exc.lineno - 1)
            return "stop", Parsed(line, buf[:200], error=error)
        return "ok", _validate(obj, self.name, line, self.consume(end))


def read_json_array(stream: IO[bytes], name: str) -> Iterator[Parsed]:
    """Decode ``[ {...}, {...} ]`` one element at a time (line numbers are where each starts)."""
    decoder = json.JSONDecoder()
    text = _JsonArrayText(stream, name)
    started = False
    try:
        while True:
            text.skip_space()
            if not text.buf:
                if text.eof or not text.fill():
                    text.eof = True
                    if started:
                        error = InputError("the JSON array is not closed (truncated input?)", path=name, line=text.line)
                        yield Parsed(text.line, "", error=error)
                    return
                continue
            if not started:
                if text.buf[0] != "[":
                    error = InputError("a JSON input must be an array of objects", path=name, line=text.line)
                    yield Parsed(text.line, text.buf[:80], error=error)
                    return
                started, text.buf = True, text.buf[1:]
                continue
            if text.buf[0] == "]":
                return
            if text.buf[0] == ",":
                text.buf = text.buf[1:]
                continue
            action, parsed = text.element(decoder)
            if parsed is not None:
                yield parsed
            if action == "stop":
                return
    except InputError as exc:
        yield Parsed(text.line, "", error=exc)
    finally:
        text.reader.detach()


def read_outcomes(source: str, fmt: str = "auto", *, delimiter: str | None = None) -> Iterator[Parsed]:
    """Every record of ``source`` ('-' for stdin), validated, in input order.

    ``delimiter`` (``,`` ``;`` ``tab`` ``|``) is for CSV and implies it; without it the header decides.
    Bad options raise ``UsageError`` here, before anything is read.
    """
    if delimiter is not None and delimiter not in DELIMITERS:
        raise UsageError("--delimiter must be one of: , ; tab |")
    kind = detect_format(source, fmt)
    if delimiter is not None and fmt == "auto":
        kind = "csv"
    elif delimiter is not None and kind != "csv":
        raise UsageError(f"--delimiter is for CSV input, not --format {kind}")
    return _records(source, kind, delimiter)


def _records(source: str, kind: str, delimiter: str | None) -> Iterator[Parsed]:
    name = "<stdin>" if source == "-" else source
    stream = open_binary(source)
    try:
        if kind == "csv":
            yield from read_csv(stream, name, delimiter)
        else:
            yield from {"jsonl": read_jsonl, "json": read_json_array}[kind](stream, name)
    finally:
        if source != "-":
            stream.close()
