#!/usr/bin/env python3
"""lobby: a small multi-room chat lobby, the front room of a game server, as a baton worker.

It speaks lines over TCP, so `nc` is a client:

    batond -- python3 examples/python/lobby.py                        # behind batond
    BATON_FALLBACK_LISTEN=127.0.0.1:7000 python3 examples/python/lobby.py   # alone
    python3 examples/python/lobby.py --direct 127.0.0.1:7000           # plain asyncio.start_server
    nc 127.0.0.1 7000

On connect it tells which worker hosts you (pid, slot, generation) and asks for a name. Rooms
and names live in one worker process: players handed to another worker by batond are in other
rooms, even if the rooms have the same name. /help lists the commands; /stats shows this worker's
clients, rooms and generation.

What makes it a game server to copy rather than a toy:
  - output never blocks: a broadcast queues a line on each player's transport; a player whose
    queue passes MAX_BUFFERED (it does not read) is cut off with a reason line, and its room
    goes on (Player.send, Lobby.overflow);
  - --idle-timeout SECONDS drops players who send nothing for that long (default: never);
  - on DRAIN (batond reloads) players are told and play on; on SIGTERM (batond's drain deadline,
    or a stop) each player gets a goodbye line, and the worker exits once they are gone.

--direct serves the same lobby with plain asyncio.start_server, without baton, to compare
direct accept with handoff in benchmarks (/ping answers pong on a short path for that).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Set, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "worker" / "python"))

import baton_worker  # noqa: E402

log = logging.getLogger("lobby")

#: Longest line a client may send, in bytes before the newline; a longer one ends the session.
MAX_LINE = 1024
#: Output queued for a client that does not read; past it the client is cut off with a reason.
MAX_BUFFERED = 256 * 1024
#: Seconds a cut-off (or, at shutdown, every) client gets to take its last line before a reset.
CLOSE_GRACE = 2.0
#: Chat lines a client may send per second (sustained), and in a burst.
CHAT_RATE, CHAT_BURST = 10.0, 20.0
#: Room everybody joins once named.
DEFAULT_ROOM = "lobby"

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,24}")
# Control characters (C0, DEL, C1) and bidi/zero-width tricks are stripped from what others see.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")

PING, PING_CRLF, PONG = b"/ping\n", b"/ping\r\n", b"pong\n"

#: What every player reads when the worker stops (SIGTERM: batond's drain deadline or stop).
GOODBYE = "* this server is shutting down: goodbye! (reconnect to play on)"

HELP = """commands:
  /name NAME   choose or change your name (letters, digits, _ and -, up to 24)
  /rooms       rooms on this worker, with player counts
  /join ROOM   enter ROOM (created if it does not exist)
  /leave       leave your room
  /who         who is in your room
  /where       which worker process hosts you (pid, slot, generation)
  /stats       this worker's clients, rooms and generation
  /ping        answers pong
  /quit        leave the lobby
  anything else is said to everyone in your room.
