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
    or a stop) each player gets a goodbye line, and the worker exits once they are gone;
  - live session migration (on by default under batond; --no-migrate turns it off): on a
    migrating reload (`batonctl reload -migrate`) every player moves to the new version with
    their name, room and any half-typed line; a room's players move together (its group key is
    the room) and the room starts talking again only once all of them have arrived, so no line
    is lost. Each player reads one line, `* the server was upgraded to v2; you are now on
    worker 3` (--version v2 names the release; default: the generation), and nothing else.

--direct serves the same lobby with plain asyncio.start_server, without baton, to compare
direct accept with handoff in benchmarks (/ping answers pong on a short path for that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

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
#: What players read when batond drains this worker (a reload) and they stay here.
DRAIN_NOTICE = "* this server is being replaced: you can stay and play on; new players go to the new version"
#: What a moved player reads on the new worker (then the version label and its worker slot).
UPGRADED = "* the server was upgraded to %s; you are now on worker %s"
#: How long players of a moved room wait for the rest of the room before talking again.
GATHER_TIMEOUT = 5.0
#: With migration, the drain notice waits this long (at most; a third of the drain deadline if
#: shorter): a migrating reload's MIGRATE follows its DRAIN, and moved players are not told.
DRAIN_NOTICE_DELAY = 3.0
#: First bytes of a migrating session's state: a later lobby can still read this one's.
STATE_MAGIC = b"lobby-state-1\n"

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

    __slots__ = ("name", "room", "writer", "tokens", "stamp", "overflow", "session", "reading", "partial", "companions")

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        overflow: Callable[["Player"], None],
        session: Optional[baton_worker.AsyncSession] = None,
    ) -> None:
        self.name: Optional[str] = None
        self.room: Optional[str] = None
        self.writer = writer
        self.tokens = CHAT_BURST
        self.stamp = time.monotonic()
        self.overflow = overflow
        # Migration: the session (None without baton), whether the handler waits for input (so
        # batond's request may interrupt it), and a line begun on the previous worker.
        self.session = session
        self.reading = False
        self.partial = b""
        self.companions: List[str] = []  # the room's players when batond asked for this session

    @property
    def moving(self) -> bool:
        """batond asks for this player's session (it is about to move to another worker)."""
        return self.session is not None and self.session.migrate_requested

    def set_room(self, room: Optional[str]) -> None:
        """Enter a room (None: none), keeping the session's group key in step: a room's players
        move together."""
        self.room = room
        if self.session is not None:
            self.session.set_group(room or "")

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
        #: The line a moved player reads here (set by main from --version and the slot).
        self.upgraded = UPGRADED % ("a new version", "?")
        #: Rooms arriving from another worker: (origin, room) -> who is expected, who came.
        self.arriving: Dict[Tuple[str, str], Gathering] = {}
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
        p.set_room(room)
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
        p.set_room(None)
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
        self.forget(p)

    def forget(self, p: Player) -> None:
        """Drop p without a word to anyone: it left for another worker, where its room goes on."""
        room = p.room
        if room is not None:
            members = self.rooms.get(room)
            if members is not None:
                members.discard(p)
                if not members:
                    del self.rooms[room]
            p.room = None
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
            if not p.moving:
                p.send(line)

    # ---------------------------------------------------------------- migration

    def state(self, p: Player, unread: bytes) -> bytes:
        """What travels with a moving player: name, room, who else is in it (so the new worker
        knows when the room is complete), chat budget, and the bytes read but not processed."""
        head = {
            "name": p.name,
            "room": p.room,
            "origin": "%d:%s" % (os.getpid(), self.where),
            "members": p.companions,
            "tokens": p.tokens,
        }
        return STATE_MAGIC + json.dumps(head).encode() + b"\n" + p.partial + unread

    def restore(self, p: Player, state: bytes) -> Optional["Gathering"]:
        """Put a moved player back as it was, silently; return the room's gathering to wait for
        (None if it has no room). A state this lobby cannot read starts the player afresh."""
        head: Dict[str, Any] = {}
        if state.startswith(STATE_MAGIC):
            raw, _, rest = state[len(STATE_MAGIC) :].partition(b"\n")
            try:
                head = json.loads(raw)
            except ValueError:
                head = {}
            p.partial = rest
        if not head:
            log.warning("a moved session brought a state this lobby cannot read (%d bytes); starting afresh", len(state))
            p.send("what is your name? (letters, digits, _ and -; /help for commands)")
            return None
        name, room = head.get("name"), head.get("room")
        p.tokens = float(head.get("tokens", CHAT_BURST))
        if isinstance(name, str) and NAME_RE.fullmatch(name):
            if name in self.names:  # rooms and names are per worker: someone here has it
                p.send("your name %s is taken on this worker; choose another with /name" % name)
            else:
                self.names[name] = p
                p.name = name
        if not isinstance(room, str) or not NAME_RE.fullmatch(room):
            return None
        self.rooms.setdefault(room, set()).add(p)
        p.set_room(room)
        key = (str(head.get("origin", "")), room)
        g = self.arriving.get(key)
        if g is None:
            g = self.arriving[key] = Gathering(set(head.get("members") or ()))
        g.arrive(name)
        if g.complete():
            del self.arriving[key]
        return g

    async def tell_drain(self, server: baton_worker.Server) -> None:
        """When batond drains this worker, tell the players who stay. With migration, a
        migrating reload asks for the sessions right after DRAIN: the notice waits a moment
        and goes only to players batond did not take (or whose hand-back failed)."""
        await server.wait_draining()
        if not server.draining:
            return
        if server.worker.migration:
            left = (server.worker.drain_deadline or 0.0) - time.monotonic()
            await asyncio.sleep(max(0.0, min(DRAIN_NOTICE_DELAY, left / 3)))
        self.announce(DRAIN_NOTICE)

    async def gather(self, p: Player, g: "Gathering") -> None:
        """Wait (at most GATHER_TIMEOUT) until the rest of p's room has arrived, so that no one
        of the room talks before everyone listens. Not reading meanwhile: input waits in the
        socket."""
        if g.done.is_set():
            return
        try:
            await asyncio.wait_for(g.done.wait(), GATHER_TIMEOUT)
        except asyncio.TimeoutError:
            log.info("room [%s] did not arrive complete within %gs: missing %s", p.room, GATHER_TIMEOUT, sorted(g.expected - g.arrived))
            for key, other in list(self.arriving.items()):
                if other is g:
                    del self.arriving[key]
            g.done.set()

    async def move(self, p: Player, reader: asyncio.StreamReader) -> bool:
        """batond asks for p's session: hand it back with its state. False if it stays here."""
        sess = p.session
        assert sess is not None
        try:
            await sess.hand_back(self.state(p, sess.unread(reader)))
        except (baton_worker.BatonException, OSError) as e:
            log.warning("%s stays on this worker: %s", p.name or "a client", e)
            if sess.migrate_requested:
                sess.decline()  # not asked again in this loop: it stays until batond asks anew
            return False
        self.forget(p)
        return True

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
        p = Player(writer, self.overflow, baton_worker.session())
        self.players.add(p)
        self.served += 1
        moved = False
        try:
            info = baton_worker.connection_info()
            gathering = None
            if info is not None and info.resumed is not None:
                p.send(self.upgraded)
                gathering = self.restore(p, info.resumed.state)
            else:
                p.send("welcome to the baton lobby; you are on " + self.where)
                p.send("what is your name? (letters, digits, _ and -; /help for commands)")
            moved = await self._session(p, reader, writer, gathering)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, maybe abruptly
        except Exception:
            log.exception("session of %s failed", p.name or "a client")
        finally:
            if moved:
                return  # the socket is batond's now: nothing more to say or close
            self.remove(p)
            await close(writer)

    def _interrupt(self, p: Player, task: "asyncio.Task[Any]") -> None:
        """batond asks for p's session: note who is in its room now (batond asks for all of a
        worker's sessions at once, before any has left), and wake its handler if it waits for
        input (a cancelled read consumes nothing: its bytes stay in the StreamReader, and go in
        the state)."""
        p.companions = sorted(m.name for m in self.rooms.get(p.room, ()) if m.name) if p.room else []
        if p.reading:
            task.cancel()

    async def _wait_input(self, p: Player, aw: "Any") -> Tuple[bool, Any]:
        """Await a read (or a gathering) that batond's request may interrupt: (False, None) if
        it did, else (True, result)."""
        p.reading = True
        try:
            return True, await aw
        except asyncio.CancelledError:
            if not p.moving:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()  # the cancellation was ours (3.11+ counts them)
            return False, None
        finally:
            p.reading = False

    def _pending_lines(self, p: Player) -> List[bytes]:
        """Complete lines that came in the state; a last partial one stays in p.partial."""
        *lines, p.partial = p.partial.split(b"\n")
        return [line + b"\n" for line in lines]

    async def _session(
        self, p: Player, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gathering: Optional["Gathering"]
    ) -> bool:
        """Serve p's lines until it leaves (False) or moved to another worker (True)."""
        timeout = self.idle_timeout or None
        transport = writer.transport
        task = asyncio.current_task()
        if p.session is not None and task is not None:
            p.session.on_migrate = lambda _s: self._interrupt(p, task)
        if gathering is not None:
            await self._wait_input(p, self.gather(p, gathering))
        pending = self._pending_lines(p)
        while True:
            if p.moving:
                if await self.move(p, reader):
                    return True
            if pending:
                raw = pending.pop(0)
            else:
                try:
                    if timeout is None:
                        ok, raw = await self._wait_input(p, reader.readuntil(b"\n"))
                    else:
                        ok, raw = await self._wait_input(p, asyncio.wait_for(reader.readuntil(b"\n"), timeout))
                except asyncio.IncompleteReadError as e:
                    if e.partial or p.partial:  # a last line without newline, then EOF
                        self.command(p, clean(p.partial + e.partial))
                    return False
                except asyncio.LimitOverrunError:
                    p.send("error: line longer than %d bytes; bye" % MAX_LINE)
                    return False
                except asyncio.TimeoutError:
                    self.cut_idle += 1
                    p.send("idle for %gs; bye" % self.idle_timeout)
                    return False
                if not ok:
                    continue  # batond asks for the session: hand it back (top of the loop)
                if p.partial:  # a line begun on the previous worker
                    raw, p.partial = p.partial + raw, b""
            if raw == PING or raw == PING_CRLF:  # the benchmark path: keep it short
                writer.write(PONG)
                if transport.get_write_buffer_size() > MAX_BUFFERED:
                    await writer.drain()
                continue
            if not self.command(p, clean(raw)) or transport.is_closing():
                return False  # /quit, or cut off (Lobby.overflow) by a reply to its own command
            if transport.get_write_buffer_size() > 64 * 1024:
                await writer.drain()  # our own replies pile up: stop reading this client for now


