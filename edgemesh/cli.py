"""The ``edgemesh`` command line (click): agent, server, gateway, status, config, cleanup, version.

Flags override the config file, which overrides defaults; ``NODE_NAME`` sits between file and
flags. Exit codes: 0 success, 2 bad usage or config (naming the key or flag), 1 runtime failure.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from edgemesh import __version__

# flag name → config key path, for the options every node command shares
META_FLAGS: dict[str, str] = {
    "node_name": "nodeName",
    "manifests": "kubeAPIConfig.manifests",
    "kubeconfig": "kubeAPIConfig.kubeConfig",
    "master": "kubeAPIConfig.master",
    "state_dir": "commonConfig.stateDir",
    "admin": "commonConfig.adminAddress",
    "log_format": "commonConfig.logFormat",
    "verbosity": "commonConfig.verbosity",
}
TUNNEL_FLAGS: dict[str, str] = {
    "server": "modules.edgeTunnel.servers",
    "psk_file": "modules.edgeTunnel.psk.path",
    "tunnel_listen": "",  # ADDR: split into listenAddress/listenPort below
}


def _fail(problems: list[str]) -> None:
    for p in problems:
        click.echo(f"error: {p}", err=True)
    sys.exit(2)


# Where the Go EdgeMesh reads its config when no --config-file is given (its ConfigMap mount).
GO_DEFAULT_CONFIG = {"EdgeMeshAgent": "/etc/edgemesh/config/edgemesh-agent.yaml",
                     "EdgeMeshGateway": "/etc/edgemesh/config/edgemesh-gateway.yaml"}


def default_config_file(kind: str, exists: Callable[[str], bool] = os.path.exists
                        ) -> str | None:
    """The Go EdgeMesh's default path for ``kind`` when that file exists, else None."""
    path = GO_DEFAULT_CONFIG.get(kind)
    return path if path and exists(path) else None


def _load(config_file: str | None, overrides: dict[str, Any], kind: str) -> Any:
    """The config with flags applied; its warnings are logged once logging is set up."""
    from edgemesh import config as cfg
    from edgemesh.errors import ConfigError
    warnings: list[str] = []
    try:
        config = cfg.load(config_file, warnings)
        if config_file is None or config.kind == "EdgeMeshAgent":
            config.kind = kind
        config = cfg.apply_overrides(config, overrides)
    except ConfigError as e:
        _fail(e.problems)
    _setup_logging(config)
    log = logging.getLogger("edgemesh.config")
    log.info("config from %s", config_file or "defaults and flags (no config file)")
    for w in warnings:
        log.warning("config %s", w)
    return config


