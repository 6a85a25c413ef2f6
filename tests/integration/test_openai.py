"""`clip-triton openai`: the OpenAI-compatible /v1/embeddings front end against the real Triton server.

Driven by the official `openai` SDK (sync and async), LangChain's OpenAIEmbeddings and curl: embeddings equal our own
client's (cosine >= 0.99999) for texts and for images in each dialect (Infinity, NV-CLIP, Jina); keys, errors in
OpenAI's schema, request ids, and image URLs guarded against SSRF.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import pytest

from clip_client import CLIPClient
from tests.integration.openai_helpers import ImageServer, cosine, data_uri, http_get, http_post, png, start_front_end
from tests.integration.triton_helpers import wait_until

KEY = "sk-test-0123456789abcdef"
OTHER_KEY = "sk-second-key-fedcba9876543210"
TEXTS = ["a photo of a cat", "a diagram of a dog", "\u00e4\u00f6\u00fc \U0001f431"]
IMAGES = [png(1), png(2, (64, 64)), png(3, (30, 90))]
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def client(triton_server):
    with CLIPClient(f"grpc://{triton_server.grpc_url}") as c:
        yield c


@pytest.fixture(scope="module")
def front(triton_server):
    fe = start_front_end([triton_server.grpc_url], "--api-key", KEY, "--api-key", OTHER_KEY)
    yield fe
    fe.stop()


@pytest.fixture(scope="module")
def model_name(front) -> str:
    return openai.OpenAI(base_url=front.base_url, api_key=KEY).models.list().data[0].id


@pytest.fixture(scope="module")
def sdk(front):
    return openai.OpenAI(base_url=front.base_url, api_key=KEY, max_retries=0)


def _embeds(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool((cosine(a, b) >= 0.99999).all())


# ------------------------------------------------------------------------------------------------ texts
def test_sdk_texts_equal_client(sdk, model_name, client):
    response = sdk.embeddings.create(model=model_name, input=TEXTS)  # the SDK asks for base64 by default
    assert _same(_embeds(response), client.encode_text(TEXTS))


def test_float_and_base64_formats_agree(front, model_name):
    answers = {}
    for fmt in ("float", "base64"):
        status, body, _ = http_post(
            f"{front.base_url}/embeddings",
            {"model": model_name, "input": TEXTS[0], "encoding_format": fmt},
            {"Authorization": f"Bearer {KEY}"},
        )
        assert status == 200 and body["object"] == "list" and body["data"][0]["object"] == "embedding"
        answers[fmt] = body["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(answers["base64"]), dtype="<f4")
    assert np.array_equal(decoded, np.array(answers["float"], dtype=np.float32))


def test_async_sdk_texts_equal_client(front, model_name, client):
    async def main():
        async with openai.AsyncOpenAI(base_url=front.base_url, api_key=OTHER_KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.embeddings.create(model=model_name, input=t) for t in TEXTS))

    got = np.concatenate([_embeds(r) for r in asyncio.run(main())])
    assert _same(got, client.encode_text(TEXTS))


def test_langchain_openai_embeddings_equal_client(front, model_name, client):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(model=model_name, base_url=front.base_url, api_key=KEY, check_embedding_ctx_length=False)
    got = np.array(emb.embed_documents(TEXTS) + [emb.embed_query(TEXTS[0])], dtype=np.float32)
    assert _same(got, client.encode_text(TEXTS + TEXTS[:1]))


def test_usage_counts_the_real_tokens(sdk, model_name, triton_server):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(triton_server.weights_dir / "tokenizer" / "tokenizer.json"))
    max_length = json.loads((triton_server.weights_dir / "manifest.json").read_text())["tokenizer"]["max_length"]
    expected = sum(min(len(tokenizer.encode(t).ids), max_length) for t in TEXTS)
    usage = sdk.embeddings.create(model=model_name, input=TEXTS + [data_uri(IMAGES[0])]).usage
    assert (usage.prompt_tokens, usage.total_tokens) == (expected, expected)


# ------------------------------------------------------------------------------------------------ images
def test_images_in_every_dialect_equal_client(sdk, model_name, client):
    expected_images = client.encode_image(IMAGES)
    expected_text = client.encode_text(TEXTS[:1])
    uris = [data_uri(b) for b in IMAGES]
    infinity = sdk.embeddings.create(model=model_name, input=uris, extra_body={"modality": "image"})
    nvclip = sdk.embeddings.create(model=model_name, input=[TEXTS[0], *uris])  # data URIs mixed with texts
    jina = sdk.embeddings.create(
        model=model_name,
        input=[
            {"text": TEXTS[0]},
            {"image": uris[0]},
            {"image": base64.b64encode(IMAGES[1]).decode()},
            {"image": uris[2]},
        ],
    )
    assert _same(
        np.concatenate([_embeds(infinity), _embeds(nvclip), _embeds(jina)]),
        np.concatenate([expected_images, expected_text, expected_images, expected_text, expected_images]),
    )


def test_bad_image_is_400_and_the_server_stays_healthy(front, sdk, model_name, client):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.embeddings.create(model=model_name, input=[TEXTS[0], data_uri(b"not an image at all")])
    error = info.value.body
    assert (info.value.status_code, "image" in error["message"], "/" in error["message"].split(":", 1)[0]) == (
        400,
        True,
        False,
    )
    assert http_get(f"http://127.0.0.1:{front.port}/health")[0] == 200
    assert _same(_embeds(sdk.embeddings.create(model=model_name, input=TEXTS)), client.encode_text(TEXTS))


# ------------------------------------------------------------------------------------------------ errors, keys, ids
def test_wrong_or_missing_key_is_401(front, model_name):
    wrong = openai.OpenAI(base_url=front.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model=model_name, input="x")
    status, body, headers = http_post(f"{front.base_url}/embeddings", {"model": model_name, "input": "x"})
    assert (status, body["error"]["code"], headers.get("www-authenticate")) == (401, "invalid_api_key", "Bearer")


def test_health_is_open_and_models_need_a_key(front):
    root = f"http://127.0.0.1:{front.port}"
    assert (http_get(f"{root}/health")[0], http_get(f"{root}/v1/models")[0]) == (200, 401)


def test_unknown_model_is_404(sdk, model_name):
    with pytest.raises(openai.NotFoundError) as info:
        sdk.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.NotFoundError) as retrieve:
        sdk.models.retrieve("text-embedding-3-small")
    assert (info.value.body["code"], retrieve.value.body["code"], sdk.models.retrieve(model_name).id) == (
        "model_not_found",
        "model_not_found",
        model_name,
    )


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"input": [[1, 2, 3]]}, "input", "token_ids_not_supported"),
        ({"input": [1, 2, 3]}, "input", "token_ids_not_supported"),
        ({"input": "x", "dimensions": 64}, "dimensions", "dimensions_not_supported"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", None),
        ({"input": []}, "input", None),
        ({"input": [{"audio": "x"}]}, "input[0]", None),
        ({"input": ["https://example.com/a.png"], "modality": "image"}, "input[0]", "url_fetch_disabled"),
    ],
)
def test_refused_requests_are_400_in_openai_schema(front, model_name, body, param, code):
    status, answer, headers = http_post(
        f"{front.base_url}/embeddings", {"model": model_name, **body}, {"Authorization": f"Bearer {KEY}"}
    )
    error = answer["error"]
    assert (status, error["type"], error["param"], error["code"], set(error)) == (
        400,
        "invalid_request_error",
        param,
        code,
        {"message", "type", "param", "code"},
    )


def test_body_over_the_cap_is_413(triton_server, model_name):
    fe = start_front_end([triton_server.grpc_url], "--max-body-bytes", "4096", env=_env_keys())
    try:
        status, answer, _ = http_post(
            f"{fe.base_url}/embeddings", {"model": model_name, "input": "x" * 5000}, {"Authorization": f"Bearer {KEY}"}
        )
    finally:
        fe.stop()
    assert (status, answer["error"]["type"]) == (413, "invalid_request_error")


def test_request_id_is_honoured_and_logged(front, model_name):
    status, _, headers = http_post(
        f"{front.base_url}/embeddings",
        {"model": model_name, "input": "x"},
        {"Authorization": f"Bearer {KEY}", "x-request-id": "trace-abc-123"},
    )
    fresh = http_post(f"{front.base_url}/embeddings", {"model": model_name, "input": "x"})[2]["x-request-id"]
    assert (status, headers["x-request-id"], bool(re.fullmatch(r"[0-9a-f]{32}", fresh))) == (200, "trace-abc-123", True)
    # the log line is written after the answer: read the front end's output until both ids are there (or 10 s)
    assert wait_until(lambda: "request_id=trace-abc-123" in front.log() and f"request_id={fresh}" in front.log(), 10)


def _env_keys() -> dict:
    import os

    return {**os.environ, "CLIP_TRITON_API_KEYS": f"{KEY},{OTHER_KEY}"}


# ------------------------------------------------------------------------------------------------ image URLs (SSRF)
@pytest.fixture(scope="module")
def image_server():
    server = ImageServer(IMAGES[0], address="127.0.0.2")  # the whole 127/8 is loopback on Linux
    yield server
    server.close()


@pytest.fixture(scope="module")
def fetching_front(triton_server):
    """URL fetching on, private targets refused, except the network 127.0.0.2/32 (an 'internal image store')."""
    fe = start_front_end(
        [triton_server.grpc_url],
        "--allow-url-fetch",
        "--allow-url-network",
        "127.0.0.2/32",
        "--fetch-timeout",
        "5",
        env=_env_keys(),
    )
    yield fe
    fe.stop()


def test_url_image_equals_client(fetching_front, image_server, model_name, client):
    sdk = openai.OpenAI(base_url=fetching_front.base_url, api_key=KEY, max_retries=0)
    response = sdk.embeddings.create(
        model=model_name, input=[f"{image_server.url}/img.png"], extra_body={"modality": "image"}
    )
    assert _same(_embeds(response), client.encode_image(IMAGES[:1]))


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/img.png",  # loopback
        "http://localhost:{port}/img.png",  # a name resolving to loopback
        "http://[::1]:{port}/img.png",
        "http://[::ffff:127.0.0.1]:{port}/img.png",  # IPv4-mapped IPv6
        "http://10.0.0.1/img.png",  # private
        "http://192.168.1.1/img.png",
        "http://169.254.169.254/latest/meta-data/",  # link-local (cloud metadata)
        "http://0.0.0.0:{port}/img.png",
        "{allowed}/redirect?to=http://127.0.0.1:{port}/img.png",  # an allowed host redirecting to loopback
        "{allowed}/redirect?to=http://169.254.169.254/",
        "{allowed}/redirect?to=file:///etc/passwd",  # another scheme
        "{allowed}/redirect?to=ftp://127.0.0.2/img.png",
        "file:///etc/passwd",
        "gopher://127.0.0.2/",
    ],
)
def test_ssrf_attempts_are_refused(fetching_front, image_server, model_name, target):
    port = image_server.url.rsplit(":", 1)[1]
    url = target.format(port=port, allowed=image_server.url)
    before = len(image_server.hits)
    status, answer, _ = http_post(
        f"{fetching_front.base_url}/embeddings",
        {"model": model_name, "input": [{"image": url}]},
        {"Authorization": f"Bearer {KEY}"},
    )
    followed = [h for h in image_server.hits[before:] if not h.startswith("/redirect")]
    assert (status, answer["error"]["param"], followed) == (400, "input[0]", [])


# ------------------------------------------------------------------------------------------------ README examples
def _readme_block(lang: str, marker: str) -> str:
    section = README.read_text(encoding="utf-8").split("## OpenAI-compatible API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)
    return next(b for b in blocks if marker in b)


def _readme_env(front, model_name) -> dict:
    import os

    return {**os.environ, "CLIP_TRITON_API_KEY": KEY, "OPENAI_BASE_URL": front.base_url, "CLIP_MODEL": model_name}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_readme_curl_example_runs(front, model_name, client):
    script = _readme_block("bash", "curl")
    out = subprocess.run(
        ["bash", "-c", script], env=_readme_env(front, model_name), capture_output=True, text=True, timeout=60
    )
    body = json.loads(out.stdout)
    assert _same(
        np.array([d["embedding"] for d in body["data"]], dtype=np.float32), client.encode_text(["a photo of a cat"])
    )


def test_readme_python_examples_run(front, model_name, client):
    for marker in ("from openai import OpenAI", "OpenAIEmbeddings"):
        script = _readme_block("python", marker)
        out = subprocess.run(
            [sys.executable, "-c", script + "\nimport json, sys; json.dump(vectors, sys.stdout)"],
            env=_readme_env(front, model_name),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        vectors = np.array(json.loads(out.stdout), dtype=np.float32)
        assert _same(vectors, client.encode_text(["a photo of a cat", "a diagram of a dog"])), marker


# ------------------------------------------------------------------------------------------------ serve --openai-port
def test_serve_starts_the_front_end_beside_the_server(triton_repository, client):
    import os
    import signal
    import time

    from clip_server import free_port

    ports = [free_port() for _ in range(4)]
    cmd = [
        sys.executable,
        "-m",
        "clip_client.cli",
        "serve",
        "--repository",
        str(triton_repository),
        "--http-port",
        str(ports[0]),
        "--grpc-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
        "--openai-port",
        str(ports[3]),
        "--no-supervise",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CLIP_TRITON_API_KEYS": KEY}
    )
    try:
        deadline = time.monotonic() + 180
        while http_get(f"http://127.0.0.1:{ports[3]}/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[3]}/v1", api_key=KEY, max_retries=0)
        got = _embeds(sdk.embeddings.create(model=sdk.models.list().data[0].id, input=TEXTS))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert (_same(got, client.encode_text(TEXTS)), code) == (True, 0)


# ------------------------------------------------------------------------------------------------ upstreams
def test_a_dead_upstream_beside_a_live_one_costs_no_error(triton_server, model_name, client):
    from clip_server import free_port

    # the live one by name: it is resolved, and every address it resolves to gets its own channel
    live = "localhost:" + triton_server.grpc_url.rsplit(":", 1)[1]
    fe = start_front_end([f"127.0.0.1:{free_port()}", live], env=_env_keys())
    try:
        sdk = openai.OpenAI(base_url=fe.base_url, api_key=KEY, max_retries=0)
        got = np.concatenate([_embeds(sdk.embeddings.create(model=model_name, input=t)) for t in TEXTS * 3])
    finally:
        fe.stop()
    assert _same(got, client.encode_text(TEXTS * 3))


def test_no_live_upstream_is_503_in_openai_schema(model_name):
    import os

    from clip_server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clip_client.cli",
            "openai",
            "--upstream",
            f"grpc://127.0.0.1:{free_port()}",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "CLIP_TRITON_API_KEYS": KEY},
    )
    try:
        assert wait_until(lambda: http_get(f"http://127.0.0.1:{port}/health")[0] == 503, 30)
        live = http_get(f"http://127.0.0.1:{port}/health/live")[0]
        status, body, _ = http_post(
            f"http://127.0.0.1:{port}/v1/embeddings",
            {"model": model_name, "input": "x"},
            {"Authorization": f"Bearer {KEY}"},
        )
    finally:
        proc.terminate()
        proc.wait(20)
    assert (status, body["error"]["type"], live) == (503, "server_error", 200)


# ------------------------------------------------------------------------------------------------ several models
@pytest.fixture(scope="module")
def two_models(weights, tmp_path_factory):
    """A repository serving two models (the second one's Triton names prefixed "minilm__") and a front end on it."""
    from clip_build.repository import build_repositories
    from tests.integration.triton_helpers import serving

    repo = build_repositories(
        [("clip", weights("clip")), ("minilm", weights("bert_vit"))], tmp_path_factory.mktemp("two_models")
    )
    with serving(repo, exit_timeout=3) as server:
        fe = start_front_end([server.grpc_url], env=_env_keys())
        try:
            yield server, fe
        finally:
            fe.stop()


def test_every_served_model_has_an_id_and_its_own_embeddings(two_models):
    server, fe = two_models
    sdk = openai.OpenAI(base_url=fe.base_url, api_key=KEY, max_retries=0)
    ids = [m.id for m in sdk.models.list().data]
    got = {name: _embeds(sdk.embeddings.create(model=name, input=TEXTS)) for name in ids}
    same = {}
    for name in ids:
        with CLIPClient(f"grpc://{server.grpc_url}", model=name) as own:
            same[name] = _same(got[name], own.encode_text(TEXTS))
    assert (ids, same) == (["clip", "minilm"], {"clip": True, "minilm": True})


def test_bytes_in_flight_are_bounded(triton_server, model_name):
    """A body still arriving holds its bytes: a second request that would pass the budget gets 429, not memory."""
    import socket

    fe = start_front_end(
        [triton_server.grpc_url], "--max-body-bytes", "10000", "--max-inflight-bytes", "10000", env=_env_keys()
    )
    held = socket.create_connection(("127.0.0.1", fe.port))
    try:
        head = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 9000\r\n\r\n"
        )
        held.sendall(head.encode() + b"{" + b" " * 6000)  # 6001 of 9000 bytes, the rest never comes
        body = {"model": model_name, "input": "x" * 5000}
        statuses = []
        for _ in range(20):  # until the held body's bytes are counted (they are read as they arrive)
            status, answer, _ = http_post(f"{fe.base_url}/embeddings", body, {"Authorization": f"Bearer {KEY}"})
            statuses.append((status, answer.get("error", {}).get("code")))
            if status == 429:
                break
            time.sleep(0.2)
    finally:
        held.close()
        fe.stop()
    assert statuses[-1] == (429, "server_busy")


