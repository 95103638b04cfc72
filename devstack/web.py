"""The emulators' HTTP plumbing: Flask apps on a threaded werkzeug server with real keep-alive and TLS.

werkzeug's own request handler sends ``Connection: close`` on every response, so a client's
connection pool would never be exercised (nor its TLS-handshake cost measured).  ``_Handler``
replaces its WSGI runner with one that keeps HTTP/1.1 connections open, drains unread request
bodies, and can drop a connection with a TCP reset when a fault says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import IO, Any, cast

from flask import Flask, Response, g, request
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.wsgi import LimitedStream

from devstack.sandboxes import Fault, Sandbox

log = logging.getLogger("devstack.web")

KEEP_ALIVE_IDLE_SECONDS = 120


class _Dropped(ConnectionAbortedError):
    """Raised from a response body to abandon the connection without answering."""


class _Server(ThreadedWSGIServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, host: str, port: int, app: Flask, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(host, port, app, handler=_Handler)
        self._to_reset: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        if ssl_context is not None:
            # Handshake in the connection's own thread, not in the accept loop (werkzeug's default),
            # so one slow or broken client cannot stall every other one.
            self.socket = ssl_context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False)
            self.ssl_context = ssl_context

    def mark_reset(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._to_reset.add(sock)

    def shutdown_request(self, request: Any) -> None:
        if request in self._to_reset:
            # No FIN first: closing with SO_LINGER 0 sends a bare RST, like a dropped load balancer flow.
            request.close()
            return
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error from %s", client_address, exc_info=True)


class _Handler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = KEEP_ALIVE_IDLE_SECONDS
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes: with Nagle on, the body waits for the client's
        # delayed ACK (~40 ms on Linux) and every answer with a body would look 40 ms slow.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def connection_dropped(self, error: BaseException, environ: Any = None) -> None:
        self.close_connection = True

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ssl.SSLError) as error:
            log.debug("connection ended: %s", error)

    def run_wsgi(self) -> None:
        if self.headers.get("Expect", "").lower().strip(" \t") == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        environ = self.environ = self.make_environ()
        chunked_request = environ.get("wsgi.input_terminated", False)
        body_stream: LimitedStream | None = None
        if not chunked_request:
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
                self.close_connection = True
            body_stream = LimitedStream(cast(IO[bytes], self.rfile), max(length, 0))
            environ["wsgi.input"] = body_stream
            environ["wsgi.input_terminated"] = True
        else:
            # A chunked body may be left half read by the app; closing is simpler than parsing it.
            self.close_connection = True

        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if exc_info and sent:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return write

        sent: list[bool] = []
        chunk = [False]

        def send_head() -> None:
            status, headers = started
            code_str, _, msg = status.partition(" ")
            code = int(code_str)
            self.send_response(code, msg)
            keys = set()
            for key, value in headers:
                if key.lower() == "connection":
                    continue
                self.send_header(key, value)
                keys.add(key.lower())
            bodyless = environ["REQUEST_METHOD"] == "HEAD" or 100 <= code < 200 or code in (204, 304)
            if "content-length" not in keys and not bodyless:
                chunk[0] = True
                self.send_header("Transfer-Encoding", "chunked")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            sent.append(True)

        def write(data: bytes) -> None:
            if not sent:
                send_head()
            if data:
                if chunk[0]:
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                else:
                    self.wfile.write(data)

        try:
            result: Iterable[bytes] = self.server.app(environ, start_response)
            try:
                for data in result:
                    write(data)
                if not sent:
                    send_head()
                if chunk[0]:
                    self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            if body_stream is not None and not self.close_connection:
                body_stream.exhaust()
        except _Dropped:
            self.close_connection = True
            self.server.mark_reset(self.connection)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True
        except Exception:
            self.close_connection = True
            log.exception("unhandled error in %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            if not sent:
                with contextlib.suppress(Exception):
                    started[:] = ["500 INTERNAL SERVER ERROR", [("Content-Length", "0")]]
                    send_head()
                    self.wfile.flush()


class ServerHandle:
    """A running server; ``shutdown()`` stops it and waits for the serving thread."""

    def __init__(self, server: _Server, thread: threading.Thread, tls: bool) -> None:
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])
        self.tls = tls

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(app: Flask, host: str = "127.0.0.1", port: int = 0, tls: bool = False) -> ServerHandle:
    """Start ``app`` on a background thread; ``port=0`` picks a free port (see ``handle.port``)."""
    context = None
    if tls:
        from devstack.tls import server_context

        context = server_context()
    server = _Server(host, port, app, context)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"devstack-{app.name}", daemon=True)
    thread.start()
    return ServerHandle(server, thread, tls)


# --- per-request helpers used by every emulator ------------------------------------------------

def create_app(name: str) -> Flask:
    """A Flask app whose responses are counted as ``status:<code>`` in the request's sandbox."""
    app = Flask(name)
    app.json.sort_keys = False  # type: ignore[attr-defined]

    @app.after_request
    def _count_status(response: Response) -> Response:
        sandbox: Sandbox | None = g.get("sandbox")
        service: str | None = g.get("service")
        if sandbox is not None and service is not None and not g.get("dropped"):
            sandbox.counters.count(service, f"status:{response.status_code}")
        return response

    return app


def bind(sandbox: Sandbox, service: str) -> None:
    """Tell the status counter which sandbox and service this request belongs to."""
    g.sandbox = sandbox
    g.service = service


def apply_latency(sandbox: Sandbox, service: str) -> None:
    seconds = sandbox.latency.get(service, 0.0)
    if seconds > 0:
        time.sleep(seconds)


def _dropping_body(sock: Any) -> Iterator[bytes]:
    raise _Dropped("fault: connection dropped")
    yield b""  # pragma: no cover - makes this a generator, so the raise happens in the server


def fault_response(fault: Fault | None) -> Response | None:
    """The scripted answer of ``fault``, or None when the caller should answer normally."""
    if fault is None:
        return None
    if fault.delay > 0:
        time.sleep(fault.delay)
    if fault.drop:
        g.dropped = True
        return Response(_dropping_body(request.environ.get("werkzeug.socket")), status=200)
    if fault.status is None and fault.body is None and fault.raw_body is None and not fault.headers:
        return None
    status = fault.status or 500
    if fault.raw_body is not None:
        response = Response(fault.raw_body, status=status, mimetype="text/plain")
    elif fault.body is not None:
        response = Response(json.dumps(fault.body), status=status, mimetype="application/json")
    else:
        response = Response(b"", status=status)
    for key, value in (fault.headers or {}).items():
        response.headers[key] = value
    return response


def enter(sandbox: Sandbox, service: str) -> Response | None:
    """Common prologue of an emulator request: bind, latency, then a matching fault's answer if any."""
    bind(sandbox, service)
    apply_latency(sandbox, service)
    return fault_response(sandbox.take_fault(service, request.method, request.path))