def _run(run: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """Run a node; a problem found while starting (a missing PSK file) exits 2 with its key."""
    from edgemesh.errors import ConfigError
    try:
        return run(*args, **kwargs)
    except ConfigError as e:
        _fail(e.problems)
        return 2


def _addr_override(flag: str, value: str | None, host_key: str, port_key: str,
                   out: dict[str, Any]) -> None:
    if value is None:
        return
    from edgemesh.config import split_host_port
    try:
        host, port = split_host_port(value)
    except ValueError as e:
        _fail([f"{flag}: {e}"])
    out[host_key], out[port_key] = host, port


def meta_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by agent and gateway: config, identity, metadata, admin, logging."""
    options = [
        click.option("--config", "--config-file", "config_file", type=click.Path(dir_okay=False),
                     help="YAML config file (see `edgemesh config default`) [default: the "
                          "Go EdgeMesh's /etc/edgemesh/config/edgemesh-agent.yaml or "
                          "edgemesh-gateway.yaml when present]."),
        click.option("--node-name", help="This node's name [default: $NODE_NAME, then the "
                                         "hostname]."),
        click.option("--manifests", multiple=True, type=click.Path(file_okay=False),
                     help="Directory of manifests to serve without a cluster (repeatable)."),
        click.option("--kubeconfig", type=click.Path(dir_okay=False),
                     help="kubeconfig for list+watch from a kube-apiserver."),
        click.option("--master", help="API server URL, e.g. the KubeEdge metaServer "
                                      "http://127.0.0.1:10550."),
        click.option("--state-dir", type=click.Path(file_okay=False),
                     help="Identity key and metadata cache [default: /var/lib/edgemesh]."),
        click.option("--admin", help="Admin endpoint HOST:PORT ('' disables) "
                                     "[default: 127.0.0.1:10557]."),
        click.option("-v", "verbosity", type=int, help="Log verbosity 0-10 [default: 2]."),
        click.option("--log-format", type=click.Choice(["text", "json"]),
                     help="Log format on stderr [default: text]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def tunnel_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--server", multiple=True, help="Rendezvous/relay server HOST:PORT "
                                                     "(repeatable)."),
        click.option("--psk-file", type=click.Path(dir_okay=False),
                     help="File with the cluster pre-shared key [default: /etc/edgemesh/psk]."),
        click.option("--tunnel-listen", help="Tunnel listen ADDR:PORT [default: 0.0.0.0:20006]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _overrides(params: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, key in table.items():
        value = params.get(flag)
        if not key or value is None or value == ():
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _setup_logging(config: Any) -> None:
    from edgemesh.runtime import logs
    logs.setup(config.commonConfig.logFormat, config.commonConfig.verbosity)


# Every command's help text is passed as help=, not taken from its docstring: the frozen binary
# is built with optimize=2, which strips docstrings (~1 MB of an idle agent's memory).
MAIN_HELP = """EdgeMesh: the data plane of an edge Kubernetes (KubeEdge) cluster.

One `edgemesh agent` per node answers cluster DNS names, proxies service traffic to
endpoints on this node or (through the tunnel) on other nodes, behind NATs or not.
`edgemesh server` relays for nodes that cannot reach each other directly;
`edgemesh gateway` lets outside clients in.

Start without a cluster:  edgemesh agent --manifests examples/ --no-iptables
"""


SERVER_HELP = """Run a rendezvous and relay server for agents that cannot reach each other.

`edgemesh server release NODE` frees a node name bound to a key (the operator's action).
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             help=MAIN_HELP)
@click.version_option(__version__, "--version", prog_name="edgemesh")
def main() -> None:
    pass  # the subcommands do the work


@main.command(help="Run the node agent: DNS, service proxy and tunnel.")
@meta_options
@tunnel_options
@click.option("--relay", is_flag=True, default=None, help="Also relay for other agents.")
@click.option("--dns-listen", help="DNS listen ADDR:PORT [default: 169.254.96.16:53 on "
                                   "edgemesh0].")
@click.option("--service-cidr", multiple=True, help="Service IP range (repeatable) "
                                                    "[default: 10.96.0.0/12].")
@click.option("--nodeport-addresses", multiple=True,
              help="Local address range (CIDR, repeatable) where NodePorts answer "
                   "[default: every local address].")
@click.option("--no-iptables", is_flag=True, default=None,
              help="Run the proxy's listeners without touching iptables.")
def agent(config_file: str | None, **params: Any) -> None:
    overrides = _overrides(params, {**META_FLAGS, **TUNNEL_FLAGS,
                                    "relay": "modules.edgeTunnel.relay",
                                    "service_cidr": "modules.edgeProxy.serviceCIDR",
                                    "nodeport_addresses":
                                        "modules.edgeProxy.nodePortAddresses"})
    if params.get("no_iptables"):
        overrides["modules.edgeProxy.iptables"] = False
    _addr_override("--dns-listen", params.get("dns_listen"), "modules.edgeDNS.listenAddress",
                   "modules.edgeDNS.listenPort", overrides)
    _addr_override("--tunnel-listen", params.get("tunnel_listen"),
                   "modules.edgeTunnel.listenAddress", "modules.edgeTunnel.listenPort", overrides)
    config = _load(config_file or default_config_file("EdgeMeshAgent"), overrides,
                   "EdgeMeshAgent")
    from edgemesh import agent as agent_mod
    sys.exit(_run(agent_mod.run, config, role="agent"))


@main.group(invoke_without_command=True, help=SERVER_HELP)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML config file (its `server` section).")
@click.option("--listen", help="Listen HOST:PORT [default: 0.0.0.0:20004].")
@click.option("--node-name", help="The name this server proves in the mesh (agents list it "
                                  "as a peer) [default: $NODE_NAME, then the hostname].")
@click.option("--advertise", multiple=True, help="Address agents should use (repeatable).")
@click.option("--psk-file", type=click.Path(dir_okay=False),
              help="File with the cluster pre-shared key [default: /etc/edgemesh/psk].")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where the server keeps its key and name bindings.")
@click.option("--admin", help="Admin endpoint HOST:PORT ('' disables).")
@click.option("-v", "verbosity", type=int, help="Log verbosity 0-10 [default: 2].")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log format.")
def server(config_file: str | None, **params: Any) -> None:
    if click.get_current_context().invoked_subcommand:
        return
    overrides = _overrides(params, {"listen": "server.listen", "advertise": "server.advertise",
                                    "node_name": "nodeName",
                                    "psk_file": "modules.edgeTunnel.psk.path",
                                    "state_dir": "commonConfig.stateDir",
                                    "admin": "commonConfig.adminAddress",
                                    "log_format": "commonConfig.logFormat",
                                    "verbosity": "commonConfig.verbosity"})
    config = _load(config_file, overrides, "EdgeMeshServer")
    from edgemesh.server import main as server_main
    sys.exit(_run(server_main.run, config))


@server.command("release", help="Free NODE's name binding: the next key that proves NODE is "
                                "bound (a re-installed node).")
@click.argument("node")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="The server's state dir [default: /var/lib/edgemesh].")
def server_release(node: str, state_dir: str | None) -> None:
    from edgemesh.config import Config
    from edgemesh.server import main as server_main
    sys.exit(server_main.release(state_dir or Config().commonConfig.stateDir, node))


