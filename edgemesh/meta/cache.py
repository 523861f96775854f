"""The metadata cache: the last good state, on disk, for starts while the API is unreachable.

``MetadataCache`` subscribes to the store and, about a second after the last change of a burst,
writes the store's raw documents (``store.raw_json()``, kept because the cache sets
``store.keep_raw``) to ``<state-dir>/metadata-cache.json``: written to a temp file, fsynced,
renamed over the old one (a crash leaves the old file or the new one, never half of one), mode
0600 in a 0700 directory (the snapshot holds Secrets when the gateway is on). It writes only
once the store is synced from the live API, so a partial first list never replaces a complete
cache.

``load()`` parses every cached document with its kind; a document that no longer parses is
skipped, a file that is not a cache (corrupt, wrong version, its ``sha256`` not that of its
``kinds``) is reported once and ignored, and temp files a killed writer left are removed.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import gevent
import gevent.event

from edgemesh.errors import ManifestError
from edgemesh.meta import kinds
from edgemesh.meta.store import Store
from edgemesh.runtime import metrics, tasks

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILE_NAME = "metadata-cache.json"
TEMP_PREFIX = ".metadata-cache-"
KINDS_KEY = b',"kinds":'

WRITES = metrics.counter("edgemesh_meta_cache_writes_total",
                         "Snapshots of the metadata store written to the state dir.")
LOADED = metrics.gauge("edgemesh_meta_cache_loaded",
                       "1 while the store holds metadata loaded from the cache.")

State = dict[str, list[tuple[Any, dict[str, Any]]]]


class MetadataCache:
    """Debounced atomic snapshots of ``store`` in ``state_dir``, and loading them back."""

    def __init__(self, store: Store, state_dir: str, *, source: str = "",
                 debounce: float = 1.0) -> None:
        self.store = store
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILE_NAME)
        self.source = source
        self.debounce = debounce
        self.written_at = ""
        self.last_error = ""
        self._dirty = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None
        self._written_revision = -1
        store.keep_raw = True  # the snapshot is made of the raw documents

    def start(self) -> None:
        self.store.subscribe(self._changed)
        self._greenlet = tasks.spawn_forever("meta-cache", self._loop, backoff=self.debounce)

    def stop(self) -> None:
        self.store.unsubscribe(self._changed)
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        if self._dirty.is_set():
            self.write()  # a change in the last second is not lost on a clean stop

    def view(self) -> dict[str, Any]:
        return {"path": self.path, "writtenAt": self.written_at, "lastError": self.last_error,
                "loaded": bool(LOADED.value)}

    def loaded(self, on: bool) -> None:
        LOADED.set(1 if on else 0)

    def _changed(self, _: frozenset[str]) -> None:
        self._dirty.set()

    def _loop(self) -> None:
        while True:
            self._dirty.wait()
            gevent.sleep(self.debounce)  # let a burst of events land: one write per burst
            self._dirty.clear()
            self.write()

    def write(self) -> bool:
        """Write the store now if it is synced live and changed; True if a file was written."""
        self._dirty.clear()
        if not self.store.synced or self.store.stale_reason or \
                self.store.revision == self._written_revision:
            return False
        revision = self.store.revision
        written = _now()
        try:
            write_atomic(self.path, snapshot_bytes(written, self.source, self.store.raw_json()))
        except OSError as e:
            if self.last_error != str(e):
                log.warning("cannot write metadata cache %s: %s", self.path, e)
            self.last_error = str(e)
            return False
        self.last_error = ""
        self.written_at = written
        self._written_revision = revision
        WRITES.inc()
        return True

    def load(self) -> State | None:
        """The cached state by kind as (typed, raw) pairs, or None without a usable cache."""
        remove_temp_files(self.state_dir, TEMP_PREFIX)
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            doc = json.loads(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("metadata cache %s is unreadable, ignoring it: %s", self.path, e)
            return None
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION or \
                not isinstance(doc.get("kinds"), dict):
            log.warning("metadata cache %s is not a version-%d cache, ignoring it", self.path,
                        FORMAT_VERSION)
            return None
        if "sha256" in doc and doc["sha256"] != _body_sha256(data):
            log.warning("metadata cache %s does not match its checksum, ignoring it", self.path)
            return None
        self.written_at = str(doc.get("written", ""))
        return parse_state(doc["kinds"], self.path)


def snapshot_bytes(written: str, source: str, kinds_: dict[str, list[bytes]]) -> bytes:
    """The cache file: its header and the raw documents, joined without re-encoding them;
    ``sha256`` in the header is that of the bytes of ``kinds`` (see ``_body_sha256``)."""
    body = b"{" + b",".join(json.dumps(kind).encode() + b":[" + b",".join(docs) + b"]"
                            for kind, docs in kinds_.items()) + b"}"
    head = json.dumps({"version": FORMAT_VERSION, "written": written, "source": source,
                       "sha256": hashlib.sha256(body).hexdigest()},
                      separators=(",", ":")).encode()
    return head[:-1] + KINDS_KEY + body + b"}"


def _body_sha256(data: bytes) -> str:
    """The SHA-256 of the ``kinds`` object's bytes in a cache file: from just after the first
    ``,"kinds":`` (which cannot occur inside the header's JSON strings, whose quotes are
    escaped) to before the file's last ``}``."""
    at = data.find(KINDS_KEY)
    end = data.rstrip().rfind(b"}")
    if at < 0 or end < at:
        return ""
    return hashlib.sha256(data[at + len(KINDS_KEY):end]).hexdigest()


def parse_state(docs: dict[str, Any], where: str) -> State:
    """Raw documents by kind name → (typed, raw) pairs; unknown kinds and bad documents skipped."""
    state: State = {}
    for name, items in docs.items():
        kind = kinds.BY_NAME.get(name)
        if kind is None or not isinstance(items, list):
            log.warning("metadata cache %s: skipping unknown kind %r", where, name)
            continue
        pairs = []
        for raw in items:
            try:
                pairs.append((kind.parse(raw), raw))
            except (ManifestError, TypeError, ValueError, AttributeError, KeyError) as e:
                log.warning("metadata cache %s: skipping a bad %s: %s", where, name, e)
        state[name] = pairs
    return state


def write_atomic(path: str, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename; the directory is made 0700 if missing."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def remove_temp_files(directory: str, prefix: str) -> None:
    """Remove the temp files a writer killed before its rename left in ``directory``."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    if names:
        log.info("removed %d unfinished temp files %s* in %s", len(names), prefix, directory)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
