"""`clip-triton gateway` with API keys, TLS (a self-signed certificate made here) and the OpenAI front end behind
/v1/*, in front of the real Triton server; and the allowlist's N__-prefixed public model names."""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path

import grpc
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clip_client import CLIPClient
from clip_common.contract import EncodeText
from tests.integration.gateway_helpers import self_signed_certificate, start_gateway
from tests.integration.openai_helpers import cosine, start_front_end

KEY = "gw-key-0123456789abcdef0123"
OTHER_KEY = "gw.key+two/==9876543210"  # regex metacharacters must not matter
TEXTS = ["a photo of a cat", "a diagram"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (openssl CLI)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    self_signed_certificate(cert, key, "DNS:localhost,IP:127.0.0.1")
    return cert, key


@pytest.fixture(scope="module")
def front(triton_server):
    fe = start_front_end([triton_server.grpc_url], "--api-key", KEY, "--api-key", OTHER_KEY)
    yield fe
    fe.stop()


@pytest.fixture(scope="module")
def edge(triton_server, certificate, front, tmp_path_factory):
    """The gateway with TLS, two keys (one from a file) and /v1/* to the front end."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# gateway keys\n{OTHER_KEY}\n")
    server = triton_server.server
    gw = start_gateway(
        [f"127.0.0.1:{server.http_port}:{server.grpc_port}"],
        "--api-key",
        KEY,
        "--api-key-file",
        str(key_file),
        "--tls-cert",
        str(certificate[0]),
        "--tls-key",
        str(certificate[1]),
        "--openai-upstream",
        f"127.0.0.1:{front.port}",
        "--health-interval",
        "0.5",
    )
    yield gw
    gw.stop()


def _https(edge, certificate, method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(certificate[0]))
    conn = http.client.HTTPSConnection("127.0.0.1", edge.http_port, timeout=30, context=context)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _infer_body(text: str) -> bytes:
    return json.dumps(
        {
            "inputs": [{"name": EncodeText.TEXT, "shape": [1, 1], "datatype": "BYTES", "data": [text]}],
            "outputs": [{"name": EncodeText.TEXT_EMBEDS}],
        }
    ).encode()


def test_https_with_a_key_equals_direct(edge, certificate, triton_server):
    infer = f"/v2/models/{EncodeText.NAME}/infer"
    answers = [
        _https(edge, certificate, "POST", infer, _infer_body(TEXTS[0]), authorization=f"Bearer {k}")
        for k in (KEY, OTHER_KEY)
    ]
    got = [np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32) for _, body in answers]
    with CLIPClient(f"grpc://{triton_server.grpc_url}") as client:
        expected = client.encode_text(TEXTS[0], normalize=False)
    assert [s for s, _ in answers] == [200, 200] and all(cosine(g, expected)[0] >= 0.99999 for g in got)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": KEY},
        {"authorization": f"Bearer {KEY}x"},
        {"authorization": f"Basic {KEY}"},
    ],
)
def test_http_without_the_right_key_is_401(edge, certificate, headers):
    status, body = _https(edge, certificate, "POST", f"/v2/models/{EncodeText.NAME}/infer", _infer_body("x"), **headers)
    assert (status, json.loads(body)) == (
        401,
        {"error": "missing or wrong API key: send the header 'authorization: Bearer KEY'"},
    )


def test_health_stays_open(edge, certificate):
    live = _https(edge, certificate, "GET", "/v2/health/live")[0]
    ready = _https(edge, certificate, "GET", "/v2/health/ready")[0]
    metadata = _https(edge, certificate, "GET", "/v2")[0]
    assert (live, ready, metadata) == (200, 200, 401)


def test_plain_text_is_not_served_on_the_tls_port(edge):
    conn = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=10)
    try:
        conn.request("GET", "/v2/health/ready")
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.getresponse()
    finally:
        conn.close()


def _grpc_client(edge, certificate) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        f"localhost:{edge.grpc_port}", ssl=True, root_certificates=str(certificate[0])
    )


def _text_input() -> grpcclient.InferInput:
    inp = grpcclient.InferInput(EncodeText.TEXT, [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[TEXTS[0].encode()]], dtype=object))
    return inp


def test_grpc_over_tls_needs_the_key_but_not_for_health(edge, certificate):
    client = _grpc_client(edge, certificate)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(EncodeText.NAME, [_text_input()])
    answer = client.infer(EncodeText.NAME, [_text_input()], headers={"authorization": f"Bearer {KEY}"})
    assert (refused.value.status(), client.is_server_ready(), answer.as_numpy(EncodeText.TEXT_EMBEDS).shape[0]) == (
        str(grpc.StatusCode.UNAUTHENTICATED),
        True,
        1,
    )


def test_openai_sdk_through_the_gateway(edge, certificate, triton_server):
    http_client = httpx.Client(verify=str(certificate[0]))
    sdk = openai.OpenAI(
        base_url=f"https://localhost:{edge.http_port}/v1", api_key=KEY, http_client=http_client, max_retries=0
    )
    model = sdk.models.list().data[0].id
    got = np.array([d.embedding for d in sdk.embeddings.create(model=model, input=TEXTS).data], dtype=np.float32)
    with CLIPClient(f"grpc://{triton_server.grpc_url}") as client:
        expected = client.encode_text(TEXTS)
    wrong = openai.OpenAI(base_url=sdk.base_url, api_key="nope", http_client=http_client, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model=model, input=TEXTS)
    assert bool((cosine(got, expected) >= 0.99999).all())


# ------------------------------------------------------------------------------------------------ N__ prefixes
@pytest.fixture(scope="module")
def plain_gateway(triton_server):
    server = triton_server.server
    gw = start_gateway([f"127.0.0.1:{server.http_port}:{server.grpc_port}"], "--health-interval", "0.5")
    yield gw
    gw.stop()


def test_prefixed_public_names_reach_triton_and_prefixed_internal_ones_do_not(plain_gateway):
    def status(path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", plain_gateway.http_port, timeout=30)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}").get("error", "")
        finally:
            conn.close()

    public, internal = status("/v2/models/siglip__encode_text/ready"), status("/v2/models/siglip__text_encoder/ready")
    # Triton answers the first (no such model here: its own 400), the edge the second
    assert (public[0], "gateway" in public[1], internal[0], "gateway" in internal[1]) == (400, False, 403, True)


def test_prefixed_names_over_grpc(plain_gateway):
    client = grpcclient.InferenceServerClient(plain_gateway.grpc_url)
    answers = []
    for name in ("siglip__encode_text", "siglip__preprocess_text"):
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata(name)
        answers.append(info.value.status())
    # the public name reaches Triton (which has no such model), the internal one is refused at the edge
    assert answers == [str(grpc.StatusCode.NOT_FOUND), str(grpc.StatusCode.PERMISSION_DENIED)]


# ------------------------------------------------------------------------------------------------ found by attack
@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer "])
def test_the_bearer_scheme_is_case_insensitive(edge, certificate, scheme):
    # RFC 9110: the auth scheme is case-insensitive; the front end behind /v1/* takes it so, the gateway must too
    infer = f"/v2/models/{EncodeText.NAME}/infer"
    status, _ = _https(edge, certificate, "POST", infer, _infer_body("x"), authorization=f"{scheme} {KEY}")
    assert status == 200


def test_gateway_refusals_on_v1_are_in_openai_schema(edge, certificate):
    body = json.dumps({"model": "any", "input": "x"}).encode()
    status, answer = _https(edge, certificate, "POST", "/v1/embeddings", body, authorization="Bearer wrong")
    error = json.loads(answer)["error"]
    assert (status, set(error), error["type"], error["code"]) == (
        401,
        {"message", "type", "param", "code"},
        "invalid_request_error",
        "invalid_api_key",
    )
