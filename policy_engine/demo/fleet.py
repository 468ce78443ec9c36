"""The demo's simulated model backends, all in one child process.

`python -m policy_engine.demo.fleet CONFIG PORTS` starts one BackendServer per entry of the
JSON file CONFIG (`{"name": {behaviour fields}}`), writes `{"name": port}` to PORTS once all
listen, and runs until SIGTERM or SIGINT. A process of their own keeps the backends' threads
from competing with the traffic driver for the demo's interpreter lock.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from policy_engine.demo.backend import BackendBehaviour, BackendServer


def behaviour(settings: dict[str, Any]) -> BackendBehaviour:
    known = {f.name for f in fields(BackendBehaviour)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown backend behaviour field(s): {', '.join(unknown)}")
    return BackendBehaviour(**settings)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m policy_engine.demo.fleet CONFIG.json PORTS.json\n")
        return 2
    config = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    servers = [BackendServer(name, behaviour=behaviour(value)).start() for name, value in config.items()]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ports = Path(argv[1])
    partial = ports.with_suffix(".tmp")
    partial.write_text(json.dumps({s.name: s.port for s in servers}))
    partial.replace(ports)  # readers never see a half-written file
    stop.wait()
    for server in servers:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
