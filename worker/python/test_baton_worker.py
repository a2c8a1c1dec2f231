"""Tests for baton_worker: the codec against PROTOCOL.md, and the blocking and asyncio workers
against a fake gateway written here (a SOCK_SEQPACKET listener in a temporary directory that
checks HELLO byte for byte, hands off real TCP sockets with SCM_RIGHTS and checks what comes
back).

Run from the repository root: python3 -m unittest discover -s worker/python -v
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import itertools
import logging
import os
import resource
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest
import warnings
from typing import List, Optional, Tuple
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baton_worker as bw  # noqa: E402

if not os.environ.get("BATON_TEST_LOG"):
    # Keep the expected warnings (lost channels, protocol errors) out of the test report;
    # assertLogs still sees them. BATON_TEST_LOG=1 shows them.
    logging.getLogger("baton_worker").addHandler(logging.NullHandler())
    logging.getLogger("baton_worker").propagate = False

TOKEN = "0123456789abcdef" * 4
# What each API asks for in every HELLO: CONNS always; non-blocking fds for asyncio only.
BLOCKING_CAPS = bw.FLAG_BATCH
ASYNC_CAPS = bw.FLAG_BATCH | bw.FLAG_NONBLOCK
T = bw.MsgType
C = bw.ErrorCode


def h(s: str) -> bytes:
    """Hex with spaces and newlines, as PROTOCOL.md writes it."""
    return bytes.fromhex("".join(s.split()))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_copies(fd: int) -> int:
    """How many fds of this process refer to the same file as ``fd`` (itself included)."""
    target = os.readlink("/proc/self/fd/%d" % fd)
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + name) == target:
                n += 1
        except OSError:
            pass
    return n


@contextlib.contextmanager
def out_of_fds(spare: int = 0):
    """Inside, this process can open no fd (or ``spare`` more): RLIMIT_NOFILE's soft limit is
    the lowest free fd number (the limit is on fd numbers; with one spare, that number is the
    only one left). A CONN's fd then cannot be received: recvmsg reports
    MSG_CTRUNC and delivers none. Garbage collection is off inside so that no finalizer frees a
    lower number meanwhile. Keep the inside short and free of anything that opens fds."""
    gc.collect()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    free = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.close(free)
    gc.disable()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (free + spare, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        gc.enable()


def welcome_1_0(w: bw.Welcome) -> bytes:
    """A 1.0 gateway's WELCOME: no flags field (and so the body ends after generation)."""
    msg = bw.encode_welcome(w)[:-4]
    return msg[:2] + struct.pack("<H", len(msg) - 4) + msg[4:]


def wait_until(pred, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.005)


# ----------------------------------------------------------------------------------------------
# Fake gateway
# ----------------------------------------------------------------------------------------------