rooms and names are per worker process: players on other workers do not see yours."""


class Player:
    """One connected client: the state the game keeps per connection.

    Output goes through ``send``, which never blocks: it queues on the transport, and a client
    whose queue passes MAX_BUFFERED (it does not read) is handed to ``overflow``, which cuts it
    off. So one slow reader costs at most MAX_BUFFERED bytes and never holds up its room.
    """

    __slots__ = ("name", "room", "writer", "tokens", "stamp", "overflow")

    def __init__(self, writer: asyncio.StreamWriter, overflow: Callable[["Player"], None]) -> None:
        self.name: Optional[str] = None
        self.room: Optional[str] = None
        self.writer = writer
        self.tokens = CHAT_BURST
        self.stamp = time.monotonic()
        self.overflow = overflow

    def send(self, line: str) -> None:
        """Queue a line; past MAX_BUFFERED queued bytes the client is cut off."""
        t = self.writer.transport
        if t.is_closing():
            return
        self.writer.write(line.encode("utf-8", "replace") + b"\n")
        if t.get_write_buffer_size() > MAX_BUFFERED:
            self.overflow(self)

    def hang_up(self, last_line: str) -> None:
        """Queue a last line past the bound, close, and reset the connection if the client has
        not taken everything within CLOSE_GRACE. Later sends are dropped (the transport is
        closing), so the queue stops growing here."""
        t = self.writer.transport
        if t.is_closing():
            return
        self.writer.write(last_line.encode("utf-8", "replace") + b"\n")
        t.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE, t.abort)

    def may_chat(self) -> bool:
        """Token bucket: CHAT_RATE lines per second, bursts of CHAT_BURST."""
        now = time.monotonic()
        self.tokens = min(CHAT_BURST, self.tokens + (now - self.stamp) * CHAT_RATE)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Lobby:
    """Rooms and names of one worker process.

    ``where`` describes the hosting process for the greeting and /where; ``draining`` tells
    whether batond is draining it.
    """

    def __init__(self, where: str, idle_timeout: float = 0.0, draining: Callable[[], bool] = lambda: False) -> None:
        self.where = where
        self.idle_timeout = idle_timeout
        self.draining = draining
        self.rooms: Dict[str, Set[Player]] = {}
        self.names: Dict[str, Player] = {}
        self.players: Set[Player] = set()
        # For /stats: sessions since start, and clients cut off for not reading or for idling.
        self.served = 0
        self.cut_slow = 0
        self.cut_idle = 0

    # ---------------------------------------------------------------- state

    def broadcast(self, room: str, line: str) -> None:
        for p in list(self.rooms.get(room, ())):
            p.send(line)

    def join(self, p: Player, room: str) -> None:
        if p.room == room:
            p.send("you are already in [%s]" % room)
            return
        self.leave(p)
        self.rooms.setdefault(room, set()).add(p)
        p.room = room
        self.broadcast(room, "* %s joined [%s] (%d here)" % (p.name, room, len(self.rooms[room])))

    def leave(self, p: Player, quiet: bool = False) -> None:
        room = p.room
        if room is None:
            return
        members = self.rooms.get(room)
        if members is not None:
            members.discard(p)
            if not members:
                del self.rooms[room]
        p.room = None
        if not quiet:
            p.send("you left [%s]" % room)
        self.broadcast(room, "* %s left [%s]" % (p.name, room))

    def rename(self, p: Player, name: str) -> None:
        if not NAME_RE.fullmatch(name):
            p.send("error: a name is 1 to 24 letters, digits, _ or -")
            return
        if name == p.name:
            p.send("you are already %s" % name)
            return
        if name in self.names:
            p.send("error: %s is taken on this worker; pick another" % name)
            return
        old = p.name
        if old is not None:
            del self.names[old]
        self.names[name] = p
        p.name = name
        if old is None:
            p.send("hello %s! /help lists the commands" % name)
            self.join(p, DEFAULT_ROOM)
        else:
            p.send("you are now %s" % name)
            if p.room is not None:
                self.broadcast(p.room, "* %s is now known as %s" % (old, name))

    def overflow(self, p: Player) -> None:
        """p does not read its output: cut it off with a reason; its room goes on without it."""
        log.info("cutting off %s: %d bytes queued, not reading", p.name or "a client", MAX_BUFFERED)
        self.cut_slow += 1
        p.hang_up("error: you are not reading (more than %d bytes queued); bye" % MAX_BUFFERED)
        self.remove(p)  # now, not when the session ends: the room stops sending to it at once

    def remove(self, p: Player) -> None:
        self.leave(p, quiet=True)
        if p.name is not None and self.names.get(p.name) is p:
            del self.names[p.name]
        self.players.discard(p)

    async def shutdown(self, goodbye: str = GOODBYE, timeout: float = CLOSE_GRACE + 1) -> None:
        """Say goodbye to everybody, hang up, and wait (a little) for their sessions to end.

        Each player gets the goodbye line after what is already queued for it; one that does
        not take it within CLOSE_GRACE is reset (Player.hang_up)."""
        for p in list(self.players):
            p.hang_up(goodbye)
        deadline = time.monotonic() + timeout
        while self.players and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def stats(self) -> str:
        named = sum(1 for p in self.players if p.name is not None)
        return "stats: %s; %d clients (%d named) in %d rooms, %d since start; cut off: %d not reading, %d idle" % (
            self.where + (", draining" if self.draining() else ""),
            len(self.players),
            named,
            len(self.rooms),
            self.served,
            self.cut_slow,
            self.cut_idle,
        )

    def announce(self, line: str) -> None:
        for p in list(self.players):
            p.send(line)

    # ---------------------------------------------------------------- commands

    def command(self, p: Player, line: str) -> bool:
        """Handle one line; False ends the session."""
        if not line.startswith("/"):
            if p.name is None:
                self.rename(p, line.strip())
            elif p.room is None:
                p.send("you are in no room: /join ROOM first (/rooms lists them)")
            elif line.strip():
                if p.may_chat():
                    self.broadcast(p.room, "[%s] %s: %s" % (p.room, p.name, line))
                else:
                    p.send("slow down: at most %d lines a second" % CHAT_RATE)
            return True
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd == "/ping":
            p.send("pong")
        elif cmd == "/quit":
            p.send("bye")
            return False
        elif cmd == "/help":
            for h in HELP.split("\n"):
                p.send(h)
        elif cmd == "/where":
            p.send(self.where + (", draining" if self.draining() else ""))
        elif cmd == "/stats":
            p.send(self.stats())
        elif cmd == "/name":
            self.rename(p, arg)
        elif cmd == "/rooms":
            if not self.rooms:
                p.send("no rooms on this worker yet: /join ROOM makes one")
            else:
                p.send(
                    "rooms on this worker: "
                    + ", ".join("%s (%d)" % (r, len(m)) for r, m in sorted(self.rooms.items()))
                )
        elif p.name is None:
            p.send("choose a name first: /name NAME")
        elif cmd == "/join":
            if not NAME_RE.fullmatch(arg):
                p.send("usage: /join ROOM (1 to 24 letters, digits, _ or -)")
            else:
                self.join(p, arg)
        elif cmd == "/leave":
            if p.room is None:
                p.send("you are in no room")
            else:
                self.leave(p)
        elif cmd == "/who":
            if p.room is None:
                p.send("you are in no room")
            else:
                names = sorted(m.name or "?" for m in self.rooms.get(p.room, ()))
                p.send("in [%s]: %s" % (p.room, ", ".join(names)))
        else:
            p.send("unknown command %s: /help lists the commands" % cmd[:32])
        return True

    # ---------------------------------------------------------------- sessions

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client (same signature as an asyncio.start_server callback)."""
        p = Player(writer, self.overflow)
        self.players.add(p)
        self.served += 1
        try:
            p.send("welcome to the baton lobby; you are on " + self.where)
            p.send("what is your name? (letters, digits, _ and -; /help for commands)")
            await self._session(p, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, maybe abruptly
        except Exception:
            log.exception("session of %s failed", p.name or "a client")
        finally:
            self.remove(p)
            await close(writer)

    async def _session(self, p: Player, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        timeout = self.idle_timeout or None
        transport = writer.transport
        while True:
            try:
                if timeout is None:
                    raw = await reader.readuntil(b"\n")
                else:
                    raw = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
            except asyncio.IncompleteReadError as e:
                if e.partial:  # a last line without newline, then EOF
                    self.command(p, clean(e.partial))
                return
            except asyncio.LimitOverrunError:
                p.send("error: line longer than %d bytes; bye" % MAX_LINE)
                return
            except asyncio.TimeoutError:
                self.cut_idle += 1
                p.send("idle for %gs; bye" % self.idle_timeout)
                return
            if raw == PING or raw == PING_CRLF:  # the benchmark path: keep it short
                writer.write(PONG)
                if transport.get_write_buffer_size() > MAX_BUFFERED:
                    await writer.drain()
                continue
            if not self.command(p, clean(raw)) or transport.is_closing():
                return  # /quit, or cut off (Lobby.overflow) by a reply to its own command
            if transport.get_write_buffer_size() > 64 * 1024:
                await writer.drain()  # our own replies pile up: stop reading this client for now


def clean(raw: bytes) -> str:
    """Bytes from a client as a printable line: UTF-8 with replacement, no control chars."""
    return UNPRINTABLE.sub("", raw.decode("utf-8", "replace").rstrip("\r\n"))


async def close(writer: asyncio.StreamWriter) -> None:
    """Close a connection, waiting a little for queued output; never raises."""
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:
        writer.transport.abort()


def where_baton(worker: baton_worker.Worker) -> str:
    if not worker.under_baton:
        return "worker pid %d, standalone (BATON_FALLBACK_LISTEN, no batond)" % worker.pid
    return "worker pid %d, slot %d, generation %d" % (worker.pid, worker.slot, worker.generation)


async def serve_direct(host: str, port: int, idle_timeout: float = 0.0) -> Tuple[asyncio.AbstractServer, Lobby]:
    """Serve the lobby with plain asyncio.start_server (no baton); for tests and benchmarks."""
    lobby = Lobby("worker pid %d, direct (no batond)" % os.getpid(), idle_timeout)
    server = await asyncio.start_server(lobby.handle, host, port, limit=MAX_LINE)
    return server, lobby


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    if args.direct:
        host, _, port = args.direct.rpartition(":")
        server, _lobby = await serve_direct(host.strip("[]"), int(port), args.idle_timeout)
        for s in server.sockets:
            print("lobby: listening on %s:%d (direct)" % s.getsockname()[:2], flush=True)
        async with server:
            await stop.wait()
            server.close()
            await _lobby.shutdown()
        return 0

    lobby = Lobby("", args.idle_timeout)
    try:
        server = await baton_worker.start_server(lobby.handle, capacity=args.capacity, limit=MAX_LINE)
    except (baton_worker.BatonException, OSError) as e:
        print("lobby: %s" % e, file=sys.stderr)
        return 1
    lobby.where = where_baton(server.worker)
    lobby.draining = lambda: server.draining
    for s in server.sockets:
        print("lobby: listening on %s:%d (standalone)" % s.getsockname()[:2], flush=True)

    async def tell_drain() -> None:
        await server.wait_draining()
        if server.draining:
            lobby.announce(
                "* this server is being replaced: you can stay and play on; new players go to the new version"
            )

    notice = asyncio.ensure_future(tell_drain())
    forever = asyncio.ensure_future(server.serve_forever())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({forever, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if forever.done() and forever.exception() is not None:
            print("lobby: %s" % forever.exception(), file=sys.stderr)
            return 1
        return 0
    finally:
        for t in (notice, forever, stopper):
            t.cancel()
        server.close()
        await lobby.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="A multi-room chat lobby served as a baton worker.")
    ap.add_argument("--direct", metavar="HOST:PORT", help="serve with plain asyncio.start_server instead of baton")
    ap.add_argument("--capacity", type=int, default=0, help="most clients at once (0: batond decides)")
    ap.add_argument("--idle-timeout", type=float, default=0.0, help="drop clients silent this many seconds (0: never)")
    ap.add_argument("--log-level", default=os.environ.get("BATON_LOG_LEVEL", "INFO"))
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="lobby[%(process)d] %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(args)))
