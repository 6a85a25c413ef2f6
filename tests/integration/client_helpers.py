"""Both clients behind one facade, so one test runs against CLIPClient and AsyncCLIPClient alike."""

from __future__ import annotations

import asyncio
import inspect

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
