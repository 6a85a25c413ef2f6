"""The synchronous HTTP transport: KServe v2 requests built and parsed by tritonclient.http's own helpers, sent
with http.client under a total deadline.

tritonclient.http's network_timeout bounds each socket read, so a server (or proxy) that drips its answer a byte at
a time never times out. Here a timer shuts the connection's socket down when the request's deadline passes,
whatever it is waiting for (connect, send, the server, the body), and the request fails with TimeoutError.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from typing import Any
from urllib.parse import quote

from clip_common.endpoint import Endpoint, system_ca_file

# failures of a kept-alive connection the server had already closed: sent again once on a new connection
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.BadStatusLine)


class HTTPStatusError(Exception):
    """An HTTP answer other than 200: its status and Triton's {"error": message} (tritonclient's shape)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self._status, self._message = str(status), message

    def status(self) -> str:
        return self._status

    def message(self) -> str:
        return self._message


class HttpTransport:
    """One keep-alive connection per thread to an HTTP(S) endpoint; every request under a total deadline."""

    def __init__(self, endpoint: Endpoint, ca_file: str | None, connect_timeout: float):
        self.endpoint, self.connect_timeout = endpoint, connect_timeout
        self._ssl = None
        if endpoint.tls:
            self._ssl = ssl.create_default_context(cafile=ca_file or system_ca_file())
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []

    def _connection(self, seconds: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            host, port = self.endpoint.host.strip("[]"), self.endpoint.port
            timeout = min(self.connect_timeout, seconds)
            if self._ssl is not None:
                conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()
        self._local = threading.local()

    def request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, Any], seconds: float
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body) of one request that takes at most `seconds` in all; TimeoutError past it."""
        conn = self._connection(seconds)
        try:
            return self._once(conn, method, path, body, headers, seconds)
        except _STALE:
            if getattr(conn, "_clip_reused", False):  # the server closed an idle kept-alive connection: once more
                return self._once(self._connection(seconds), method, path, body, headers, seconds)
            raise

    def _once(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, Any],
        seconds: float,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass

        timer = threading.Timer(seconds, expire)
        timer.daemon = True
        timer.start()
        try:
            if conn.sock is not None:
                conn.sock.settimeout(seconds)
            conn.request(method, self.endpoint.path + path, body=body, headers={k: str(v) for k, v in headers.items()})
            response = conn.getresponse()
            data = response.read()
            if expired.is_set():
                raise TimeoutError
            conn._clip_reused = True  # type: ignore[attr-defined]
            return response.status, response.headers, data
        except BaseException:
            conn.close()
            self._local.conn = None
            if expired.is_set():
                raise TimeoutError(f"no complete answer within {seconds:.3g} s") from None
            raise
        finally:
            timer.cancel()

    # ---- Triton's HTTP API
    def infer(self, model: str, inputs: list, seconds: float, headers: dict | None, queue_timeout_us: int):
        """POST /v2/models/MODEL/infer with every output asked for in binary; the parsed InferResult."""
        from tritonclient.http import InferenceServerClient

        body, json_size = InferenceServerClient.generate_request_body(inputs, outputs=None, timeout=queue_timeout_us)
        h = dict(headers or {})
        if json_size is not None:
            h["Inference-Header-Content-Length"] = json_size
        status, rh, data = self.request("POST", f"/v2/models/{quote(model)}/infer", body, h, seconds)
        _raise_for_status(status, data)
        length = rh.get("Inference-Header-Content-Length")
        return InferenceServerClient.parse_response_body(
            data, header_length=None if length is None else int(length), content_encoding=rh.get("Content-Encoding")
        )

    def get_json(self, path: str, seconds: float, headers: dict | None) -> dict:
        """GET a JSON document of Triton's API (server metadata, a model's config)."""
        status, _, data = self.request("GET", path, None, dict(headers or {}), seconds)
        _raise_for_status(status, data)
        try:
            return json.loads(data)
        except ValueError as e:
            raise HTTPStatusError(status, f"the answer to GET {path} is not JSON: {e}") from None


def _raise_for_status(status: int, data: bytes) -> None:
    if status == 200:
        return
    try:
        message = str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        message = data[:300].decode("utf-8", "replace").strip() or f"HTTP {status}"
    raise HTTPStatusError(status, message)
