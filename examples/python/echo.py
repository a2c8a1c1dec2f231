#!/usr/bin/env python3
"""echo: the smallest baton worker, used by the protocol conformance suite.

Every byte a client sends comes back verbatim; when the client closes its side, the worker
finishes sending and closes too. After batond sends DRAIN, the process exits with status 0 once
its last connection has closed. If registration fails (batond refuses the HELLO, cannot be
reached, or the program was not started by batond), the error goes to stderr and the exit
status is 1. If batond refuses it for good later (a final error, PROTOCOL.md), it serves the
connections it holds until they close, then says why on stderr and exits 1.

    batond -- python3 examples/python/echo.py
    BATON_FALLBACK_LISTEN=127.0.0.1:7000 python3 examples/python/echo.py   # without batond
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "worker" / "python"))

import baton_worker  # noqa: E402


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until the client closes its side; baton_worker closes the connection after."""
    while True:
        data = await reader.read(65536)
        if not data:
            return
        writer.write(data)
        await writer.drain()


async def main(capacity: int) -> int:
    try:
        server = await baton_worker.start_server(echo, capacity=capacity)
    except (baton_worker.BatonException, OSError) as e:
        print("echo: %s" % e, file=sys.stderr)
        return 1
    try:
        await server.serve_forever()  # returns once drained and idle
    except baton_worker.BatonError as e:
        # Final: no more clients will come, but those we hold are still ours to serve.
        await server.wait_idle()
        print("echo: %s" % e, file=sys.stderr)
        return 1
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacity", type=int, default=0, help="most connections at once (0: batond decides)")
    args = ap.parse_args()
    logging.basicConfig(
        level=os.environ.get("BATON_LOG_LEVEL", "WARNING").upper(),
        format="echo[%(process)d] %(levelname)s %(message)s",
    )
    sys.exit(asyncio.run(main(args.capacity)))
