"""Locust load test for the clip-triton ensembles (encode_text, encode_image, zero_shot) over HTTP or gRPC.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 -u 16 -r 16 -t 60s \
        --csv reports/http --html reports/http.html
    locust -f loadtest/locustfile.py --headless --host grpc://127.0.0.1:8001 -u 16 -r 16 -t 60s --p95-ms 500
    locust -f loadtest/locustfile.py --headless --host grpcs://triton.example:443 --ca-file ca.pem \
        --api-key-file keys.txt ...

The host's scheme picks the protocol and TLS (http, https, grpc, grpcs), as for clip_client and `clip-triton --url`.
TLS always verifies the server's certificate (against --ca-file, else the system's CAs) and its host name.

(loadtest/locustfile.py re-exports this module, loadtest/clip_loadtest/locustfile.py.)

Every option below also reads an environment variable (CLIP_LT_*), so workers in a compose file need no flags.
The quitting gate sets a non-zero exit code on any failure, on too few requests, or when p95/p99 exceed bounds.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from locust import User, events, task
from locust.env import Environment

from clip_common.contract import EncodeImage, EncodeText, ZeroShot
from clip_common.endpoint import Endpoint, EndpointError, parse_endpoint, tritonclient_tls
from clip_loadtest.workload import LABELS, jpeg_images, parse_sizes, short_prompts

log = logging.getLogger("clip_loadtest")

KINDS = ("text", "image", "zero_shot")


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("clip-triton")
    group.add_argument(
        "--protocol",
        choices=["auto", "http", "grpc"],
        default="auto",
        env_var="CLIP_LT_PROTOCOL",
        help="auto: from the host's scheme (http://, https://, grpc://, grpcs://; none: http)",
    )
    group.add_argument(
        "--ca-file",
        default=None,
        env_var="CLIP_LT_CA_FILE",
        help="CA certificates for https:// / grpcs:// hosts (default: the system's)",
    )
    group.add_argument(
        "--api-key-file",
        default=None,
        env_var="CLIP_LT_API_KEY_FILE",
        help="bearer API key: the first key of this file (one per line, '#' comments), as the "
        "gateway's --api-key-file; $CLIP_LT_API_KEY wins, $CLIP_TRITON_API_KEYS is the fallback",
    )
    group.add_argument(
        "--mix",
        default="text=3,image=2,zero_shot=1",
        env_var="CLIP_LT_MIX",
        help="task weights, e.g. 'text=1,image=0,zero_shot=0'",
    )
    group.add_argument(
        "--image-sizes",
        default="224x224,320x240,480x640,640x480,1024x768",
        env_var="CLIP_LT_IMAGE_SIZES",
        help="JPEG sizes (WxH) generated at startup",
    )
    group.add_argument("--num-images", type=int, default=20, env_var="CLIP_LT_NUM_IMAGES", help="distinct JPEGs")
    group.add_argument("--text-batch", type=int, default=1, env_var="CLIP_LT_TEXT_BATCH", help="texts per request")
    group.add_argument("--image-batch", type=int, default=1, env_var="CLIP_LT_IMAGE_BATCH", help="images per request")
    group.add_argument("--labels", type=int, default=10, env_var="CLIP_LT_LABELS", help="zero-shot class prompts")
    group.add_argument("--top-k", type=int, default=5, env_var="CLIP_LT_TOP_K")
    group.add_argument("--seed", type=int, default=0, env_var="CLIP_LT_SEED")
    group.add_argument("--request-timeout", type=float, default=60.0, env_var="CLIP_LT_TIMEOUT", help="seconds")
    group.add_argument("--p95-ms", type=float, default=0.0, env_var="CLIP_LT_P95_MS", help="gate: 0 = no bound")
    group.add_argument("--p99-ms", type=float, default=0.0, env_var="CLIP_LT_P99_MS", help="gate: 0 = no bound")
    group.add_argument(
        "--max-fail-ratio",
        type=float,
        default=0.0,
        env_var="CLIP_LT_MAX_FAIL_RATIO",
        help="gate: failures/requests allowed (0 = none)",
    )
    group.add_argument(
        "--min-requests",
        type=int,
        default=1,
        env_var="CLIP_LT_MIN_REQUESTS",
        help="gate: fewer completed requests fail the run",
    )


def endpoint_of(host: str | None, protocol: str) -> Endpoint:
    """The server a --host (and --protocol, 'auto' = the host's scheme, http when it has none) points at."""
    return parse_endpoint(host, None if protocol == "auto" else protocol, default_protocol="http")


class SettingsError(ValueError):
    """Options that cannot work together (a bad --host, a CA for a plain-text host, an unreadable file)."""


def connection_settings(host: str | None, opts) -> tuple[Endpoint, dict, dict[str, str] | None]:
    """(endpoint, tritonclient TLS keyword arguments, request headers) of the options, checked before any request.

    Raises:
        SettingsError: a bad --host, --ca-file for a plain-text host, an unreadable CA or key file.
    """
    try:
        endpoint = endpoint_of(host, opts.protocol)
    except EndpointError as e:
        raise SettingsError(f"--host: {e}") from None
    ca_file = getattr(opts, "ca_file", None)
    if ca_file:
        if not endpoint.tls:
            raise SettingsError(
                f"--ca-file {ca_file} is for TLS hosts, but {endpoint.url} is plain text: use https:// or grpcs://"
            )
        if not os.access(ca_file, os.R_OK):
            raise SettingsError(f"--ca-file {ca_file}: not a readable file")
    return endpoint, tritonclient_tls(endpoint, ca_file), auth_headers(getattr(opts, "api_key_file", None))


def parse_mix(spec: str) -> dict[str, float]:
    """'text=3,image=2' -> {'text': 3.0, 'image': 2.0, 'zero_shot': 0.0}."""
    mix = dict.fromkeys(KINDS, 0.0)
    for part in filter(None, spec.replace(" ", "").split(",")):
        name, _, weight = part.partition("=")
        if name not in mix:
            raise ValueError(f"--mix: unknown task {name!r} (choose from {', '.join(KINDS)})")
        mix[name] = float(weight or 1)
    if sum(mix.values()) <= 0:
        raise ValueError(f"--mix {spec!r}: all weights are zero")
    return mix


class Workload:
    """Inputs shared by every user of a process, built once from the options."""

    def __init__(self, opts) -> None:
        self.mix = parse_mix(opts.mix)
        self.images = jpeg_images(max(1, opts.num_images), sizes=parse_sizes(opts.image_sizes), seed=opts.seed)
        self.texts = short_prompts(256)
        self.labels = [
            f"a photo of a {LABELS[i % len(LABELS)]}" + ("" if i < len(LABELS) else f" #{i}")
            for i in range(max(1, opts.labels))
        ]
        self.opts = opts


_workload: Workload | None = None
_grpc_gevent = False
_exit_code: int | None = None


def _init_grpc_gevent() -> None:
    """Make gRPC's C core yield to gevent (else one blocking call freezes every user of the process: measured).

    Must run before the first channel exists. Its poller thread then hangs interpreter shutdown, so once locust
    has written its reports and chosen the exit code, `_hard_exit` ends the process with that code.
    """
    global _grpc_gevent
    if not _grpc_gevent:
        import grpc.experimental.gevent as grpc_gevent

        grpc_gevent.init_gevent()
        _grpc_gevent = True


@events.quit.add_listener
def _remember_exit_code(exit_code: int, **_kw) -> None:
    global _exit_code
    _exit_code = exit_code


@atexit.register
def _hard_exit() -> None:
    if _grpc_gevent and _exit_code is not None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code)


