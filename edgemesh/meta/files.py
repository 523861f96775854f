"""The files source: cluster metadata from directories of manifests, without a cluster.

``--manifests DIR`` (repeatable) loads every ``*.yaml``, ``*.yml`` and ``*.json`` below DIR
(hidden entries skipped, so a ConfigMap volume's ``..data`` copies are not read twice). A file
may hold several documents (``---``), concatenated JSON objects, or a ``kind: List`` /
``ServiceList`` with ``items``. Where the kernel has inotify, a change is read as soon as it is
written (the directories are watched; a file is re-read only if its (mtime, size, inode) or
bytes changed); elsewhere files are polled every ``poll_interval`` seconds, so an edit lands
within two polls. Only what a changed file changed is written to the store.

Rules a user can rely on:

- Documents of kinds EdgeMesh does not read (Deployments, ConfigMaps...) are ignored.
- A file is applied whole. While it has a YAML/JSON syntax error or a malformed document of a
  kind EdgeMesh reads, the error is logged as ``FILE:doc#N: reason`` (the first document is
  ``doc#1``), counted in ``edgemesh_meta_bad_documents_total``, and the file's last good
  contents stay in effect (none, if it never was good).
- A Service with a selector and neither EndpointSlices nor Endpoints gets endpoints derived
  from the Pods it selects, as Kubernetes' EndpointSlice controller would: one slice per
  address family named ``<service>-derived`` (``-derived-ipv6`` for IPv6), ready when the
  Pod is Running, Ready and not terminating, named target ports resolved per Pod.
- Namespaces that objects live in exist even without a Namespace document (Kubernetes would
  not have accepted the objects otherwise), so DNS can tell NODATA from NXDOMAIN.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import gevent
import yaml

from edgemesh import doc_limits
from edgemesh.errors import ManifestError
from edgemesh.meta import kinds
from edgemesh.meta.inotify import Watcher
from edgemesh.meta.merged import Merged, Parsed
from edgemesh.meta.models import SERVICE_NAME_LABEL, Pod, Service
from edgemesh.meta.store import Store
from edgemesh.runtime import metrics, tasks

log = logging.getLogger(__name__)

EXTENSIONS = (".yaml", ".yml", ".json")
RACY_NS = 2_000_000_000
EVENT_SETTLE = 0.01  # seconds to let the rest of a writer's burst arrive after an event

BAD_DOCUMENTS = metrics.counter(
    "edgemesh_meta_bad_documents_total",
    "Manifest documents rejected (syntax errors, malformed objects of known kinds).")
RELOADS = metrics.counter("edgemesh_meta_manifest_reloads_total",
                          "Times the files source applied changed manifests to the store.")

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _ManifestLoader(_Base):  # type: ignore[misc]
    """A safe loader that keeps timestamps as strings, as JSON (and Kubernetes) would."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in _Base.yaml_implicit_resolvers.items()}


Signature = tuple[int, int, int]  # (mtime_ns, size, inode)


