"""Tests for examples/python/lobby.py and echo.py.

Most run the lobby in direct mode (plain asyncio.start_server on 127.0.0.1, port 0) in this
process and drive clients over TCP; the last ones run the programs as real processes, standalone
and behind the fake gateway of worker/python/test_baton_worker.py.

Run from the repository root: python3 -m unittest discover -s examples/python -v
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
from pathlib import Path
from typing import List, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "worker" / "python"))

import baton_worker as bw  # noqa: E402
import lobby  # noqa: E402
from test_baton_worker import FakeGateway, expect_handback, resume  # noqa: E402

T = bw.MsgType


class Client:
    """A line client over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def connect(cls, port: int) -> "Client":
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def line(self, timeout: float = 5.0) -> str:
        raw = await asyncio.wait_for(self.r.readline(), timeout)
        if not raw:
            raise EOFError
        return raw.decode().rstrip("\n")

    async def until(self, pred, timeout: float = 5.0) -> List[str]:
        """Read lines until one satisfies pred (a substring or a callable); return them all."""
        if isinstance(pred, str):
            sub = pred
            pred = lambda s: sub in s  # noqa: E731
        got = []
        while True:
            got.append(await self.line(timeout))
            if pred(got[-1]):
                return got

    async def say(self, *lines: str) -> None:
        self.w.write("".join(line + "\n" for line in lines).encode())
        await self.w.drain()

    async def eof(self, timeout: float = 5.0) -> bytes:
        """Everything up to EOF."""
        return await asyncio.wait_for(self.r.read(), timeout)

    async def quiet(self, seconds: float = 0.2) -> bool:
        try:
            await asyncio.wait_for(self.r.readline(), seconds)
        except asyncio.TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.w.close()


class LobbyTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.server, self.lobby = await lobby.serve_direct("127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.clients: List[Client] = []

    async def asyncTearDown(self):
        for c in self.clients:
            c.close()
        await self.lobby.shutdown()
        self.server.close()
        await self.server.wait_closed()

    async def join(self, name: str) -> Client:
        c = await Client.connect(self.port)
        self.clients.append(c)
        greeting = await c.until("what is your name")
        self.assertIn("pid %d" % os.getpid(), greeting[0])
        await c.say(name)
        await c.until("* %s joined [lobby]" % name)
        return c

    async def test_two_players_chat_and_rooms(self):
        alice = await self.join("alice")
        bob = await self.join("bob")
        await alice.until("* bob joined [lobby] (2 here)")
        await alice.say("/rooms")
        self.assertEqual(await alice.line(), "rooms on this worker: lobby (2)")
        await alice.say("hello bob")
        self.assertEqual(await bob.line(), "[lobby] alice: hello bob")
        self.assertEqual(await alice.line(), "[lobby] alice: hello bob")
        await bob.say("/who")
        self.assertEqual(await bob.line(), "in [lobby]: alice, bob")
        await alice.say("/join arena")
        await alice.until("* alice joined [arena] (1 here)")
        self.assertEqual(await bob.line(), "* alice left [lobby]")
        await bob.say("/rooms")
        self.assertEqual(await bob.line(), "rooms on this worker: arena (1), lobby (1)")
        await bob.say("only bob hears this")
        self.assertEqual(await bob.line(), "[lobby] bob: only bob hears this")
        self.assertTrue(await alice.quiet())
        await bob.say("/join arena")
        await bob.until("joined [arena]")
        await alice.until("* bob joined [arena] (2 here)")
        await alice.say("/leave")
        self.assertEqual(await alice.line(), "you left [arena]")
        self.assertEqual(await bob.line(), "* alice left [arena]")
        await alice.say("anyone?")
        self.assertIn("no room", await alice.line())
        await bob.say("/rooms")
        self.assertEqual(await bob.line(), "rooms on this worker: arena (1)")  # empty rooms vanish

    async def test_where_ping_help_quit(self):
        c = await self.join("carol")
        await c.say("/where")
        self.assertEqual(await c.line(), "worker pid %d, direct (no batond)" % os.getpid())
        await c.say("/ping")
        self.assertEqual(await c.line(), "pong")
        c.w.write(b"/ping\r\n/ping\n")
        self.assertEqual([await c.line(), await c.line()], ["pong", "pong"])
        await c.say("/help")
        help_lines = await c.until("/quit")
        self.assertTrue(any("/rooms" in h for h in help_lines))
        rest = await c.until("per worker process")
        self.assertIn("rooms and names are per worker process", rest[-1])
        await c.say("/bogus")
        self.assertIn("unknown command /bogus", await c.line())
        await c.say("/quit")
        self.assertEqual(await c.eof(), b"bye\n")

    async def test_ping_before_name(self):
        c = await Client.connect(self.port)
        self.clients.append(c)
        await c.until("what is your name")
        await c.say("/ping")
        self.assertEqual(await c.line(), "pong")
        await c.say("/join x")
        self.assertIn("choose a name first", await c.line())

    async def test_names(self):
        dave = await self.join("dave")
        c = await Client.connect(self.port)
        self.clients.append(c)
        await c.until("what is your name")
        await c.say("dave")
        self.assertIn("dave is taken", await c.line())
        await c.say("not a valid name!")
        self.assertIn("error: a name is", await c.line())
        await c.say("/name erin")
        await c.until("* erin joined [lobby]")
        await dave.until("* erin joined")
        await c.say("/name frank")
        self.assertEqual(await c.line(), "you are now frank")
        self.assertEqual(await dave.line(), "* erin is now known as frank")
        await dave.say("/who")
        self.assertEqual(await dave.line(), "in [lobby]: dave, frank")

    async def test_garbage_and_control_characters(self):
        g = await self.join("gina")
        h = await self.join("hank")
        await g.until("hank joined")
        g.w.write(b"\xff\xfe hi \x1b[2J\x07there\x00\n")
        await g.w.drain()
        self.assertEqual(await h.line(), "[lobby] gina: \ufffd\ufffd hi [2Jthere")
        g.w.write(bytes(range(256)).replace(b"\n", b"") + b"\n")
        await g.w.drain()
        line = await h.line()
        self.assertTrue(line.startswith("[lobby] gina: "))
        self.assertFalse(any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in line))
        await h.say("/ping")
        self.assertEqual((await h.until("pong"))[-1], "pong")

    async def test_long_line_closes_with_message(self):
        c = await self.join("ivan")
        other = await self.join("judy")
        c.w.write(b"x" * 5000 + b"\n")
        data = await c.eof()
        self.assertTrue(data.endswith(b"error: line longer than 1024 bytes; bye\n"), data[-100:])
        await other.until("* ivan left [lobby]")
        self.assertNotIn("ivan", self.lobby.names)
        # MAX_LINE bytes before the newline is fine; one more is not
        await other.say("y" * lobby.MAX_LINE)
        self.assertEqual(await other.line(), "[lobby] judy: " + "y" * lobby.MAX_LINE)
        await other.say("y" * (lobby.MAX_LINE + 1))
        self.assertTrue((await other.eof()).endswith(b"bye\n"))

    async def test_silent_and_abrupt_clients(self):
        silent = await Client.connect(self.port)  # never says a word
        self.clients.append(silent)
        k = await self.join("kim")
        leo = await self.join("leo")
        await k.until("leo joined")
        # leo vanishes with a RST, mid-line
        leo.w.write(b"half a li")
        await leo.w.drain()
        sock = leo.w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        leo.w.transport.abort()
        self.clients.remove(leo)
        await k.until("* leo left [lobby]")
        await k.say("/who")
        self.assertEqual(await k.line(), "in [lobby]: kim")
        self.assertEqual(len(self.lobby.players), 2)  # kim and the silent one

    async def test_flood_is_rate_limited(self):
        m = await self.join("mia")
        n = await self.join("ned")
        await m.until("ned joined")
        await m.say(*["spam %d" % i for i in range(100)])
        lines = await m.until("slow down")
        self.assertLessEqual(sum(1 for x in lines if x.startswith("[lobby] mia: spam")), lobby.CHAT_BURST + 2)

    async def test_slow_reader_is_cut_and_room_goes_on(self):
        """A client that never reads while others chat: it is cut off with a reason line, its
        queue never grows past the bound, and everybody else gets every line, in order."""
        old, lobby.MAX_BUFFERED = lobby.MAX_BUFFERED, 32 * 1024
        self.addCleanup(setattr, lobby, "MAX_BUFFERED", old)
        # pete resumes reading at once, but with its 4 KiB buffer the window reopens only on the
        # sender's zero-window probes, whose back-off under a loaded CI machine outlasts the
        # 2 s default grace: what is tested is that a client reading within the grace gets the
        # reason line, so give the grace room.
        old_grace, lobby.CLOSE_GRACE = lobby.CLOSE_GRACE, 15.0
        self.addCleanup(setattr, lobby, "CLOSE_GRACE", old_grace)
        pete = await Client.connect(self.port)
        self.clients.append(pete)
        pete.w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await pete.say("pete")
        await pete.until("pete joined")
        pete.w.transport.pause_reading()  # pete stops reading
        pete_transport = self.lobby.names["pete"].writer.transport
        pete_transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        talkers = [await self.join("t%d" % i) for i in range(4)]
        quinn = await self.join("quinn")  # listens only
        everyone = talkers + [quinn]
        for c in talkers:  # drain the join notices, so what follows is chat only
            await c.until("* quinn joined")
        heard: List[List[str]] = [[] for _ in everyone]

        async def listen(i: int) -> None:
            while True:
                line = await everyone[i].line(10)
                heard[i].append(line)
                if line == "[lobby] quinn: over":
                    return

        listeners = [asyncio.ensure_future(listen(i)) for i in range(len(everyone))]
        self.addCleanup(lambda: [t.cancel() for t in listeners])
        pad = "z" * 900
        rounds, peak, cut_at, pete_data = 0, 0, None, None
        deadline = time.monotonic() + 30
        # Each talker says one line a round (within the chat rate); 10 rounds go on after the cut.
        while (cut_at is None or rounds < cut_at + 10) and time.monotonic() < deadline:
            for i, t in enumerate(talkers):
                await t.say("t%d %d %s" % (i, rounds, pad))
            rounds += 1
            await asyncio.sleep(0.12)
            peak = max(peak, pete_transport.get_write_buffer_size())
            if cut_at is None and "pete" not in self.lobby.names:
                cut_at = rounds
                # pete reads now, within CLOSE_GRACE: what was queued, the reason, then EOF
                pete.w.transport.resume_reading()
                pete_data = asyncio.ensure_future(pete.eof(20))
        self.assertIsNotNone(cut_at, "pete was never cut off")
        # memory bounded: the queue passed the bound by at most one line, plus the reason
        self.assertLessEqual(peak, lobby.MAX_BUFFERED + 2 * 1024)
        self.assertEqual(self.lobby.cut_slow, 1)
        tail = (await pete_data).decode().rstrip("\n").rsplit("\n", 1)[-1]
        self.assertEqual(tail, "error: you are not reading (more than 32768 bytes queued); bye")

        await quinn.say("over")
        await asyncio.wait_for(asyncio.gather(*listeners), 20)
        want = ["[lobby] t%d: t%d %d %s" % (i, i, k, pad) for k in range(rounds) for i in range(len(talkers))]
        for i, lines in enumerate(heard):
            chat = [x for x in lines if x.startswith("[lobby] t")]
            self.assertEqual(chat, want, "player %d missed or reordered lines" % i)
            self.assertIn("* pete left [lobby]", lines)
        await quinn.say("/who")
        self.assertEqual((await quinn.until("in [lobby]"))[-1], "in [lobby]: quinn, t0, t1, t2, t3")
        self.assertNotIn("pete", self.lobby.names)
        self.assertEqual(len(self.lobby.players), len(everyone))

    async def test_stats(self):
        a = await self.join("ann")
        b = await self.join("bea")
        anon = await Client.connect(self.port)  # not named yet
        self.clients.append(anon)
        await anon.until("what is your name")
        await b.say("/join arena")
        await b.until("* bea joined [arena]")
        await a.until("* bea left [lobby]")
        await a.say("/stats")
        self.assertEqual(
            await a.line(),
            "stats: worker pid %d, direct (no batond); 3 clients (2 named) in 2 rooms, 3 since start; "
            "cut off: 0 not reading, 0 idle" % os.getpid(),
        )
        anon.close()
        self.clients.remove(anon)
        deadline = time.monotonic() + 5
        while len(self.lobby.players) > 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await expect_stats(a, "2 clients (2 named) in 2 rooms, 3 since start")

    async def test_shutdown_says_goodbye(self):
        a = await self.join("cy")
        b = await self.join("di")
        await a.until("di joined")
        await asyncio.wait_for(self.lobby.shutdown(), lobby.CLOSE_GRACE + 2)
        for c in (a, b):
            self.assertTrue((await c.eof()).decode().endswith(lobby.GOODBYE + "\n"))
        self.assertEqual(self.lobby.players, set())


