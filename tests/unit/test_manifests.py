"""build/: every Kubernetes manifest parses, has what the API server requires, and agrees with
the code: container args are real flags, probes hit the admin port the process listens on,
ConfigMaps hold configs the loader accepts, RBAC covers what the kube source watches and no
more, and no PSK is shipped."""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import click
import pytest
import yaml

from edgemesh import cli
from edgemesh.config import Config, from_mapping, split_host_port
from edgemesh.meta import kinds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, "build")
NAMESPACED = {"ServiceAccount", "ConfigMap", "Secret", "Service", "Deployment", "DaemonSet",
              "Role", "RoleBinding"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
CAPS_AGENT = {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"}
WATCHED = ("Service", "EndpointSlice", "Endpoints", "Pod", "Namespace", "Node",
           "DestinationRule", "Gateway", "VirtualService")


def manifest_files() -> list[str]:
    out = []
    for dirpath, _, files in os.walk(BUILD):
        if os.sep + "helm" in dirpath:
            continue  # chart templates are not plain YAML
        out += [os.path.join(dirpath, f) for f in files if f.endswith((".yaml", ".yml"))
                and f != "kustomization.yaml"]
    return sorted(out)


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in manifest_files():
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    yield os.path.relpath(path, ROOT), doc


DOCS = list(documents())


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCS if d["kind"] == kind]


def workloads() -> list[dict[str, Any]]:
    return of_kind("DaemonSet") + of_kind("Deployment")


def by_name(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def parse_args(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """(subcommand path, {flag: value}) from a container's args (every flag takes a value
    here except boolean ones, which the click command knows)."""
    words, flags, i = [], {}, 0
    command: click.Command = cli.main
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            option = next((p for p in command.params if arg in p.opts), None)
            assert option is not None, f"{' '.join(words)}: no such flag {arg}"
            takes_value = not getattr(option, "is_flag", False)
            flags[arg] = args[i + 1] if takes_value else "true"
            i += 2 if takes_value else 1
            continue
        assert isinstance(command, click.Group), f"unexpected argument {arg}"
        sub = command.commands.get(arg)
        assert sub is not None, f"no such command: edgemesh {' '.join(words)} {arg}"
        words.append(arg)
        command = sub
        i += 1
    return words, flags


def mounted_configmap(workload: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The ConfigMap document a file path inside the container comes from, if any."""
    pod = workload["spec"]["template"]["spec"]
    for mount in container(workload)["volumeMounts"]:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            if "configMap" in volume:
                cm = by_name("ConfigMap", volume["configMap"]["name"])
                key = path[len(mount["mountPath"].rstrip("/")) + 1:]
                return yaml.safe_load(cm["data"][key])  # type: ignore[no-any-return]
    return None


def config_of(workload: dict[str, Any]) -> Config:
    """The effective config: the mounted file, then the flags, as the CLI applies them."""
    _, flags = parse_args(container(workload)["args"])
    data = mounted_configmap(workload, flags["--config"]) if "--config" in flags else {}
    config = from_mapping(data)
    if "--admin" in flags:
        config.commonConfig.adminAddress = flags["--admin"]
    return config


def test_every_manifest_parses_and_has_required_fields() -> None:
    assert len(manifest_files()) >= 8
    for path, doc in DOCS:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        meta = doc["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta["name"]), path
        if doc["kind"] in NAMESPACED:
            assert meta.get("namespace") == "kubeedge", f"{path}: {meta['name']}"
        else:
            assert doc["kind"] in CLUSTER_SCOPED and "namespace" not in meta, path


def test_kustomization_lists_every_manifest_and_generates_the_psk() -> None:
    with open(os.path.join(BUILD, "kustomization.yaml"), encoding="utf-8") as f:
        kust = yaml.safe_load(f)
    listed = {os.path.join(BUILD, r) for r in kust["resources"]}
    assert listed == set(manifest_files())
    (gen,) = kust["secretGenerator"]
    assert gen["name"] == "edgemesh-psk" and gen["files"] == ["psk"]
    assert "literals" not in gen


def test_workloads_are_well_formed() -> None:
    assert {w["metadata"]["name"] for w in workloads()} == {
        "edgemesh-agent", "edgemesh-server", "edgemesh-gateway"}
    for w in workloads():
        spec, pod = w["spec"], w["spec"]["template"]["spec"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        c = container(w)
        assert c["name"] and c["image"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes
        for env in c.get("env", []):
            assert "value" in env or "valueFrom" in env
        assert "memory" in c["resources"]["requests"] and "memory" in c["resources"]["limits"]


@pytest.mark.parametrize("name", ["edgemesh-agent", "edgemesh-server", "edgemesh-gateway"])
def test_container_args_are_real_flags(name: str) -> None:
    w = by_name("DaemonSet" if name == "edgemesh-agent" else "Deployment", name)
    c = container(w)
    assert c["command"] == ["/usr/local/bin/edgemesh"]
    words, flags = parse_args(c["args"])
    assert words == [name.removeprefix("edgemesh-")]
    for flag in ("--admin", "--listen", "--tunnel-listen"):
        if flag in flags:
            split_host_port(flags[flag])


@pytest.mark.parametrize("name", ["edgemesh-agent", "edgemesh-server", "edgemesh-gateway"])
def test_probes_hit_the_admin_endpoint(name: str) -> None:
    w = by_name("DaemonSet" if name == "edgemesh-agent" else "Deployment", name)
    c = container(w)
    host, port = split_host_port(config_of(w).commonConfig.adminAddress)
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, port)
        # host network: the kubelet reaches a loopback admin endpoint at 127.0.0.1
        assert w["spec"]["template"]["spec"]["hostNetwork"] is True
        assert get["host"] == host == "127.0.0.1"


def test_admin_ports_do_not_collide_on_one_node() -> None:
    ports = [split_host_port(config_of(w).commonConfig.adminAddress)[1] for w in workloads()]
    assert len(set(ports)) == len(ports)
    agent = config_of(by_name("DaemonSet", "edgemesh-agent"))
    assert agent.commonConfig.adminAddress == Config().commonConfig.adminAddress


def test_configmaps_pass_the_config_loader() -> None:
    kinds_seen = set()
    for cm in of_kind("ConfigMap"):
        for key, text in cm["data"].items():
            config = from_mapping(yaml.safe_load(text))
            kinds_seen.add(config.kind)
            assert key == f"edgemesh-{config.kind.removeprefix('EdgeMesh').lower()}.yaml"
    assert kinds_seen == {"EdgeMeshAgent", "EdgeMeshGateway"}


def test_agent_daemonset_is_least_privilege() -> None:
    w = by_name("DaemonSet", "edgemesh-agent")
    pod, c = w["spec"]["template"]["spec"], container(w)
    sc = c["securityContext"]
    assert sc.get("privileged", False) is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == CAPS_AGENT
    assert pod["hostNetwork"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    config = config_of(w)
    ports = {(p["containerPort"], p["protocol"]) for p in c["ports"]}
    assert (config.modules.edgeDNS.listenPort, "UDP") in ports
    assert (config.modules.edgeTunnel.listenPort, "TCP") in ports


def test_other_workloads_add_no_network_admin() -> None:
    for name in ("edgemesh-server", "edgemesh-gateway"):
        sc = container(by_name("Deployment", name))["securityContext"]
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert set(sc["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
    server = by_name("Deployment", "edgemesh-server")["spec"]["template"]["spec"]
    assert server["automountServiceAccountToken"] is False


def test_psk_comes_from_the_generated_secret_only() -> None:
    assert of_kind("Secret") == []  # generated by kustomize from build/psk, never shipped
    for w in workloads():
        _, flags = parse_args(container(w)["args"])
        psk_path = flags["--psk-file"]
        pod = w["spec"]["template"]["spec"]
        mount = next(m for m in container(w)["volumeMounts"]
                     if psk_path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "edgemesh-psk"
        assert psk_path.endswith("/psk")
    for path in manifest_files():
        text = open(path, encoding="utf-8").read()
        assert not re.search(r"(?im)^\s*psk\s*:\s*['\"]?[A-Za-z0-9+/=]{16,}", text), path


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def test_rbac_covers_what_is_watched_read_only() -> None:
    for name in ("edgemesh-agent", "edgemesh-gateway"):
        rules = rules_of(by_name("ClusterRole", name))
        assert {v for _, _, v in rules} == {"get", "list", "watch"}
        for kind_name in WATCHED:
            k = kinds.BY_NAME[kind_name]
            assert {(k.group, k.plural, "list"), (k.group, k.plural, "watch")} <= rules, \
                f"{name} cannot list+watch {k.plural}"
        assert not any(r == "secrets" for _, r, _ in rules)


def test_secrets_only_by_namespaced_binding_for_the_gateway() -> None:
    for role in of_kind("ClusterRole") + of_kind("Role"):
        if any(r == "secrets" for _, r, _ in rules_of(role)):
            assert role["metadata"]["name"] == "edgemesh-gateway-secrets"
            assert {v for _, _, v in rules_of(role)} == {"get", "list", "watch"}
    for binding in of_kind("ClusterRoleBinding"):
        assert binding["roleRef"]["name"] != "edgemesh-gateway-secrets"
    (rb,) = of_kind("RoleBinding")
    assert rb["roleRef"]["name"] == "edgemesh-gateway-secrets"
    assert [s["name"] for s in rb["subjects"]] == ["edgemesh-gateway"]


def test_crds_serve_the_istio_versions_we_read() -> None:
    crds = {c["metadata"]["name"]: c for c in of_kind("CustomResourceDefinition")}
    for kind_name in ("DestinationRule", "Gateway", "VirtualService"):
        k = kinds.BY_NAME[kind_name]
        crd = crds[f"{k.plural}.{k.group}"]
        spec = crd["spec"]
        assert spec["group"] == k.group and spec["names"]["kind"] == k.name
        assert spec["names"]["plural"] == k.plural and spec["scope"] == "Namespaced"
        served = {v["name"] for v in spec["versions"] if v["served"]}
        assert {k.version, *k.versions} <= served
        assert sum(v["storage"] for v in spec["versions"]) == 1
        for v in spec["versions"]:
            assert v["schema"]["openAPIV3Schema"]["type"] == "object"


def test_server_listens_where_its_port_is_declared() -> None:
    w = by_name("Deployment", "edgemesh-server")
    _, flags = parse_args(container(w)["args"])
    listen_port = split_host_port(flags.get("--listen", Config().server.listen))[1]
    assert {p["containerPort"] for p in container(w)["ports"]} == {listen_port}