class Chan:
    """The gateway's end of one worker's channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(5)
        self.hello: Optional[bw.Hello] = None
        self.hello_raw = b""

    def recv(self, timeout: float = 5.0) -> Tuple[int, bytes, List[int]]:
        self.sock.settimeout(timeout)
        data, anc, flags, _ = self.sock.recvmsg(bw.MAX_LARGE_MESSAGE, socket.CMSG_SPACE(16 * 4))
        fds: List[int] = []
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                fds.extend(a)
        if not data:
            raise EOFError("worker closed the channel")
        t, body = bw.split(data)
        return t, body, fds

    def expect(self, t: int, timeout: float = 5.0) -> bytes:
        got, body, fds = self.recv(timeout)
        if fds:
            raise AssertionError("worker sent fds")
        if got != t:
            raise AssertionError("want %s, got %s %r" % (bw._type_name(t), bw._type_name(got), body))
        return body

    def expect_ids(self, t: int, timeout: float = 5.0) -> List[int]:
        return bw.parse_ids(t, self.expect(t, timeout))

    def expect_error(self, timeout: float = 5.0) -> bw.BatonError:
        return bw.parse_error(self.expect(T.ERROR, timeout))

    def expect_eof(self, timeout: float = 5.0) -> None:
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(8192)
            if not data:
                return

    def silent(self, seconds: float = 0.2) -> bool:
        """True if the worker sends nothing for ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(8192, socket.MSG_PEEK)
        except socket.timeout:
            return True
        return False

    def send(self, data: bytes, fds: Tuple[int, ...] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def read_hello(self) -> bw.Hello:
        t, body, fds = self.recv()
        assert t == T.HELLO and not fds, (t, fds)
        self.hello_raw = bw._HDR.pack(t, 0, len(body)) + body
        self.hello = bw.parse_hello(body)
        return self.hello

    def welcome(self, generation: int = 7, ping_ms: int = 1000, flags: int = 0, old: bool = False) -> None:
        """Answer HELLO: a 1.1 WELCOME with ``flags``, or with ``old`` a 1.0 one (no flags field)."""
        w = bw.Welcome(version=1, ping_interval_ms=ping_ms, generation=generation, flags=flags)
        self.send(welcome_1_0(w) if old else bw.encode_welcome(w))

    def hand_off(
        self,
        conn: socket.socket,
        cid: int,
        client=("203.0.113.9", 5555),
        local=("127.0.0.1", 7000),
        listener: str = "tcp",
    ) -> None:
        self.send(bw.encode_conn(bw.ConnInfo(cid, client, local, listener)), (conn.fileno(),))

    def close(self) -> None:
        self.sock.close()


class FakeGateway:
    """A registration socket in a temporary directory, plus a TCP listener for client pairs."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "workers.sock")
        self.lsock: Optional[socket.socket] = None
        self.listen()
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.ids = itertools.count(1)
        self.chans: List[Chan] = []
        self.tcp_socks: List[socket.socket] = []

    def listen(self) -> None:
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.lsock.bind(self.path)
        self.lsock.listen(16)

    def unlisten(self) -> None:
        assert self.lsock is not None
        self.lsock.close()
        self.lsock = None
        os.unlink(self.path)

    def env(self, slot: int = 3, generation: int = 7, token: str = TOKEN) -> dict:
        return {
            "BATON_SOCKET": self.path,
            "BATON_WORKER": str(slot),
            "BATON_GENERATION": str(generation),
            "BATON_TOKEN": token,
        }

    def accept(self, timeout: float = 5.0) -> Chan:
        assert self.lsock is not None
        self.lsock.settimeout(timeout)
        s, _ = self.lsock.accept()
        ch = Chan(s)
        self.chans.append(ch)
        return ch

    def handshake(self, timeout: float = 5.0, generation: int = 7, flags: int = 0, old: bool = False) -> Chan:
        ch = self.accept(timeout)
        ch.read_hello()
        ch.welcome(generation=generation, flags=flags, old=old)
        return ch

    def tcp_pair(self) -> Tuple[socket.socket, socket.socket]:
        """(client, server side): a real TCP connection on 127.0.0.1."""
        c = socket.create_connection(self.tcp.getsockname())
        s, _ = self.tcp.accept()
        c.settimeout(5)
        self.tcp_socks += [c, s]
        return c, s

    def hand_off(self, ch: Chan, **kw) -> Tuple[int, socket.socket]:
        """Hand a fresh connection to the worker; wait for its ACK; drop our copy like batond."""
        c, s = self.tcp_pair()
        cid = next(self.ids)
        ch.hand_off(s, cid, **kw)
        assert ch.expect_ids(T.ACK) == [cid]
        s.close()
        return cid, c

    def conns(self, n: int, first_id: int, nonblocking: bool = False):
        """``n`` fresh TCP connections as one CONNS: (message, gateway-side sockets, clients)."""
        pairs = [self.tcp_pair() for _ in range(n)]
        infos = [bw.ConnInfo(first_id + i, ("203.0.113.%d" % (i + 1), 5000 + i), ("127.0.0.1", 7000), "tcp") for i in range(n)]
        for _, srv in pairs:
            srv.setblocking(not nonblocking)  # batond sets O_NONBLOCK where NONBLOCK was granted
        return bw.encode_conns(infos), [srv for _, srv in pairs], [c for c, _ in pairs]

    def close(self) -> None:
        for ch in self.chans:
            ch.close()
        for s in self.tcp_socks:
            s.close()
        if self.lsock is not None:
            self.lsock.close()
        self.tcp.close()
        self.dir.cleanup()


def hello_bytes(pid: int, slot: int, gen: int, cap: int, flags: int, live: int, token: str) -> bytes:
    """HELLO built by hand from the PROTOCOL.md table, independently of the module's encoder."""
    body = (
        (1).to_bytes(2, "little")
        + (1).to_bytes(2, "little")
        + pid.to_bytes(4, "little")
        + slot.to_bytes(4, "little")
        + gen.to_bytes(8, "little")
        + cap.to_bytes(4, "little")
        + flags.to_bytes(4, "little")
        + live.to_bytes(4, "little")
        + len(token).to_bytes(2, "little")
        + token.encode()
    )
    return bytes([0x01, 0x00]) + len(body).to_bytes(2, "little") + body


# ----------------------------------------------------------------------------------------------
# Codec
# ----------------------------------------------------------------------------------------------


class CodecTest(unittest.TestCase):
    def test_ready_example(self):
        self.assertEqual(bw.encode_ready(), h("04 00 00 00"))
        self.assertEqual(bw.split(h("04 00 00 00")), (T.READY, b""))

    def test_ack_example(self):
        ex = h("05 00 12 00  02 00  07 00 00 00 00 00 00 00  09 00 00 00 00 00 00 00")
        self.assertEqual(bw.encode_ack([7, 9]), ex)
        t, body = bw.split(ex)
        self.assertEqual((t, bw.parse_ids(t, body)), (T.ACK, [7, 9]))
        self.assertEqual(bw.encode_closed([7, 9])[0], 0x06)
        self.assertEqual(bw.encode_closed([7, 9])[1:], ex[1:])

    # PROTOCOL.md's CONN example says "09 00 1a 00 (body 26 bytes)", but its own body lines add
    # up to 8 + 7 + 7 + 5 = 27 bytes (0x1b); Go's AppendConn agrees with 27. These are the
    # example's bytes with the corrected length.
    CONN_EXAMPLE = h(
        """
        09 00 1b 00
        01 00 00 00 00 00 00 00
        04 40 9c 7f 00 00 01
        04 58 1b 7f 00 00 01
        03 00 74 63 70
        """
    )

    def test_conn_example(self):
        info = bw.ConnInfo(1, ("127.0.0.1", 40000), ("127.0.0.1", 7000), "tcp")
        self.assertEqual(bw.encode_conn(info), self.CONN_EXAMPLE)
        t, body = bw.split(self.CONN_EXAMPLE)
        self.assertEqual(t, T.CONN)
        self.assertEqual(bw.parse_conn(body), info)

    CONNS_EXAMPLE = h(
        """
        0c 00 3c 00  02 00
        1b 00  01 00 00 00 00 00 00 00  04 40 9c 7f 00 00 01  04 58 1b 7f 00 00 01  03 00 74 63 70
        1b 00  02 00 00 00 00 00 00 00  04 41 9c 7f 00 00 01  04 58 1b 7f 00 00 01  03 00 74 63 70
        """
    )

    def test_conns_example(self):
        a = bw.ConnInfo(1, ("127.0.0.1", 40000), ("127.0.0.1", 7000), "tcp")
        b = bw.ConnInfo(2, ("127.0.0.1", 40001), ("127.0.0.1", 7000), "tcp")
        self.assertEqual(bw.encode_conns([a, b]), self.CONNS_EXAMPLE)
        t, body = bw.split(self.CONNS_EXAMPLE)
        self.assertEqual(t, T.CONNS)
        self.assertEqual(bw.parse_conns(body), [a, b])

    def test_conns_entries(self):
        one = bw.split(bw.encode_conn(bw.ConnInfo(5, None, ("::1", 9), "x")))[1]
        # An entry may grow fields at its end: they are skipped, the next entry is found.
        grown = struct.pack("<H", 2) + struct.pack("<H", len(one) + 3) + one + b"new" + struct.pack("<H", len(one)) + one
        self.assertEqual([c.id for c in bw.parse_conns(grown)], [5, 5])
        bad = {
            "count 0": struct.pack("<H", 0),
            "count 17": struct.pack("<H", 17) + (struct.pack("<H", len(one)) + one) * 17,
            "entry past the body": struct.pack("<HH", 1, len(one) + 1) + one,
            "entry shorter than a CONN": struct.pack("<HH", 1, 8) + one[:8],
            "fewer entries than count": struct.pack("<HH", 2, len(one)) + one,
        }
        for name, body in bad.items():
            with self.subTest(name), self.assertRaises(bw.ProtocolError) as cm:
                bw.parse_conns(body)
            self.assertEqual(cm.exception.code, C.MALFORMED)
        with self.assertRaises(ValueError):
            bw.encode_conns([])
        with self.assertRaises(ValueError):
            bw.encode_conns([bw.ConnInfo(1, None, None, "")] * 17)

    def test_conn_example_as_printed_is_malformed(self):
        printed = b"\x09\x00\x1a\x00" + self.CONN_EXAMPLE[4:]
        with self.assertRaises(bw.ProtocolError) as cm:
            bw.split(printed)
        self.assertEqual(cm.exception.code, C.MALFORMED)

    def test_hello_bytes(self):
        hello = bw.Hello(1, 1, pid=0x01020304, slot=2, generation=0x0A0B, capacity=100, flags=3, live=5, token="ab")
        want = h(
            """
            01 00 24 00
            01 00 01 00
            04 03 02 01
            02 00 00 00
            0b 0a 00 00 00 00 00 00
            64 00 00 00
            03 00 00 00
            05 00 00 00
            02 00 61 62
            """
        )
        self.assertEqual(bw.encode_hello(hello), want)
        self.assertEqual(want, hello_bytes(0x01020304, 2, 0x0A0B, 100, 3, 5, "ab"))
        self.assertEqual(bw.parse_hello(bw.split(want)[1]), hello)

    def test_welcome_error_ping_pong_drain(self):
        w = bw.encode_welcome(bw.Welcome(1, 2500, 9))
        self.assertEqual(w, h("02 00 14 00  01 00 00 00  c4 09 00 00  09 00 00 00 00 00 00 00  00 00 00 00"))
        self.assertEqual(bw.parse_welcome(bw.split(w)[1]), bw.Welcome(1, 2500, 9))
        e = bw.encode_error(C.TOKEN, "no")
        self.assertEqual(e, h("03 00 06 00  02 00  02 00 6e 6f"))
        err = bw.parse_error(bw.split(e)[1])
        self.assertEqual((err.code, err.reason, err.fatal), (C.TOKEN, "no", True))
        self.assertIn("TOKEN", str(err))
        self.assertEqual(bw.encode_ping(0x1122), h("07 00 08 00  22 11 00 00 00 00 00 00"))
        self.assertEqual(bw.encode_pong(0x1122), h("08 00 08 00  22 11 00 00 00 00 00 00"))
        self.assertEqual(bw.parse_nonce(T.PING, bw.split(bw.encode_ping(5))[1]), 5)
        self.assertEqual(bw.encode_drain(30000), h("0a 00 04 00  30 75 00 00"))
        self.assertEqual(bw.parse_drain(bw.split(bw.encode_drain(30000))[1]), 30000)

    def test_addresses(self):
        for client, want in [
            (("::1", 443), ("::1", 443)),
            (("2001:db8::5", 1), ("2001:db8::5", 1)),
            (("::ffff:10.0.0.1", 80), ("10.0.0.1", 80)),  # unmapped, like the Go encoder
            (None, None),
        ]:
            info = bw.ConnInfo(2**64 - 1, client, None, "")
            got = bw.parse_conn(bw.split(bw.encode_conn(info))[1])
            self.assertEqual((got.id, got.client, got.local, got.listener), (2**64 - 1, want, None, ""))
        body = bw.split(bw.encode_conn(bw.ConnInfo(1, ("::1", 443), None, "x")))[1]
        self.assertEqual(body[8:11], b"\x06\xbb\x01")  # family 6, port 443 little-endian

    def test_trailing_bytes_ignored(self):
        body = self.CONN_EXAMPLE[4:] + b"future field"
        self.assertEqual(bw.parse_conn(body).listener, "tcp")
        wbody = bw.split(bw.encode_welcome(bw.Welcome(1, 5, 6)))[1] + b"\x01\x02"
        self.assertEqual(bw.parse_welcome(wbody), bw.Welcome(1, 5, 6))
        self.assertEqual(bw.parse_ids(T.CLOSED, b"\x01\x00" + b"\x05" + b"\x00" * 7 + b"xyz"), [5])
        self.assertEqual(bw.parse_drain(b"\x01\x00\x00\x00\xff"), 1)
        self.assertEqual(bw.parse_nonce(T.PING, b"\x01" + b"\x00" * 8), 1)

    def test_welcome_1_0_and_1_1(self):
        # 1.0: the body ends after generation; flags read as 0 (nothing granted).
        old = h("02 00 10 00  01 00 00 00  c4 09 00 00  09 00 00 00 00 00 00 00")
        self.assertEqual(welcome_1_0(bw.Welcome(1, 2500, 9)), old)
        self.assertEqual(bw.parse_welcome(bw.split(old)[1]), bw.Welcome(1, 2500, 9, flags=0))
        # 1.1: u32 flags appended.
        new = h("02 00 14 00  01 00 00 00  c4 09 00 00  09 00 00 00 00 00 00 00  03 00 00 00")
        w = bw.Welcome(1, 2500, 9, flags=bw.WELCOME_NONBLOCK | bw.WELCOME_REFUSE)
        self.assertEqual(bw.encode_welcome(w), new)
        self.assertEqual(bw.parse_welcome(bw.split(new)[1]), w)
        self.assertEqual((bw.WELCOME_NONBLOCK, bw.WELCOME_REFUSE, bw.FLAG_NONBLOCK), (1, 2, 4))
        # Later revisions append more: ignored.
        self.assertEqual(bw.parse_welcome(new[4:] + b"\x01\x02\x03\x04\x05"), w)
        # 1 to 3 bytes after generation are no flags field (as Go's reader): 0.
        for n in (1, 2, 3):
            self.assertEqual(bw.parse_welcome(old[4:] + b"\xff" * n).flags, 0)
        self.assertEqual(bw.parse_welcome(bw.split(bw.encode_welcome(bw.Welcome(flags=0xFFFFFFFF)))[1]).flags, 0xFFFFFFFF)

    def test_refuse(self):
        self.assertEqual(T.REFUSE, 0x0B)
        self.assertEqual(T(0x0B).name, "REFUSE")
        ack = h("05 00 12 00  02 00  07 00 00 00 00 00 00 00  09 00 00 00 00 00 00 00")
        refuse = bw.encode_refuse([7, 9])
        self.assertEqual(refuse, b"\x0b" + ack[1:])  # the body of an ACK, type 0x0B
        t, body = bw.split(refuse)
        self.assertEqual((t, bw.parse_ids(t, body)), (T.REFUSE, [7, 9]))
        self.assertEqual(len(bw.encode_refuse(list(range(511)))), 4 + 2 + 511 * 8)
        for ids in ([], list(range(512))):
            with self.assertRaises(ValueError):
                bw.encode_refuse(ids)

    def test_truncated_bodies_are_malformed(self):
        cases = [
            (bw.parse_conn, self.CONN_EXAMPLE[4:]),
            (bw.parse_hello, bw.encode_hello(bw.Hello(token=TOKEN))[4:]),
            (bw.parse_welcome, welcome_1_0(bw.Welcome())[4:]),  # flags are optional (1.1)
            (bw.parse_error, bw.encode_error(5, "why")[4:]),
            (bw.parse_drain, bw.encode_drain(1)[4:]),
            (lambda b: bw.parse_nonce(T.PING, b), bw.encode_ping(1)[4:]),
            (lambda b: bw.parse_ids(T.ACK, b), bw.encode_ack([1, 2, 3])[4:]),
        ]
        for parse, body in cases:
            parse(body)  # whole: fine
            for n in range(len(body)):
                with self.subTest(parse=parse, n=n):
                    with self.assertRaises(bw.ProtocolError) as cm:
                        parse(body[:n])
                    self.assertEqual(cm.exception.code, C.MALFORMED)

    def test_bad_fields(self):
        bad = [
            # address family 5
            b"\x01" + b"\x00" * 7 + b"\x05" + b"\x00" * 20,
            # listener longer than 1024 bytes
            b"\x01" + b"\x00" * 7 + b"\x00\x00" + struct.pack("<H", 1025) + b"a" * 1025,
            # listener not UTF-8
            b"\x01" + b"\x00" * 7 + b"\x00\x00" + b"\x02\x00\xff\xfe",
        ]
        for body in bad:
            with self.assertRaises(bw.ProtocolError) as cm:
                bw.parse_conn(body)
            self.assertEqual(cm.exception.code, C.MALFORMED)
        for body in [b"\x00\x00", struct.pack("<H", 512) + b"\x00" * 8 * 512, b"\x02\x00" + b"\x00" * 15]:
            with self.assertRaises(bw.ProtocolError):
                bw.parse_ids(T.ACK, body)

    def test_split(self):
        for msg, code in [
            (b"", C.MALFORMED),
            (b"\x04\x00\x00", C.MALFORMED),
            (b"\x04\x00\x01\x00", C.MALFORMED),  # says 1 body byte, has 0
            (b"\x04\x00\x00\x00\x00", C.MALFORMED),  # says 0, has 1
            (b"\x81\x00" + struct.pack("<H", 4093) + b"\x00" * 4093, C.TOO_BIG),
        ]:
            with self.assertRaises(bw.ProtocolError) as cm:
                bw.split(msg)
            self.assertEqual(cm.exception.code, code, msg[:8])
        self.assertEqual(bw.split(b"\x81\x07\x00\x00"), (0x81, b""))  # header flags ignored
        big = b"\x81\x00" + struct.pack("<H", 4092) + b"\x00" * 4092
        self.assertEqual(len(bw.split(big)[1]), 4092)

    def test_encoder_limits(self):
        self.assertEqual(bw.MAX_IDS, 511)
        self.assertEqual(len(bw.encode_ack(list(range(511)))), 4 + 2 + 511 * 8)
        for ids in ([], list(range(512))):
            with self.assertRaises(ValueError):
                bw.encode_ack(ids)
        with self.assertRaises(ValueError):
            bw.encode_hello(bw.Hello(token="x" * 1025))
        e = bw.encode_error(4, "é" * 1000)  # 2000 bytes of reason: cut to <= 1024, still UTF-8
        self.assertLessEqual(len(bw.parse_error(bw.split(e)[1]).reason.encode()), 1024)


class RecvMessageTest(unittest.TestCase):
    def setUp(self):
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.b.settimeout(5)
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)

    def rejects(self, data: bytes, nfds: int, code: int) -> None:
        r, w = os.pipe()
        fds = [r] * nfds
        before = open_fds()
        if fds:
            socket.send_fds(self.a, [data], fds)
        else:
            self.a.send(data)
        with self.assertRaises(bw.ProtocolError) as cm:
            bw.recv_message(self.b)
        self.assertEqual(cm.exception.code, code)
        self.assertEqual(open_fds(), before, "received fds were not all closed")
        os.close(r)
        os.close(w)

    def test_fd_rules(self):
        conn = bw.encode_conn(bw.ConnInfo(1, None, None, ""))
        self.rejects(conn, 0, C.FDS)
        self.rejects(conn, 2, C.FDS)
        self.rejects(bw.encode_ready(), 1, C.FDS)
        self.rejects(conn, 6, C.TOO_BIG)  # more fds than the receive buffer has room for
        self.rejects(b"\x81\x00" + struct.pack("<H", 5000) + b"\x00" * 5000, 0, C.TOO_BIG)

    def test_conn_out_of_fds(self):
        # Only a whole CONN whose fd could not be installed (MSG_CTRUNC, no fd) is special:
        # NoFDError carrying the message. Anything else truncated stays TOO_BIG.
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        conn = bw.encode_conn(bw.ConnInfo(77, None, None, "l"))
        socket.send_fds(self.a, [conn], [r])
        socket.send_fds(self.a, [bw.encode_ready()], [r])
        gc.collect()  # earlier tests' garbage closes its fds now, not inside
        before = open_fds()
        with out_of_fds():
            with self.assertRaises(bw.NoFDError) as cm:
                bw.recv_message(self.b)
            with self.assertRaises(bw.ProtocolError) as cm2:
                bw.recv_message(self.b)
        self.assertEqual(cm.exception.message, conn)
        self.assertTrue(cm.exception.flags & socket.MSG_CTRUNC)
        self.assertNotIsInstance(cm.exception, bw.ProtocolError)
        self.assertEqual(cm2.exception.code, C.TOO_BIG)
        self.assertEqual(open_fds(), before)
        # With the limit back, the same CONN arrives with its fd.
        socket.send_fds(self.a, [conn], [r])
        data, fd = bw.recv_message(self.b)
        self.assertEqual(data, conn)
        os.close(fd)

    def rejects_batch(self, data: bytes, nfds: int, code: int) -> None:
        r, w = os.pipe()
        before = open_fds()
        if nfds:
            socket.send_fds(self.a, [data], [r] * nfds)
        else:
            self.a.send(data)
        with self.assertRaises(bw.ProtocolError) as cm:
            bw.recv_batch(self.b)
        self.assertEqual(cm.exception.code, code)
        self.assertEqual(open_fds(), before, "received fds were not all closed")
        os.close(r)
        os.close(w)

    def test_batch_fd_rules(self):
        conns = bw.encode_conns([bw.ConnInfo(i, None, None, "") for i in (1, 2, 3)])
        self.rejects_batch(conns, 0, C.FDS)
        self.rejects_batch(conns, 2, C.FDS)
        self.rejects_batch(conns, 4, C.FDS)
        self.rejects_batch(conns, 21, C.TOO_BIG)  # more than the buffer's 16 + 4
        self.rejects_batch(bw.encode_conn(bw.ConnInfo(1, None, None, "")), 2, C.FDS)
        self.rejects_batch(bw.encode_ready(), 1, C.FDS)
        self.rejects(conns, 3, C.FDS)  # recv_message (no BATCH asked) takes no CONNS
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        socket.send_fds(self.a, [conns], [r, r, r])
        data, fds = bw.recv_batch(self.b)
        self.assertEqual((data, len(fds)), (conns, 3))
        for fd in fds:
            self.assertFalse(os.get_inheritable(fd))
            os.close(fd)
        self.a.send(bw.encode_ready())
        self.assertEqual(bw.recv_batch(self.b), (bw.encode_ready(), []))

    def test_conns_partly_out_of_fds(self):
        # The kernel installs what fits, in order: the first entry has its fd, the others none.
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        conns = bw.encode_conns([bw.ConnInfo(i, None, None, "") for i in (1, 2, 3)])
        socket.send_fds(self.a, [conns], [r, r, r])
        gc.collect()
        before = open_fds()
        with out_of_fds(spare=1):
            with self.assertRaises(bw.NoFDError) as cm:
                bw.recv_batch(self.b)
        self.assertEqual(cm.exception.message, conns)
        self.assertEqual(len(cm.exception.fds), 1)
        self.assertEqual(open_fds(), before + 1)  # the one that came belongs to the catcher
        os.close(cm.exception.fds[0])

    def test_good_and_eof(self):
        r, w = os.pipe()
        conn = bw.encode_conn(bw.ConnInfo(1, None, None, ""))
        socket.send_fds(self.a, [conn], [r])
        data, fd = bw.recv_message(self.b)
        self.assertEqual(data, conn)
        self.assertIsNotNone(fd)
        self.assertFalse(os.get_inheritable(fd))
        os.close(fd)
        self.a.send(bw.encode_ready())
        self.assertEqual(bw.recv_message(self.b), (bw.encode_ready(), None))
        self.a.close()
        self.assertIsNone(bw.recv_message(self.b))
        os.close(r)
        os.close(w)


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