def test_a_trickled_body_gets_408_and_frees_its_bytes(triton_server, model_name):
    import socket

    fe = start_front_end(
        [triton_server.grpc_url],
        "--max-body-bytes",
        "10000",
        "--max-inflight-bytes",
        "10000",
        "--body-timeout",
        "1",
        env=_env_keys(),
    )
    held = socket.create_connection(("127.0.0.1", fe.port), timeout=10)
    try:
        head = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 9000\r\n\r\n"
        )
        held.sendall(head.encode() + b"{" + b" " * 6000)
        answer = held.recv(4096).split(b"\r\n", 1)[0]  # the front end answers the half-sent request itself
        status = http_post(
            f"{fe.base_url}/embeddings", {"model": model_name, "input": "x" * 5000}, {"Authorization": f"Bearer {KEY}"}
        )[0]
    finally:
        held.close()
        fe.stop()
    assert (answer, status) == (b"HTTP/1.1 408 Request Timeout", 200)


def test_an_answer_from_another_model_id_is_refused_and_triggers_discovery(triton_server):
    """The catalog says model_id X; the server answers as Y (rebuilt, or a rolling update mixing versions): the call
    fails with MODEL_CHANGED (503 for the caller, who retries) and clip_info is read again at once."""
    from clip_server.openai_api.upstream import UpstreamError, Upstreams

    async def main():
        upstreams = Upstreams([triton_server.grpc_url], timeout=30)
        await upstreams.start()
        try:
            model = next(iter((await upstreams.discover()).models.values()))
            served_id, model.model_id = model.model_id, "a-model-id-the-server-no-longer-has"
            with pytest.raises(UpstreamError) as info:
                await upstreams.encode_texts(model, [b"a cat"], "rid")
            return info.value.status, upstreams.changed.is_set(), served_id in info.value.message
        finally:
            await upstreams.close()

    assert asyncio.run(main()) == ("MODEL_CHANGED", True, True)


