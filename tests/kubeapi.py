"""A Kubernetes API test server: list and watch over real HTTP on 127.0.0.1, with the semantics of
docs/specs/watch.md, and a Python API for tests to change objects and misbehave.

What it does like kube-apiserver:
- one etcd-like counter gives every write a new, larger resourceVersion (sent as a string);
- lists (K2): ``<Kind>List``, items without kind/apiVersion, the list RV, ``limit`` +
  ``continue`` pagination over a snapshot (all pages share the first page's RV), continue
  tokens that can be expired (HTTP 410 with a Status body);
- watches (K3/K4): ``watch=true|1``, chunked newline-delimited events whose objects carry
  kind/apiVersion; rv ""/"0" replays ADDED for the current state, rv X streams the retained
  events after X; an X older than the bounded history gets HTTP 200 + one ERROR 410 event +
  EOF (K5.1); ``timeoutSeconds`` ends the stream cleanly; BOOKMARKs on demand to watches that
  allowed them;
- per-resource 404 (absent CRDs, no EndpointSlice API), 403, and injected error statuses;
- RBAC like the gateway's (build/gateway/rbac.yaml): Secrets are readable per namespace only
  (a cluster-wide Secret list or watch gets 403, as with RoleBindings and no ClusterRoleBinding),
  and with ``granted={"secrets": {...}}`` only in those namespaces.

Misbehaviour on demand: ``drop_watches`` (connection closed, optionally mid-event),
``end_watches`` (clean end), ``send_error`` (ERROR event), ``compact`` (forget history),
``expire_continue_tokens``, ``stop``/``start`` (the API goes away and comes back on the same
port), ``chunking="split"`` (events cut across chunk boundaries).

``metaserver=True`` mimics the KubeEdge metaServer (K10): list items carry kind/apiVersion, an
empty list has no resourceVersion, watches ignore the RV and replay ADDED for everything, no
BOOKMARK and no 410.
"""
from __future__ import annotations

import base64
import collections
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import gevent
import gevent.queue
from gevent.server import StreamServer

# resource → (API prefix, Kind, apiVersion, namespaced)
RESOURCES: dict[str, tuple[str, str, str, bool]] = {
    "services": ("/api/v1", "Service", "v1", True),
    "endpoints": ("/api/v1", "Endpoints", "v1", True),
    "pods": ("/api/v1", "Pod", "v1", True),
    "nodes": ("/api/v1", "Node", "v1", False),
    "namespaces": ("/api/v1", "Namespace", "v1", False),
    "secrets": ("/api/v1", "Secret", "v1", True),
    "endpointslices": ("/apis/discovery.k8s.io/v1", "EndpointSlice", "discovery.k8s.io/v1",
                       True),
    "destinationrules": ("/apis/networking.istio.io/v1beta1", "DestinationRule",
                         "networking.istio.io/v1beta1", True),
    "gateways": ("/apis/networking.istio.io/v1beta1", "Gateway",
                 "networking.istio.io/v1beta1", True),
    "virtualservices": ("/apis/networking.istio.io/v1beta1", "VirtualService",
                        "networking.istio.io/v1beta1", True),
}
ISTIO = ("destinationrules", "gateways", "virtualservices")


@dataclass
class Request:
    path: str
    resource: str
    namespace: str
    params: dict[str, str]

    @property
    def watch(self) -> bool:
        return self.params.get("watch") in ("true", "1")


@dataclass
class Watch:
    resource: str
    namespace: str
    bookmarks: bool
    queue: gevent.queue.Queue = field(default_factory=gevent.queue.Queue)
    sent: list[dict[str, Any]] = field(default_factory=list)  # every event written


@dataclass
class Event:
    rv: int
    resource: str
    type: str
    obj: dict[str, Any]


