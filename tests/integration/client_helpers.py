"""Both clients behind one facade, so one test runs against CLIPClient and AsyncCLIPClient alike."""

from __future__ import annotations

import asyncio
import inspect
import json

from clip_client import AsyncCLIPClient, CLIPClient

# (protocol, mode): every way of calling the server
COMBOS = [("grpc", "sync"), ("http", "sync"), ("grpc", "async"), ("http", "async")]


class Runner:
    """One facade over both clients: async methods are run to completion on a private loop."""

    def __init__(self, client, loop=None):
        self.client, self.loop = client, loop

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if self.loop is not None and inspect.iscoroutinefunction(attr):
            return lambda *a, **k: self.loop.run_until_complete(attr(*a, **k))
        return attr

    def close(self):
        if self.loop is None:
            self.client.close()
        else:
            self.loop.run_until_complete(self.client.close())
            self.loop.close()


def make_client(url: str, mode: str, **options) -> Runner:
    """A CLIPClient (mode 'sync') or AsyncCLIPClient ('async') for url, wrapped in a Runner."""
    if mode == "sync":
        return Runner(CLIPClient(url, **options))
    return Runner(AsyncCLIPClient(url, **options), asyncio.new_event_loop())


# ------------------------------------------------------------------------------- a corrupting HTTP proxy


class CorruptingProxy:
    """An HTTP/1.1 proxy in front of the real server's HTTP port that rewrites the answers of encode_text /
    encode_image (everything else passes untouched), as set by `mode`:

    pass | rows (one row fewer than inputs) | dims (7 dims) | nan (a NaN value) | many (60,000 rows) | rename (the
    embeddings output renamed) | model_id (another model's id) | no_model_id (the output left out: an old server) |
    drip (the answer, one byte every 50 ms) | status:CODE:N (the first N inference requests answered CODE, as a
    gateway would, then passed).
    """

    MODELS = ("encode_text", "encode_image")

    def __init__(self, target: str):
        import http.server
        import threading

        self.target, self.mode, self.seen = target, "pass", 0
        self._refused = 0
        # hold: requests to this model wait for `release` before they are forwarded (`held` is set when one waits)
        self.hold: str | None = None
        self.held, self.release = threading.Event(), threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy._forward(self, None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy._forward(self, body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _forward(self, handler, body: bytes | None) -> None:
        import http.client

        if self.hold is not None and handler.path.startswith(f"/v2/models/{self.hold}/"):
            self.held.set()
            self.release.wait(30)
        host, port = self.target.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        dropped = ("host", "connection", "accept-encoding")  # plain bodies, to rewrite them
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in dropped}
        conn.request(handler.command, handler.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        out_headers = {
            k: v
            for k, v in response.getheaders()
            if k.lower() not in ("content-length", "connection", "transfer-encoding")
        }
        conn.close()
        status = response.status
        model = handler.path.split("/")[3] if handler.path.startswith("/v2/models/") else ""
        if handler.command == "POST" and model in self.MODELS:
            self.seen += 1
            if self.mode.startswith("status:"):
                _, code, n = self.mode.split(":")
                if self._refused < int(n):
                    self._refused += 1
                    self._send(
                        handler,
                        int(code),
                        {"Content-Type": "application/json"},
                        json.dumps({"error": f"refused by the test proxy ({code})"}).encode(),
                    )
                    return
            elif status == 200 and self.mode != "pass":
                data, out_headers = self._rewrite(data, out_headers)
        self._send(handler, status, out_headers, data)

    def _send(self, handler, status: int, headers: dict, data: bytes) -> None:
        import time as _time

        try:
            handler.send_response(status)
            for k, v in headers.items():
                handler.send_header(k, v)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            if self.mode == "drip" and status == 200 and len(data) > 0:
                for i in range(len(data)):  # bounded: one byte per 50 ms until the client hangs up
                    handler.wfile.write(data[i : i + 1])
                    handler.wfile.flush()
                    _time.sleep(0.05)
            else:
                handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _rewrite(self, data: bytes, headers: dict) -> tuple[bytes, dict]:
        import numpy as np

        if self.mode == "drip":
            return data, headers
        key = next(k for k in headers if k.lower() == "inference-header-content-length")
        size = int(headers[key])
        header = json.loads(data[:size])
        blobs, offset = [], size
        for out in header["outputs"]:
            n = out["parameters"]["binary_data_size"]
            blobs.append(data[offset : offset + n])
            offset += n
        for i, out in enumerate(header["outputs"]):
            if out["name"] == "model_id" and self.mode == "model_id":
                other = b"some-other-model"
                blobs[i] = len(other).to_bytes(4, "little") + other
            if not out["name"].endswith("_embeds") or out["datatype"] != "FP32":
                continue
            arr = np.frombuffer(blobs[i], np.float32).reshape(out["shape"]).copy()
            if self.mode == "rows":
                arr = arr[:-1]
            elif self.mode == "dims":
                arr = arr[:, :7]
            elif self.mode == "nan":
                arr[0, 0] = np.nan
            elif self.mode == "many":
                arr = np.resize(arr, (60_000, arr.shape[1]))
            elif self.mode == "rename":
                out["name"] += "_v2"
            out["shape"] = list(arr.shape)
            blobs[i] = arr.tobytes()
        if self.mode == "no_model_id":  # a server built before the model_id output
            kept = [(o, b) for o, b in zip(header["outputs"], blobs) if o["name"] != "model_id"]
            header["outputs"], blobs = [o for o, _ in kept], [b for _, b in kept]
        for out, blob in zip(header["outputs"], blobs):
            out["parameters"]["binary_data_size"] = len(blob)
        head = json.dumps(header).encode()
        headers = dict(headers)
        headers[key] = str(len(head))
        return head + b"".join(blobs), headers


def drip_relay(target_port: int):
    """A TCP relay (tests/integration/relay.py) whose server-to-client bytes, while `relay.drip` is True, go one per
    50 ms: a gRPC answer that is always arriving and never complete."""
    import asyncio as _asyncio

    from tests.integration.relay import Relay

    class DripRelay(Relay):
        drip = False

        async def _handle(self, reader, writer):
            try:
                up_reader, up_writer = await _asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.transport.abort()
                return
            self._writers |= {writer, up_writer}
            await _asyncio.gather(self._pipe(reader, up_writer), self._slow(up_reader, writer))

        async def _slow(self, reader, writer):
            try:
                while data := await reader.read(1 << 16):
                    for i in range(0, len(data), 1 if self.drip else len(data)):
                        writer.write(data[i : i + 1] if self.drip else data)
                        await writer.drain()
                        if self.drip:
                            await _asyncio.sleep(0.05)
            except (ConnectionError, OSError):
                pass
            finally:
                self._writers.discard(writer)
                writer.transport.abort()

    return DripRelay(target_port).start()