class FilesSource:
    """Watches manifest directories and keeps the store equal to what they describe."""

    def __init__(self, store: Store, dirs: list[str], poll_interval: float = 1.0,
                 use_inotify: bool = True) -> None:
        self.store = store
        self.dirs = list(dirs)
        self.poll_interval = poll_interval
        self.use_inotify = use_inotify
        self.merged = Merged(slices_for_pods, implied_namespace)
        self._signatures: dict[str, Signature] = {}
        self._errors: dict[str, list[str]] = {}  # path → problems of its current version
        self._content: dict[str, bytes] = {}  # path → digest of the bytes last read
        self._racy: set[str] = set()
        self._missing_reported: set[str] = set()
        self._dirs_seen: set[str] = set()
        # directories this poll could not list (EMFILE...): their files are kept, not removed
        self._unlistable: dict[str, str] = {}
        self._unlistable_reported: set[str] = set()
        self._watcher: Watcher | None = None
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Load once (so the store is synced before consumers start), then watch: inotify
        where the kernel has it (a change is read as soon as it is written), else a poll every
        ``poll_interval`` seconds."""
        self._watcher = Watcher.open() if self.use_inotify else None
        self._watch_dirs()
        self.poll()
        self._greenlet = tasks.spawn_forever("meta-files", self._wait_then_poll, backoff=0)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    @property
    def watching(self) -> str:
        """How changes are noticed: "inotify" or "polling"."""
        return "inotify" if self._watcher is not None else "polling"

    @property
    def errors(self) -> dict[str, list[str]]:
        """The current problems by file (empty when every file is good)."""
        return {path: list(problems) for path, problems in self._errors.items()}

    def _wait_then_poll(self) -> None:
        watcher = self._watcher
        if watcher is None or self._missing_reported:
            gevent.sleep(self.poll_interval)  # polling, or waiting for a directory to appear
        elif watcher.wait(None):
            gevent.sleep(EVENT_SETTLE)  # a writer's burst (write, rename) lands as one poll
            watcher.drain()
        if self._watch_dirs() and self._watcher is not None:
            self.poll()  # a new directory: what was written before its watch is read here
        self.poll()

    def _watch_dirs(self) -> bool:
        """Watch every directory known; True if one was not watched before."""
        if self._watcher is None:
            return False
        known = set(self._watcher.watched)
        dirs = {top for top in self.dirs if os.path.isdir(top)} | self._dirs_seen
        for d in dirs:
            self._watcher.watch(d)
        self._watcher.forget(dirs)
        return bool(set(self._watcher.watched) - known)

    def poll(self) -> bool:
        """Re-read changed files; apply the result to the store. True if anything changed."""
        self._dirs_seen.clear()
        self._unlistable.clear()
        current = dict(self._scan())
        self._report_unlistable()
        changed = False
        for path in sorted(set(self._signatures) - set(current)):
            if self._under_unlistable(path):
                continue  # unknown this time, not gone: keep what it served
            log.info("manifest %s removed", path)
            self._signatures.pop(path)
            self.merged.remove_file(path)
            self._errors.pop(path, None)
            self._content.pop(path, None)
            self._racy.discard(path)
            changed = True
        for path, signature in sorted(current.items()):
            if self._signatures.get(path) == signature and path not in self._racy:
                continue
            self._signatures[path] = signature
            changed |= self._load_file(path, signature)
        if changed or not self.store.synced:
            self._apply()
        return changed

    # ---- reading files ------------------------------------------------------------------------

    def _scan(self) -> Iterator[tuple[str, Signature]]:
        for top in self.dirs:
            if not os.path.isdir(top):
                if top not in self._missing_reported:
                    self._missing_reported.add(top)
                    log.warning("manifests directory %s does not exist (yet); watching for it",
                                top)
                continue
            self._missing_reported.discard(top)
            yield from _walk(top, self._dirs_seen, self._unlistable)

    def _under_unlistable(self, path: str) -> bool:
        return any(path.startswith(d + os.sep) for d in self._unlistable)

    def _report_unlistable(self) -> None:
        """Log a directory that cannot be listed once, and again when it can be."""
        for top, why in self._unlistable.items():
            if top not in self._unlistable_reported:
                self._unlistable_reported.add(top)
                log.warning("cannot list %s: %s; keeping what its manifests served until it "
                            "can be listed", top, why)
        for top in sorted(self._unlistable_reported - set(self._unlistable)):
            self._unlistable_reported.discard(top)
            log.info("can list %s again", top)

    def _load_file(self, path: str, signature: Signature) -> bool:
        """Read one file that may have changed; True if its content did."""
        # A write in the same clock tick as our read leaves (mtime, size) unchanged, so a
        # file modified very recently is read again on the next poll ("racy" as git says).
        # With inotify that write is an event of its own: no second read needed.
        if self._watcher is None and time.time_ns() - signature[0] < RACY_NS:
            self._racy.add(path)
        else:
            self._racy.discard(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            self._content.pop(path, None)
            self._reject(path, [f"{path}: cannot read: {e}"])
            return False
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if self._content.get(path) == digest:
            return False
        self._content[path] = digest
        parsed, problems = read_manifest(path, text, keep_raw=self.store.keep_raw)
        if problems:
            self._reject(path, problems)
            return False
        if self._errors.pop(path, None):
            log.info("manifest %s is good again", path)
        self.merged.set_file(path, parsed)
        log.debug("manifest %s: %d objects", path, len(parsed))
        return True

    def _reject(self, path: str, problems: list[str]) -> None:
        self._errors[path] = problems
        BAD_DOCUMENTS.inc(len(problems))
        for problem in problems:
            log.error("%s", problem)
        log.warning("manifest %s rejected; keeping its last good contents (%d objects)",
                    path, self.merged.count(path))

    # ---- applying -----------------------------------------------------------------------------

    def _apply(self) -> None:
        writes = self.merged.flush()
        if self.store.write_many(writes.puts, writes.deletes):
            RELOADS.inc()
            counts = self.merged.counts()
            log.info("manifests applied: %s (%d added, %d changed, %d removed)",
                     ", ".join(f"{n:,} {k}" for k, n in counts.items()) or "no objects",
                     writes.added, writes.changed, writes.removed)
        self.store.mark_synced()


def _walk(top: str, dirs: set[str], unlistable: dict[str, str]
          ) -> Iterator[tuple[str, Signature]]:
    dirs.add(top)
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return  # removed meanwhile: its files are gone
    except OSError as e:
        unlistable[top] = e.strerror or str(e)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(entry.path, dirs, unlistable)
            elif entry.name.endswith(EXTENSIONS) and entry.is_file():
                st = entry.stat()
                yield entry.path, (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            continue  # vanished between listing and stat: the next poll sees it gone


# ---- documents --------------------------------------------------------------------------------

def read_manifest(path: str, text: str, keep_raw: bool = True
                  ) -> tuple[list[Parsed], list[str]]:
    """The objects of known kinds in one file, and every problem found (``FILE:doc#N: ...``);
    without ``keep_raw`` the parsed objects do not hold on to their documents."""
    try:
        documents = _documents(path, text)
    except ManifestError as e:
        return [], [str(e)]
    parsed: list[Parsed] = []
    problems: list[str] = []
    ignored = 0
    for index, doc in enumerate(documents, 1):
        if doc is None:
            continue
        for where, item in _expand_list(doc, f"{path}:doc#{index}"):
            try:
                result = parse_document(item, keep_raw)
            except ManifestError as e:
                problems.append(f"{where}: {e}")
                continue
            if result is None:
                ignored += 1
            else:
                parsed.append(result)
    if ignored:
        log.debug("%s: ignored %d documents of kinds EdgeMesh does not read", path, ignored)
    return parsed, problems


def _documents(path: str, text: str) -> list[Any]:
    """The documents of one file, each within ``doc_limits`` (depth, expanded size).

    JSON is not walked: it has no aliases, so a walk sees at most one node per byte of text
    (within the budget by construction), and the decoder's own recursion limit bounds its
    depth (RecursionError: refused). Walking 50,000 Pods cost ~40 % of a 10k-Service load.
    """
    json_text = path.endswith(".json")
    try:
        docs = _json_documents(path, text) if json_text else _yaml_documents(path, text)
    except RecursionError:
        raise ManifestError(f"{path}: nested too deeply") from None
    if json_text:
        return docs
    for i, doc in enumerate(docs):
        why = doc_limits.problem(doc, len(text))
        if why:
            raise ManifestError(f"{path}:doc#{i + 1}: refused: the document {why}")
    return docs


def _yaml_documents(path: str, text: str) -> list[Any]:
    docs: list[Any] = []
    try:
        for doc in yaml.load_all(text, Loader=_ManifestLoader):
            docs.append(doc)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(e, "problem", None) or str(e)
        raise ManifestError(f"{path}:doc#{len(docs) + 1}: YAML syntax error{at}: {reason}"
                            ) from e
    return docs


def _json_documents(path: str, text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    docs: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return docs
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:doc#{len(docs) + 1}: JSON syntax error at line "
                                f"{e.lineno}, column {e.colno}: {e.msg}") from e
        docs.append(doc)


def _expand_list(doc: Any, where: str) -> Iterator[tuple[str, Any]]:
    """A document, or the items of a ``List``/``ServiceList`` (items inherit the list's kind)."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if not (isinstance(kind, str) and kind.endswith("List") and "items" in doc):
        yield where, doc
        return
    items = doc.get("items") or []
    if not isinstance(items, list):
        yield where, {"kind": kind, "apiVersion": doc.get("apiVersion"), "items": items}
        return
    item_kind = kind[: -len("List")]
    for i, item in enumerate(items):
        if isinstance(item, dict) and item_kind and "kind" not in item:
            item = {"kind": item_kind, "apiVersion": doc.get("apiVersion"), **item}
        yield f"{where}.items[{i}]", item


def parse_document(doc: Any, keep_raw: bool = True) -> Parsed | None:
    """A typed object from one document; None for kinds EdgeMesh does not read.

    Raises ManifestError for something that is not a Kubernetes object, or a malformed
    object of a kind EdgeMesh reads.
    """
    if not isinstance(doc, dict):
        raise ManifestError(f"expected a Kubernetes object (a mapping), got {_shape(doc)}")
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    if not isinstance(kind, str) or not kind:
        raise ManifestError("kind: required")
    if not isinstance(api_version, str) or not api_version:
        raise ManifestError("apiVersion: required")
    if kind.endswith("List") and "items" in doc:
        raise ManifestError("items: expected a list")
    known = kinds.kind_for(api_version, kind)
    if known is None:
        return None
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    try:
        return Parsed(known.name, known.parse(doc), doc if keep_raw else None)
    except ManifestError as e:
        raise ManifestError(f"{kind} {name if isinstance(name, str) else '?'}: {e}") from None
    except (AttributeError, TypeError, ValueError) as e:  # a shape the parser did not foresee
        log.debug("parser of %s failed on an unforeseen shape", kind, exc_info=True)
        raise ManifestError(f"{kind} {name if isinstance(name, str) else '?'}: malformed "
                            f"({type(e).__name__}: {e})") from None


def _shape(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


# ---- endpoints from pods ----------------------------------------------------------------------

def slices_for_pods(svc: Service, pods: list[Pod]) -> list[Parsed]:
    """The slices Kubernetes would make for ``svc`` from ``pods``.

    Pods are grouped by address family and by how the service's (possibly named) target
    ports resolve on them, since one slice carries one port mapping.
    """
    groups: dict[tuple[str, tuple[tuple[str, int, str, str], ...]], list[dict[str, Any]]] = {}
    for pod in sorted(pods, key=lambda p: p.meta.name):
        if pod.phase in ("Succeeded", "Failed"):
            continue
        ports = _resolved_ports(svc, pod)
        for ip in pod.pod_ips:
            family = "IPv6" if ":" in ip else "IPv4"
            groups.setdefault((family, ports), []).append(_endpoint_doc(svc, pod, ip))
    out = []
    counts: dict[str, int] = {}
    for (family, ports), endpoints in sorted(groups.items()):
        counts[family] = counts.get(family, 0) + 1
        name = f"{svc.meta.name}-derived" + ("-ipv6" if family == "IPv6" else "") + \
            (f"-{counts[family]}" if counts[family] > 1 else "")
        raw = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": name, "namespace": svc.meta.namespace,
                            "labels": {SERVICE_NAME_LABEL: svc.meta.name,
                                       "endpointslice.kubernetes.io/managed-by":
                                           "files.edgemesh.kubeedge.io"}},
               "addressType": family, "endpoints": endpoints,
               "ports": [{"name": n, "port": number, "protocol": proto,
                          **({"appProtocol": app} if app else {})}
                         for n, number, proto, app in ports]}
        out.append(Parsed("EndpointSlice", kinds.ENDPOINT_SLICE.parse(raw), raw))
    return out


def _resolved_ports(svc: Service, pod: Pod) -> tuple[tuple[str, int, str, str], ...]:
    """(name, target port, protocol, appProtocol) of each service port resolvable on ``pod``."""
    out = []
    for p in svc.ports:
        target = p.target_port
        if isinstance(target, str):
            number = next((cport for cname, cport, cproto in pod.container_ports
                           if cname == target and cproto == p.protocol), None)
            if number is None:
                if not target.isdigit():
                    continue  # Kubernetes leaves such a pod out of this port's endpoints
                number = int(target)
            target = number
        out.append((p.name, target, p.protocol, p.app_protocol))
    return tuple(out)


def _endpoint_doc(svc: Service, pod: Pod, ip: str) -> dict[str, Any]:
    serving = pod.ready and pod.phase == "Running"
    doc: dict[str, Any] = {
        "addresses": [ip],
        "conditions": {"ready": serving and not pod.terminating, "serving": serving,
                       "terminating": pod.terminating},
        "targetRef": {"kind": "Pod", "namespace": pod.meta.namespace, "name": pod.meta.name,
                      **({"uid": pod.meta.uid} if pod.meta.uid else {})}}
    if pod.node_name:
        doc["nodeName"] = pod.node_name
    if pod.hostname and pod.subdomain == svc.meta.name:
        doc["hostname"] = pod.hostname
    return doc


# ---- namespaces -------------------------------------------------------------------------------

def implied_namespace(name: str) -> Parsed:
    """The Namespace object of a namespace that objects live in but no document declares."""
    raw = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
           "status": {"phase": "Active"}}
    return Parsed("Namespace", kinds.NAMESPACE.parse(raw), raw)