async def expect_stats(c: Client, want: str) -> None:
    await c.say("/stats")
    line = await c.line()
    if want not in line:
        raise AssertionError("%r not in %r" % (want, line))


class IdleTest(unittest.IsolatedAsyncioTestCase):
    async def test_idle_client_is_dropped_active_one_stays(self):
        server, lob = await lobby.serve_direct("127.0.0.1", 0, idle_timeout=0.5)
        self.addAsyncCleanup(server.wait_closed)
        self.addCleanup(server.close)
        self.addAsyncCleanup(lob.shutdown)
        port = server.sockets[0].getsockname()[1]
        idle, busy = await Client.connect(port), await Client.connect(port)
        self.addCleanup(idle.close)
        self.addCleanup(busy.close)
        for c, name in ((idle, "ida"), (busy, "bo")):
            await c.until("what is your name")
            await c.say(name)
            await c.until("* %s joined" % name)
        start = time.monotonic()
        for _ in range(10):  # busy speaks every 0.2 s for 2 s, idle says nothing
            await busy.say("/ping")
            await asyncio.sleep(0.2)
        data = (await idle.eof()).decode()
        self.assertTrue(data.endswith("idle for 0.5s; bye\n"), data)
        self.assertLess(time.monotonic() - start, 5)
        await busy.say("/stats")
        lines = await busy.until("stats:")
        self.assertIn("* ida left [lobby]", lines)
        self.assertIn("1 clients (1 named)", lines[-1])
        self.assertTrue(lines[-1].endswith("cut off: 0 not reading, 1 idle"), lines[-1])