@events.init.add_listener
def _on_init(environment: Environment, **_kw) -> None:
    global _workload
    opts = environment.parsed_options
    if opts is None:  # imported by a tool, not started by locust
        return
    if environment.runner is not None and type(environment.runner).__name__ == "MasterRunner":
        return  # the master only aggregates; workers generate load
    try:
        connection_settings(environment.host, opts)
    except SettingsError as e:  # before any user starts: one clear message, not a failure per request
        log.error("clip loadtest: %s", e)
        sys.exit(2)
    _workload = Workload(opts)
    sizes = sorted({len(b) for b in _workload.images})
    log.info("clip loadtest: mix %s, %d JPEGs (%d..%d bytes)", _workload.mix, len(sizes), sizes[0], sizes[-1])


class RequestFailed(Exception):
    """A failed inference as locust's error report shows it (the client exception's type and message)."""


def auth_headers(key_file: str | None = None) -> dict[str, str] | None:
    """`authorization: Bearer KEY` for a gateway with API keys: $CLIP_LT_API_KEY, else the first key of `key_file`
    (--api-key-file: one per line, '#' comments, e.g. the clip-triton chart's Secret), else the first of
    $CLIP_TRITON_API_KEYS (what the compose file gives the gateway); None without any.

    Raises:
        SettingsError: `key_file` cannot be read or holds no key.
    """
    key = os.environ.get("CLIP_LT_API_KEY", "").strip()
    if not key and key_file:
        try:
            with open(key_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise SettingsError(f"--api-key-file {key_file}: cannot read it ({type(e).__name__})") from None
        key = next((line for line in lines if line and not line.startswith("#")), "")
        if not key:
            raise SettingsError(f"--api-key-file {key_file}: no key in it")
    if not key:
        key = os.environ.get("CLIP_TRITON_API_KEYS", "").split(",")[0].strip()
    return {"authorization": f"Bearer {key}"} if key else None


def _bytes_array(items: list[bytes]) -> np.ndarray:
    return np.array(items, dtype=np.object_).reshape(-1, 1)  # BYTES [N, 1]


class CLIPUser(User):
    """One Triton client per user (tritonclient.http is not thread-safe); protocol from --protocol or the host."""

    host = "http://127.0.0.1:8000"

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.rng = random.Random(opts.seed * 7919 + id(self))
        endpoint, tls, self.headers = connection_settings(self.host, opts)  # opts as the master sent them
        self.protocol = endpoint.protocol
        self.timeout = float(opts.request_timeout)
        if self.protocol == "grpc":
            _init_grpc_gevent()
            self.mod = grpcclient
            self.client = grpcclient.InferenceServerClient(url=endpoint.address, **tls)
            self.request_type = "gRPC"
        else:
            self.mod = httpclient
            self.client = httpclient.InferenceServerClient(
                url=endpoint.address,
                concurrency=1,
                connection_timeout=self.timeout,
                network_timeout=self.timeout,
                **tls,
            )
            self.request_type = "HTTP"

    def on_stop(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001  closing a broken connection must not fail the run
            pass

    # ---- requests ------------------------------------------------------------------------------------------------
    def _bytes_input(self, name: str, items: list[bytes]):
        arr = _bytes_array(items)
        inp = self.mod.InferInput(name, list(arr.shape), "BYTES")
        if self.protocol == "http":
            inp.set_data_from_numpy(arr, binary_data=True)
        else:
            inp.set_data_from_numpy(arr)
        return inp

    def _output(self, name: str):
        if self.protocol == "http":
            return self.mod.InferRequestedOutput(name, binary_data=True)
        return self.mod.InferRequestedOutput(name)

    def _infer(
        self, model: str, inputs: list, outputs: list[str] | None, expect: dict[str, tuple[int, ...]], name: str
    ) -> None:
        """One inference, reported to locust with its latency, response size and any error (shape checks included)."""
        start = time.perf_counter()
        length, exc = 0, None
        try:
            kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
            requested = None if outputs is None else [self._output(o) for o in outputs]
            result = self.client.infer(model, inputs, outputs=requested, headers=self.headers, **kwargs)
            for out_name, lead in expect.items():
                arr = result.as_numpy(out_name)
                if arr is None or tuple(arr.shape[: len(lead)]) != lead:
                    raise ValueError(f"{out_name}: shape {None if arr is None else arr.shape}, expected {lead}+")
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise ValueError(f"{out_name}: non-finite values")
                length += arr.nbytes
        except Exception as e:  # noqa: BLE001  server errors, timeouts, bad shapes: a failed request, never a dead user
            exc = RequestFailed(f"{type(e).__name__}: {e}")
        self.environment.events.request.fire(
            request_type=self.request_type,
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exc,
            context={"protocol": self.protocol},
        )

    def text(self) -> None:
        n = max(1, self.environment.parsed_options.text_batch)
        texts = [self.rng.choice(_workload.texts).encode() for _ in range(n)]
        self._infer(
            EncodeText.NAME,
            [self._bytes_input(EncodeText.TEXT, texts)],
            [EncodeText.TEXT_EMBEDS],
            {EncodeText.TEXT_EMBEDS: (n,)},
            EncodeText.NAME if n == 1 else f"{EncodeText.NAME}[{n}]",
        )

    def image(self) -> None:
        n = max(1, self.environment.parsed_options.image_batch)
        images = [self.rng.choice(_workload.images) for _ in range(n)]
        self._infer(
            EncodeImage.NAME,
            [self._bytes_input(EncodeImage.IMAGE, images)],
            [EncodeImage.IMAGE_EMBEDS],
            {EncodeImage.IMAGE_EMBEDS: (n,)},
            EncodeImage.NAME if n == 1 else f"{EncodeImage.NAME}[{n}]",
        )

    def zero_shot(self) -> None:
        labels = _workload.labels
        top_k = self.mod.InferInput(ZeroShot.TOP_K, [1], "INT32")
        top_k.set_data_from_numpy(np.array([self.environment.parsed_options.top_k], dtype=np.int32))
        inputs = [
            self._bytes_input(ZeroShot.TEXT, [t.encode() for t in labels]),
            self._bytes_input(ZeroShot.IMAGE, [self.rng.choice(_workload.images)]),
            top_k,
        ]
        # all outputs: Triton 2.51 answers "unexpected deadlock" when a request names only some outputs of an
        # ensemble whose outputs also feed a later step (text_embeds/image_embeds feed postprocess)
        self._infer(
            ZeroShot.NAME, inputs, None, {ZeroShot.PROBS: (1, len(labels)), ZeroShot.TOPK_TEXTS: (1,)}, ZeroShot.NAME
        )

    @task
    def work(self) -> None:
        """One request, its kind drawn from --mix."""
        kinds = [k for k in KINDS if _workload.mix[k] > 0]
        kind = self.rng.choices(kinds, weights=[_workload.mix[k] for k in kinds])[0]
        getattr(self, kind)()


@events.quitting.add_listener
def _gate(environment: Environment, **_kw) -> None:
    """Non-zero exit on failures, too few requests, or p95/p99 over their bounds (checked where stats aggregate)."""
    if environment.runner is not None and type(environment.runner).__name__ == "WorkerRunner":
        return
    opts = environment.parsed_options
    total = environment.stats.total
    problems = []
    if total.num_requests < opts.min_requests:
        problems.append(f"only {total.num_requests} requests (< {opts.min_requests})")
    if total.num_requests and total.fail_ratio > opts.max_fail_ratio:
        problems.append(f"{total.num_failures} failures ({total.fail_ratio:.2%} > {opts.max_fail_ratio:.2%})")
    for label, q, bound in (("p95", 0.95, opts.p95_ms), ("p99", 0.99, opts.p99_ms)):
        if bound > 0 and total.num_requests:
            for entry in [total, *environment.stats.entries.values()]:
                value = entry.get_response_time_percentile(q)
                if value > bound:
                    problems.append(f"{entry.name} {label} {value:.0f} ms > {bound:.0f} ms")
    if problems:
        log.error("clip loadtest gate: FAIL: %s", "; ".join(problems))
        environment.process_exit_code = 1
    else:
        log.info(
            "clip loadtest gate: pass (%d requests, p95 %.0f ms, p99 %.0f ms)",
            total.num_requests,
            total.get_response_time_percentile(0.95),
            total.get_response_time_percentile(0.99),
        )