class Gathering:
    """A room arriving from another worker: the names expected (the room's players when it
    left) and those here already. ``done`` is set when all are, or the wait is given up."""

    def __init__(self, expected: Set[str]) -> None:
        self.expected = expected
        self.arrived: Set[str] = set()
        self.done = asyncio.Event()

    def arrive(self, name: Optional[str]) -> None:
        if name:
            self.arrived.add(name)
        if self.complete():
            self.done.set()

    def complete(self) -> bool:
        return self.arrived >= self.expected


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
        server = await baton_worker.start_server(
            lobby.handle, capacity=args.capacity, limit=MAX_LINE, migrate=not args.no_migrate
        )
    except (baton_worker.BatonException, OSError) as e:
        print("lobby: %s" % e, file=sys.stderr)
        return 1
    lobby.where = where_baton(server.worker)
    lobby.draining = lambda: server.draining
    version = args.version or "generation %s" % server.worker.generation
    lobby.upgraded = UPGRADED % (version, server.worker.slot)
    for s in server.sockets:
        print("lobby: listening on %s:%d (standalone)" % s.getsockname()[:2], flush=True)

    notice = asyncio.ensure_future(lobby.tell_drain(server))
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
    ap.add_argument(
        "--version",
        default=os.environ.get("LOBBY_VERSION", ""),
        help="release label players see after a migrating reload, e.g. v2 (default: $LOBBY_VERSION, else the generation)",
    )
    ap.add_argument("--no-migrate", action="store_true", help="do not take part in live session migration")
    ap.add_argument("--log-level", default=os.environ.get("BATON_LOG_LEVEL", "INFO"))
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="lobby[%(process)d] %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(args)))
