"""The OpenAI front end's pure parts: request parsing (three image dialects), SSRF address checks, API keys, and the
compose service's command against the real argument parsers."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import numpy as np
import pytest
import yaml

from clip_server.api_keys import load_api_keys
from clip_server.openai_api import add_arguments, settings_from_args
from clip_server.openai_api.app import _digest, key_ok
from clip_server.openai_api.fetch import FetchError, address_allowed, ascii_url
from clip_server.openai_api.schema import APIError, parse_request, response_body

ROOT = Path(__file__).resolve().parents[2]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"x" * 20).decode()


def test_the_three_image_dialects_and_texts():
    req = parse_request(
        {
            "model": "m",
            "input": [
                "a cat",
                f"data:image/png;base64,{PNG}",
                {"text": "b"},
                {"image": PNG},
                {"image": "https://example.com/a.png"},
            ],
        },
        1024,
    )
    infinity = parse_request(
        {"model": "m", "modality": "image", "input": [f"data:image/jpeg;base64,{PNG}", "http://example.com/x"]}, 1024
    )
    assert [i.kind for i in req.items] + [i.kind for i in infinity.items] == [
        "text",
        "image",
        "text",
        "image",
        "url",
        "image",
        "url",
    ]


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "m", "input": [[1, 2]]}, 400, "input"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x"}, 400, "model"),
        ({"model": "m", "input": ["data:image/png;base64,@@@"]}, 400, "input[0]"),
        ({"model": "m", "input": [f"data:image/png;base64,{'A' * 4000}"]}, 413, "input[0]"),
        ({"model": "m", "input": ["x", "\ud800"]}, 400, "input[1]"),
        ({"model": "m", "input": [{"text": "a", "image": "b"}]}, 400, "input[0]"),
        ({"model": "m", "modality": "image", "input": ["just text"]}, 400, "input[0]"),
        ({"model": "m", "input": ["data:image/svg+xml,<svg/>"]}, 400, "input[0]"),  # an image, but not base64
    ],
)
def test_refusals_name_the_parameter(body, status, param):
    with pytest.raises(APIError) as info:
        parse_request(body, 1024)
    assert (info.value.status, info.value.param) == (status, param)


def test_base64_answer_is_little_endian_float32():
    embeds = np.array([[0.5, -1.25, 3.0]], dtype=np.float32)
    body = response_body("m", embeds, "base64", 7)
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert (decoded.tolist(), body["usage"]) == ([0.5, -1.25, 3.0], {"prompt_tokens": 7, "total_tokens": 7})


@pytest.mark.parametrize(
    "address, allowed",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),
        ("64:ff9b::7f00:1", False),  # NAT64 (RFC 6052) of loopback
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of the cloud metadata address
        ("64:ff9b:1::808:808", False),  # local-use NAT64 (RFC 8215)
        ("::7f00:1", False),  # IPv4-compatible loopback
        ("::ffff:0:a00:1", False),  # IPv4-translated (SIIT) private
        ("64:ff9b::808:808", True),  # NAT64 of a public address
        ("224.0.0.1", False),
        ("255.255.255.255", False),
    ],
)
def test_only_public_addresses_are_fetched(address, allowed):
    assert address_allowed(address, allow_private=False) is allowed


@pytest.mark.parametrize(
    "url, sent",
    [
        ("http://example.com/caf\u00e9.png?q=\u00fc", "http://example.com/caf%C3%A9.png?q=%C3%BC"),
        ("http://\u2460\u2461\u2466.0.0.1:80/", "http://127.0.0.1:80/"),  # IDNA-normalised: then judged as loopback
        ("http://example.com/a.png", "http://example.com/a.png"),
    ],
)
def test_urls_are_sent_as_ascii(url, sent):
    assert ascii_url(url) == sent


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/", "http://[::1/", "http://x:abc/"])
def test_malformed_urls_are_fetch_errors(url):
    with pytest.raises(FetchError):
        ascii_url(url)


def test_allowed_networks_open_only_themselves():
    assert [address_allowed(a, False, ["10.1.0.0/16"]) for a in ("10.1.2.3", "10.2.0.1")] == [True, False]


def test_keys_from_flags_file_and_env(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text("# comment\nk2\n\nk3\n")
    monkeypatch.setenv("CLIP_TRITON_API_KEYS", "k3, k4")
    assert load_api_keys(["k1"], str(path)) == ["k1", "k2", "k3", "k4"]


def test_key_check():
    digests = [_digest("alpha"), _digest("beta")]
    got = [key_ok(h, digests) for h in ("Bearer alpha", "bearer beta", "Bearer gamma", "alpha", None, "Bearer ")]
    assert got == [True, True, False, False, False, False]


def test_compose_runs_the_front_end_behind_the_gateway(monkeypatch):
    from clip_server.gateway import add_arguments as gateway_arguments

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    monkeypatch.setenv("CLIP_TRITON_API_KEYS", "k")
    parser = argparse.ArgumentParser()
    add_arguments(parser, "openai")
    args = parser.parse_args(services["openai"]["command"])
    settings = settings_from_args(args, ["triton:8001"])
    gateway = argparse.ArgumentParser()
    gateway_arguments(gateway, "gateway")
    gw = gateway.parse_args(services["gateway"]["command"])
    assert (gw.openai_upstream, settings.api_keys, services["openai"]["build"]["target"]) == (
        f"openai:{args.port}",
        ["k"],
        "openai",
    )