# ----------------------------------------------------------------------------------------------
# Real processes
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def recv_lines(sock: socket.socket, n: int) -> List[str]:
    buf = b""
    sock.settimeout(5)
    while buf.count(b"\n") < n:
        d = sock.recv(4096)
        if not d:
            break
        buf += d
    return buf.decode().splitlines()


class ProcessTest(unittest.TestCase):
    def spawn(self, args: List[str], env: dict) -> subprocess.Popen:
        full = dict(os.environ)
        for k in list(full):
            if k.startswith("BATON_"):
                del full[k]
        full.update(env)
        p = subprocess.Popen(
            [sys.executable] + args, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.addCleanup(lambda: (p.poll() is None and p.kill(), p.wait(), p.stdout.close(), p.stderr.close()))
        return p

    def test_direct_flag(self):
        p = self.spawn([str(HERE / "lobby.py"), "--direct", "127.0.0.1:0"], {})
        line = p.stdout.readline()
        self.assertIn("(direct)", line)
        port = int(line.rsplit(":", 1)[1].split()[0])
        c = socket.create_connection(("127.0.0.1", port))
        recv_lines(c, 2)
        c.sendall(b"/ping\n")
        self.assertEqual(recv_lines(c, 1), ["pong"])
        c.close()
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(10), 0)

    def test_fallback_env(self):
        port = free_port()
        p = self.spawn([str(HERE / "lobby.py")], {"BATON_FALLBACK_LISTEN": "127.0.0.1:%d" % port})
        self.assertIn("(standalone)", p.stdout.readline())
        c = socket.create_connection(("127.0.0.1", port))
        self.assertIn("standalone", recv_lines(c, 2)[0])
        c.close()
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(10), 0)

    def test_not_under_baton(self):
        for prog in ("lobby.py", "echo.py"):
            p = self.spawn([str(HERE / prog)], {})
            _, err = p.communicate(timeout=10)
            self.assertEqual(p.returncode, 1, prog)
            self.assertIn("BATON_SOCKET is not set", err)

    def under_gateway(self, prog: str, gw: FakeGateway):
        p = self.spawn([str(HERE / prog)], gw.env(slot=5, generation=12))
        ch = gw.accept(timeout=10)
        hello = ch.read_hello()
        self.assertEqual((hello.pid, hello.slot, hello.generation, hello.live), (p.pid, 5, 12, 0))
        ch.welcome(generation=12)
        ch.expect(T.READY, timeout=10)
        return p, ch

    def test_lobby_behind_gateway(self):
        gw = FakeGateway()
        self.addCleanup(gw.close)
        p, ch = self.under_gateway("lobby.py", gw)
        cid, c = gw.hand_off(ch)
        greeting = recv_lines(c, 2)
        self.assertIn("worker pid %d, slot 5, generation 12" % p.pid, greeting[0])
        c.sendall(b"zoe\n/where\n")
        self.assertEqual(recv_lines(c, 3)[-1], "worker pid %d, slot 5, generation 12" % p.pid)
        ch.send(bw.encode_drain(10000))
        self.assertIn("being replaced", recv_lines(c, 1)[0])
        c.sendall(b"/where\n")
        self.assertTrue(recv_lines(c, 1)[0].endswith(", draining"))
        time.sleep(0.2)
        self.assertIsNone(p.poll())  # still serving zoe
        c.sendall(b"/quit\n")
        self.assertEqual(ch.expect_ids(T.CLOSED), [cid])
        self.assertEqual(p.wait(10), 0)  # drained and idle: exits

    def test_lobby_stats_and_goodbye_on_sigterm(self):
        gw = FakeGateway()
        self.addCleanup(gw.close)
        p, ch = self.under_gateway("lobby.py", gw)
        conns = [gw.hand_off(ch) for _ in range(2)]
        for i, (_, c) in enumerate(conns):
            recv_lines(c, 2)
            c.sendall(b"p%d\n" % i)
            recv_lines(c, 2)  # hello, own join
        ch.send(bw.encode_drain(60000))
        c = conns[0][1]
        self.assertIn("being replaced", recv_lines(c, 2)[-1])
        c.sendall(b"/stats\n")
        stats = recv_lines(c, 1)[0]
        self.assertEqual(
            stats,
            "stats: worker pid %d, slot 5, generation 12, draining; 2 clients (2 named) in 1 rooms, "
            "2 since start; cut off: 0 not reading, 0 idle" % p.pid,
        )
        p.send_signal(signal.SIGTERM)  # batond's drain deadline passed
        for _, c in conns:
            c.settimeout(10)
            data = b""
            while True:
                d = c.recv(65536)
                if not d:
                    break
                data += d
            self.assertTrue(data.decode().endswith(lobby.GOODBYE + "\n"), data)
        self.assertEqual(p.wait(10), 0)

    def test_echo_behind_gateway(self):
        gw = FakeGateway()
        self.addCleanup(gw.close)
        p, ch = self.under_gateway("echo.py", gw)
        conns: List[Tuple[int, socket.socket]] = [gw.hand_off(ch) for _ in range(3)]
        payload = bytes(range(256)) * 1000
        for cid, c in conns:
            got = bytearray()

            def reader(c=c, got=got):
                while True:
                    d = c.recv(65536)
                    if not d:
                        return
                    got.extend(d)

            t = threading.Thread(target=reader)
            t.start()
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            t.join(10)
            self.assertEqual(bytes(got), payload)
            self.assertEqual(ch.expect_ids(T.CLOSED), [cid])
        cid, c = gw.hand_off(ch)
        ch.send(bw.encode_drain(10000))
        time.sleep(0.2)
        self.assertIsNone(p.poll())
        c.sendall(b"last")
        self.assertEqual(c.recv(10), b"last")
        c.close()
        self.assertEqual(ch.expect_ids(T.CLOSED), [cid])
        self.assertEqual(p.wait(10), 0)

    def test_echo_refused(self):
        gw = FakeGateway()
        self.addCleanup(gw.close)
        p = self.spawn([str(HERE / "echo.py")], gw.env())
        ch = gw.accept(timeout=10)
        ch.read_hello()
        ch.send(bw.encode_error(bw.ErrorCode.TOKEN, "token does not match"))
        _, err = p.communicate(timeout=10)
        self.assertEqual(p.returncode, 1)
        self.assertIn("TOKEN", err)
        self.assertIn("token does not match", err)