class KubeAPI:
    """The server and its state; ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, port: int = 0, history: int = 1000, metaserver: bool = False,
                 absent: tuple[str, ...] = (), chunking: str = "event",
                 namespaced_only: tuple[str, ...] = ("secrets",),
                 granted: dict[str, set[str]] | None = None) -> None:
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            r: {} for r in RESOURCES}
        self.rv = 100
        self.history: collections.deque[Event] = collections.deque(maxlen=history)
        self.compacted = 0  # events with rv <= this are forgotten
        self.metaserver = metaserver
        self.chunking = chunking
        self.status: dict[str, int] = {r: 404 for r in absent}  # fixed status per resource
        self.namespaced_only = set(namespaced_only)  # 403 for cluster-wide requests
        self.granted = granted or {}  # resource -> the only namespaces it may be read in
        self.failures: dict[str, list[int]] = collections.defaultdict(list)  # one-shot
        self.requests: list[Request] = []
        self.on_request: Callable[[Request], int | None] | None = None  # status to inject
        self.watches: list[Watch] = []  # live watch streams
        self.streams: list[Watch] = []  # every watch stream ever opened, with what it sent
        self._tokens: dict[str, tuple[float, int, list[dict[str, Any]]]] = {}
        self._token_ids = itertools.count(1)
        self._conns: set[Any] = set()
        self.port = port
        self._server: StreamServer | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "KubeAPI":
        self._server = StreamServer(("127.0.0.1", self.port), self._handle)
        self._server.start()
        self.port = self._server.server_port
        return self

    def stop(self) -> None:
        """The API goes away: listener closed, every connection cut."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self.watches):
            w.queue.put(("drop", False))
        for conn in list(self._conns):
            _close(conn)
        gevent.sleep(0)

    def __enter__(self) -> "KubeAPI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- objects (the test's side) ------------------------------------------------------------

    def put(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object; returns it with its new resourceVersion."""
        _, kind, api_version, namespaced = RESOURCES[resource]
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        if namespaced:
            meta.setdefault("namespace", "default")
        key = (meta.get("namespace", ""), meta["name"])
        old = self.objects[resource].get(key)
        meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        obj["kind"], obj["apiVersion"] = kind, api_version
        self.objects[resource][key] = obj
        self._emit(Event(self.rv, resource, "MODIFIED" if old else "ADDED", obj))
        return obj

    def delete(self, resource: str, namespace: str, name: str) -> None:
        obj = self.objects[resource].pop((namespace, name))
        self.rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        self._emit(Event(self.rv, resource, "DELETED", obj))

    def put_raw(self, resource: str, namespace: str, name: str, obj: dict[str, Any]) -> None:
        """Store ``obj`` as given (a malformed object, say), with an RV and an event."""
        self.rv += 1
        obj = {**obj, "metadata": {**obj.get("metadata", {}), "resourceVersion": str(self.rv)}}
        self.objects[resource][(namespace, name)] = obj
        self._emit(Event(self.rv, resource, "ADDED", obj))

    # ---- misbehaviour -------------------------------------------------------------------------

    def set_status(self, resource: str, code: int | None) -> None:
        """Answer every request for ``resource`` with ``code`` (404: absent CRD), or stop."""
        if code is None:
            self.status.pop(resource, None)
        else:
            self.status[resource] = code

    def fail_next(self, resource: str, *codes: int) -> None:
        """The next requests for ``resource`` get these HTTP error codes, one each."""
        self.failures[resource].extend(codes)

    def bookmark(self, resource: str) -> None:
        """Send a BOOKMARK at the current RV to watches of ``resource`` that allowed them."""
        for w in self._watching(resource):
            if w.bookmarks:
                w.queue.put(("event", self._bookmark(resource)))

    def drop_watches(self, resource: str | None = None, mid_event: bool = False) -> int:
        """Close watch connections without ending the chunked body (``mid_event``: after half
        of one more event); returns how many were dropped."""
        found = self._watching(resource)
        for w in found:
            self.watches.remove(w)
            w.queue.put(("drop", mid_event))
        return len(found)

    def send_raw(self, resource: str, data: bytes, chunk: int = 1 << 20) -> int:
        """Write ``data`` as is (in chunks of ``chunk`` bytes) into the live watches of
        ``resource``: a hostile or broken server's bytes; returns how many watches got it."""
        found = self._watching(resource)
        for w in found:
            w.queue.put(("raw", (data, chunk)))
        return len(found)

    def end_watches(self, resource: str | None = None) -> int:
        found = self._watching(resource)
        for w in found:
            self.watches.remove(w)
            w.queue.put(("end", None))
        return len(found)

    def send_error(self, resource: str, code: int, message: str = "",
                   reason: str = "") -> None:
        """An ERROR event (Status with ``code``), then the stream ends (K5.1, K10.4)."""
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message or f"injected error {code}",
                  "reason": reason or ("Expired" if code == 410 else "InternalError"),
                  "code": code}
        for w in self._watching(resource):
            self.watches.remove(w)
            w.queue.put(("event", {"type": "ERROR", "object": status}))
            w.queue.put(("end", None))

    def compact(self) -> None:
        """Forget all history: a watch from any RV before now gets 410 Expired."""
        self.compacted = self.rv
        self.history.clear()

    def expire_continue_tokens(self) -> None:
        self._tokens.clear()

    # ---- observation --------------------------------------------------------------------------

    def watching(self, resource: str) -> int:
        return len(self._watching(resource))

    def streams_for(self, resource: str) -> list[Watch]:
        return [w for w in self.streams if w.resource == resource]

    def requests_for(self, resource: str, watch: bool | None = None,
                     namespace: str | None = None) -> list[Request]:
        """Requests made for ``resource`` (``namespace`` "": cluster-wide ones only)."""
        return [r for r in self.requests if r.resource == resource and
                (watch is None or r.watch == watch) and
                (namespace is None or r.namespace == namespace)]

    def watching_in(self, resource: str, namespace: str) -> int:
        """Open watches of ``resource`` in exactly ``namespace``."""
        return len([w for w in self._watching(resource) if w.namespace == namespace])

    def _watching(self, resource: str | None) -> list[Watch]:
        return [w for w in self.watches if resource is None or w.resource == resource]

    # ---- events -------------------------------------------------------------------------------

    def _emit(self, ev: Event) -> None:
        self.history.append(ev)
        if len(self.history) == self.history.maxlen:
            self.compacted = max(self.compacted, self.history[0].rv - 1)
        for w in self._watching(ev.resource):
            if not w.namespace or w.namespace == ev.obj["metadata"].get("namespace"):
                w.queue.put(("event", {"type": ev.type, "object": ev.obj}))

    def _bookmark(self, resource: str) -> dict[str, Any]:
        _, kind, api_version, _ = RESOURCES[resource]
        return {"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                                               "metadata": {"resourceVersion": str(self.rv)}}}

    # ---- HTTP ---------------------------------------------------------------------------------

    def _handle(self, sock: Any, _addr: Any) -> None:
        self._conns.add(sock)
        try:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data or len(buf) > 65536:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                if not self._serve(sock, head.decode("latin-1")):
                    return
        except OSError:
            pass
        finally:
            self._conns.discard(sock)
            _close(sock)

    def _serve(self, sock: Any, head: str) -> bool:
        """Answer one request; False when the connection must close."""
        method, target, _ = (head.split("\r\n", 1)[0].split(" ") + ["", ""])[:3]
        url = urlsplit(target)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        resource, namespace = _route(url.path)
        req = Request(url.path, resource, namespace, params)
        self.requests.append(req)
        if method != "GET":
            return self._status(sock, 405, "MethodNotAllowed", "only GET here")
        if resource not in RESOURCES:
            return self._status(sock, 404, "NotFound", "the server could not find the resource")
        if not self._allowed(resource, namespace):
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            return self._status(sock, 403, "Forbidden", f'{resource} is forbidden: cannot '
                                f'{"watch" if req.watch else "list"} resource "{resource}" '
                                f'in API group "" {scope}')
        code = self.status.get(resource) or (self.failures[resource].pop(0)
                                             if self.failures[resource] else 0) or \
            (self.on_request(req) if self.on_request else 0)
        if code:
            return self._status(sock, code, _REASONS.get(code, "InternalError"),
                                f"injected status {code} for {resource}")
        if req.watch:
            self._watch(sock, req)
            return False
        return self._list(sock, req)

    def _allowed(self, resource: str, namespace: str) -> bool:
        if resource in self.namespaced_only and not namespace:
            return False
        return resource not in self.granted or namespace in self.granted[resource]

    def _list(self, sock: Any, req: Request) -> bool:
        _, kind, api_version, _ = RESOURCES[req.resource]
        token = req.params.get("continue", "")
        limit = int(req.params.get("limit") or 0)
        if token:
            found = self._tokens.get(token)
            if found is None:
                return self._status(sock, 410, "Expired", "the provided continue parameter "
                                    "is too old to display a consistent list result")
            _, list_rv, items = found
        else:
            list_rv, items = self.rv, [self._list_item(o) for _, o in sorted(
                self._selected(req.resource, req.namespace))]
        page, rest = (items[:limit], items[limit:]) if limit else (items, [])
        meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
        if rest:
            new = base64.urlsafe_b64encode(f"{next(self._token_ids)}".encode()).decode()
            self._tokens[new] = (time.monotonic(), list_rv, rest)
            meta["continue"] = new
            meta["remainingItemCount"] = len(rest)
        if self.metaserver and not items:
            meta = {}  # K10.3: an empty offline list has no resourceVersion
        body = {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta,
                "items": page}
        return self._send(sock, 200, "OK", json.dumps(body).encode())

    def _list_item(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.metaserver:
            return obj
        return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}  # K2.2

    def _selected(self, resource: str, namespace: str) -> list[tuple[tuple[str, str], Any]]:
        return [(k, o) for k, o in self.objects[resource].items()
                if not namespace or k[0] == namespace]

    def _watch(self, sock: Any, req: Request) -> None:
        rv_text = req.params.get("resourceVersion", "")
        w = Watch(req.resource, req.namespace,
                  req.params.get("allowWatchBookmarks") == "true" and not self.metaserver)
        self.streams.append(w)
        backlog = self._backlog(req, rv_text)
        if backlog is not None:
            self.watches.append(w)  # before any yield: later events queue behind the backlog
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        if backlog is None:
            status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": f"too old resource version: {rv_text} ({self.compacted})",
                      "reason": "Expired", "code": 410}
            self._write_event(sock, w, {"type": "ERROR", "object": status})
            sock.sendall(b"0\r\n\r\n")
            return
        for ev in backlog:
            self._write_event(sock, w, ev)
        timeout = float(req.params.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        closed = gevent.spawn(self._notice_close, sock, w)
        try:
            self._pump(sock, w, deadline)
        finally:
            closed.kill(block=False)
            if w in self.watches:
                self.watches.remove(w)

    @staticmethod
    def _notice_close(sock: Any, w: Watch) -> None:
        """A client that closes its watch ends the stream at once (the apiserver notices too)."""
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        w.queue.put(("drop", False))

    def _backlog(self, req: Request, rv_text: str) -> list[dict[str, Any]] | None:
        """Events to send first: the replay, the history after the RV, or None for 410."""
        if self.metaserver or rv_text in ("", "0"):
            return [{"type": "ADDED", "object": o}
                    for _, o in sorted(self._selected(req.resource, req.namespace))]
        try:
            since = int(rv_text)
        except ValueError:
            since = -1
        if since < self.compacted:
            return None
        return [{"type": ev.type, "object": ev.obj} for ev in self.history
                if ev.rv > since and ev.resource == req.resource and
                (not req.namespace or ev.obj["metadata"].get("namespace") == req.namespace)]

    def _pump(self, sock: Any, w: Watch, deadline: float) -> None:
        while True:
            try:
                what, arg = w.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except gevent.queue.Empty:
                sock.sendall(b"0\r\n\r\n")  # timeoutSeconds: a clean end (K6.1)
                return
            if what == "event":
                self._write_event(sock, w, arg)
            elif what == "end":
                sock.sendall(b"0\r\n\r\n")
                return
            elif what == "raw":
                data, size = arg
                try:
                    for at in range(0, len(data), size):
                        part = data[at:at + size]
                        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                except OSError:
                    return  # the client hung up on it
            elif what == "drop":
                if arg:
                    _, kind, api_version, _ = RESOURCES[w.resource]
                    phantom = {"type": "ADDED", "object": {
                        "kind": kind, "apiVersion": api_version,
                        "metadata": {"name": "phantom", "namespace": "default",
                                     "resourceVersion": "999999999"}}}
                    data = json.dumps(phantom).encode() + b"\n"
                    part = data[:len(data) // 2]
                    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                return  # the handler closes the socket: no terminating chunk

    def _write_event(self, sock: Any, w: Watch, ev: dict[str, Any]) -> None:
        w.sent.append(ev)
        data = json.dumps(ev).encode() + b"\n"
        parts = [data[:len(data) // 2], data[len(data) // 2:]] if self.chunking == "split" \
            else [data]
        sock.sendall(b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts))

    def _status(self, sock: Any, code: int, reason: str, message: str) -> bool:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}
        return self._send(sock, code, reason, json.dumps(body).encode())

    def _send(self, sock: Any, code: int, reason: str, body: bytes) -> bool:
        sock.sendall(f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        return True


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            410: "Expired", 429: "TooManyRequests", 500: "InternalError",
            503: "ServiceUnavailable", 504: "Timeout"}


def _route(path: str) -> tuple[str, str]:
    """(resource, namespace) of a collection path; ("", "") if it is none we serve."""
    parts = path.strip("/").split("/")
    if parts[:1] == ["api"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"]:
        rest = parts[3:]
    else:
        return "", ""
    namespace = ""
    if len(rest) == 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if len(rest) != 1 or rest[0] not in RESOURCES:
        return "", ""
    prefix = RESOURCES[rest[0]][0]
    if not path.startswith(prefix + "/"):
        return "", ""
    return rest[0], namespace


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


# ---- object builders for tests ----------------------------------------------------------------

def service(name: str, ns: str = "default", ip: str = "10.96.0.10", port: int = 80,
            target: int = 8080) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "selector": {"app": name},
                     "ports": [{"name": "http", "protocol": "TCP", "port": port,
                                "targetPort": target}]}}


def endpoint_slice(service_name: str, ips: list[str], ns: str = "default", port: int = 8080,
                   node: str = "edge-1", suffix: str = "abcde") -> dict[str, Any]:
    return {"metadata": {"name": f"{service_name}-{suffix}", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                           "nodeName": node} for ip in ips],
            "ports": [{"name": "http", "protocol": "TCP", "port": port}]}


