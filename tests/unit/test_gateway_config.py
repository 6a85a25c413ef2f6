"""The gateway's Envoy config as rendered from the template (tests/integration/test_gateway.py runs the real Envoy)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from clip_build.repository import effective_limits
from clip_common.contract import INTERNAL_MODELS, PUBLIC_MODELS
from clip_server.gateway import (
    GatewayError,
    GatewaySettings,
    Upstream,
    body_cap,
    http_routes,
    render_config,
    repository_limits,
    resolve_limits,
)


def _config(*upstreams: str, **settings) -> dict:
    options = {"http_port": 8080, "grpc_port": 8081, "max_body_bytes": 1000, **settings}
    return yaml.safe_load(render_config([Upstream.parse(u) for u in upstreams], GatewaySettings(**options)))


def test_upstream_parsing():
    assert Upstream.parse("triton-0.svc:8000:8001") == Upstream("triton-0.svc", 8000, 8001)
    for bad in ("host:8000", "host:x:8001", ":1:2", "host:0:8001", "host:8000:70000"):
        with pytest.raises(GatewayError):
            Upstream.parse(bad)


def test_body_cap_of_the_default_limits():
    limits = effective_limits()
    assert body_cap(limits) == 64 * (16384 + 20 * 1024 * 1024 + 8) + 64 * 1024 == 1_343_291_904
    assert body_cap(repository_limits(None, ["max_items_per_request=2"])) == 2 * (16384 + 20 * 1024 * 1024 + 8) + 65536
    with pytest.raises(GatewayError):
        repository_limits(None, ["max_items_per_request=0"])


def test_limits_resolution_without_asking_upstreams(tmp_path):
    nowhere = [Upstream.parse("127.0.0.1:1:2")]
    assert resolve_limits(nowhere, None, [], 0) == (effective_limits(), "build defaults")
    assert resolve_limits(nowhere, None, ["max_text_bytes=10"], 60)[0]["max_text_bytes"] == 10  # not asked
    (tmp_path / "clip_info" / "1").mkdir(parents=True)
    (tmp_path / "clip_info" / "1" / "info.json").write_text(
        json.dumps({"max_items_per_request": 3, "limits": {**effective_limits(), "max_items_per_request": 8}})
    )
    limits, source = resolve_limits(nowhere, str(tmp_path), [], 60)
    assert limits["max_items_per_request"] == 3 and source == str(tmp_path)  # what one request may carry
    assert resolve_limits(nowhere, None, [], 0.1) == (effective_limits(), "build defaults")  # nobody answered


def test_public_models_route_and_internal_models_never_appear():
    text = render_config([Upstream.parse("10.0.0.1:8000:8001")], GatewaySettings(8080, 8081, 1000))
    assert not [m for m in INTERNAL_MODELS if m in text]
    pattern = next(
        r["match"]["safe_regex"]["regex"]
        for r in http_routes(GatewaySettings(8080, 8081, 1000))
        if r["match"].get("safe_regex", {}).get("regex", "").endswith("/infer$")
    )
    for model in PUBLIC_MODELS:
        assert re.match(pattern, f"/v2/models/{model}/infer")
        assert re.match(pattern, f"/v2/models/{model}/versions/3/infer")
        assert f'["{model}"] = true' in text  # the Lua filter's set
    for model in INTERNAL_MODELS:
        assert not re.match(pattern, f"/v2/models/{model}/infer")


def test_clusters_follow_the_upstreams():
    static = _config("10.0.0.1:8000:8001", "10.0.0.2:9000:9001")
    clusters = {c["name"]: c for c in static["static_resources"]["clusters"]}
    assert clusters["triton_http"]["type"] == "STATIC" and clusters["triton_http"]["lb_policy"] == "LEAST_REQUEST"
    grpc = clusters["triton_grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ports = [
        (e["endpoint"]["address"]["socket_address"]["port_value"], e["endpoint"]["health_check_config"]["port_value"])
        for e in grpc
    ]
    assert ports == [(8001, 8000), (9001, 9000)]  # gRPC endpoints health-checked on their HTTP port
    dns = _config("triton-headless.ns.svc.cluster.local:8000:8001")
    assert {c["type"] for c in dns["static_resources"]["clusters"] if c["name"].startswith("triton")} == {"STRICT_DNS"}


def test_body_cap_and_rate_limit_in_both_listeners():
    config = _config("10.0.0.1:8000:8001", max_body_bytes=12345, rate_limit_rps=7, rate_limit_burst=9)
    for listener in config["static_resources"]["listeners"][:2]:
        hcm = listener["filter_chains"][0]["filters"][1]["typed_config"]
        filters = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
        assert filters["envoy.filters.http.buffer"]["max_request_bytes"] == 12345
        limit = filters["envoy.filters.http.local_ratelimit"]
        assert limit["filter_enforced"]["default_value"]["numerator"] == 100
        assert limit["descriptors"][0]["token_bucket"] == {"max_tokens": 9, "tokens_per_fill": 7, "fill_interval": "1s"}
    off = _config("10.0.0.1:8000:8001")["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][1]
    limit = next(f for f in off["typed_config"]["http_filters"] if f["name"].endswith("local_ratelimit"))
    assert limit["typed_config"]["filter_enabled"]["default_value"]["numerator"] == 0


def test_bad_settings_are_refused():
    with pytest.raises(GatewayError):
        render_config([], GatewaySettings(8080, 8081, 1000))
    with pytest.raises(GatewayError):
        render_config([Upstream.parse("h:1:2")], GatewaySettings(8080, 8081, 2**32))


def test_ipv6_upstreams_and_heap_bound():
    assert Upstream.parse("[::1]:8000:8001") == Upstream("::1", 8000, 8001)
    for bad in ("::1:8000:8001", "[host]:8000:8001"):
        with pytest.raises(GatewayError):
            Upstream.parse(bad)
    cluster = _config("[::1]:8000:8001")["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["address"] == "::1"
    with pytest.raises(GatewayError, match="max-heap-bytes"):  # two bodies of the cap must fit below the threshold
        _config("h:1:2", max_body_bytes=600_000_000, max_heap_bytes=1024**3)


GATEWAY_IMAGE = """
import runpy, sys
ours = {"clip_server", "clip_common", "clip_build", "clip_runtime", "clip_client", "clip_loadtest"}
class OnlyStdlibAndOurs:  # the gateway image installs our packages with --no-deps, and Envoy
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in sys.stdlib_module_names and top not in ours and not top.startswith("_"):
            raise ImportError(f"{name} is not installed in the gateway image")
sys.meta_path.insert(0, OnlyStdlibAndOurs())
sys.argv = ["gateway", "--upstream", "triton:8000:8001", "--http-port", "8000", "--grpc-port", "8001",
            "--limits-timeout", "0", "--print-config"]
runpy.run_module("clip_server.gateway", run_name="__main__")
"""


def test_gateway_runs_with_only_what_its_image_installs():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", GATEWAY_IMAGE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "static_resources" in done.stdout and "triton_grpc" in done.stdout
