"""Where the API server is and how to authenticate to it: kubeconfig, --master, in-cluster, or
the KubeEdge edge metaServer.

Precedence (``connection_from_config``):

1. ``kubeAPIConfig.kubeConfig``: the current context's cluster ``server``, its CA
   (``certificate-authority``/``-data``, ``insecure-skip-tls-verify``), the user's client
   certificate/key (file or data) and ``token``/``tokenFile``. When ``master`` is set too, it
   replaces the server URL and the kubeconfig's credentials are kept, as client-go's
   ``BuildConfigFromFlags(master, kubeconfig)`` does for the Go EdgeMesh.
2. ``kubeAPIConfig.master`` alone: a bare URL, no credentials (the metaServer, ``kubectl proxy``).
3. In a pod (``in_cluster``): ``KUBERNETES_SERVICE_HOST``/``PORT`` with the service-account
   token and CA from ``/var/run/secrets/kubernetes.io/serviceaccount``.
4. ``kubeAPIConfig.metaServer.server`` (default ``http://127.0.0.1:10550``), with client
   certificates when ``metaServer.security.requireAuthorization`` is on.

A kubeconfig that cannot be used raises ``ConfigError`` naming the key and the file, so the
CLI exits 2 instead of retrying something that can never work. Token files are re-read every
minute: bound service-account tokens rotate.
"""
from __future__ import annotations

import base64
import binascii
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import requests
import requests.adapters
import yaml
from urllib3.connection import HTTPConnection

from edgemesh import doc_limits
from edgemesh.config import KubeAPIConfig
from edgemesh.errors import ConfigError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_REREAD_SECONDS = 60.0
KEY = "kubeAPIConfig.kubeConfig"
MAX_KUBECONFIG_BYTES = 16 * 1024 * 1024  # kubeconfigs with embedded certificates: ~10-100 KB


@dataclass
class Connection:
    """An API server's URL and credentials; ``session()`` makes a ready ``requests`` session."""
    base_url: str
    verify: bool | str = True  # False, True (system CAs) or a CA bundle path
    cert: tuple[str, str] | None = None  # client certificate and key paths
    token: str = ""
    token_file: str = ""
    _token_read_at: float = field(default=0.0, repr=False)

    def url(self, path: str) -> str:
        return self.base_url + path

    def bearer_token(self) -> str:
        """The token, re-read from ``token_file`` at most once a minute."""
        if self.token_file and time.monotonic() - self._token_read_at > TOKEN_REREAD_SECONDS:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    self.token = f.read().strip()
                self._token_read_at = time.monotonic()
            except OSError:
                pass  # keep the last token; the API will say 401 if it expired
        return self.token

    def headers(self) -> dict[str, str]:
        out = {"Accept": "application/json", "User-Agent": "edgemesh-python"}
        token = self.bearer_token()
        if token:
            out["Authorization"] = f"Bearer {token}"
        return out

    def session(self) -> requests.Session:
        s = requests.Session()
        s.verify = self.verify
        s.cert = self.cert
        s.trust_env = False  # a proxy from the environment must not sit between us and the API
        adapter = _KeepaliveAdapter()
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        return s


# A watch only reads. Without keepalive, a connection whose NAT mapping vanished (a router
# restarted, `conntrack -F`) stays open and silent until the watch's timeoutSeconds (5-10 min)
# and no change arrives meanwhile (tests/chaos). Probes after 15 s of silence end it within
# ~30 s, at once where the far end answers with a reset; client-go keeps alive at 30 s.
KEEPALIVE = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
             (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 15),
             (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
             (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)]


class _KeepaliveAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["socket_options"] = HTTPConnection.default_socket_options + KEEPALIVE
        super().init_poolmanager(*args, **kwargs)


def connection_from_config(api: KubeAPIConfig, in_cluster: bool) -> Connection:
    """The connection the config asks for, by the precedence in the module docstring."""
    if api.kubeConfig:
        conn = from_kubeconfig(api.kubeConfig)
        if api.master:
            conn.base_url = _base(api.master)
        return conn
    if api.master:
        return Connection(base_url=_base(api.master))
    if in_cluster:
        return in_cluster_connection()
    return metaserver_connection(api)


def in_cluster_connection(sa_dir: str = SERVICE_ACCOUNT_DIR) -> Connection:
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    ca = os.path.join(sa_dir, "ca.crt")
    return Connection(base_url=f"https://{host}:{port}",
                      verify=ca if os.path.exists(ca) else True,
                      token_file=os.path.join(sa_dir, "token"))