def endpoints(service_name: str, ips: list[str], ns: str = "default",
              port: int = 8080, node: str = "edge-1") -> dict[str, Any]:
    return {"metadata": {"name": service_name, "namespace": ns},
            "subsets": [{"addresses": [{"ip": ip, "nodeName": node} for ip in ips],
                         "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}]}


def namespace(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": "Active"}}


def pod(name: str, ip: str, ns: str = "default", node: str = "edge-1") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": node}, "status": {"phase": "Running", "podIP": ip}}


def destination_rule(name: str, ns: str = "default",
                     policy: str = "RANDOM") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"host": name, "trafficPolicy": {"loadBalancer": {"simple": policy}}}}


def tls_secret(name: str, ns: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "type": "kubernetes.io/tls",
            "data": {"tls.crt": base64.b64encode(b"cert of " + name.encode()).decode(),
                     "tls.key": base64.b64encode(b"key of " + name.encode()).decode()}}


def gateway(name: str, ns: str = "default", credential: str = "",
            selector: dict[str, str] | None = None, port: int = 443) -> dict[str, Any]:
    """A Gateway with one server: HTTPS terminated with Secret ``credential``, or plain HTTP."""
    server: dict[str, Any] = {"port": {"number": port, "name": "web",
                                       "protocol": "HTTPS" if credential else "HTTP"},
                              "hosts": ["*"]}
    if credential:
        server["tls"] = {"mode": "SIMPLE", "credentialName": credential}
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"selector": selector if selector is not None else
                     {"kubeedge": "edgemesh-gateway"}, "servers": [server]}}


def cluster(api: KubeAPI, services: int = 1) -> None:
    """A small cluster: namespace default, ``services`` services with one slice each."""
    api.put("namespaces", namespace("default"))
    for i in range(services):
        name = f"svc{i}"
        api.put("services", service(name, ip=f"10.96.0.{10 + i}"))
        api.put("endpointslices", endpoint_slice(name, [f"172.17.0.{10 + i}"]))
        api.put("pods", pod(f"{name}-pod", f"172.17.0.{10 + i}"))