def test_model_id_is_an_alias_of_the_name(front, model_name, triton_server):
    model_id = json.loads((triton_server.repository / "clip_triton.json").read_text())["model_id"]
    status, body, _ = http_post(
        f"{front.base_url}/embeddings", {"model": model_id, "input": "x"}, {"Authorization": f"Bearer {KEY}"}
    )
    assert (status, body["model"]) == (200, model_name)


# ------------------------------------------------------------------------------------------------ found by attack
def test_2048_texts_in_one_request_equal_client(sdk, model_name, client):
    texts = [f"caption number {i}" for i in range(2048)]  # OpenAI's own limit; LangChain sends 1000 at once
    assert _same(_embeds(sdk.embeddings.create(model=model_name, input=texts)), client.encode_text(texts))


@pytest.mark.parametrize("path", ["/caf\u00e9 \u732b.png", "/img.png?name=\u00fc"])
def test_non_ascii_image_url_equals_client(fetching_front, image_server, model_name, client, path):
    sdk = openai.OpenAI(base_url=fetching_front.base_url, api_key=KEY, max_retries=0)
    response = sdk.embeddings.create(model=model_name, input=[{"image": image_server.url + path}])
    assert _same(_embeds(response), client.encode_image(IMAGES[:1]))


def test_uppercase_url_scheme_equals_client(fetching_front, image_server, model_name, client):
    sdk = openai.OpenAI(base_url=fetching_front.base_url, api_key=KEY, max_retries=0)
    url = image_server.url.replace("http://", "HTTP://") + "/img.png"
    response = sdk.embeddings.create(model=model_name, input=[url], extra_body={"modality": "image"})
    assert _same(_embeds(response), client.encode_image(IMAGES[:1]))


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:99999/img.png",  # port out of range
        "http://127.0.0.2:abc/img.png",
        "http://[::1/img.png",  # unclosed bracket
        "http://\u2460\u2461\u2466.0.0.1:{port}/img.png",  # circled digits: IDNA makes it 127.0.0.1 (loopback)
    ],
)
def test_malformed_or_disguised_image_urls_are_400(fetching_front, image_server, model_name, target):
    url = target.format(port=image_server.url.rsplit(":", 1)[1])
    status, answer, _ = http_post(
        f"{fetching_front.base_url}/embeddings",
        {"model": model_name, "input": [{"image": url}]},
        {"Authorization": f"Bearer {KEY}"},
    )
    assert (status, answer["error"]["param"], answer["error"]["code"]) == (400, "input[0]", "image_url_refused")


