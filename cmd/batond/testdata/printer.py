"""A worker that prints a line to stdout for every message it echoes (see printer_test.go),
with SIGPIPE at its default disposition (Python ignores it unless told otherwise): a write
into a pipe nobody reads would kill it with all its sessions."""

import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "worker" / "python"))

import baton_worker  # noqa: E402

signal.signal(signal.SIGPIPE, signal.SIG_DFL)
GEN, SLOT = os.environ.get("BATON_GENERATION"), os.environ.get("BATON_WORKER")


async def handle(reader, writer):
    writer.write(("printer gen=%s slot=%s pid=%d\n" % (GEN, SLOT, os.getpid())).encode())
    while True:
        line = await reader.readline()
        if not line:
            return
        print("printer gen=%s slot=%s pid=%d: %s" % (GEN, SLOT, os.getpid(), line.decode().rstrip("\n")), flush=True)
        writer.write(line)
        await writer.drain()


async def main():
    server = await baton_worker.start_server(handle)
    await server.serve_forever()


asyncio.run(main())
