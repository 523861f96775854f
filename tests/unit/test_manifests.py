"""build/: every Kubernetes manifest parses, has what the API server requires, and agrees with
the code: container args are real flags, probes hit the admin port the process listens on,
ConfigMaps hold configs the loader accepts, RBAC covers what the kube source watches and no
more, and no PSK is shipped."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
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


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_renders_with_a_generated_psk(tmp_path) -> None:
    tree = tmp_path / "build"
    shutil.copytree(BUILD, tree, ignore=shutil.ignore_patterns("psk", "helm"))
    r = subprocess.run(["sh", str(tree / "generate-psk.sh")], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert oct((tree / "psk").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run(["sh", str(tree / "generate-psk.sh")], capture_output=True,
                           timeout=30)
    assert again.returncode == 1  # never silently replaces the cluster's key
    r = subprocess.run(["kubectl", "kustomize", str(tree)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert len(rendered) == len(DOCS) + 1
    (secret,) = [d for d in rendered if d["kind"] == "Secret"]
    assert secret["metadata"] == {**secret["metadata"], "name": "edgemesh-psk",
                                  "namespace": "kubeedge"}
    psk = base64.b64decode(secret["data"]["psk"]).strip()
    assert len(psk) >= 32 and psk == (tree / "psk").read_bytes().strip()
    images = {container(d)["image"] for d in rendered if d["kind"] in ("DaemonSet", "Deployment")}
    assert images == {"edgemesh:0.1.0"}


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


# ---- packaging/: the same flags and files outside Kubernetes -----------------------------------

PACKAGING = os.path.join(ROOT, "packaging")
OPENWRT = os.path.join(PACKAGING, "openwrt", "edgemesh", "files")

# Stand-ins for OpenWrt's functions.sh/procd.sh: config values come from CFG_<section>_<opt>
# variables, procd_* print the instance's command one argument per line.
PROCD_STUBS = r"""
config_load() { :; }
config_get() { eval "_v=\${CFG_$2_$3-\$4}"; eval "$1=\$_v"; }
config_get_bool() {
    config_get "$@"
    eval "case \$$1 in 1|on|true|yes|enabled) $1=1 ;; *) $1=0 ;; esac"
}
config_list_foreach() {
    _s=$1; _o=$2; _cb=$3; shift 3
    eval "_items=\${CFG_${_s}_${_o}}"
    for _i in $_items; do "$_cb" "$_i" "$@"; done
}
procd_open_instance() { echo "INSTANCE $1"; }
procd_set_param() { [ "$1" = command ] && { shift; printf 'ARG %s\n' "$@"; }; return 0; }
procd_append_param() { [ "$1" = command ] && { shift; printf 'ARG %s\n' "$@"; }; return 0; }
procd_close_instance() { echo END; }
logger() { echo "LOG $*"; }
"""


def uci_options(path: str) -> dict[str, dict[str, str | list[str]]]:
    """The shipped /etc/config/edgemesh: {section: {option: value or [list items]}}."""
    sections: dict[str, dict[str, str | list[str]]] = {}
    current: dict[str, str | list[str]] = {}
    for line in open(path, encoding="utf-8"):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        value = " ".join(words[2:]).strip("'") if len(words) > 2 else ""
        if words[0] == "config":
            current = sections.setdefault(words[2].strip("'"), {})
        elif words[0] == "option":
            current[words[1]] = value
        elif words[0] == "list":
            existing = current.setdefault(words[1], [])
            assert isinstance(existing, list)
            existing.append(value)
    return sections


def procd_commands(cfg: dict[str, str]) -> dict[str, list[str]]:
    env = "".join(f"CFG_{k}='{v}'\n" for k, v in cfg.items())
    script = f"{PROCD_STUBS}\n{env}\n. {os.path.join(OPENWRT, 'edgemesh.init')}\nstart_service\n"
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return procd_output(r.stdout)


def procd_output(stdout: str) -> dict[str, list[str]]:
    """The instances (name → argv) and log lines the PROCD_STUBS printed."""
    commands: dict[str, list[str]] = {}
    name = ""
    for line in stdout.splitlines():
        if line.startswith("INSTANCE "):
            name = line.split()[1]
            commands[name] = []
        elif line.startswith("ARG "):
            commands[name].append(line[4:])
        elif line.startswith("LOG "):
            commands.setdefault("log", []).append(line[4:])
    return commands


def test_openwrt_uci_options_map_to_real_flags(tmp_path) -> None:
    psk = tmp_path / "psk"
    psk.write_text("k" * 32)
    cfg: dict[str, str] = {}
    shipped = uci_options(os.path.join(OPENWRT, "edgemesh.config"))
    for section, options in shipped.items():
        for option, value in options.items():
            cfg[f"{section}_{option}"] = " ".join(value) if isinstance(value, list) else value
        cfg[f"{section}_enabled"] = "1"
        cfg[f"{section}_psk_file"] = str(psk)
        cfg[f"{section}_state_dir"] = str(tmp_path / section)
    cfg.update(agent_server="relay-a:20004 relay-b:20004", agent_relay="1",
               agent_manifests="/srv/manifests", agent_node_name="router-1",
               agent_dns_listen="127.0.0.1:1053", server_advertise="203.0.113.7:20004",
               agent_nodeport_addresses="192.168.1.0/24 fd00:1::/64")
    commands = procd_commands(cfg)
    assert commands["agent"][0] == "/usr/bin/edgemesh"
    words, flags = parse_args(commands["agent"][1:])
    assert words == ["agent"]
    args = commands["agent"]
    assert args.count("--server") == 2 and "--relay" in args and "--no-iptables" not in args
    assert args.count("--nodeport-addresses") == 2 and "fd00:1::/64" in args
    assert flags["--node-name"] == "router-1" and flags["--psk-file"] == str(psk)
    # every shipped option (but the booleans) reaches the command line with its value
    for section, options in shipped.items():
        words, flags = parse_args(commands[section][1:])
        assert words == [section]
        for option in options:
            value = cfg[f"{section}_{option}"]
            if option in ("enabled", "relay", "no_iptables") or not value:
                continue
            for item in value.split():
                assert item in commands[section], f"{section}.{option} not passed on"


def test_openwrt_refuses_to_start_without_a_psk(tmp_path) -> None:
    commands = procd_commands({"agent_enabled": "1",
                               "agent_psk_file": str(tmp_path / "missing")})
    assert "agent" not in commands
    assert any("PSK" in line for line in commands["log"])


def systemd_exec_start(unit: str) -> list[str]:
    text = open(os.path.join(PACKAGING, "systemd", unit), encoding="utf-8").read()
    (line,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    return [w for w in line.split() if not re.fullmatch(r"\$[A-Z_]+", w)]  # $EXTRA_ARGS


@pytest.mark.parametrize("unit", ["edgemesh-agent.service", "edgemesh-server.service"])
def test_systemd_units_use_real_flags_and_harden(unit: str) -> None:
    argv = systemd_exec_start(unit)
    assert argv[0] == "/usr/bin/edgemesh"
    words, flags = parse_args(argv[1:])
    assert words == [unit.split("-")[1].split(".")[0]]
    text = open(os.path.join(PACKAGING, "systemd", unit), encoding="utf-8").read()
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet="):
        assert setting in text
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M)
    assert caps is not None
    assert set(caps.group(1).split()) <= {"CAP_NET_ADMIN", "CAP_NET_RAW",
                                          "CAP_NET_BIND_SERVICE"}


def test_sysctl_file_is_shipped_identically() -> None:
    ours = open(os.path.join(PACKAGING, "sysctl.d", "60-edgemesh.conf"), encoding="utf-8").read()
    openwrt = open(os.path.join(OPENWRT, "60-edgemesh.conf"), encoding="utf-8").read()
    assert ours == openwrt
    for line in ours.splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"-?[a-z0-9_.]+ = \S+", line), line
