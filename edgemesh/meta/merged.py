"""What a set of manifest files describes, kept up to date file by file (sans-IO).

``set_file(path, objects)`` / ``remove_file(path)`` record a file's new contents; ``flush()``
returns the writes that bring the store from the last flush to the new state: objects whose
winning definition changed, endpoints derived from Pods for the selector Services affected, and
the Namespaces implied by the objects. Pods themselves stay here, where endpoints are derived
from them: no consumer reads Pods from the store. The work is proportional to what the files
changed, not to the size of the cluster: indexes by namespace find the Services a Pod change can
touch.

Rules (the files source's docstring states them for users): an object defined in several files
comes from the last path in sort order (logged once per change); a Service with a selector and
neither EndpointSlices nor Endpoints gets slices derived from the Pods it selects; a namespace
that objects live in exists even without a Namespace document.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edgemesh.meta import kinds
from edgemesh.meta.models import Pod, Service

log = logging.getLogger(__name__)

Key = tuple[str, str]
KindKey = tuple[str, str, str]  # (kind, namespace, name)
Put = tuple[str, Any, "dict[str, Any] | None"]


@dataclass(frozen=True, slots=True)
class Parsed:
    """One object read from a manifest: its kind name, typed value and (if kept) raw document."""
    kind: str
    obj: Any
    raw: dict[str, Any] | None


@dataclass
class Writes:
    """What ``flush`` asks the store to do, and how many objects it adds/changes/removes."""
    puts: list[Put] = field(default_factory=list)
    deletes: list[tuple[str, Key]] = field(default_factory=list)
    added: int = 0
    changed: int = 0
    removed: int = 0


_NONE: dict[str, Any] = {}  # an empty index to look into (never written)

DeriveSlices = Callable[[Service, list[Pod]], list[Parsed]]
ImplyNamespace = Callable[[str], Parsed]


class Merged:
    """The merged state of every file, and the index it needs to derive endpoints.

    Memory per object is a few dict slots: a file's objects by (kind, namespace, name), the
    path that defines each (a list only for objects defined in several files), and the Pods
    and Services by namespace; the objects themselves are shared with the store.
    """

    def __init__(self, derive: DeriveSlices, imply: ImplyNamespace) -> None:
        self._derive, self._imply = derive, imply
        self._files: dict[str, dict[KindKey, Any]] = {}  # path -> objects it defines
        self._raws: dict[str, dict[KindKey, dict[str, Any]]] = {}  # only if documents kept
        self._owners: dict[KindKey, str | list[str]] = {}  # the paths defining an object
        self._applied: dict[KindKey, Any] = {}  # what the store was given (winners only)
        self._dirty: set[KindKey] = set()
        self._services: dict[str, dict[str, Service]] = {}  # namespace -> name -> Service
        # (ns, label, value) -> the Service selecting by it, or a set when several do
        self._selectors: dict[tuple[str, str, str], str | set[str]] = {}
        self._pods: dict[str, dict[str, Pod]] = {}  # namespace -> name -> Pod
        self._covered: collections.Counter[Key] = collections.Counter()  # user slices
        self._derived: dict[Key, list[Parsed]] = {}
        self._ns_use: collections.Counter[str] = collections.Counter()
        self._declared: set[str] = set()
        self._implied: set[str] = set()
        self._counts: collections.Counter[str] = collections.Counter()  # applied, by kind
        self._derived_count = 0
        self.derivations = 0  # Services whose endpoints were derived again (tests count it)
        self._debug = False

    def count(self, path: str) -> int:
        return len(self._files.get(path, ()))

    def set_file(self, path: str, objects: list[Parsed]) -> None:
        self.remove_file(path)
        mine: dict[KindKey, Any] = {}
        raws: dict[KindKey, dict[str, Any]] = {}
        for item in objects:
            ck = (item.kind, item.obj.meta.namespace, item.obj.meta.name)
            mine[ck] = item.obj  # a later document in the same file wins
            if item.raw is not None:
                raws[ck] = item.raw
        self._files[path] = mine
        if raws:
            self._raws[path] = raws
        for ck in mine:
            owners = self._owners.get(ck)
            if owners is None:
                self._owners[ck] = path
            else:
                self._owners[ck] = sorted({*([owners] if isinstance(owners, str)
                                             else owners), path})
            self._dirty.add(ck)

    def remove_file(self, path: str) -> None:
        self._raws.pop(path, None)
        for ck in self._files.pop(path, ()):
            owners = self._owners.get(ck)
            if owners == path:
                del self._owners[ck]
            elif isinstance(owners, list):
                rest = [p for p in owners if p != path]
                self._owners[ck] = rest[0] if len(rest) == 1 else rest
            self._dirty.add(ck)

    def flush(self) -> Writes:
        """The store writes since the last flush."""
        out = Writes()
        touched: set[Key] = set()
        self._debug = log.isEnabledFor(logging.DEBUG)  # per-object lines at -v 3 and up
        for ck in self._dirty:
            self._settle(ck, out, touched)
        self._dirty.clear()
        for key in touched:
            self._rederive(key, out)
        self._imply_namespaces(out)
        return out

    # ---- winners ----------------------------------------------------------------------------

    def _settle(self, ck: KindKey, out: Writes, touched: set[Key]) -> None:
        owners = self._owners.get(ck)
        if isinstance(owners, list):
            log.warning("%s %s/%s is defined twice; %s wins", ck[0], ck[1], ck[2], owners[-1])
            owners = owners[-1]
        new = self._files[owners][ck] if owners is not None else None
        pod = ck[0] == "Pod"  # Pods stay here (endpoints are derived from them), not the store
        old = self._pods.get(ck[1], _NONE).get(ck[2]) if pod else self._applied.get(ck)
        if new is old or (new is not None and old is not None and new == old):
            return
        kind, key = ck[0], (ck[1], ck[2])
        if self._debug:
            log.debug("%s %s/%s %s", kind, ck[1], ck[2], "removed" if new is None else
                      "added" if old is None else "changed")
        if new is None:
            if not pod:
                del self._applied[ck]
                out.deletes.append((kind, key))
            out.removed += 1
            self._counts[kind] -= 1
        else:
            assert owners is not None
            if not pod:
                self._applied[ck] = new
                raws = self._raws.get(owners)
                out.puts.append((kind, new, raws.get(ck) if raws else None))
            out.added += old is None
            out.changed += old is not None
            self._counts[kind] += old is None
        for obj, sign in ((old, -1), (new, 1)):
            if obj is not None:
                self._index(kind, key, obj, sign, touched)

    def _index(self, kind: str, key: Key, obj: Any, sign: int, touched: set[Key]) -> None:
        ns, name = key
        if ns:
            self._ns_use[ns] += sign
        if kind == "Pod":  # first: most objects are Pods
            _put_or_drop(self._pods, ns, name, obj, sign)
            services = self._services.get(ns, _NONE)
            for label, value in obj.meta.labels.items():
                names = self._selectors.get((ns, label, value))
                if names is None:
                    continue
                for svc_name in (names,) if isinstance(names, str) else names:
                    svc = services.get(svc_name)
                    if svc is not None and svc.selector and selects(svc.selector, obj):
                        touched.add((ns, svc_name))
        elif kind == "Namespace":
            (self._declared.add if sign > 0 else self._declared.discard)(name)
        elif kind == "Service":
            _put_or_drop(self._services, ns, name, obj, sign)
            if obj.selector:  # indexed by one of its labels: a Pod finds its Services
                _select(self._selectors, (ns, *min(obj.selector.items())), name, sign)
            touched.add(key)
        elif kind == "EndpointSlice" and obj.service_name:
            self._covered[(ns, obj.service_name)] += sign
            touched.add((ns, obj.service_name))
        elif kind == "Endpoints":
            self._covered[key] += sign
            touched.add(key)

    # ---- derived endpoints and implied namespaces -------------------------------------------

    def _rederive(self, key: Key, out: Writes) -> None:
        svc = self._services.get(key[0], _NONE).get(key[1])
        new: list[Parsed] = []
        if svc is not None and svc.selector and svc.type != "ExternalName" and \
                self._covered[key] <= 0:
            self.derivations += 1
            pods = [p for p in self._pods.get(key[0], {}).values()
                    if selects(svc.selector, p)]
            new = [p for p in self._derive(svc, pods) if
                   ("EndpointSlice", p.obj.meta.namespace, p.obj.meta.name)
                   not in self._applied]
        if self._covered[key] <= 0:
            del self._covered[key]
        old = self._derived.pop(key, [])
        self._derived_count += len(new) - len(old)
        if new:
            self._derived[key] = new
        names = {p.obj.meta.name for p in new}
        for p in old:
            if p.obj.meta.name not in names:
                out.deletes.append(("EndpointSlice", (key[0], p.obj.meta.name)))
        out.puts += [("EndpointSlice", p.obj, p.raw) for p in new]

    def _imply_namespaces(self, out: Writes) -> None:
        used = {ns for ns, n in self._ns_use.items() if n > 0} | {"default"}
        implied = used - self._declared
        for ns in sorted(self._implied - implied):
            if ns not in self._declared:
                out.deletes.append(("Namespace", ("", ns)))
        for ns in sorted(implied - self._implied):
            item = self._imply(ns)
            out.puts.append(("Namespace", item.obj, item.raw))
        self._implied = implied

    def pod(self, namespace: str, name: str) -> Pod | None:
        """A Pod the files define (Pods are kept here, not in the store)."""
        return self._pods.get(namespace, {}).get(name)

    def objects(self) -> Iterable[Any]:
        """Every winning definition (not the derived ones)."""
        return self._applied.values()

    def counts(self) -> dict[str, int]:
        """Objects by kind, derived slices and implied namespaces included."""
        out = self._counts.copy()
        out["EndpointSlice"] += self._derived_count
        out["Namespace"] += len(self._implied)
        return {k.name: out[k.name] for k in kinds.ALL if out[k.name]}


def selects(selector: dict[str, str], pod: Pod) -> bool:
    labels = pod.meta.labels
    for k, v in selector.items():
        if labels.get(k) != v:
            return False
    return True


def _select(index: dict[tuple[str, str, str], str | set[str]], item: tuple[str, str, str],
            name: str, sign: int) -> None:
    names = index.get(item)
    if sign > 0:
        if names is None or names == name:
            index[item] = name
        elif isinstance(names, str):
            index[item] = {names, name}
        else:
            names.add(name)
    elif names == name:
        del index[item]
    elif isinstance(names, set):
        names.discard(name)
        if len(names) == 1:
            index[item] = names.pop()


def _put_or_drop(index: dict[str, dict[str, Any]], ns: str, name: str, obj: Any,
                 sign: int) -> None:
    if sign > 0:
        index.setdefault(ns, {})[name] = obj
        return
    objs = index.get(ns)
    if objs is not None and objs.get(name) is obj:
        del objs[name]
        if not objs:
            del index[ns]
