"""The gateway's API keys, TLS and OpenAI route as rendered into the Envoy config (no Envoy here: test_gateway_edge)."""

from __future__ import annotations

import re

import yaml

from clip_server.gateway import EdgeSecurity, GatewaySettings, Upstream, render_config


def _config(edge: EdgeSecurity | None) -> dict:
    settings = GatewaySettings(http_port=18000, grpc_port=18001, max_body_bytes=1 << 20, edge=edge)
    return yaml.safe_load(render_config([Upstream.parse("127.0.0.1:8000:8001")], settings))


def _routes(config: dict, listener: str) -> list[dict]:
    found = next(x for x in config["static_resources"]["listeners"] if x["name"] == listener)
    manager = found["filter_chains"][0]["filters"][-1]["typed_config"]
    return manager["route_config"]["virtual_hosts"][0]["routes"]


def _key_regex(routes: list[dict]) -> str | None:
    for route in routes:
        for header in route["match"].get("headers", []):
            if header["name"] == "authorization":
                return header["string_match"]["safe_regex"]["regex"]
    return None


def test_keys_guard_everything_after_health_and_match_exactly():
    config = _config(EdgeSecurity(api_keys=("k.1+", "two")))
    http, grpc = _routes(config, "http"), _routes(config, "grpc")
    regex = _key_regex(http)
    first_guarded = [i for i, r in enumerate(http) if r["match"].get("headers", [{}])[0].get("name") == "authorization"]
    matches = [
        bool(re.fullmatch(regex, h))
        for h in ("Bearer k.1+", "Bearer two", "Bearer kx1+", "Bearer two ", "two", "Bearer k.1+|two")
    ]
    assert (first_guarded, _key_regex(grpc) == regex, matches) == ([3], True, [True, True, False, False, False, False])


def test_without_keys_nothing_is_guarded_and_without_tls_the_chains_are_plain():
    config = _config(None)
    chains = [x["filter_chains"][0].get("transport_socket") for x in config["static_resources"]["listeners"][:2]]
    assert (_key_regex(_routes(config, "http")), chains) == (None, [None, None])


def test_tls_and_the_openai_route():
    config = _config(EdgeSecurity(tls_cert="/c/tls.crt", tls_key="/c/tls.key", openai_upstream=("openai", 8080)))
    sockets = [
        x["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
        for x in config["static_resources"]["listeners"][:2]
    ]
    v1 = [r for r in _routes(config, "http") if r["match"].get("prefix") == "/v1/"]
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "openai")
    assert (
        [s["alpn_protocols"] for s in sockets],
        sockets[0]["tls_certificates"][0]["certificate_chain"],
        v1[0]["route"]["cluster"],
        cluster["type"],
    ) == ([["h2", "http/1.1"], ["h2"]], {"filename": "/c/tls.crt"}, "openai", "STRICT_DNS")