def test_a_refused_image_is_named_by_its_index_in_input(sdk, model_name):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.embeddings.create(model=model_name, input=[TEXTS[0], data_uri(IMAGES[0]), data_uri(b"not an image")])
    assert (info.value.body["param"], info.value.body["message"].startswith("input[2]: ")) == ("input[2]", True)


def test_bodies_cut_off_by_the_client_give_their_bytes_back(triton_server, model_name):
    """Callers that hang up mid-body must not leak their bytes from the in-flight budget (else: 429 for everyone)."""
    import socket

    fe = start_front_end(
        [triton_server.grpc_url], "--max-body-bytes", "10000", "--max-inflight-bytes", "10000", env=_env_keys()
    )
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 9000\r\n\r\n"
    )
    try:
        for _ in range(5):  # 5 x 6001 bytes taken and never returned would exhaust the 10000-byte budget
            cut = socket.create_connection(("127.0.0.1", fe.port), timeout=10)
            cut.sendall(head.encode() + b"{" + b" " * 6000)
            time.sleep(0.3)  # the bytes are read (and counted) as they arrive
            cut.close()
        time.sleep(0.5)
        status = http_post(
            f"{fe.base_url}/embeddings", {"model": model_name, "input": "x" * 5000}, {"Authorization": f"Bearer {KEY}"}
        )[0]
    finally:
        fe.stop()
    assert status == 200


@pytest.mark.parametrize(
    "encode",
    [
        lambda b: "data:image/png;base64," + base64.encodebytes(b).decode(),  # wrapped every 76 characters
        lambda b: "DATA:IMAGE/PNG;BASE64," + base64.b64encode(b).decode(),  # the scheme is case-insensitive
        lambda b: {"image": base64.urlsafe_b64encode(b).decode().rstrip("=")},  # URL-safe, unpadded
    ],
    ids=["line-wrapped", "upper-case", "urlsafe-unpadded"],
)
def test_base64_images_as_encoders_write_them_equal_client(sdk, model_name, client, encode):
    image = png(7, (64, 64))
    response = sdk.embeddings.create(model=model_name, input=[encode(image)])
    assert _same(_embeds(response), client.encode_image([image]))


def test_a_key_file_saved_with_a_bom_and_crlf_works(triton_server, model_name, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\r\n" + OTHER_KEY.encode() + b"\r\n")  # Windows Notepad
    fe = start_front_end([triton_server.grpc_url], "--api-key-file", str(key_file))
    try:
        listed = openai.OpenAI(base_url=fe.base_url, api_key=KEY, max_retries=0).models.list().data[0].id
    finally:
        fe.stop()
    assert listed == model_name
