"""Node identity: the static key pair, the cluster PSK, and node-name → key bindings.

- The key pair is random, made on first start in the state dir (``tunnel.key``, mode 0600) —
  never derived from the node name, so knowing a name gives nothing.
- The PSK file may hold any secret text; the 32-byte Noise PSK is SHA-256 over a fixed label
  and the file's bytes with surrounding whitespace stripped, so a Kubernetes Secret mounted
  with or without a trailing newline gives the same key.
- Bindings (``bindings.json``) remember which key a node name proved first. A different key for
  a bound name is refused until an operator releases the name (``edgemesh server release``, or
  deleting the name from an agent's ``peers.json``). The file is re-read when it changes on
  disk, so a release by another process takes effect without a restart.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass

from edgemesh.errors import ConfigError
from edgemesh.tunnel.x25519 import StaticKey

log = logging.getLogger(__name__)

PSK_LABEL = b"edgemesh cluster psk v1\x00"
NO_PSK = b"\x00" * 32  # psk.enable=false: the handshake still runs, membership is not proved


def load_or_create_key(state_dir: str, filename: str = "tunnel.key") -> StaticKey:
    """The node's static key, created (0600, atomically) on first start.

    Created as a temp file in the state dir, fsynced, renamed over ``filename``, then the
    directory fsynced: a crash at any point leaves no key (a new one is made on the next start,
    the name not yet bound to it) or the whole key. A key file of the wrong size is a
    ``ConfigError``, never silently replaced: peers and servers have bound the node's name to
    its key. Temp files of a killed creation are removed. Loading or creating the key does not
    import ``cryptography`` (see ``tunnel/x25519.py``).
    """
    path = os.path.join(state_dir, filename)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if len(raw) != 32:
            raise ConfigError([f"--state-dir: {path} is not a 32-byte X25519 key ({len(raw)} "
                               f"bytes): restore it, or delete it to make a new key (then "
                               f"release the node's name: edgemesh server release NODE)"])
        return StaticKey(raw)
    except FileNotFoundError:
        pass
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    _remove_temp_keys(state_dir, f".{filename}.")
    key = StaticKey.generate()
    raw = key.private
    import tempfile  # only when a key is created: tempfile + shutil cost an idle agent ~0.4 MB

    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{filename}.")
    try:
        os.fchmod(fd, 0o600)
        if os.write(fd, raw) != len(raw):
            raise OSError(f"short write to {tmp}")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(state_dir)
    log.info("created node key %s (public %s)", path, key.public.hex()[:16])
    return key


def _remove_temp_keys(state_dir: str, prefix: str) -> None:
    for name in os.listdir(state_dir):
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(state_dir, name))
            except OSError:
                pass


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` survive a power cut."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def psk_from_bytes(secret: bytes) -> bytes:
    secret = secret.strip()
    if len(secret) < 16:
        raise ConfigError(["modules.edgeTunnel.psk.path: the PSK must be at least 16 bytes"])
    return hashlib.sha256(PSK_LABEL + secret).digest()


def load_psk(path: str, enable: bool = True) -> bytes:
    """The 32-byte handshake PSK from ``path`` (NO_PSK when disabled)."""
    if not enable:
        log.warning("psk.enable is false: any host that can reach the tunnel port may join")
        return NO_PSK
    try:
        with open(path, "rb") as f:
            return psk_from_bytes(f.read())
    except OSError as e:
        raise ConfigError([f"modules.edgeTunnel.psk.path: cannot read {path}: "
                           f"{e.strerror}"]) from e


@dataclass(frozen=True)
class Binding:
    node: str
    key: str  # hex of the 32-byte static public key


class Bindings:
    """Name → key bindings persisted in one JSON file; first proof binds, others are refused."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._keys: dict[str, str] = {}
        self._mtime: float | None = None
        self._reload()

    def check(self, node: str, key: bytes) -> bool:
        """True if ``node`` may use ``key`` (binding it if the name is new)."""
        self._reload()
        hexkey = key.hex()
        bound = self._keys.get(node)
        if bound == hexkey:
            return True
        if bound is not None:
            return False
        self._keys[node] = hexkey
        self._save()
        return True

    def key_of(self, node: str) -> str | None:
        self._reload()
        return self._keys.get(node)

    def release(self, node: str) -> bool:
        """Forget ``node``'s binding (operator action); True if it was bound."""
        self._reload()
        if self._keys.pop(node, None) is None:
            return False
        self._save()
        return True

    def all(self) -> list[Binding]:
        self._reload()
        return [Binding(n, k) for n, k in sorted(self._keys.items())]

    def _reload(self) -> None:
        if not self.path:
            return
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                fcntl.flock(f, fcntl.LOCK_SH)
                doc = json.load(f)
        except (OSError, ValueError) as e:
            log.error("cannot read bindings %s: %s (keeping what is in memory)", self.path, e)
            return
        if isinstance(doc, dict):
            self._keys = {str(k): str(v) for k, v in doc.items()}
        self._mtime = mtime

    def _save(self) -> None:
        if not self.path:
            return
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        import tempfile  # the server's bindings only (see load_or_create_key)

        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bindings.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._keys, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        self._mtime = os.stat(self.path).st_mtime_ns


def release_binding(state_dir: str, node: str, filename: str = "bindings.json") -> bool:
    """Operator action used by ``edgemesh server release NODE``."""
    return Bindings(os.path.join(state_dir, filename)).release(node)