@main.command(help="Run the ingress gateway: outside clients in, routed by Istio "
                   "Gateway/VirtualService.")
@meta_options
@tunnel_options
@click.option("--nic", help="Interfaces to listen on: '*' or comma-separated names.")
@click.option("--include-ip", help="IPs/CIDRs to listen on: '*' or comma-separated.")
@click.option("--exclude-ip", help="IPs/CIDRs never to listen on (comma-separated).")
def gateway(config_file: str | None, **params: Any) -> None:
    overrides = _overrides(params, {**META_FLAGS, **TUNNEL_FLAGS,
                                    "nic": "modules.edgeGateway.nic",
                                    "include_ip": "modules.edgeGateway.includeIP",
                                    "exclude_ip": "modules.edgeGateway.excludeIP"})
    _addr_override("--tunnel-listen", params.get("tunnel_listen"),
                   "modules.edgeTunnel.listenAddress", "modules.edgeTunnel.listenPort", overrides)
    overrides.update({"modules.edgeGateway.enable": True, "modules.edgeDNS.enable": False,
                      "modules.edgeProxy.enable": False})
    config = _load(config_file or default_config_file("EdgeMeshGateway"), overrides,
                   "EdgeMeshGateway")
    from edgemesh import agent as agent_mod
    sys.exit(_run(agent_mod.run, config, role="gateway"))


@main.command(help="Show what the local agent knows: services, endpoints, peers and their paths.")
@click.option("--admin", default="127.0.0.1:10557", show_default=True,
              help="The local agent's admin endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(admin: str, as_json: bool) -> None:
    from edgemesh import status as status_mod
    sys.exit(status_mod.show(admin, as_json))


@main.group(help="Print or check configuration files.")
def config() -> None:
    pass  # the subcommands do the work


@config.command("default", help="Print a complete, commented default config.")
def config_default() -> None:
    from edgemesh.config import render_default
    click.echo(render_default(), nl=False)


@config.command("validate", help="Check FILE (a config, or a ConfigMap holding one); list "
                                 "every problem with its key path (exit 2), or say it is valid, "
                                 "after a warning for each Go EdgeMesh key it ignores.")
@click.argument("file", type=click.Path(dir_okay=False))
def config_validate(file: str) -> None:
    from edgemesh import config as cfg
    from edgemesh.errors import ConfigError
    warnings: list[str] = []
    try:
        cfg.load(file, warnings)
    except ConfigError as e:
        _fail(e.problems)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"{file}: valid" + (f" ({len(warnings)} warnings)" if warnings else ""))


@main.command(help="Remove every iptables rule and network device the agent made.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="The agent's config (for device and address names).")
def cleanup(config_file: str | None) -> None:
    config = _load(config_file or default_config_file("EdgeMeshAgent"), {}, "EdgeMeshAgent")
    from edgemesh import cleanup as cleanup_mod
    sys.exit(cleanup_mod.run(config))


@main.command(help="Print the version.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def version(as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"version": __version__,
                               "python": sys.version.split()[0],
                               "frozen": bool(getattr(sys, "frozen", False))}))
    else:
        click.echo(f"edgemesh {__version__}")


def entry() -> None:
    """Console entry point: patch once, first, then run click."""
    from edgemesh.runtime import patching
    patching.patch_all()  # gevent's patch_all; ssl patched on first import (idle memory)
    main()