class MigrationTest(unittest.IsolatedAsyncioTestCase):
    """Two lobbies in this process behind the fake gateway, both taking part in migration: the
    old one hands its players back, the test delivers them to the new one as batond would."""

    async def asyncSetUp(self):
        self.gw = FakeGateway()
        self.addCleanup(self.gw.close)
        self.old, self.old_ch, self.old_srv = await self.worker(slot=0, version="v1")
        self.new, self.new_ch, self.new_srv = await self.worker(slot=1, version="v2")

    async def worker(self, slot: int, version: str):
        lob = lobby.Lobby("slot %d" % slot)
        lob.upgraded = lobby.UPGRADED % (version, slot)
        task = asyncio.ensure_future(bw.start_server(lob.handle, env=self.gw.env(slot=slot), migrate=True, limit=lobby.MAX_LINE))
        flags = bw.WELCOME_BATCH | bw.WELCOME_REFUSE | bw.WELCOME_MIGRATE
        ch = await asyncio.to_thread(self.gw.handshake, flags=flags)
        srv = await asyncio.wait_for(task, 5)
        self.addCleanup(srv.close)
        notice = asyncio.ensure_future(lob.tell_drain(srv))
        self.addCleanup(notice.cancel)
        self.assertTrue(srv.worker.migration)
        await asyncio.to_thread(ch.expect, T.READY)
        return lob, ch, srv

    async def player(self, name: str, room: str) -> Tuple[int, socket.socket]:
        cid, c = await asyncio.to_thread(self.gw.hand_off, self.old_ch)
        await asyncio.to_thread(recv_lines, c, 2)
        await asyncio.to_thread(c.sendall, ("%s\n/join %s\n" % (name, room)).encode())
        await asyncio.to_thread(recv_until, c, "* %s joined [%s]" % (name, room))
        return cid, c

    async def test_players_move_with_name_room_and_half_a_line(self):
        # The room waits for its last member at most GATHER_TIMEOUT: on a loaded machine the
        # steps below may take longer than its 5 s, and bob's line would then go out early.
        old, lobby.GATHER_TIMEOUT = lobby.GATHER_TIMEOUT, 60.0
        self.addCleanup(setattr, lobby, "GATHER_TIMEOUT", old)
        ca, a = await self.player("ann", "red")
        cb, b = await self.player("bob", "red")
        await asyncio.to_thread(recv_until, a, "* bob joined [red]")
        await asyncio.to_thread(a.sendall, b"before the move\n")
        for c in (a, b):
            self.assertEqual(await asyncio.to_thread(recv_until, c, "before"), ["[red] ann: before the move"])
        await asyncio.to_thread(b.sendall, b"half a li")  # typed, not finished: in the state
        await asyncio.sleep(0.2)
        self.old_ch.send(bw.encode_drain(60000))
        self.old_ch.send(bw.encode_migrate(bw.Migrate(5000, [])))
        hbs = {}
        for _ in range(2):
            hb, fd = await asyncio.to_thread(expect_handback, self.old_ch)
            hbs[hb.conn.id] = (hb, fd)
        self.assertEqual({(h.group, h.group_size) for h, _ in hbs.values()}, {("red", 2)})
        state_b = hbs[cb][0].state
        self.assertTrue(state_b.startswith(lobby.STATE_MAGIC) and state_b.endswith(b"half a li"), state_b)
        self.assertEqual(self.old_srv.live, 0)
        self.assertEqual((self.old.players, self.old.rooms, self.old.names), (set(), {}, {}))
        # bob arrives first: his finished line waits until ann (the rest of [red]) is there.
        await asyncio.to_thread(b.sendall, b"ne\n")
        resume(self.new_ch, hbs[cb][1], 201, prev=cb, state=state_b, group="red")
        self.assertEqual(await asyncio.to_thread(self.new_ch.expect_ids, T.ACK), [201])
        self.assertEqual(await asyncio.to_thread(recv_lines, b, 1), ["* the server was upgraded to v2; you are now on worker 1"])
        self.assertTrue(await asyncio.to_thread(quiet, b, 0.3), "bob's line before the room arrived")
        resume(self.new_ch, hbs[ca][1], 202, prev=ca, state=hbs[ca][0].state, group="red")
        self.assertEqual(await asyncio.to_thread(self.new_ch.expect_ids, T.ACK), [202])
        for _, fd in hbs.values():
            fd.close()
        # The room is complete: bob's line, begun on v1, reaches both, right behind ann's
        # upgrade line (one read may bring both).
        self.assertEqual(
            await asyncio.to_thread(recv_lines, a, 2),
            ["* the server was upgraded to v2; you are now on worker 1", "[red] bob: half a line"],
        )
        self.assertEqual(await asyncio.to_thread(recv_lines, b, 1), ["[red] bob: half a line"])
        await asyncio.to_thread(a.sendall, b"/who\n")
        self.assertEqual(await asyncio.to_thread(recv_lines, a, 1), ["in [red]: ann, bob"])
        self.assertEqual(sorted(self.new.names), ["ann", "bob"])
        self.assertEqual(self.new.players and {p.session.group for p in self.new.players}, {"red"})
        self.assertTrue(await asyncio.to_thread(quiet, b, 0.2))  # no join/leave notices, no drain notice
        a.close()
        b.close()

    async def test_not_asked_players_get_the_drain_notice(self):
        ca, a = await self.player("cid", "blue")
        self.old_ch.send(bw.encode_drain(1200))  # no MIGRATE follows: the notice comes
        lines = await asyncio.to_thread(recv_until, a, "being replaced")
        self.assertEqual(lines, [lobby.DRAIN_NOTICE])
        a.close()


def recv_until(sock: socket.socket, want: str, timeout: float = 5.0) -> List[str]:
    """Lines up to and including the first that contains ``want``."""
    got: List[str] = []
    while not got or want not in got[-1]:
        got += recv_lines(sock, 1)
    return got


def quiet(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        data = sock.recv(100, socket.MSG_PEEK)
    except socket.timeout:
        return True
    finally:
        sock.settimeout(5)
    return not data


if __name__ == "__main__":
    unittest.main()
