"""A one-shot WebSocket client for the demo: send each message, print what comes back.

    python -m examples.demo.wsclient ws://ws.demo/ hello world
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    from websockets.sync.client import connect

    url, messages = argv[0], argv[1:]
    with connect(url, open_timeout=20) as ws:
        for message in messages:
            ws.send(message)
            print(f"> {message}\n< {ws.recv(timeout=20)!s}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
