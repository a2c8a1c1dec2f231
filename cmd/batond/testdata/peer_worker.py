"""A worker for the multi-host test (multihost_test.go): its greeting names the client address
batond handed over in CONN (behind HAProxy with PROXY v2: the real client, not the balancer),
then it echoes every line."""

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "worker" / "python"))

import baton_worker  # noqa: E402

GEN, SLOT = os.environ.get("BATON_GENERATION"), os.environ.get("BATON_WORKER")


async def handle(reader, writer):
    info = baton_worker.connection_info()
    client = "%s:%d" % info.client if info is not None and info.client is not None else "unknown"
    try:
        await serve(reader, writer, client)
    except ConnectionError:
        pass  # HAProxy's health checks connect and close without reading


async def serve(reader, writer, client):
    writer.write(("baton python · worker %s · pid %d · generation %s · client %s\n" % (SLOT, os.getpid(), GEN, client)).encode())
    while True:
        line = await reader.readline()
        if not line:
            return
        writer.write(line)
        await writer.drain()


async def main():
    server = await baton_worker.start_server(handle)
    await server.serve_forever()


asyncio.run(main())
