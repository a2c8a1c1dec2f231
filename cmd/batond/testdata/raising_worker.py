#!/usr/bin/env python3
"""raising_worker: a baton worker whose connection handler raises on every connection.

Used by TestPythonHandlerRaises (cmd/batond/python_test.go). It serves through
baton_worker.start_server (the asyncio API). Its handler fails in two ways, by turns on each
worker:

  * odd connections: a greeting line is written and flushed, then the coroutine raises;
  * even connections: the handler (a plain function) raises at once, before any I/O.

In both cases baton_worker must log the exception, close the client connection and report the
close (CLOSED) to batond, and the worker must keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Awaitable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "worker" / "python"))

import baton_worker  # noqa: E402

count = 0


async def _greet_then_raise(writer: asyncio.StreamWriter, n: int) -> None:
    writer.write(b"raising worker pid %d, connection %d\n" % (os.getpid(), n))
    await writer.drain()
    raise RuntimeError("raising_worker: deliberate failure after the greeting, connection %d" % n)


def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Optional[Awaitable[None]]:
    global count
    count += 1
    if count % 2 == 0:
        raise RuntimeError("raising_worker: deliberate failure before any I/O, connection %d" % count)
    return _greet_then_raise(writer, count)


async def main() -> int:
    server = await baton_worker.start_server(handle)
    await server.serve_forever()
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="raising_worker[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(asyncio.run(main()))
