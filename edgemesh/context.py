"""What a node's modules are given: the typed wiring of one EdgeMesh process.

The assembler (``agent.run``) builds one ``Context``; modules import this module, never the
assembler. Start order is in ``agent.run``'s code: the tunnel first (the dialer reaches remote
endpoints through it), then the proxy, DNS and the gateway.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from edgemesh.config import Config
from edgemesh.dialer import Dialer, TunnelDialer
from edgemesh.meta.store import Store
from edgemesh.runtime.admin import Admin

if TYPE_CHECKING:
    from edgemesh.proxy.meshcidr import AddressPlan


class Role(enum.Enum):
    """What ``edgemesh`` runs as (the server is not a module host: ``server.main``)."""
    AGENT = "agent"
    GATEWAY = "gateway"


class Module(Protocol):
    """A part of a node: started after the metadata sources, stopped in reverse order."""
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Context:
    """Config, the store, the admin endpoint, THE dialer every part dials through, the
    tunnel once it is built (the dialer's route to other nodes), and, with the Edge CNI on,
    the virtual address plan the proxy fills and DNS answers from."""
    config: Config
    store: Store
    admin: Admin
    role: Role = Role.AGENT
    dialer: Dialer = field(init=False)
    tunnel: TunnelDialer | None = None
    mesh_addresses: AddressPlan | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        modules = self.config.modules
        timeout = modules.edgeProxy.connectTimeout if modules.edgeProxy.enable \
            else modules.edgeGateway.connectTimeout
        self.dialer = Dialer(self.node_name, timeout)
        self.dialer.tunnel = self.tunnel
        cni = modules.edgeCNI
        if cni.enable:
            from edgemesh.proxy.meshcidr import AddressPlan, Mode
            self.mesh_addresses = AddressPlan(self.node_name, cni.meshCIDR, Mode(cni.mode))

    def attach_tunnel(self, tunnel: TunnelDialer) -> None:
        """From now on, endpoints on other nodes are dialled through ``tunnel``."""
        self.tunnel = self.dialer.tunnel = tunnel

    @property
    def node_name(self) -> str:
        return self.config.nodeName

    @property
    def state_dir(self) -> str:
        return self.config.commonConfig.stateDir
