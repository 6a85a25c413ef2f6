"""A local HTTP server for the image-URL tests (unit and integration): files of one folder, plus odd routes."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """http://127.0.0.1:PORT serving folder's files; /big streams 3 MiB without a length, /slow never answers,
    /drip promises 30 bytes and sends one a second, /to-file redirects to a file:// URL. Yields the base URL."""
    release = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(folder), **k)

        def log_message(self, *a):  # quiet
            pass

        def do_GET(self):
            if self.path == "/big":
                self.send_response(200)
                self.end_headers()
                for _ in range(3):
                    self.wfile.write(b"x" * (1 << 20))
            elif self.path == "/slow":
                release.wait(30)
            elif self.path == "/drip":
                self.send_response(200)
                self.send_header("Content-Length", "30")
                self.end_headers()
                for _ in range(30):
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        return
                    if release.wait(1):
                        return
            elif self.path == "/to-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/hostname")
                self.end_headers()
            else:
                super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="webserver", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
