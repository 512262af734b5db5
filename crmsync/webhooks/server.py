"""The receiver's HTTP plumbing: a stdlib server with a connection cap, an overflow answerer, request deadlines.

``WebhookReceiver.handle`` decides every answer; this module only gets requests to it and answers
back, cheaply under hostile traffic: at most ``max_connections`` threads, the rest answered 503
from one overflow thread (``/healthz`` still 200), and a request must arrive whole within its
deadline however slowly it trickles.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crmsync.webhooks import WebhookReceiver

log = logging.getLogger("crmsync.webhooks")

LOG_EVERY_SECONDS = 60.0  # one log line per kind of problem per minute; the metrics count every one


class LogOnce:
    """At most one log line per kind of problem per interval; the others go to debug.

    A flood of bad requests must not become a flood of log lines (or of tracebacks): the
    metrics count every request, the log says that it happens.
    """

    def __init__(self, every: float = LOG_EVERY_SECONDS) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            due = now - self._last.get(kind, float("-inf")) >= self.every
            if due:
                self._last[kind] = now
        log.log(level if due else logging.DEBUG, message, *args)


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    text: str | None = None  # a plain-text body instead of JSON (metrics)


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose every read fits in what is left of the request's deadline.

    A per-read timeout restarts with every byte, so a client trickling one byte a second could
    hold a thread for ever; this one ends the whole request at its deadline.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


_BUSY = b'{"error": "busy, retry later"}'
_HEALTHY = b'{"ok": true}'


class _Overflow:
    """Answers connections beyond the cap from one thread: 200 to ``/healthz``, 503 to the rest.

    The first bytes of each request are awaited briefly (without a thread per connection) so
    that a load balancer's health check still passes while slow clients hold every worker.
    """

    WAIT = 1.0  # seconds for the first bytes of a request, then the 503 goes out anyway
    LINGER = 0.5  # seconds to drain what the client still sends, so the answer is not lost to a reset
    MAX_HELD = 1024  # sockets held at once; beyond, answered at once without reading

    def __init__(self, health_paths: tuple[str, ...], log_once: LogOnce) -> None:
        self.health = tuple(f"GET {p} ".encode() for p in health_paths)
        self.health += tuple(f"GET {p}?".encode() for p in health_paths)
        self.log_once = log_once
        self._selector = selectors.DefaultSelector()
        self._held: dict[socket.socket, tuple[float, bytearray, bool]] = {}  # deadline, head, answered
        self._lock = threading.Lock()
        self._incoming: list[socket.socket] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="webhook-overflow", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket) -> None:
        self.log_once("busy", logging.WARNING, "webhook receiver at its connection limit: answering 503 (Retry-After)")
        with self._lock:
            self._incoming.append(sock)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(timeout=5)
        with self._lock:
            left, self._incoming = [*self._held, *self._incoming], []
        for sock in left:
            self._close(sock)
        for end in (self._wake_r, self._wake_w):
            end.close()
        self._selector.close()

    def _run(self) -> None:
        while not self._stopped:
            for key, _ in self._selector.select(timeout=0.1):
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                self._readable(key.fileobj)  # type: ignore[arg-type]
            with self._lock:
                incoming, self._incoming = self._incoming, []
            now = time.monotonic()
            for sock in incoming:
                if len(self._held) >= self.MAX_HELD:
                    # Under pressure, answered sockets stop draining first: they already have their 503.
                    for answered_sock in [held for held, (_, _, done) in self._held.items() if done]:
                        self._close(answered_sock)
                if len(self._held) >= self.MAX_HELD:
                    self._answer(sock, b"")
                    self._close(sock)
                    continue
                sock.setblocking(False)
                self._held[sock] = (now + self.WAIT, bytearray(), False)
                self._selector.register(sock, selectors.EVENT_READ)
            for sock, (deadline, head, answered) in list(self._held.items()):
                if now >= deadline:
                    if answered:
                        self._close(sock)
                    else:
                        self._finish(sock, head)

    def _readable(self, sock: socket.socket) -> None:
        if sock not in self._held:
            return
        _, head, answered = self._held[sock]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(sock)
            return
        if answered:
            return  # draining
        head += data
        # Decided as soon as the first bytes tell: only a health check is worth waiting for.
        if head.startswith(self.health) or not any(h.startswith(bytes(head[: len(h)])) for h in self.health):
            self._finish(sock, head)

    def _finish(self, sock: socket.socket, head: bytes | bytearray) -> None:
        self._answer(sock, head)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        self._held[sock] = (time.monotonic() + self.LINGER, bytearray(), True)

    def _answer(self, sock: socket.socket, head: bytes | bytearray) -> None:
        if head.startswith(self.health):
            status, extra, body = "200 OK", "", _HEALTHY
        else:
            status, extra, body = "503 Service Unavailable", "Retry-After: 1\r\n", _BUSY
        response = (
            f"HTTP/1.1 {status}\r\nServer: crmsync\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        with contextlib.suppress(OSError):
            sock.send(response)  # a few hundred bytes always fit in an empty send buffer

    def _close(self, sock: socket.socket) -> None:
        if self._held.pop(sock, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        with contextlib.suppress(OSError):
            sock.close()


class Server(ThreadingHTTPServer):
    """One thread per connection up to ``receiver.max_connections``; the rest go to ``_Overflow``."""

    daemon_threads = True
    block_on_close = False  # stop() waits for requests in flight; idle readers end at their deadline
    allow_reuse_address = True
    # A small backlog drops SYNs under a burst of new connections: each costs a 1 s retransmit.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        self.slots = threading.BoundedSemaphore(receiver.max_connections)
        super().__init__(address, make_handler(receiver))
        health = ("/healthz", receiver._prefix + "/healthz") if receiver._prefix else ("/healthz",)
        self.overflow = _Overflow(health, receiver.log_once)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.overflow.add(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        kind = type(exc).__name__
        self.receiver.log_once(
            f"connection:{kind}",
            logging.WARNING,
            "webhook connection from %s failed: %s: %s",
            client_address[0],
            kind,
            exc,
        )

    def server_close(self) -> None:
        super().server_close()
        self.overflow.stop()


def make_handler(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: HubSpot and load tests reuse connections
        server_version = "crmsync"
        sys_version = ""
        timeout = receiver.request_deadline  # for writes; reads follow the request's deadline
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def setup(self) -> None:
            super().setup()
            self.rfile.close()
            self._reader = _DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self._reader)

        def handle_one_request(self) -> None:
            # The deadline covers a keep-alive connection's idle wait too: idle connections hold slots.
            self._reader.deadline = time.monotonic() + receiver.request_deadline
            super().handle_one_request()

        def _serve(self) -> None:
            if not receiver._enter():
                self._send(Answer(503, {"error": "shutting down"}, {"Retry-After": "5"}, close=True))
                return
            try:
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    answer = receiver.handle(
                        self.command, self.path, headers, self.rfile.read, client=str(self.client_address[0])
                    )
                except TimeoutError:
                    receiver.log_once(
                        "timeout", logging.INFO, "webhook request cut at its %.0f s deadline", receiver.request_deadline
                    )
                    answer = Answer(408, {"error": "request timeout"}, close=True)
                except OSError as exc:
                    receiver.log_once(f"connection:{type(exc).__name__}", logging.INFO, "webhook client gone: %s", exc)
                    self.close_connection = True
                    return
                except Exception as exc:
                    # A bug: one line a minute here, the traceback only with --verbose.
                    receiver.log_once(
                        f"bug:{type(exc).__name__}",
                        logging.ERROR,
                        "webhook receiver bug: %s: %s",
                        type(exc).__name__,
                        exc,
                    )
                    log.debug("webhook receiver bug", exc_info=True)
                    answer = Answer(500, {"error": "internal error"}, close=True)
                self._send(answer)
            finally:
                receiver._leave()

        def _send(self, answer: Answer) -> None:
            text = answer.text
            payload = text.encode() if text is not None else json.dumps(answer.body).encode()
            headers = {
                "Server": self.server_version,
                "Date": self.date_time_string(),
                "Content-Type": "text/plain; version=0.0.4" if text is not None else "application/json",
                "Content-Length": str(len(payload)),
                **answer.headers,
            }
            if answer.close:
                headers["Connection"] = "close"
                self.close_connection = True
            head = f"{self.protocol_version} {answer.status} {HTTPStatus(answer.status).phrase}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            self.connection.settimeout(receiver.request_deadline)  # a client that never reads is cut too
            # One write per answer: headers and body in separate segments cost a syscall each.
            self.wfile.write(head.encode("latin-1") + (payload if self.command != "HEAD" else b""))
            self.log_request(answer.status)

        do_POST = do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

        def log_error(self, format: str, *args: Any) -> None:
            # The stdlib reports timeouts and bad request lines here, once per request.
            receiver.log_once("request", logging.INFO, "webhook request refused: %s", format % args)

        def log_message(self, format: str, *args: Any) -> None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s", self.address_string(), format % args)

    return Handler
