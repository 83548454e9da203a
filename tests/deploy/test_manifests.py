"""deploy/*.yaml: valid Kubernetes objects, written the way Istio's injector writes them, and accepted by this agent.

Schema validation uses kubernetes-validate's newest bundled schemas in strict mode (unknown fields are errors), which
covers native sidecars (`restartPolicy` on an init container, Kubernetes >= 1.29). What a schema cannot see is checked
by hand: the agent's own CLI parser accepts every argv the manifests give it, `pilot-agent render` turns the
manifest's env and the downward-API files kubelet would write into a bootstrap with the pod's identity, probes and
ports are Istio's, every mount has a volume, selectors select.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from agent.cli import build_parser
from tests.support.envoy import envoy_binary, new_base_id, remove_shm
from tests.support.kube_values import PodIdentity
from tests.support.pod import Image, Pod, find_container, load_documents, pod_template

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VARIANTS = ("sidecar", "native-sidecar", "hold-application", "no-control-plane")
K8S_VERSION = all_versions()[-1]

ISTIO_INIT_ARGS = [
    "istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
    "-d", "15090,15021,15020", "--log_output_level=default:info",
]  # fmt: skip
ISTIO_PROXY_ARGS = [
    "proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local", "--proxyLogLevel=warning",
    "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info",
]  # fmt: skip
# The injection template's env order (reference §8); the manifests use a subset, in this order.
ISTIO_ENV_ORDER = [
    "ISTIO_LOCAL_XDS_DIR", "PILOT_CERT_PROVIDER", "CA_ADDR", "POD_NAME", "POD_NAMESPACE", "INSTANCE_IP",
    "SERVICE_ACCOUNT", "HOST_IP", "ISTIO_CPU_LIMIT", "PROXY_CONFIG", "ISTIO_META_POD_PORTS",
    "ISTIO_META_APP_CONTAINERS", "GOMEMLIMIT", "ISTIO_META_CLUSTER_ID", "ISTIO_META_NODE_NAME",
    "ISTIO_META_INTERCEPTION_MODE", "ISTIO_META_WORKLOAD_NAME", "ISTIO_META_OWNER", "ISTIO_META_MESH_ID",
    "TRUST_DOMAIN", "ISTIO_KUBE_APP_PROBERS",
]  # fmt: skip
APP_PROBER_KEY = re.compile(r"^/(app-health|app-lifecycle)/[^/]+/(livez|readyz|startupz|prestopz|poststartz)$")


def _all_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in sorted(DEPLOY.glob("*.yaml"))
        for doc in load_documents(path)
    ]


def _deployment(variant: str) -> dict[str, Any]:
    return next(doc for doc in load_documents(DEPLOY / f"{variant}.yaml") if doc["kind"] == "Deployment")


def _spec(variant: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return pod_template(_deployment(variant))


def _proxy(variant: str) -> dict[str, Any]:
    return find_container(_spec(variant)[1], "istio-proxy")[0]


def _env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {var["name"]: var for var in container.get("env", [])}


def _parse(argv: list[str]) -> tuple[Any, list[str]]:
    args, unknown = build_parser().parse_known_args(argv)
    return args, unknown


# ---- schemas ---------------------------------------------------------------------------------------------------------
def test_schemas_are_new_enough_for_native_sidecars() -> None:
    major, minor = (int(x) for x in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 29)


def test_every_variant_is_there() -> None:
    assert {path.stem for path in DEPLOY.glob("*.yaml")} == set(VARIANTS)


@pytest.mark.parametrize(("name", "doc"), _all_documents(), ids=[n for n, _ in _all_documents()])
def test_manifest_validates_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_check_rejects_what_kubectl_would() -> None:
    # The validation above can fail: a misspelt field and a wrong type are caught.
    doc = _deployment("native-sidecar")
    proxy = find_container(doc["spec"]["template"]["spec"], "istio-proxy")[0]
    index = doc["spec"]["template"]["spec"]["initContainers"].index(proxy)
    doc["spec"]["template"]["spec"]["initContainers"][index] = {**proxy, "restartPolicyy": "Always"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    doc = _deployment("sidecar")
    doc["spec"]["template"]["spec"]["containers"][-1]["ports"][0]["containerPort"] = "15090"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ---- istio-init ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_istio_init_is_the_injectors(variant: str) -> None:
    _meta, spec = _spec(variant)
    init, is_init = find_container(spec, "istio-init")
    assert is_init
    assert spec["initContainers"][0]["name"] == "istio-init", "capture goes in before anything else runs"
    assert init["args"] == ISTIO_INIT_ARGS
    assert "command" not in init, "the image's ENTRYPOINT (pilot-agent) runs the args"
    assert init["image"] == _proxy(variant)["image"], "one image serves istio-init and istio-proxy"
    ctx = init["securityContext"]
    assert ctx["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["runAsNonRoot"]) == (0, 0, False)


def test_istio_init_args_are_accepted_by_the_agent() -> None:
    args, unknown = _parse(ISTIO_INIT_ARGS)
    assert args.command == "istio-iptables"
    assert unknown == [], f"pilot-agent istio-iptables would ignore {unknown}"


def test_istio_init_args_produce_the_capture_rules() -> None:
    # --dry-run prints the rules instead of applying them: the manifest's exact argv, through the real command.
    done = subprocess.run(
        [str(Image().programs["pilot-agent"]), *ISTIO_INIT_ARGS, "--dry-run"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in done.stdout
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in done.stdout
    for port in (15090, 15021, 15020):
        assert f"-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN" in done.stdout
    assert "--uid-owner 1337" in done.stdout


# ---- istio-proxy -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_istio_proxy_has_istios_args_probes_ports_and_user(variant: str) -> None:
    proxy = _proxy(variant)
    assert proxy["args"] == ISTIO_PROXY_ARGS
    assert proxy["ports"] == [{"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"}]
    target = {"path": "/healthz/ready", "port": 15021}
    assert proxy["startupProbe"] == {
        "httpGet": target, "initialDelaySeconds": 0, "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 600,
    }  # fmt: skip
    assert proxy["readinessProbe"] == {
        "httpGet": target, "initialDelaySeconds": 0, "periodSeconds": 15, "timeoutSeconds": 3, "failureThreshold": 4,
    }  # fmt: skip
    assert "livenessProbe" not in proxy
    assert proxy["securityContext"] == {
        "allowPrivilegeEscalation": False, "privileged": False, "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True, "runAsGroup": 1337, "runAsNonRoot": True, "runAsUser": 1337,
    }  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_istio_proxy_args_are_accepted_by_the_agent(variant: str) -> None:
    args, unknown = _parse(_proxy(variant)["args"])
    assert args.command == "proxy"
    assert unknown == [], f"pilot-agent proxy would ignore {unknown}"
    assert args.proxy_type == "sidecar"
    assert args.proxy_log_level == "warning"


@pytest.mark.parametrize("variant", VARIANTS)
def test_istio_proxy_env_is_istios_in_istios_order(variant: str) -> None:
    proxy = _proxy(variant)
    names = [var["name"] for var in proxy["env"]]
    assert len(names) == len(set(names))
    assert [n for n in ISTIO_ENV_ORDER if n in names] == names
    env = _env(proxy)
    downward = {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "INSTANCE_IP": "status.podIP"}
    downward |= {"SERVICE_ACCOUNT": "spec.serviceAccountName", "HOST_IP": "status.hostIP"}
    for name, field_path in downward.items():
        assert env[name]["valueFrom"] == {"fieldRef": {"fieldPath": field_path}}
    assert env["ISTIO_CPU_LIMIT"]["valueFrom"] == {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}
    json.loads(env["PROXY_CONFIG"]["value"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_istio_proxy_metadata_env_describes_the_pod(variant: str) -> None:
    deployment = _deployment(variant)
    meta, spec = pod_template(deployment)
    env = _env(_proxy(variant))
    apps = [c for c in spec["containers"] if c["name"] != "istio-proxy"]
    assert env["ISTIO_META_APP_CONTAINERS"]["value"] == ",".join(c["name"] for c in apps)
    ports = [p for c in apps for p in c.get("ports", [])]
    assert json.loads(env["ISTIO_META_POD_PORTS"]["value"]) == ports
    name, namespace = deployment["metadata"]["name"], deployment["metadata"]["namespace"]
    assert env["ISTIO_META_WORKLOAD_NAME"]["value"] == name
    assert env["ISTIO_META_OWNER"]["value"] == f"kubernetes://apis/apps/v1/namespaces/{namespace}/deployments/{name}"
    assert meta["labels"]["sidecar.istio.io/inject"] == "false", "already injected: the webhook must not do it again"


@pytest.mark.parametrize("variant", VARIANTS)
def test_app_probes_are_rewritten_to_the_agent_with_the_originals_in_env(variant: str) -> None:
    _meta, spec = _spec(variant)
    probers = json.loads(_env(_proxy(variant))["ISTIO_KUBE_APP_PROBERS"]["value"])
    rewritten: set[str] = set()
    for container in spec["containers"]:
        if container["name"] == "istio-proxy":
            continue
        app_ports = {p["containerPort"] for p in container.get("ports", [])}
        for kind, suffix in (("readiness", "readyz"), ("liveness", "livez"), ("startup", "startupz")):
            probe = container.get(f"{kind}Probe")
            if probe is None:
                continue
            path = f"/app-health/{container['name']}/{suffix}"
            assert probe["httpGet"] == {"path": path, "port": 15020}
            original = probers[path]
            assert [k for k in ("httpGet", "tcpSocket", "grpc") if k in original] == ["httpGet"]
            assert original["httpGet"]["port"] in app_ports
            rewritten.add(path)
    assert set(probers) == rewritten
    assert all(APP_PROBER_KEY.match(key) for key in probers)


@pytest.mark.parametrize("variant", VARIANTS)
def test_volumes_are_istios_and_every_mount_has_one(variant: str) -> None:
    _meta, spec = _spec(variant)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"] + spec["initContainers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']} mounts undeclared volume {mount['name']}"
    mounts = {m["name"]: m["mountPath"] for m in _proxy(variant)["volumeMounts"]}
    assert mounts["istio-podinfo"] == "/etc/istio/pod"
    assert mounts["istio-envoy"] == "/etc/istio/proxy"
    assert mounts["istio-data"] == "/var/lib/istio/data"
    assert mounts["istio-certs"] == "/etc/certs/"
    assert volumes["istio-envoy"]["emptyDir"] == {"medium": "Memory"}
    items = volumes["istio-podinfo"]["downwardAPI"]["items"]
    assert {i["path"]: i["fieldRef"]["fieldPath"] for i in items} == {
        "labels": "metadata.labels", "annotations": "metadata.annotations",
    }  # fmt: skip
    assert volumes["istio-certs"]["secret"]["optional"] is True


@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_select_the_pod(variant: str) -> None:
    docs = load_documents(DEPLOY / f"{variant}.yaml")
    deployment = _deployment(variant)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] in accounts


# ---- placement per variant -------------------------------------------------------------------------------------------
def test_classic_sidecar_is_the_last_container() -> None:
    _meta, spec = _spec("sidecar")
    assert spec["containers"][-1]["name"] == "istio-proxy"
    assert "lifecycle" not in spec["containers"][-1]


def test_native_sidecar_is_an_always_restarting_init_container_that_drains_before_sigterm() -> None:
    _meta, spec = _spec("native-sidecar")
    assert [c["name"] for c in spec["initContainers"]] == ["istio-init", "istio-proxy"]
    assert all(c["name"] != "istio-proxy" for c in spec["containers"])
    proxy = spec["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"
    command = proxy["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["pilot-agent", "request", "--debug-port=15020", "POST", "drain"]
    args, unknown = _parse(command[1:])
    assert unknown == []
    assert (args.command, args.method, args.path, args.debug_port) == ("request", "POST", "drain", 15020)


def test_hold_application_starts_the_proxy_first_and_waits_for_it() -> None:
    meta, spec = _spec("hold-application")
    assert spec["containers"][0]["name"] == "istio-proxy"
    command = spec["containers"][0]["lifecycle"]["postStart"]["exec"]["command"]
    assert command == ["pilot-agent", "wait"]
    args, unknown = _parse(command[1:])
    assert unknown == []
    assert args.command == "wait"
    assert json.loads(_env(spec["containers"][0])["PROXY_CONFIG"]["value"]) == {"holdApplicationUntilProxyStarts": True}
    assert yaml.safe_load(meta["annotations"]["proxy.istio.io/config"]) == {"holdApplicationUntilProxyStarts": True}


def test_no_control_plane_reads_xds_from_its_configmap_and_needs_nothing_from_istiod() -> None:
    docs = load_documents(DEPLOY / "no-control-plane.yaml")
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    _meta, spec = _spec("no-control-plane")
    proxy = _proxy("no-control-plane")
    volume = next(v for v in spec["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
    mount = next(m for m in proxy["volumeMounts"] if m["name"] == volume["name"])
    assert _env(proxy)["ISTIO_LOCAL_XDS_DIR"]["value"] == mount["mountPath"]
    assert set(configmap["data"]) == {"lds.yaml", "cds.yaml"}
    names = {v["name"] for v in spec["volumes"]}
    assert not names & {"istio-token", "istiod-ca-cert"}, "without istiod these volumes would never be satisfied"
    assert "CA_ADDR" not in _env(proxy)


# ---- the agent reads what kubelet would give it ----------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_render_sees_the_pods_identity_from_env_and_downward_api_files(variant: str) -> None:
    meta, _spec_ = _spec(variant)
    labels = {**meta["labels"], "pod-template-hash": "5d8f7b6c4"}
    identity = PodIdentity(
        name=f"{meta['labels']['app']}-5d8f7b6c4-x7k2p", namespace="shop", labels=labels,
        annotations=dict(meta.get("annotations", {})), service_account="echo", pod_ip="10.44.0.7",
    )  # fmt: skip
    configmaps = {"istio-ca-root-cert": {"root-cert.pem": "-----BEGIN CERTIFICATE-----\n"}}
    configmaps |= {
        d["metadata"]["name"]: d["data"] for d in load_documents(DEPLOY / f"{variant}.yaml") if d["kind"] == "ConfigMap"
    }
    with Pod(meta, _spec_, identity=identity, configmaps=configmaps) as pod:
        env = pod.env("istio-proxy")
        if "ISTIO_LOCAL_XDS_DIR" in env:
            # The harness keeps mounts under the pod root rather than on this machine's /etc.
            env["ISTIO_LOCAL_XDS_DIR"] = str(pod.path(env["ISTIO_LOCAL_XDS_DIR"]))
        argv = pod.argv("istio-proxy")
        assert argv[1] == "proxy"
        command = [argv[0], "render", *argv[2:]]
        done = subprocess.run(command, env=env, cwd=pod.root, capture_output=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr.decode().count("ignoring unknown flags") == 0
        node = json.loads(done.stdout)["node"]
    assert node["id"] == f"sidecar~10.44.0.7~{identity.name}.shop~shop.svc.cluster.local"
    assert node["cluster"] == f"{meta['labels']['app']}.shop"
    metadata = node["metadata"]
    # Labels come from the downward-API file kubelet writes, less the Deployment's pod-template-hash (as Istio).
    assert metadata["LABELS"] == {k: v for k, v in labels.items() if k != "pod-template-hash"}
    assert metadata["NAMESPACE"] == "shop"
    assert metadata["SERVICE_ACCOUNT"] == "echo"
    assert metadata["INTERCEPTION_MODE"] == "REDIRECT"
    assert metadata["WORKLOAD_NAME"] == meta["labels"]["app"]


@pytest.mark.envoy
def test_no_control_plane_listeners_and_clusters_pass_envoys_validation(tmp_path: Path) -> None:
    # Envoy's validate mode does not load path-based xDS, so the same resources go in as static ones: every field,
    # type URL and filter name is checked by the Envoy the image ships (same minor release).
    configmap = next(d for d in load_documents(DEPLOY / "no-control-plane.yaml") if d["kind"] == "ConfigMap")

    def resources(key: str, type_url: str) -> list[dict[str, Any]]:
        listed = yaml.safe_load(configmap["data"][key])["resources"]
        assert all(r.pop("@type") == type_url for r in listed)
        return list(listed)

    listeners = resources("lds.yaml", "type.googleapis.com/envoy.config.listener.v3.Listener")
    clusters = resources("cds.yaml", "type.googleapis.com/envoy.config.cluster.v3.Cluster")
    bootstrap = {
        "node": {"id": "validate", "cluster": "validate"},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    assert {listener["name"] for listener in listeners} == {
        "virtualInbound", "virtualOutbound",
    }  # fmt: skip
    config = tmp_path / "bootstrap.json"
    config.write_text(json.dumps(bootstrap))
    base_id = new_base_id()
    try:
        done = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(config), "--base-id", str(base_id)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        remove_shm(base_id)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "OK" in done.stdout + done.stderr