class EnvTest(unittest.TestCase):
    def test_not_under_baton(self):
        with self.assertRaises(bw.NotUnderBaton) as cm:
            bw.Worker(env={})
        msg = str(cm.exception)
        self.assertIn("BATON_SOCKET is not set", msg)
        self.assertIn("batond", msg)
        self.assertIn("BATON_FALLBACK_LISTEN", msg)
        with mock.patch.dict(os.environ, {}, clear=True):
            with self.assertRaises(bw.NotUnderBaton):
                bw.Worker()

    def test_not_under_baton_async(self):
        async def main():
            await bw.start_server(lambda r, w: None, env={})

        with self.assertRaises(bw.NotUnderBaton):
            asyncio.run(main())

    def test_bad_environment(self):
        base = {"BATON_SOCKET": "/nonexistent", "BATON_WORKER": "1", "BATON_GENERATION": "1", "BATON_TOKEN": "t"}
        for change in [{"BATON_WORKER": "x"}, {"BATON_WORKER": "-1"}, {"BATON_GENERATION": ""}, {"BATON_TOKEN": "t" * 2000}]:
            env = dict(base, **change)
            with self.assertRaises(bw.ConfigError, msg=str(change)):
                bw.Worker(env=env)
        with self.assertRaises(bw.ConfigError):
            bw.Worker(env={"BATON_FALLBACK_LISTEN": "nonsense"})

    def test_gateway_absent(self):
        env = {"BATON_SOCKET": "/nonexistent/x.sock", "BATON_WORKER": "1", "BATON_GENERATION": "1", "BATON_TOKEN": "t"}
        t0 = time.monotonic()
        with self.assertRaises(bw.RegistrationError) as cm:
            bw.Worker(env=env, register_timeout=0.5)
        self.assertLess(time.monotonic() - t0, 2)
        self.assertIn("/nonexistent/x.sock", str(cm.exception))


class FallbackTest(unittest.TestCase):
    def test_blocking_fallback(self):
        w = bw.Worker(env={}, fallback=("127.0.0.1", 0))
        self.addCleanup(w.close)
        self.assertFalse(w.under_baton)
        host, port = w.address
        c = socket.create_connection((host, port))
        self.addCleanup(c.close)
        s, addr = w.accept(timeout=5)
        self.assertEqual(addr, c.getsockname()[:2])
        self.assertIsInstance(s, bw.BatonSocket)
        self.assertEqual(w.live, 1)
        c.sendall(b"hi")
        self.assertEqual(s.recv(2), b"hi")
        s.close()
        self.assertTrue(w.wait_idle(5))
        with self.assertRaises(socket.timeout):
            w.accept(timeout=0.05)

    def test_close_wakes_fallback_accept(self):
        w = bw.Worker(env={}, fallback=("127.0.0.1", 0))
        errs = []

        def run():
            try:
                w.accept()
            except Exception as e:  # noqa: BLE001
                errs.append(e)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.1)
        w.close()
        t.join(5)
        self.assertFalse(t.is_alive())
        self.assertIsInstance(errs[0], bw.WorkerClosed)

    def test_env_fallback_wins(self):
        probe = socket.create_server(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        w = bw.Worker(env={"BATON_FALLBACK_LISTEN": "127.0.0.1:%d" % port}, fallback=("127.0.0.1", 1))
        self.addCleanup(w.close)
        self.assertEqual(w.address, ("127.0.0.1", port))

    def test_asyncio_fallback(self):
        async def handler(reader, writer):
            writer.write(b"hello " + await reader.readline())
            # return without closing: the module closes

        async def main():
            server = await bw.start_server(handler, env={"BATON_FALLBACK_LISTEN": "127.0.0.1:0"})
            port = server.sockets[0].getsockname()[1]
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"you\n")
            self.assertEqual(await r.read(), b"hello you\n")  # read() to EOF: the server closed
            w.close()
            await server.wait_idle()
            self.assertEqual(server.live, 0)
            server.close()
            await server.wait_closed()

        asyncio.run(asyncio.wait_for(main(), 10))


# ----------------------------------------------------------------------------------------------
# Blocking worker
# ----------------------------------------------------------------------------------------------


