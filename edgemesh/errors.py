"""The one error root and its branches; each says whose fault it is."""
from __future__ import annotations


class EdgeMeshError(Exception):
    """Root of every error EdgeMesh raises on purpose."""


class ConfigError(EdgeMeshError):
    """The user's flags or config are wrong; the CLI exits 2 with ``problems`` listed.

    Each problem names its key path: ``modules.edgeTunnel.listenPort: expected ...``.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ManifestError(EdgeMeshError):
    """A metadata document is malformed; the source keeps its last good state."""


class RemoteProtocolError(EdgeMeshError):
    """A peer sent bytes that break the protocol; ``hint`` is the status to answer with."""

    def __init__(self, message: str, hint: int | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class LocalProtocolError(EdgeMeshError):
    """We were asked to do something the protocol forbids (a bug on our side)."""


class UnavailableError(EdgeMeshError):
    """A dependency (API server, upstream, endpoint, peer) cannot be reached now."""
