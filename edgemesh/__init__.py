"""EdgeMesh: the data plane of an edge Kubernetes (KubeEdge) cluster, on gevent."""
from __future__ import annotations

__version__ = "0.1.0"
