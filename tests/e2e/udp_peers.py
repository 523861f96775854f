"""A UDP echo pod and a connected UDP client, shared by the proxy's end-to-end tests.

- ``UDP_ECHO`` (argv: the address to bind, port 7007): answers each datagram with
  ``"<bound address> <datagram>"``, so a reply names the endpoint that served it.
- ``UDP_CLIENT`` (argv: address, port): a *connected* socket sends ``ping 0..2`` and prints each
  reply, then the address it is connected to. The kernel drops replies from any other source
  than that address and port, so a printed reply proves conntrack gave it the address the
  client sent to (ClusterIP, externalIP, node address and nodePort).
"""
from __future__ import annotations

import textwrap

UDP_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET,
                      socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 7007))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(sys.argv[1].encode() + b" " + data, peer)
""")

UDP_CLIENT = textwrap.dedent("""
    import socket, sys
    ip = sys.argv[1]
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((ip, int(sys.argv[2])))
    for i in range(3):
        s.send(b"ping %d" % i); print(s.recv(65535).decode())
    print(s.getpeername()[0])
""")
