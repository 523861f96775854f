"""``edgemesh status``: what the local agent knows, read from its admin endpoint."""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

import click

VIEWS = ("node", "services", "peers")


def fetch(admin: str, view: str, timeout: float = 3.0) -> Any:
    with urllib.request.urlopen(f"http://{admin}/debug/{view}", timeout=timeout) as r:
        return json.load(r)


def show(admin: str, as_json: bool) -> int:
    try:
        available = fetch(admin, "")
        data = {view: fetch(admin, view) for view in VIEWS if view in available}
        if "proxy" in available:  # the Edge CNI's part only
            data["edgeCNI"] = edge_cni(admin)
    except (OSError, urllib.error.URLError, ValueError) as e:
        click.echo(f"error: cannot reach the agent's admin endpoint at {admin}: {e}", err=True)
        return 1
    if as_json:
        json.dump(data, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    click.echo(render(data))
    return 0


def render(data: dict[str, Any]) -> str:
    node = data.get("node", {})
    lines = [f"node {node.get('node')} ({node.get('role')}, edgemesh {node.get('version')})"]
    if not node.get("synced"):
        lines.append("metadata: waiting for first sync")
    elif node.get("stale"):
        lines.append(f"metadata: STALE — {node['stale']}")
    lines.append("")
    lines.append(f"{'SERVICE':40} {'CLUSTER-IP':16} {'PORT':24} ENDPOINTS")
    for svc in data.get("services", []):
        name = f"{svc['namespace']}/{svc['name']}"
        ip = "None" if svc["headless"] else (svc["externalName"] or
                                             ",".join(svc["clusterIPs"]) or "-")
        if not svc["ports"]:
            lines.append(f"{name:40} {ip:16} {'-':24} -")
        for p in svc["ports"]:
            eps = ", ".join(f"{e['ip']}:{e['port']}" + (f"@{e['node']}" if e["node"] else "")
                            for e in p["endpoints"]) or "<none>"
            port = f"{p['port']}/{p['protocol']}" + (f" {p['name']}" if p["name"] else "")
            lines.append(f"{name:40} {ip:16} {port:24} {eps}")
    peers = data.get("peers")
    if peers is not None:
        lines.append("")
        lines.append(f"{'PEER':24} {'PATH':10} {'ADDRESS':24} {'RTT':>9} DETAIL")
        for p in peers:
            rtt = f"{p['rtt_ms']:.2f}ms" if p.get("rtt_ms") is not None else "-"
            detail = p.get("detail", "")
            if p.get("next_attempt_in") is not None:
                detail += f" (next direct attempt in {p['next_attempt_in']:.0f}s)"
            lines.append(f"{p['node']:24} {p.get('path', '-'):10} {p.get('address') or '-':24} "
                         f"{rtt:>9} {detail}")
            for a in p.get("attempts", [])[-3:]:
                reason = f": {a['reason']}" if a.get("reason") else ""
                lines.append(f"{'':24}   tried {a['path']} {a['result']}{reason}")
    lines += render_edge_cni(data.get("edgeCNI"))
    return "\n".join(lines)


# ---- the Edge CNI -----------------------------------------------------------------------------

# metric -> the column of ``edgemesh status`` (per peer node, from /metrics)
CNI_COUNTERS = {"edgemesh_cni_pod_connections_total": "tcp_connections",
                "edgemesh_cni_pod_udp_sessions_total": "udp_sessions",
                "edgemesh_cni_pod_datagrams_total": "datagrams",
                "edgemesh_cni_pod_datagram_bytes_total": "datagram_bytes"}


def edge_cni(admin: str, timeout: float = 3.0) -> dict[str, Any] | None:
    """The Edge CNI's view (``/debug/proxy``'s ``edgeCNI``: the Pod networks this agent
    carries) and its per-peer counts from ``/metrics``; None when the Edge CNI is off."""
    view = fetch(admin, "proxy", timeout).get("edgeCNI")
    if view is None:
        return None
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=timeout) as r:
        text = r.read().decode(errors="replace")
    return {**view, "peers": cni_peer_counts(text)}


def cni_peer_counts(text: str) -> dict[str, dict[str, float]]:
    """node -> {column: value} of the ``CNI_COUNTERS`` in Prometheus text."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        column = CNI_COUNTERS.get(name)
        if column is None or 'node="' not in rest:
            continue
        node = rest.split('node="', 1)[1].split('"', 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        out.setdefault(node, dict.fromkeys(CNI_COUNTERS.values(), 0.0))[column] = value
    return out


def render_edge_cni(cni: dict[str, Any] | None) -> list[str]:
    """The Edge CNI's lines of ``edgemesh status`` (none when it is off)."""
    if cni is None:
        return []
    steered = cni.get("steered", {})
    # "podNetworks": the ranges without the mesh range of virtual addresses
    ranges = sorted(cni.get("podNetworks") or
                    set(steered.get("tcp", [])) | set(steered.get("udp", [])))
    lines = ["", f"EDGE CNI: {cni.get('pod_ips', 0)} Pod IPs known, "
             f"{len(ranges)} remote Pod networks carried; mode {cni.get('mode')}, meshCIDR "
             f"{cni.get('meshCIDR')}, {cni.get('virtualIPs', 0)} virtual IPs handed out"
             + (f", {cni['exhausted']} found none (range full)" if cni.get("exhausted") else "")]
    if cni.get("pod_cidrs"):
        lines.append(f"  node podCIDRs: {', '.join(cni['pod_cidrs'])}")
    lines.append(f"{'POD NETWORK':24} PROTOCOLS")
    for r in ranges:
        protocols = "/".join(p.upper() for p in ("tcp", "udp") if r in steered.get(p, []))
        lines.append(f"{r:24} {protocols}")
    peers = cni.get("peers") or {}
    if peers:
        lines.append(f"{'POD PEER':24} {'TCP CONNS':>10} {'UDP SESSIONS':>13} "
                     f"{'DATAGRAMS':>10} {'DGRAM BYTES':>12}")
        for node, c in sorted(peers.items()):
            lines.append(f"{node:24} {c['tcp_connections']:>10.0f} {c['udp_sessions']:>13.0f} "
                         f"{c['datagrams']:>10.0f} {c['datagram_bytes']:>12.0f}")
    listed = cni.get("virtualIPList", [])
    if listed:
        lines.append(f"{'VIRTUAL-IP':16} {'FOR':40} REAL")
        for v in listed:
            real = f"{v['ip']}@{v['node']}" if "pod" in v else "balanced like a ClusterIP"
            lines.append(f"{v['vip']:16} {v.get('pod') or v.get('service', '-'):40} {real}")
        if len(listed) < cni.get("virtualIPs", 0):
            lines.append(f"... and {cni['virtualIPs'] - len(listed)} more")
    return lines