def metaserver_connection(api: KubeAPIConfig) -> Connection:
    sec = api.metaServer.security
    base = _base(api.metaServer.server)
    if not sec.requireAuthorization:
        return Connection(base_url=base)
    if base.startswith("http://"):
        base = "https://" + base[len("http://"):]
    return Connection(base_url=base,
                      verify=False if sec.insecureSkipTLSVerify else sec.tlsCaFile,
                      cert=(sec.tlsCertFile, sec.tlsPrivateKeyFile))


def _base(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "https://" + url  # client-go's default scheme for a bare host:port
    return url


# ---- kubeconfig -------------------------------------------------------------------------------

def from_kubeconfig(path: str) -> Connection:
    """The current context's cluster and user; ``ConfigError`` names what is missing."""
    doc = _read_kubeconfig(path)
    where = f"{KEY}: {path}"
    current = doc.get("current-context")
    if not current:
        raise ConfigError([f"{where}: no current-context"])
    context = _named(doc, "contexts", current, "context", where)
    cluster = _named(doc, "clusters", context.get("cluster"), "cluster", where)
    user = _named(doc, "users", context.get("user"), "user", where) if context.get("user") \
        else {}
    server = cluster.get("server")
    if not server or not isinstance(server, str):
        raise ConfigError([f"{where}: cluster {context.get('cluster')!r} has no server"])
    base_dir = os.path.dirname(os.path.abspath(path))
    conn = Connection(base_url=_base(server))
    if cluster.get("insecure-skip-tls-verify"):
        conn.verify = False
    else:
        ca = _file_or_data(cluster, "certificate-authority", base_dir, where)
        if ca:
            conn.verify = ca
    cert = _file_or_data(user, "client-certificate", base_dir, where)
    key = _file_or_data(user, "client-key", base_dir, where)
    if bool(cert) != bool(key):
        raise ConfigError([f"{where}: user {context.get('user')!r} has a client certificate "
                           "without a key, or a key without a certificate"])
    if cert and key:
        conn.cert = (cert, key)
    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise ConfigError([f"{where}: user {context.get('user')!r}: {unsupported} "
                               "credential plugins are not supported; use a token or "
                               "client certificate"])
    conn.token = str(user.get("token") or "")
    token_file = user.get("tokenFile")
    if token_file:
        conn.token_file = _resolve(str(token_file), base_dir)
        if not os.path.exists(conn.token_file):
            raise ConfigError([f"{where}: tokenFile {conn.token_file} does not exist"])
    return conn


def _read_kubeconfig(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_KUBECONFIG_BYTES + 1)  # never more: a huge file is refused
        if len(text) > MAX_KUBECONFIG_BYTES:
            raise ConfigError([f"{KEY}: {path}: refused: larger than "
                               f"{MAX_KUBECONFIG_BYTES} bytes"])
        doc = yaml.safe_load(text)
        why = doc_limits.problem(doc, len(text))
    except OSError as e:
        raise ConfigError([f"{KEY}: cannot read {path}: {e.strerror}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"{KEY}: {path} is not UTF-8 text: {e.reason}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{KEY}: {path} is not valid YAML: {e}"]) from e
    except RecursionError:
        raise ConfigError([f"{KEY}: {path}: refused: nested too deeply"]) from None
    if why:
        raise ConfigError([f"{KEY}: {path}: refused: the document {why}"])
    if not isinstance(doc, dict):
        raise ConfigError([f"{KEY}: {path}: expected a kubeconfig mapping"])
    return doc


def _named(doc: dict[str, Any], section: str, name: Any, inner: str,
           where: str) -> dict[str, Any]:
    if not name:
        raise ConfigError([f"{where}: the current context names no {inner}"])
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(inner) or {}
            if not isinstance(value, dict):
                raise ConfigError([f"{where}: {section}[{name}].{inner}: expected a mapping"])
            return value
    raise ConfigError([f"{where}: {inner} {name!r} not found in {section}"])


def _resolve(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def _file_or_data(entry: dict[str, Any], key: str, base_dir: str, where: str) -> str:
    """A file path for ``key`` (relative to the kubeconfig), or ``key-data`` written to one."""
    data = entry.get(f"{key}-data")
    if data:
        try:
            raw = base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ConfigError([f"{where}: {key}-data is not valid base64"]) from e
        return _private_file(raw, key)
    path = entry.get(key)
    if not path:
        return ""
    full = _resolve(str(path), base_dir)
    if not os.path.exists(full):
        raise ConfigError([f"{where}: {key} {full} does not exist"])
    return full


_PRIVATE_DIR: str | None = None


def _private_file(data: bytes, name: str) -> str:
    """Inline credentials written to a 0700 temp dir: ``requests`` takes only file paths."""
    global _PRIVATE_DIR
    if _PRIVATE_DIR is None:
        _PRIVATE_DIR = tempfile.mkdtemp(prefix="edgemesh-kube-")
    fd, path = tempfile.mkstemp(prefix=name + "-", dir=_PRIVATE_DIR)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