class BlockingTest(unittest.TestCase):
    def setUp(self):
        self.gw = FakeGateway()
        self.addCleanup(self.gw.close)

    def start(self, welcome: Optional[dict] = None, **kw) -> Tuple[bw.Worker, Chan]:
        """Start a Worker (its constructor blocks until WELCOME) against the fake gateway;
        ``welcome`` are keyword arguments for its WELCOME (FakeGateway.handshake)."""
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("ch", self.gw.handshake(**(welcome or {}))))
        t.start()
        w = bw.Worker(env=self.gw.env(), **kw)
        t.join(5)
        self.addCleanup(w.close)
        return w, box["ch"]

    def accept_in_thread(self, w: bw.Worker):
        box: dict = {}

        def run():
            try:
                box["r"] = w.accept(timeout=5)
            except Exception as e:  # noqa: BLE001
                box["e"] = e

        t = threading.Thread(target=run)
        t.start()
        return t, box

    def test_hello_and_ready(self):
        w, ch = self.start(capacity=50)
        self.assertEqual(ch.hello_raw, hello_bytes(os.getpid(), 3, 7, 50, BLOCKING_CAPS, 0, TOKEN))
        self.assertTrue(w.registered)
        self.assertEqual(w.welcome, bw.Welcome(1, 1000, 7))
        self.assertTrue(ch.silent(0.2), "READY before serving")
        t, box = self.accept_in_thread(w)
        ch.expect(T.READY)
        cid, client = self.gw.hand_off(ch)
        t.join(5)
        sock, addr = box["r"]
        self.assertEqual(addr, ("203.0.113.9", 5555))  # from CONN, not getpeername
        self.assertEqual(sock.conn_info, bw.ConnInfo(cid, ("203.0.113.9", 5555), ("127.0.0.1", 7000), "tcp"))
        sock.close()
        self.assertEqual(ch.expect_ids(T.CLOSED), [cid])

    def test_ack_without_accept_then_serve_and_close(self):
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        c, s = self.gw.tcp_pair()
        c.sendall(b"early bytes")  # already waiting in the socket before the handoff
        ch.hand_off(s, 42)
        self.assertEqual(ch.expect_ids(T.ACK), [42])  # no accept() yet: the ACK comes anyway
        s.close()
        self.assertEqual(w.live, 1)
        sock, addr = w.accept(timeout=5)
        self.assertIsNone(sock.gettimeout())
        self.assertEqual(sock.recv(100), b"early bytes")
        sock.sendall(b"pong")
        self.assertEqual(c.recv(100), b"pong")
        self.assertTrue(ch.silent(0.1))
        sock.close()
        self.assertEqual(ch.expect_ids(T.CLOSED), [42])
        self.assertEqual(c.recv(100), b"")  # the client sees the close
        self.assertTrue(w.wait_idle(1))

    def test_garbage_collected_socket_reports_closed(self):
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        cid, client = self.gw.hand_off(ch)
        sock, _ = w.accept(timeout=5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del sock  # never closed: garbage collection must still count it down
            gc.collect()
        self.assertEqual(ch.expect_ids(T.CLOSED), [cid])
        self.assertEqual(client.recv(10), b"")
        self.assertTrue(ch.silent(0.1), "CLOSED more than once")

    def test_detach_makefile_and_with(self):
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        cid1, _ = self.gw.hand_off(ch)
        cid2, _ = self.gw.hand_off(ch)
        cid3, _ = self.gw.hand_off(ch)
        s1, _ = w.accept(timeout=5)
        s2, _ = w.accept(timeout=5)
        s3, _ = w.accept(timeout=5)
        fd = s1.detach()
        self.assertEqual(ch.expect_ids(T.CLOSED), [cid1])
        os.close(fd)
        f = s2.makefile("rb")
        s2.close()
        self.assertTrue(ch.silent(0.1), "CLOSED while a makefile() object still holds the socket")
        f.close()
        self.assertEqual(ch.expect_ids(T.CLOSED), [cid2])
        with s3:
            pass
        self.assertEqual(ch.expect_ids(T.CLOSED), [cid3])
        s3.close()
        del s3
        gc.collect()
        self.assertTrue(ch.silent(0.1), "CLOSED more than once")

    def test_ping(self):
        w, ch = self.start()
        ch.send(bw.encode_ping(0xDEADBEEF12345678))
        self.assertEqual(bw.parse_nonce(T.PONG, ch.expect(T.PONG)), 0xDEADBEEF12345678)
        ch.send(bw._HDR.pack(0x80, 0, 3) + b"new")  # optional type: ignored
        ch.send(bw.encode_ping(1))
        self.assertEqual(bw.parse_nonce(T.PONG, ch.expect(T.PONG)), 1)

    def test_drain(self):
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        cid1, _ = self.gw.hand_off(ch)
        self.assertFalse(w.draining)
        ch.send(bw.encode_drain(30000))
        cid2, _ = self.gw.hand_off(ch)  # crossed the DRAIN on the wire: acked and served
        wait_until(lambda: w.draining, what="draining")
        self.assertAlmostEqual(w.drain_deadline - time.monotonic(), 30, delta=1)
        s1, _ = w.accept(timeout=5)
        s2, _ = w.accept(timeout=5)
        self.assertEqual([s1.conn_info.id, s2.conn_info.id], [cid1, cid2])
        with self.assertRaises(bw.Draining):
            w.accept(timeout=5)
        self.assertFalse(w.wait_drained(0.05))
        s1.close()
        s2.close()
        closed = ch.expect_ids(T.CLOSED)
        if len(closed) < 2:  # closes may be batched
            closed += ch.expect_ids(T.CLOSED)
        self.assertEqual(sorted(closed), [cid1, cid2])
        self.assertTrue(w.wait_drained(5))
        self.assertEqual(w.live, 0)

    def test_drain_wakes_waiting_accept(self):
        w, ch = self.start()
        t, box = self.accept_in_thread(w)
        ch.expect(T.READY)
        ch.send(bw.encode_drain(1000))
        t.join(5)
        self.assertIsInstance(box.get("e"), bw.Draining)

    def test_reregistration_keeps_sessions(self):
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        cid1, c1 = self.gw.hand_off(ch)
        cid2, c2 = self.gw.hand_off(ch)
        cid3, c3 = self.gw.hand_off(ch)
        socks = [w.accept(timeout=5)[0] for _ in range(3)]
        # batond goes away: the listener vanishes and the channel drops.
        self.gw.unlisten()
        t0 = time.monotonic()
        ch.close()
        wait_until(lambda: not w.registered, what="channel loss noticed")
        socks[2].close()  # ends while batond is away: its CLOSED waits for the next channel
        wait_until(lambda: w.live == 2, what="live == 2")  # the program's view: 2 sessions
        time.sleep(0.3)  # a few failed attempts (ENOENT) with backoff
        self.gw.listen()
        ch2 = self.gw.accept(timeout=5)
        self.assertGreaterEqual(time.monotonic() - t0, 0.1)
        ch2.read_hello()
        # live = acked and not yet reported CLOSED: 2 held + 1 whose CLOSED is queued
        self.assertEqual(ch2.hello_raw, hello_bytes(os.getpid(), 3, 7, 0, bw.FLAG_READY | BLOCKING_CAPS, 3, TOKEN))
        socks[0].close()  # ends before WELCOME: counted in HELLO, so reported after it
        self.assertTrue(ch2.silent(0.1), "sent something before WELCOME")
        ch2.welcome(generation=8)
        closed = ch2.expect_ids(T.CLOSED)
        if len(closed) < 2:
            closed += ch2.expect_ids(T.CLOSED)
        self.assertEqual(sorted(closed), [cid1, cid3])
        self.assertTrue(ch2.silent(0.1), "READY sent again although HELLO had the READY flag")
        # The sessions survived the outage.
        c2.sendall(b"still here")
        self.assertEqual(socks[1].recv(100), b"still here")
        socks[1].close()
        self.assertEqual(ch2.expect_ids(T.CLOSED), [cid2])
        self.assertEqual(w.welcome.generation, 8)
        # New connections flow on the new channel.
        cid4, _ = self.gw.hand_off(ch2)
        s4, _ = w.accept(timeout=5)
        self.assertEqual(s4.conn_info.id, cid4)
        s4.close()
        self.assertEqual(ch2.expect_ids(T.CLOSED), [cid4])

    def fill_worker_send_queue(self, w: bw.Worker, ch: Chan) -> int:
        """Send PINGs without reading the PONGs until the worker's sends would block."""
        n = 0
        while not w._outq:
            for _ in range(100):
                ch.send(bw.encode_ping(n))
                n += 1
            time.sleep(0.01)
            self.assertLess(n, 100000)
        return n

    def drain_until(self, ch: Chan, t: int) -> List[int]:
        while True:
            got, body, _ = ch.recv()
            if got == t:
                return bw.parse_ids(t, body)
            self.assertEqual(got, T.PONG)

    def test_full_send_queue(self):
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        self.fill_worker_send_queue(w, ch)
        # The ACK waits behind the PONGs: the program must not get the connection before it.
        c, s = self.gw.tcp_pair()
        ch.hand_off(s, 500)
        s.close()
        with self.assertRaises(socket.timeout):
            w.accept(timeout=0.3)
        self.assertEqual(self.drain_until(ch, T.ACK), [500])
        sock, _ = w.accept(timeout=5)
        # A CLOSED stuck in the queue when the channel drops is reported after re-registering.
        self.fill_worker_send_queue(w, ch)
        sock.close()
        wait_until(lambda: w.live == 0)
        ch.close()
        ch2 = self.gw.accept(timeout=5)
        self.assertEqual(ch2.read_hello().live, 1)
        ch2.welcome()
        self.assertEqual(ch2.expect_ids(T.CLOSED), [500])
        c.close()

    def test_out_of_fds_ack_queued(self):
        # 1.0 gateway: the ACK of a CONN without fd waits behind PONGs; its CLOSED goes only
        # once the ACK is written. If the channel drops first, the id is forgotten: batond
        # still owns that client, so the next HELLO does not count it.
        w, ch = self.start(welcome={"old": True})
        w.ready()
        ch.expect(T.READY)

        def queued(cid: int) -> bool:
            return any(e[3] == [cid] for e in list(w._outq))

        for cid in (60, 61):
            self.fill_worker_send_queue(w, ch)
            c, s = self.gw.tcp_pair()
            with self.assertLogs("baton_worker", logging.ERROR):
                with out_of_fds():
                    ch.hand_off(s, cid)
                    wait_until(lambda: queued(cid), what="ACK queued")
            s.close()
            c.close()
            if cid == 60:
                self.assertEqual(self.drain_until(ch, T.ACK), [60])
                self.assertEqual(self.drain_until(ch, T.CLOSED), [60])
        ch.close()
        ch2 = self.gw.accept(timeout=5)
        self.assertEqual(ch2.read_hello().live, 0)
        ch2.welcome()
        self.assertTrue(ch2.silent(0.2), "CLOSED for an id never acked")
        cid, _ = self.gw.hand_off(ch2)
        sock, _ = w.accept(timeout=5)
        sock.close()
        self.assertEqual(ch2.expect_ids(T.CLOSED), [cid])

    def test_reregistration_backoff(self):
        w, ch = self.start()
        times = []
        for _ in range(4):
            ch.close()
            ch = self.gw.accept(timeout=5)
            times.append(time.monotonic())
            ch.read_hello()
            ch.send(bw.encode_error(C.SHUTDOWN, "batond is stopping"))  # not final: retry, after a backoff
            ch.expect_eof()
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertGreaterEqual(gaps[0], 0.09)
        self.assertGreater(gaps[2], gaps[0] * 1.5, gaps)
        self.assertIsNone(w._fatal)

    def test_reregistration_draining_flag(self):
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        cid, _ = self.gw.hand_off(ch)
        s, _ = w.accept(timeout=5)
        ch.send(bw.encode_drain(5000))
        wait_until(lambda: w.draining)
        ch.close()
        ch2 = self.gw.accept(timeout=5)
        hello = ch2.read_hello()
        self.assertEqual((hello.flags, hello.live), (bw.FLAG_READY | bw.FLAG_DRAINING | BLOCKING_CAPS, 1))
        ch2.welcome()
        s.close()
        self.assertEqual(ch2.expect_ids(T.CLOSED), [cid])
        self.assertTrue(w.wait_drained(5))

    def test_registration_refused(self):
        def gateway():
            ch = self.gw.accept()
            ch.read_hello()
            ch.send(bw.encode_error(C.TOKEN, "token does not match slot 3 generation 7"))
            ch.close()

        t = threading.Thread(target=gateway)
        t.start()
        with self.assertRaises(bw.BatonError) as cm:
            bw.Worker(env=self.gw.env())
        t.join()
        e = cm.exception
        self.assertEqual((e.code, e.fatal), (C.TOKEN, True))
        self.assertIn("token does not match", e.reason)
        self.assertIn("TOKEN", str(e))

    def test_final_error_on_reregistration(self):
        # Every final code (PROTOCOL.md, "Errors") ends registration: accept() raises it, naming
        # the code, no further HELLO follows, and the sessions held are kept.
        for code in (C.VERSION, C.TOKEN, C.PEER, C.SLOT):
            with self.subTest(code=code.name):
                self.gw = FakeGateway()
                self.addCleanup(self.gw.close)
                w, ch = self.start()
                w.ready()
                ch.expect(T.READY)
                cid, client = self.gw.hand_off(ch)
                sock, _ = w.accept(timeout=5)
                t, box = self.accept_in_thread(w)
                ch.close()
                ch2 = self.gw.accept()
                ch2.read_hello()
                with self.assertLogs("baton_worker", logging.ERROR) as logs:
                    ch2.send(bw.encode_error(code, "not yours"))
                    t.join(5)
                self.assertIn("final", logs.output[0])
                e = box.get("e")
                self.assertIsInstance(e, bw.BatonError)
                self.assertEqual((e.code, e.fatal), (code, True))
                self.assertIn(code.name, str(e))
                with self.assertRaises(bw.BatonError):
                    w.accept(timeout=1)
                with self.assertRaises(bw.BatonError):
                    w.wait_drained(1)
                with self.assertRaises(socket.timeout):  # and no further attempts
                    self.gw.accept(timeout=0.6)
                client.sendall(b"still here")  # the session lives on
                self.assertEqual(sock.recv(100), b"still here")
                sock.close()
                wait_until(lambda: w.live == 0, what="live == 0 with no channel")
                w.close()

    def test_shutdown_keeps_reregistering(self):
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        cid, client = self.gw.hand_off(ch)
        sock, _ = w.accept(timeout=5)
        ch.close()
        for _ in range(3):
            chi = self.gw.accept()
            self.assertEqual(chi.read_hello().live, 1)
            chi.send(bw.encode_error(C.SHUTDOWN, "batond is stopping"))
            chi.expect_eof()
        ch2 = self.gw.handshake()
        self.assertIsNone(w._fatal)
        client.sendall(b"after SHUTDOWN")
        self.assertEqual(sock.recv(100), b"after SHUTDOWN")
        cid2, _ = self.gw.hand_off(ch2)
        s2, _ = w.accept(timeout=5)
        self.assertEqual(s2.conn_info.id, cid2)
        s2.close()
        self.assertEqual(ch2.expect_ids(T.CLOSED), [cid2])
        sock.close()

    def test_second_drain_replaces_deadline(self):
        # After a reload the old batond drains its workers and the new one drains them again
        # when they re-register: the latest DRAIN's deadline is the one enforced.
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        ch.send(bw.encode_drain(60000))
        wait_until(lambda: w.draining, what="draining")
        self.assertAlmostEqual(w.drain_deadline - time.monotonic(), 60, delta=1)
        ch.close()
        ch2 = self.gw.accept()
        self.assertEqual(ch2.read_hello().flags, bw.FLAG_READY | bw.FLAG_DRAINING | BLOCKING_CAPS)
        ch2.welcome(generation=8)
        ch2.send(bw.encode_drain(600000))
        wait_until(lambda: w.drain_deadline - time.monotonic() > 500, what="later deadline")
        ch2.send(bw.encode_drain(2000))
        wait_until(lambda: w.drain_deadline - time.monotonic() < 3, what="earlier deadline")
        self.assertGreater(w.drain_deadline - time.monotonic(), 1)
        self.assertTrue(w.wait_drained(1))

    def test_welcome_timeout(self):
        def gateway():
            self.gw.accept().read_hello()  # and never answer

        t = threading.Thread(target=gateway)
        t.start()
        with self.assertRaises(bw.RegistrationError):
            bw.Worker(env=self.gw.env(), register_timeout=0.3)
        t.join()

    def check_protocol_error(self, payload: bytes, fds: Tuple[int, ...], code: int) -> None:
        w, ch = self.start()
        ch.send(payload, fds)
        self.assertEqual(ch.expect_error().code, code)
        ch.expect_eof()
        wait_until(lambda: not w.registered)
        for fd in fds:  # the worker closed its copy; ours is the only one left
            self.assertEqual(fd_copies(fd), 1)
        # ... and it comes back.
        ch2 = self.gw.accept(timeout=5)
        self.assertEqual(ch2.read_hello().live, 0)

    def test_malformed_from_gateway(self):
        self.check_protocol_error(b"\x07\x00\x08\x00abc", (), C.MALFORMED)

    def test_conns_in_one_ack(self):
        w, ch = self.start(welcome={"flags": bw.WELCOME_BATCH | bw.WELCOME_REFUSE})
        w.ready()
        ch.expect(T.READY)
        msg, srvs, clients = self.gw.conns(3, 100)
        ch.send(msg, tuple(s.fileno() for s in srvs))
        self.assertEqual(ch.expect_ids(T.ACK), [100, 101, 102])  # one ACK for the lot
        self.assertTrue(ch.silent(0.2))
        for srv in srvs:
            srv.close()
        for i, c in enumerate(clients):
            sock, addr = w.accept(timeout=5)
            self.assertEqual((sock.conn_info.id, addr), (100 + i, ("203.0.113.%d" % (i + 1), 5000 + i)))
            self.assertEqual((sock.family, sock.type, sock.gettimeout()), (socket.AF_INET, socket.SOCK_STREAM, None))
            self.assertEqual(sock.getsockname(), self.gw.tcp.getsockname())
            c.sendall(b"to %d" % i)
            self.assertEqual(sock.recv(100), b"to %d" % i)
            sock.close()
        closed: List[int] = []
        while len(closed) < 3:
            closed += ch.expect_ids(T.CLOSED)
        self.assertEqual(sorted(closed), [100, 101, 102])

    def check_bad_conns(self, entries: List[bytes], fds: List[int], code: int) -> None:
        """A CONNS the worker rejects: ERROR, and every fd it received is closed (including
        those already wrapped in sockets), none reported."""
        body = struct.pack("<H", len(entries)) + b"".join(struct.pack("<H", len(e)) + e for e in entries)
        self.check_protocol_error(bw._HDR.pack(T.CONNS, 0, len(body)) + body, tuple(fds), code)

    def good_entry(self, cid: int, listener: str = "tcp") -> bytes:
        return bw.split(bw.encode_conn(bw.ConnInfo(cid, ("203.0.113.1", 1), None, listener)))[1]

    def test_bad_conns_closes_every_fd(self):
        pairs = [self.gw.tcp_pair() for _ in range(3)]
        fds = [s.fileno() for _, s in pairs]
        bad = b"\x09" + b"\x00" * 7 + b"\x07"  # address family 7
        with self.subTest("malformed second entry"):
            self.check_bad_conns([self.good_entry(1), bad, self.good_entry(3)], fds, C.MALFORMED)
        with self.subTest("count 3, 2 fds"):
            self.check_bad_conns([self.good_entry(1), self.good_entry(2), self.good_entry(3)], fds[:2], C.FDS)
        for c, s in pairs:
            s.close()
            c.settimeout(5)
            self.assertEqual(c.recv(10), b"")  # the worker kept no copy

    def test_conns_with_a_non_socket_closes_what_it_made(self):
        # The first entry becomes a socket, the second (a file, on a listener not seen yet) is
        # refused: the socket made for the first is closed and not reported (no ACK was sent).
        c, s = self.gw.tcp_pair()
        # A file of its own, so that fd_copies counts only the copies of this fd.
        null = os.open(os.path.join(self.gw.dir.name, "not-a-socket"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        self.addCleanup(os.close, null)
        self.check_bad_conns([self.good_entry(1, "a"), self.good_entry(2, "b")], [s.fileno(), null], C.FDS)
        s.close()
        self.assertEqual(c.recv(10), b"")

    def test_conn_without_fd(self):
        self.check_protocol_error(bw.encode_conn(bw.ConnInfo(1, None, None, "")), (), C.FDS)

    def test_fd_on_ping(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.check_protocol_error(bw.encode_ping(1), (a.fileno(),), C.FDS)

    def test_malformed_conn_closes_fd(self):
        c, s = self.gw.tcp_pair()
        bad = bw._HDR.pack(T.CONN, 0, 9) + b"\x01" + b"\x00" * 7 + b"\x07"  # family 7
        self.check_protocol_error(bad, (s.fileno(),), C.MALFORMED)
        s.close()
        self.assertEqual(c.recv(10), b"")  # the worker's copy is closed too

    def test_unknown_type(self):
        self.check_protocol_error(bw._HDR.pack(0x20, 0, 0), (), C.UNKNOWN_TYPE)

    def test_unexpected_type(self):
        self.check_protocol_error(bw.encode_ack([1]), (), C.UNEXPECTED)

    def test_too_big(self):
        self.check_protocol_error(b"\x81\x00" + struct.pack("<H", 6000) + b"\x00" * 6000, (), C.TOO_BIG)

    def check_out_of_fds(self, refuse: bool) -> None:
        """A CONN arrives while the worker is out of fds: REFUSE (1.1 gateway with the REFUSE
        flag) or ACK + CLOSED (1.0 gateway); the channel and the other sessions live on."""
        welcome = {"flags": bw.WELCOME_REFUSE} if refuse else {"old": True}
        w, ch = self.start(welcome=welcome)
        self.assertEqual(w.welcome.flags, bw.WELCOME_REFUSE if refuse else 0)
        self.assertEqual(ch.hello.flags & bw.FLAG_NONBLOCK, 0)  # blocking fds, always
        w.ready()
        ch.expect(T.READY)
        cid1, c1 = self.gw.hand_off(ch)  # a session held across the shortage
        s1, _ = w.accept(timeout=5)
        c, s = self.gw.tcp_pair()
        with self.assertLogs("baton_worker", logging.WARNING) as logs:
            with out_of_fds():
                ch.hand_off(s, 50)
                t, body, fds = ch.recv()
        self.assertEqual(fds, [])
        if refuse:
            self.assertEqual((bw._type_name(t), bw.parse_ids(t, body)), ("REFUSE", [50]))
            self.assertTrue(ch.silent(0.2), "more than REFUSE (an ACK?) for a CONN without fd")
        else:
            self.assertEqual((bw._type_name(t), bw.parse_ids(t, body)), ("ACK", [50]))
            self.assertEqual(ch.expect_ids(T.CLOSED), [50])
            self.assertTrue(ch.silent(0.2))
        self.assertEqual(len(logs.records), 1, logs.output)
        self.assertEqual(logs.records[0].levelno, logging.WARNING if refuse else logging.ERROR)
        self.assertIn("CONN 0x32", logs.output[0])
        self.assertIn("out of file descriptors", logs.output[0])
        self.assertEqual(fd_copies(s.fileno()), 1)  # the worker got no copy of the client
        s.close()  # batond's copy: it gives it to another worker, or closes it
        c.close()
        # Same channel, no ERROR, no re-registration; the session held before goes on.
        self.assertTrue(w.registered)
        self.assertIsNone(w._fatal)
        self.assertEqual(len(self.gw.chans), 1)
        self.assertEqual(w.live, 1)
        c1.sendall(b"before")
        self.assertEqual(s1.recv(100), b"before")
        # A later CONN (fds to spare again) is served normally on the same channel.
        cid2, c2 = self.gw.hand_off(ch)
        s2, _ = w.accept(timeout=5)
        self.assertEqual(s2.conn_info.id, cid2)
        c2.sendall(b"after")
        self.assertEqual(s2.recv(100), b"after")
        s2.close()
        self.assertEqual(ch.expect_ids(T.CLOSED), [cid2])
        s1.close()
        self.assertEqual(ch.expect_ids(T.CLOSED), [cid1])
        self.assertTrue(w.wait_idle(1))

    def test_out_of_fds_refuse(self):
        self.check_out_of_fds(refuse=True)

    def test_out_of_fds_gateway_1_0(self):
        self.check_out_of_fds(refuse=False)

    def test_no_fd_leak_over_many_handoffs(self):
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        # warm up, then count
        cid, c = self.gw.hand_off(ch)
        s, _ = w.accept(timeout=5)
        s.close()
        c.close()
        ch.expect_ids(T.CLOSED)
        before = open_fds()
        for i in range(300):
            c, srv = socket.socketpair()  # any stream socket will do for counting fds
            ch.hand_off(srv, 1000 + i, client=None, local=None)
            self.assertEqual(ch.expect_ids(T.ACK), [1000 + i])
            srv.close()
            s, addr = w.accept(timeout=5)
            if i % 2:
                s.close()
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ResourceWarning)
                    del s
            self.assertEqual(ch.expect_ids(T.CLOSED), [1000 + i])
            c.close()
        gc.collect()
        self.assertEqual(open_fds(), before)

    def test_threads_accept_concurrently(self):
        w, ch = self.start()
        got: List[int] = []
        lock = threading.Lock()

        def run():
            while True:
                try:
                    s, _ = w.accept(timeout=5)
                except bw.Draining:
                    return
                with lock:
                    got.append(s.conn_info.id)
                s.close()

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        ch.expect(T.READY)
        sent = []
        for _ in range(40):
            c, s = self.gw.tcp_pair()
            cid = next(self.gw.ids)
            ch.hand_off(s, cid)
            s.close()
            sent.append(cid)
        ch.send(bw.encode_drain(1000))
        acked, closed = [], []
        while len(closed) < 40:
            t, body, _ = ch.recv()
            (acked if t == T.ACK else closed).extend(bw.parse_ids(t, body))
        for t in threads:
            t.join(5)
        self.assertEqual(sorted(acked), sent)
        self.assertEqual(sorted(closed), sent)
        self.assertEqual(sorted(got), sent)

    def test_close_reports_unaccepted(self):
        w, ch = self.start()
        w.ready()
        ch.expect(T.READY)
        cid, client = self.gw.hand_off(ch)
        w.close()
        self.assertEqual(ch.expect_ids(T.CLOSED), [cid])
        ch.expect_eof()
        self.assertEqual(client.recv(10), b"")
        with self.assertRaises(bw.WorkerClosed):
            w.accept(timeout=1)


# ----------------------------------------------------------------------------------------------
# asyncio worker
# ----------------------------------------------------------------------------------------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)
        await writer.drain()


class AsyncioTest(unittest.IsolatedAsyncioTestCase):
    def setUp(self):
        self.gw = FakeGateway()
        self.addCleanup(self.gw.close)

    async def start(self, handler, welcome: Optional[dict] = None, **kw) -> Tuple[bw.Server, Chan]:
        task = asyncio.ensure_future(bw.start_server(handler, env=self.gw.env(), **kw))
        ch = await asyncio.to_thread(self.gw.handshake, **(welcome or {}))
        server = await asyncio.wait_for(task, 5)
        self.addCleanup(server.close)
        return server, ch

    async def hand_off(self, ch: Chan, **kw) -> Tuple[int, socket.socket]:
        return await asyncio.to_thread(self.gw.hand_off, ch, **kw)

    async def expect(self, ch: Chan, t: int) -> bytes:
        return await asyncio.to_thread(ch.expect, t)

    async def expect_ids(self, ch: Chan, t: int) -> List[int]:
        return await asyncio.to_thread(ch.expect_ids, t)

    async def test_echo(self):
        server, ch = await self.start(echo, capacity=9)
        self.assertEqual(ch.hello_raw, hello_bytes(os.getpid(), 3, 7, 9, ASYNC_CAPS, 0, TOKEN))
        await self.expect(ch, T.READY)  # start_server serves at once
        self.assertTrue(server.is_serving())
        cid, client = await self.hand_off(ch)
        await asyncio.to_thread(client.sendall, b"hello, world")
        self.assertEqual(await asyncio.to_thread(client.recv, 100), b"hello, world")
        self.assertEqual(server.live, 1)
        client.shutdown(socket.SHUT_WR)  # echo returns; the module closes the connection
        self.assertEqual(await asyncio.to_thread(client.recv, 100), b"")
        self.assertEqual(await self.expect_ids(ch, T.CLOSED), [cid])
        await asyncio.wait_for(server.wait_idle(), 5)

    async def test_connection_info_and_handler_that_does_not_close(self):
        seen = []

        async def handler(reader, writer):
            info = bw.connection_info()
            seen.append(info)
            writer.write(("%s:%d via %s\n" % (info.client[0], info.client[1], info.listener)).encode())
            # returns without closing

        server, ch = await self.start(handler)
        await self.expect(ch, T.READY)
        cid, client = await self.hand_off(ch, client=("2001:db8::7", 40000), listener="public")
        self.assertEqual(await asyncio.to_thread(client.recv, 100), b"2001:db8::7:40000 via public\n")
        self.assertEqual(await asyncio.to_thread(client.recv, 100), b"")
        self.assertEqual(await self.expect_ids(ch, T.CLOSED), [cid])
        self.assertEqual(seen[0].id, cid)
        self.assertIsNone(bw.connection_info())

    async def test_handler_raises(self):
        async def handler(reader, writer):
            await reader.readexactly(3)
            raise RuntimeError("game bug")

        server, ch = await self.start(handler)
        await self.expect(ch, T.READY)
        cid, client = await self.hand_off(ch)
        with self.assertLogs("baton_worker", logging.ERROR) as logs:
            await asyncio.to_thread(client.sendall, b"abc")
            self.assertEqual(await asyncio.to_thread(client.recv, 100), b"")
            self.assertEqual(await self.expect_ids(ch, T.CLOSED), [cid])
        self.assertIn("game bug", "\n".join(logs.output))
        self.assertEqual(server.live, 0)

    async def test_plain_function_handler(self):
        def handler(reader, writer):
            writer.write(b"sync\n")

        server, ch = await self.start(handler)
        await self.expect(ch, T.READY)
        cid, client = await self.hand_off(ch)
        self.assertEqual(await asyncio.to_thread(client.recv, 100), b"sync\n")
        self.assertEqual(await self.expect_ids(ch, T.CLOSED), [cid])

    async def test_ping_and_many_connections(self):
        server, ch = await self.start(echo)
        await self.expect(ch, T.READY)
        ch.send(bw.encode_ping(77))
        self.assertEqual(bw.parse_nonce(T.PONG, await self.expect(ch, T.PONG)), 77)
        clients = []
        for _ in range(20):
            clients.append(await self.hand_off(ch))
        for cid, c in clients:
            await asyncio.to_thread(c.sendall, b"x%d" % cid)
            self.assertEqual(await asyncio.to_thread(c.recv, 100), b"x%d" % cid)
        self.assertEqual(server.live, 20)
        for _, c in clients:
            c.close()
        closed: List[int] = []
        while len(closed) < 20:
            closed += await self.expect_ids(ch, T.CLOSED)
        self.assertEqual(sorted(closed), [cid for cid, _ in clients])

    async def test_drain_then_serve_forever_returns(self):
        server, ch = await self.start(echo)
        await self.expect(ch, T.READY)
        cid1, c1 = await self.hand_off(ch)
        forever = asyncio.ensure_future(server.serve_forever())
        draining = asyncio.ensure_future(server.wait_draining())
        ch.send(bw.encode_drain(10000))
        cid2, c2 = await self.hand_off(ch)  # crossed the DRAIN: still served
        await asyncio.wait_for(draining, 5)
        self.assertFalse(server.is_serving())
        await asyncio.to_thread(c2.sendall, b"late")
        self.assertEqual(await asyncio.to_thread(c2.recv, 100), b"late")
        await asyncio.sleep(0.1)
        self.assertFalse(forever.done())
        c1.close()
        self.assertEqual(await self.expect_ids(ch, T.CLOSED), [cid1])
        self.assertFalse(forever.done())
        c2.close()
        self.assertEqual(await self.expect_ids(ch, T.CLOSED), [cid2])
        await asyncio.wait_for(forever, 5)

    async def test_reregistration(self):
        server, ch = await self.start(echo)
        await self.expect(ch, T.READY)
        cid1, c1 = await self.hand_off(ch)
        cid2, c2 = await self.hand_off(ch)
        self.gw.unlisten()
        ch.close()
        await asyncio.sleep(0.05)
        self.assertFalse(server.worker.registered)
        c2.close()  # ends while batond is away
        for _ in range(200):
            if server.live == 1:
                break
            await asyncio.sleep(0.01)
        self.assertEqual(server.live, 1)
        self.gw.listen()
        ch2 = await asyncio.to_thread(self.gw.accept)
        hello = await asyncio.to_thread(ch2.read_hello)
        self.assertEqual((hello.live, hello.flags), (2, bw.FLAG_READY | ASYNC_CAPS))  # c2's CLOSED is queued
        ch2.welcome()
        self.assertEqual(await self.expect_ids(ch2, T.CLOSED), [cid2])
        await asyncio.to_thread(c1.sendall, b"survived")
        self.assertEqual(await asyncio.to_thread(c1.recv, 100), b"survived")
        c1.close()
        self.assertEqual(await self.expect_ids(ch2, T.CLOSED), [cid1])
        cid3, c3 = await self.hand_off(ch2)
        c3.close()
        self.assertEqual(await self.expect_ids(ch2, T.CLOSED), [cid3])

    async def test_conns_nonblocking_fds_one_ack(self):
        flags = bw.WELCOME_BATCH | bw.WELCOME_NONBLOCK | bw.WELCOME_REFUSE
        seen: List[Tuple[int, socket.socket]] = []

        async def record(reader, writer):
            seen.append((bw.connection_info().id, writer.get_extra_info("socket")))
            await echo(reader, writer)

        server, ch = await self.start(record, welcome={"flags": flags})
        self.assertEqual(ch.hello.flags & ASYNC_CAPS, ASYNC_CAPS)
        await self.expect(ch, T.READY)
        msg, srvs, clients = self.gw.conns(4, 200, nonblocking=True)
        ch.send(msg, tuple(s.fileno() for s in srvs))
        self.assertEqual(await self.expect_ids(ch, T.ACK), [200, 201, 202, 203])
        self.assertTrue(await asyncio.to_thread(ch.silent, 0.2), "more than one ACK")
        for srv in srvs:
            srv.close()
        for i, c in enumerate(clients):
            await asyncio.to_thread(c.sendall, b"n%d" % i)
            self.assertEqual(await asyncio.to_thread(c.recv, 100), b"n%d" % i)
        self.assertEqual(sorted(cid for cid, _ in seen), [200, 201, 202, 203])
        for _, sock in seen:
            self.assertEqual((sock.family, sock.type), (socket.AF_INET, socket.SOCK_STREAM))
            self.assertEqual(sock.getsockname(), self.gw.tcp.getsockname())
        for c in clients:
            c.close()
        closed: List[int] = []
        while len(closed) < 4:
            closed += await self.expect_ids(ch, T.CLOSED)
        self.assertEqual(sorted(closed), [200, 201, 202, 203])

    async def test_acks_and_closes_batched_per_loop_iteration(self):
        go = asyncio.Event()

        async def wait_then_close(reader, writer):
            await go.wait()

        server, ch = await self.start(wait_then_close)
        await self.expect(ch, T.READY)
        clients = []
        for i in range(5):  # five CONNs queued before the loop reads any (no await between)
            c, srv = self.gw.tcp_pair()
            ch.hand_off(srv, 300 + i)
            clients.append((c, srv))
        self.assertEqual(await self.expect_ids(ch, T.ACK), [300, 301, 302, 303, 304])
        for _, srv in clients:
            srv.close()
        await asyncio.sleep(0.1)
        self.assertEqual(server.live, 5)
        go.set()  # every handler returns in the same iteration: their ends go in one CLOSED
        self.assertEqual(sorted(await self.expect_ids(ch, T.CLOSED)), [300, 301, 302, 303, 304])
        self.assertTrue(await asyncio.to_thread(ch.silent, 0.2))
        for c, _ in clients:
            c.close()

    async def test_conns_partly_out_of_fds(self):
        flags = bw.WELCOME_BATCH | bw.WELCOME_NONBLOCK | bw.WELCOME_REFUSE
        server, ch = await self.start(echo, welcome={"flags": flags})
        await self.expect(ch, T.READY)
        msg, srvs, clients = self.gw.conns(3, 400, nonblocking=True)
        await asyncio.to_thread(ch.silent, 0.05)  # the pool thread exists before the shortage
        with self.assertLogs("baton_worker", logging.WARNING) as logs:
            with out_of_fds(spare=1):
                ch.send(msg, tuple(s.fileno() for s in srvs))
                got = [await asyncio.to_thread(ch.recv), await asyncio.to_thread(ch.recv)]
        answers = {bw._type_name(t): bw.parse_ids(t, body) for t, body, _ in got}
        self.assertEqual(answers, {"REFUSE": [401, 402], "ACK": [400]})
        self.assertEqual(len(logs.records), 2, logs.output)
        self.assertEqual([fd_copies(s.fileno()) for s in srvs], [2, 1, 1])
        for srv in srvs:
            srv.close()
        await asyncio.to_thread(clients[0].sendall, b"kept")
        self.assertEqual(await asyncio.to_thread(clients[0].recv, 100), b"kept")
        self.assertEqual(server.live, 1)
        self.assertTrue(server.worker.registered)
        for c in clients:
            c.close()
        self.assertEqual(await self.expect_ids(ch, T.CLOSED), [400])

    async def test_bad_conns_closes_every_fd(self):
        server, ch = await self.start(echo, welcome={"flags": bw.WELCOME_BATCH})
        await self.expect(ch, T.READY)
        msg, srvs, clients = self.gw.conns(3, 500)
        body = bytearray(bw.split(msg)[1])
        body[2 + 2 + 8] = 7  # the first entry's client address family: 7
        ch.send(bw._HDR.pack(T.CONNS, 0, len(body)) + bytes(body), tuple(s.fileno() for s in srvs))
        self.assertEqual((await asyncio.to_thread(ch.expect_error)).code, C.MALFORMED)
        await asyncio.to_thread(ch.expect_eof)
        self.assertEqual([fd_copies(s.fileno()) for s in srvs], [1, 1, 1])
        self.assertEqual(server.live, 0)
        ch2 = await asyncio.to_thread(self.gw.accept)
        self.assertEqual((await asyncio.to_thread(ch2.read_hello)).live, 0)
        for s, c in zip(srvs, clients):
            s.close()
            self.assertEqual(await asyncio.to_thread(c.recv, 10), b"")

    async def check_out_of_fds(self, refuse: bool) -> None:
        """As BlockingTest.check_out_of_fds, with the channel read by the event loop."""
        welcome = {"flags": bw.WELCOME_REFUSE} if refuse else {"old": True}
        server, ch = await self.start(echo, welcome=welcome)
        await self.expect(ch, T.READY)
        cid1, c1 = await self.hand_off(ch)
        c, s = self.gw.tcp_pair()
        with self.assertLogs("baton_worker", logging.WARNING) as logs:
            with out_of_fds():
                ch.hand_off(s, 50)
                t, body, fds = await asyncio.to_thread(ch.recv)
        self.assertEqual(fds, [])
        if refuse:
            self.assertEqual((bw._type_name(t), bw.parse_ids(t, body)), ("REFUSE", [50]))
            self.assertTrue(await asyncio.to_thread(ch.silent, 0.2), "more than REFUSE")
        else:
            self.assertEqual((bw._type_name(t), bw.parse_ids(t, body)), ("ACK", [50]))
            self.assertEqual(await self.expect_ids(ch, T.CLOSED), [50])
            self.assertTrue(await asyncio.to_thread(ch.silent, 0.2))
        self.assertEqual(len(logs.records), 1, logs.output)
        self.assertEqual(logs.records[0].levelno, logging.WARNING if refuse else logging.ERROR)
        self.assertIn("CONN 0x32", logs.output[0])
        self.assertEqual(fd_copies(s.fileno()), 1)
        s.close()
        c.close()
        self.assertTrue(server.worker.registered)
        self.assertTrue(server.is_serving())
        self.assertEqual(len(self.gw.chans), 1)
        self.assertEqual(server.live, 1)
        await asyncio.to_thread(c1.sendall, b"before")
        self.assertEqual(await asyncio.to_thread(c1.recv, 100), b"before")
        cid2, c2 = await self.hand_off(ch)
        await asyncio.to_thread(c2.sendall, b"after")
        self.assertEqual(await asyncio.to_thread(c2.recv, 100), b"after")
        c2.close()
        self.assertEqual(await self.expect_ids(ch, T.CLOSED), [cid2])
        c1.close()
        self.assertEqual(await self.expect_ids(ch, T.CLOSED), [cid1])
        await asyncio.wait_for(server.wait_idle(), 5)

    async def test_out_of_fds_refuse(self):
        await self.check_out_of_fds(refuse=True)

    async def test_out_of_fds_gateway_1_0(self):
        await self.check_out_of_fds(refuse=False)

    async def test_fatal_error_ends_serve_forever(self):
        server, ch = await self.start(echo)
        await self.expect(ch, T.READY)
        forever = asyncio.ensure_future(server.serve_forever())
        ch.send(bw.encode_error(C.TOKEN, "token revoked"))
        with self.assertRaises(bw.BatonError) as cm:
            await asyncio.wait_for(forever, 5)
        self.assertEqual(cm.exception.code, C.TOKEN)

    async def test_final_error_on_reregistration_ends_serve_forever(self):
        server, ch = await self.start(echo)
        await self.expect(ch, T.READY)
        cid, c = await self.hand_off(ch)
        forever = asyncio.ensure_future(server.serve_forever())
        ch.close()
        ch2 = await asyncio.to_thread(self.gw.accept)
        await asyncio.to_thread(ch2.read_hello)
        ch2.send(bw.encode_error(C.SLOT, "slot 3 belongs to pid 1 (process group 1)"))
        with self.assertRaises(bw.BatonError) as cm:
            await asyncio.wait_for(forever, 5)
        self.assertEqual(cm.exception.code, C.SLOT)
        self.assertIn("SLOT", str(cm.exception))
        self.assertFalse(server.is_serving())
        with self.assertRaises(socket.timeout):  # no further attempts
            await asyncio.to_thread(self.gw.accept, 0.6)
        await asyncio.to_thread(c.sendall, b"kept")  # the session is still served
        self.assertEqual(await asyncio.to_thread(c.recv, 100), b"kept")
        idle = asyncio.ensure_future(server.wait_idle())  # how a refused worker lets it end
        await asyncio.sleep(0.1)
        self.assertFalse(idle.done())
        c.close()
        await asyncio.wait_for(idle, 5)

    async def test_shutdown_keeps_reregistering(self):
        server, ch = await self.start(echo)
        await self.expect(ch, T.READY)
        ch.close()
        for _ in range(3):
            chi = await asyncio.to_thread(self.gw.accept)
            await asyncio.to_thread(chi.read_hello)
            chi.send(bw.encode_error(C.SHUTDOWN, "batond is stopping"))
            await asyncio.to_thread(chi.expect_eof)
        ch2 = await asyncio.to_thread(self.gw.handshake)
        self.assertTrue(server.is_serving())
        cid, c = await self.hand_off(ch2)
        await asyncio.to_thread(c.sendall, b"back")
        self.assertEqual(await asyncio.to_thread(c.recv, 100), b"back")
        c.close()
        self.assertEqual(await self.expect_ids(ch2, T.CLOSED), [cid])

    async def test_registration_refused(self):
        task = asyncio.ensure_future(bw.start_server(echo, env=self.gw.env()))

        def gateway():
            ch = self.gw.accept()
            ch.read_hello()
            ch.send(bw.encode_error(C.VERSION, "no common version"))

        await asyncio.to_thread(gateway)
        with self.assertRaises(bw.BatonError) as cm:
            await asyncio.wait_for(task, 5)
        self.assertEqual(cm.exception.code, C.VERSION)

    async def test_malformed_message_reregisters(self):
        server, ch = await self.start(echo)
        await self.expect(ch, T.READY)
        ch.send(b"\x0a\x00\x02\x00\x00\x00")  # DRAIN with a 2-byte body
        err = await asyncio.to_thread(ch.expect_error)
        self.assertEqual(err.code, C.MALFORMED)
        ch2 = await asyncio.to_thread(self.gw.accept)
        hello = await asyncio.to_thread(ch2.read_hello)
        self.assertEqual(hello.flags, bw.FLAG_READY | ASYNC_CAPS)


# ----------------------------------------------------------------------------------------------
# Live session migration (PROTOCOL.md "Migration (1.4)")
# ----------------------------------------------------------------------------------------------

MIG_WELCOME = {"flags": bw.WELCOME_BATCH | bw.WELCOME_REFUSE | bw.WELCOME_MIGRATE}


def expect_handback(ch: Chan, timeout: float = 5.0) -> Tuple[bw.Handback, socket.socket]:
    """The next message must be a HANDBACK with exactly one fd: decoded, and the socket."""
    t, body, fds = ch.recv(timeout)
    if t != T.HANDBACK:
        bw._close_fds(fds)
        raise AssertionError("want HANDBACK, got %s %r" % (bw._type_name(t), body[:64]))
    if len(fds) != 1:
        bw._close_fds(fds)
        raise AssertionError("HANDBACK with %d fds" % len(fds))
    return bw.parse_handback(body), socket.socket(fileno=fds[0])


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            break
        out += got
    return out


def resume(ch: Chan, conn: socket.socket, cid: int, prev: int, state: bytes, group: str = "", hops: int = 1) -> None:
    info = bw.ConnInfo(cid, ("203.0.113.9", 5555), ("127.0.0.1", 7000), "tcp", bw.Resumed(state, prev, hops, group))
    ch.send(bw.encode_resume(info), (conn.fileno(),))


class MigrationCodecTest(unittest.TestCase):
    def test_round_trips(self):
        m = bw.Migrate(2500, [7, 9])
        raw = bw.encode_migrate(m)
        self.assertEqual(raw, h("0d 00 16 00  c4 09 00 00  02 00  07 00 00 00 00 00 00 00  09 00 00 00 00 00 00 00"))
        self.assertEqual(bw.parse_migrate(bw.split(raw)[1]), m)
        self.assertEqual(bw.parse_migrate(bw.split(bw.encode_migrate(bw.Migrate(10, [])))[1]), bw.Migrate(10, []))
        conn = bw.ConnInfo(5, ("127.0.0.1", 40000), ("::1", 7000), "tcp")
        hb = bw.Handback(conn, 2, "room-1", 3, b"\x00state" * 1000)
        t, body = bw.split(bw.encode_handback(hb))
        self.assertEqual(t, T.HANDBACK)
        self.assertEqual(bw.parse_handback(body), hb)
        big = bw.Handback(conn, 0, "", 0, b"s" * bw.MAX_STATE)
        raw = bw.encode_handback(big)
        self.assertGreater(len(raw), bw.MAX_MESSAGE)
        self.assertLessEqual(len(raw), bw.MAX_LARGE_MESSAGE)
        self.assertEqual(bw.parse_handback(bw.split(raw)[1]).state, big.state)
        r = bw.ConnInfo(8, None, ("127.0.0.1", 7000), "tcp", bw.Resumed(b"st", 5, 3, "g"))
        t, body = bw.split(bw.encode_resume(r))
        self.assertEqual((t, bw.parse_resume(body)), (T.RESUME, r))
        self.assertEqual(bw.parse_ids(T.DECLINE, bw.split(bw.encode_decline([1, 2]))[1]), [1, 2])

    def test_limits(self):
        conn = bw.ConnInfo(5, None, None, "tcp")
        with self.assertRaises(bw.StateTooBig):
            bw.encode_handback(bw.Handback(conn, 0, "", 0, b"s" * (bw.MAX_STATE + 1)))
        # A RESUME claiming a bigger state is malformed; a CONN past 4096 bytes is too big.
        body = bytearray(bw.split(bw.encode_resume(bw.ConnInfo(8, None, None, "", bw.Resumed(b"", 1, 1, ""))))[1])
        body[-4:] = struct.pack("<I", bw.MAX_STATE + 1)
        with self.assertRaises(bw.ProtocolError) as cm:
            bw.parse_resume(bytes(body) + b"x" * (bw.MAX_STATE + 1))
        self.assertEqual(cm.exception.code, C.MALFORMED)
        with self.assertRaises(bw.ProtocolError) as cm:
            bw.split(bytes([T.CONN, 0]) + struct.pack("<H", 5000) + bytes(5000))
        self.assertEqual(cm.exception.code, C.TOO_BIG)


class BlockingMigrationTest(unittest.TestCase):
    def setUp(self):
        self.gw = FakeGateway()
        self.addCleanup(self.gw.close)

    def start(self) -> Tuple[bw.Worker, Chan]:
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("ch", self.gw.handshake(**MIG_WELCOME)))
        t.start()
        w = bw.Worker(env=self.gw.env(), migrate=True)
        t.join(5)
        self.addCleanup(w.close)
        ch = box["ch"]
        self.assertEqual(ch.hello.flags, BLOCKING_CAPS | bw.FLAG_MIGRATE)
        w.ready()
        ch.expect(T.READY)
        return w, ch

    def sessions(self, w: bw.Worker, ch: Chan, n: int):
        out = []
        for _ in range(n):
            cid, client = self.gw.hand_off(ch)
            sock, _ = w.accept(timeout=5)
            out.append((cid, client, sock))
        return out

    def test_hand_back_with_groups_and_unread_bytes(self):
        w, ch = self.start()
        got = self.sessions(w, ch, 3)
        (c1, cl1, s1), (c2, cl2, s2), (c3, cl3, s3) = got
        s1.session.set_group("room-a")
        s2.session.set_group("room-a")
        s3.session.set_group("room-b")
        s3.session.set_group("")  # changed its mind: no group
        called = []
        s1.session.on_migrate = called.append
        self.assertFalse(s1.session.migrate_requested)
        with self.assertRaises(bw.NotAsked):
            s1.session.hand_back(b"x")
        cl1.sendall(b"line one\npart")
        self.assertEqual(s1.recv(9), b"line one\n")  # read and processed; "part" stays unread
        s1.sendall(b"reply before the move\n")
        fd_before = open_fds()
        ch.send(bw.encode_migrate(bw.Migrate(5000, [])))
        self.assertTrue(s1.session.wait_migrate(5))
        self.assertEqual(called, [s1.session])
        self.assertIsNotNone(s1.session.migrate_deadline)
        s1.session.hand_back(b"state of 1")
        hb, fd1 = expect_handback(ch)
        self.assertEqual((hb.conn.id, hb.hops, hb.group, hb.group_size, hb.state), (c1, 0, "room-a", 2, b"state of 1"))
        self.assertEqual((hb.conn.client, hb.conn.listener), (("203.0.113.9", 5555), "tcp"))
        self.assertEqual(s1.fileno(), -1)  # our copy is closed
        self.assertEqual(open_fds(), fd_before)  # ours closed; the gateway's received copy open
        self.assertEqual(cl1.recv(100), b"reply before the move\n")
        fd1.settimeout(5)
        self.assertEqual(fd1.recv(100), b"part")  # unread bytes travelled in the socket
        fd1.sendall(b"from the next worker\n")
        self.assertEqual(cl1.recv(100), b"from the next worker\n")  # the connection lives on
        s2.session.hand_back(b"")
        hb2, fd2 = expect_handback(ch)
        self.assertEqual((hb2.conn.id, hb2.group, hb2.group_size), (c2, "room-a", 2))
        s3.session.hand_back(b"3")
        hb3, fd3 = expect_handback(ch)
        self.assertEqual((hb3.conn.id, hb3.group, hb3.group_size), (c3, "", 0))
        self.assertEqual(w.live, 0)
        self.assertTrue(ch.silent(0.3), "CLOSED or DECLINE for a handed-back session")
        for f in (fd1, fd2, fd3):
            f.close()

    def test_unanswered_declined_at_deadline_and_asked_again(self):
        w, ch = self.start()
        (c1, cl1, s1), (c2, cl2, s2) = self.sessions(w, ch, 2)
        ch.send(bw.encode_migrate(bw.Migrate(300, [c2, 999])))
        self.assertTrue(s2.session.wait_migrate(5))
        self.assertFalse(s1.session.migrate_requested)
        self.assertEqual(ch.expect_ids(T.DECLINE), [c2])
        self.assertFalse(s2.session.migrate_requested)
        with self.assertRaises(bw.NotAsked):
            s2.session.hand_back(b"late")
        cl2.sendall(b"still here")
        self.assertEqual(s2.recv(100), b"still here")  # still ours
        ch.send(bw.encode_migrate(bw.Migrate(5000, [c2])))  # asked again
        self.assertTrue(s2.session.wait_migrate(5))
        s2.session.decline()
        self.assertEqual(ch.expect_ids(T.DECLINE), [c2])
        self.assertEqual(w.live, 2)
        s1.close()
        s2.close()
        closed = ch.expect_ids(T.CLOSED)
        closed += [] if len(closed) == 2 else ch.expect_ids(T.CLOSED)
        self.assertEqual(sorted(closed), [c1, c2])

    def test_state_too_big_is_declined(self):
        w, ch = self.start()
        ((c1, cl1, s1),) = self.sessions(w, ch, 1)
        ch.send(bw.encode_migrate(bw.Migrate(5000, [])))
        self.assertTrue(s1.session.wait_migrate(5))
        with self.assertRaises(bw.StateTooBig):
            s1.session.hand_back(b"x" * (bw.MAX_STATE + 1))
        self.assertEqual(ch.expect_ids(T.DECLINE), [c1])
        self.assertGreaterEqual(s1.fileno(), 0)
        s1.sendall(b"kept")
        self.assertEqual(cl1.recv(100), b"kept")
        s1.close()

    def test_channel_lost_lapses_request(self):
        w, ch = self.start()
        ((c1, cl1, s1),) = self.sessions(w, ch, 1)
        ch.send(bw.encode_migrate(bw.Migrate(5000, [])))
        self.assertTrue(s1.session.wait_migrate(5))
        ch.close()
        wait_until(lambda: not s1.session.migrate_requested, what="the request to lapse with its channel")
        with self.assertRaises(bw.NotAsked):
            s1.session.hand_back(b"s")
        ch2 = self.gw.accept()
        self.assertEqual(ch2.read_hello().live, 1)  # still counted: it never left
        s1.close()

    def test_resume_delivers_state(self):
        w, ch = self.start()
        c, srv = self.gw.tcp_pair()
        c.sendall(b"typed while moving")
        resume(ch, srv, 41, prev=5, state=b"\x01name=ann", group="room-a", hops=2)
        self.assertEqual(ch.expect_ids(T.ACK), [41])
        srv.close()
        sock, addr = w.accept(timeout=5)
        r = sock.conn_info.resumed
        self.assertEqual(r, bw.Resumed(b"\x01name=ann", 5, 2, "room-a"))
        self.assertIs(sock.session.resumed, r)
        self.assertEqual(sock.recv(100), b"typed while moving")
        # Moved again: hops carries on.
        ch.send(bw.encode_migrate(bw.Migrate(5000, [41])))
        self.assertTrue(sock.session.wait_migrate(5))
        sock.session.hand_back(b"again")
        hb, fd = expect_handback(ch)
        self.assertEqual((hb.conn.id, hb.hops), (41, 2))
        fd.close()
        c.close()

    def test_unmigrating_worker_rejects_migrate(self):
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("ch", self.gw.handshake(**MIG_WELCOME)))
        t.start()
        w = bw.Worker(env=self.gw.env())
        t.join(5)
        self.addCleanup(w.close)
        ch = box["ch"]
        self.assertEqual(ch.hello.flags, BLOCKING_CAPS)
        ch.send(bw.encode_migrate(bw.Migrate(5000, [])))
        self.assertEqual(ch.expect_error().code, C.UNEXPECTED)


async def migrating_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes lines; when asked, hands the session back with its line count and unread bytes."""
    sess = bw.session()
    assert sess is not None
    info = bw.connection_info()
    assert info is not None
    count = int(info.resumed.state.split(b"|")[0]) if info.resumed else 0
    task = asyncio.current_task()
    reading = [False]

    def wake(_s) -> None:
        if reading[0]:
            task.cancel()

    sess.on_migrate = wake
    if info.resumed:
        writer.write(b"resumed with %d\n" % count)
    while True:
        if sess.migrate_requested:
            await sess.hand_back(b"%d|" % count + sess.unread(reader))
            return
        reading[0] = True
        try:
            line = await reader.readline()
        except asyncio.CancelledError:
            if not sess.migrate_requested:
                raise
            if hasattr(task, "uncancel"):
                task.uncancel()
            continue
        finally:
            reading[0] = False
        if not line:
            return
        count += 1
        writer.write(line)


class AsyncioMigrationTest(unittest.IsolatedAsyncioTestCase):
    def setUp(self):
        self.gw = FakeGateway()
        self.addCleanup(self.gw.close)

    async def start(self, handler) -> Tuple[bw.Server, Chan]:
        task = asyncio.ensure_future(bw.start_server(handler, env=self.gw.env(), migrate=True))
        ch = await asyncio.to_thread(self.gw.handshake, **MIG_WELCOME)
        server = await asyncio.wait_for(task, 5)
        self.addCleanup(server.close)
        self.assertEqual(ch.hello.flags, ASYNC_CAPS | bw.FLAG_MIGRATE)
        await asyncio.to_thread(ch.expect, T.READY)
        return server, ch

    async def test_hand_back_and_resume(self):
        server, ch = await self.start(migrating_echo)
        cid, client = await asyncio.to_thread(self.gw.hand_off, ch)
        await asyncio.to_thread(client.sendall, b"a\nb\n")
        self.assertEqual(await asyncio.to_thread(recv_exact, client, 4), b"a\nb\n")
        cid2, client2 = await asyncio.to_thread(self.gw.hand_off, ch)
        await asyncio.to_thread(client2.sendall, b"half a li")
        await asyncio.sleep(0.2)  # the partial line is read into the StreamReader
        ch.send(bw.encode_migrate(bw.Migrate(5000, [])))
        got = {}
        for _ in range(2):
            hb, fd = await asyncio.to_thread(expect_handback, ch)
            got[hb.conn.id] = (hb, fd)
        self.assertEqual(got[cid][0].state, b"2|")
        self.assertEqual(got[cid2][0].state, b"0|half a li")  # read, not processed: in the state
        self.assertEqual(server.live, 0)
        self.assertTrue(await asyncio.to_thread(ch.silent, 0.3))
        # The new worker (this one again, for the test) gets it back with its state.
        fd = got[cid][1]
        resume(ch, fd, 100, prev=cid, state=got[cid][0].state)
        self.assertEqual(await asyncio.to_thread(ch.expect_ids, T.ACK), [100])
        fd.close()
        self.assertEqual(await asyncio.to_thread(client.recv, 100), b"resumed with 2\n")
        await asyncio.to_thread(client.sendall, b"c\n")
        self.assertEqual(await asyncio.to_thread(client.recv, 100), b"c\n")
        self.assertEqual(server.live, 1)
        client.close()
        self.assertEqual(await asyncio.to_thread(ch.expect_ids, T.CLOSED), [100])
        got[cid2][1].close()

    async def test_waits_for_output_then_hands_back(self):
        big = b"y" * (4 << 20)

        async def handler(reader, writer):
            sess = bw.session()
            writer.write(big)  # more than the socket takes: stays in the transport's buffer
            await sess.wait_migrate()
            await sess.hand_back(b"s")

        server, ch = await self.start(handler)
        cid, client = await asyncio.to_thread(self.gw.hand_off, ch)
        ch.send(bw.encode_migrate(bw.Migrate(20000, [])))
        self.assertTrue(await asyncio.to_thread(ch.silent, 0.3), "HANDBACK before the output left")

        def read_all() -> int:
            n = 0
            while n < len(big):
                n += len(client.recv(1 << 20))
            return n

        self.assertEqual(await asyncio.to_thread(read_all), len(big))
        hb, fd = await asyncio.to_thread(expect_handback, ch)
        self.assertEqual(hb.conn.id, cid)
        fd.close()

    async def test_declined_at_deadline_and_too_big(self):
        outcome: List[BaseException] = []

        async def handler(reader, writer):
            sess = bw.session()
            await sess.wait_migrate()
            try:
                await sess.hand_back(b"z" * (bw.MAX_STATE + 1))
            except bw.StateTooBig as e:
                outcome.append(e)
            await sess.wait_migrate()  # asked again: this time say nothing
            await asyncio.sleep(1.0)
            try:
                await sess.hand_back(b"late")
            except bw.NotAsked as e:
                outcome.append(e)
            writer.write(b"still mine\n")
            await reader.read()

        server, ch = await self.start(handler)
        cid, client = await asyncio.to_thread(self.gw.hand_off, ch)
        ch.send(bw.encode_migrate(bw.Migrate(5000, [])))
        self.assertEqual(await asyncio.to_thread(ch.expect_ids, T.DECLINE), [cid])
        ch.send(bw.encode_migrate(bw.Migrate(200, [cid])))
        self.assertEqual(await asyncio.to_thread(ch.expect_ids, T.DECLINE), [cid])
        self.assertEqual(await asyncio.to_thread(client.recv, 100), b"still mine\n")
        self.assertEqual([type(e) for e in outcome], [bw.StateTooBig, bw.NotAsked])
        self.assertEqual(server.live, 1)
        client.close()
        self.assertEqual(await asyncio.to_thread(ch.expect_ids, T.CLOSED), [cid])


if __name__ == "__main__":
    unittest.main()
