"""baton_worker: write baton workers in Python (standard library only, Python >= 3.9, Linux).

``batond`` accepts TCP connections and hands each connected socket to one of its worker
processes over a ``SOCK_SEQPACKET`` Unix socket (``SCM_RIGHTS``). This module is the worker side
of that protocol (``handoff/PROTOCOL.md``, version 1, revision 1.4): it registers with ``batond``,
receives client sockets, acknowledges them at once, reports when they end, answers pings, honours
``DRAIN`` and re-registers by itself when the channel to ``batond`` drops, keeping every client
session. A ``CONN`` whose fd cannot be received (the process is out of file descriptors) costs
that one client at most, never the channel: it is refused (``REFUSE``: ``batond`` gives the client
to another worker) or, with a 1.0 gateway, acked and reported closed at once.

Blocking API (one background thread owns the channel; ``accept`` is thread-safe)::

    import baton_worker
    w = baton_worker.Worker()                # registers; raises BatonError / NotUnderBaton
    while True:
        try:
            sock, addr = w.accept()          # first call sends READY
        except baton_worker.Draining:
            break                            # no new connections will come
        threading.Thread(target=serve, args=(sock, addr)).start()
    w.wait_idle()                            # every session has ended: exit

asyncio API (the channel is read with ``loop.add_reader``; no threads)::

    async def handle(reader, writer):       # exactly as for asyncio.start_server
        ...

    async def main():
        server = await baton_worker.start_server(handle)
        await server.serve_forever()         # returns once drained and the last client left

Live session migration (1.4), opt-in with ``migrate=True``: ``batond`` may ask for a session;
the program hands it back with an opaque state (``AsyncSession.hand_back`` /
``Session.hand_back``) or keeps it (``decline``; unanswered, the library declines it at the
deadline), and a session moved here arrives with ``ConnInfo.resumed`` (its state). Bytes the
program read but did not process belong in the state; unread bytes stay in the socket.

Every client socket is a :class:`BatonSocket`; ``batond``'s count of live connections for this
worker goes down exactly once per socket, when it is closed, detached or garbage-collected, so a
game that forgets to close a socket still does not look full forever. In the asyncio API the
connection is closed when the handler returns or raises (an exception is logged).

Outside ``batond`` (no ``BATON_SOCKET`` in the environment) :class:`NotUnderBaton` is raised,
unless a fallback TCP address is given with ``fallback=(host, port)`` or the environment variable
``BATON_FALLBACK_LISTEN=host:port`` (which wins over the parameter): then the worker listens on
that address itself, for local development.

``batond`` refuses a worker for good with a final ``ERROR`` code (``VERSION``, ``TOKEN``,
``PEER``, ``SLOT``): the module then stops registering, keeps serving the sessions it holds, and
raises the :class:`BatonError` from ``accept`` and ``serve_forever``; exit once the sessions end.
Any other ``ERROR`` only ends the channel, and the module registers again with backoff.

Output: ``batond`` leaves the read end of the worker's stdout/stderr pipe open in the worker at
fd 3 (``BATON_OUTPUT_FD``), so ``print()`` never meets a broken pipe, whichever ``batond`` has
gone; do not close fd 3. This module changes no signal disposition.

Ownership of fds: a received client fd belongs to this module until it is handed to the program
(``accept`` returns it, or the asyncio handler starts); from then on it belongs to the returned
:class:`BatonSocket`. Every error path closes the fds it received. Logging goes to the
``baton_worker`` logger.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextvars
import enum
import errno
import inspect
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from typing import (
    Any,
    Awaitable,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

__all__ = [
    "VERSION",
    "MAX_MESSAGE",
    "HEADER_LEN",
    "MAX_STRING",
    "MAX_IDS",
    "FLAG_READY",
    "FLAG_DRAINING",
    "FLAG_NONBLOCK",
    "FLAG_BATCH",
    "WELCOME_NONBLOCK",
    "WELCOME_REFUSE",
    "WELCOME_BATCH",
    "MAX_BATCH",
    "FLAG_MIGRATE",
    "WELCOME_MIGRATE",
    "MAX_LARGE_MESSAGE",
    "MAX_STATE",
    "Resumed",
    "Migrate",
    "Handback",
    "StateTooBig",
    "NotAsked",
    "Session",
    "AsyncSession",
    "session",
    "encode_migrate",
    "encode_handback",
    "encode_decline",
    "encode_resume",
    "parse_migrate",
    "parse_handback",
    "parse_resume",
    "MsgType",
    "ErrorCode",
    "Hello",
    "Welcome",
    "ConnInfo",
    "BatonException",
    "BatonError",
    "ProtocolError",
    "NotUnderBaton",
    "ConfigError",
    "RegistrationError",
    "NoFDError",
    "Draining",
    "WorkerClosed",
    "split",
    "encode_hello",
    "encode_welcome",
    "encode_error",
    "encode_ready",
    "encode_ids",
    "encode_ack",
    "encode_closed",
    "encode_refuse",
    "encode_ping",
    "encode_pong",
    "encode_conn",
    "encode_conns",
    "encode_drain",
    "parse_hello",
    "parse_welcome",
    "parse_error",
    "parse_ids",
    "parse_nonce",
    "parse_conn",
    "parse_conns",
    "parse_drain",
    "recv_message",
    "recv_batch",
    "BatonSocket",
    "Worker",
    "Server",
    "start_server",
    "connection_info",
]

log = logging.getLogger("baton_worker")

# --------------------------------------------------------------------------------------------
# Protocol constants (PROTOCOL.md)
# --------------------------------------------------------------------------------------------

#: The protocol version this module speaks (of it, revision 1.1: compatible revisions append
#: fields and messages without changing the version, PROTOCOL.md "Versioning").
VERSION = 1
#: Largest message, header included.
MAX_MESSAGE = 4096
#: Size of the fixed header in front of every body.
HEADER_LEN = 4
#: Longest ``str`` field in bytes.
MAX_STRING = 1024
#: Most connection ids one ACK or CLOSED carries (511).
MAX_IDS = (MAX_MESSAGE - HEADER_LEN - 2) // 8
#: First optional message type: receivers ignore unknown types at or above it.
OPTIONAL_TYPE = 0x80

#: HELLO flag bit 0: already serving (READY was sent before the channel dropped).
FLAG_READY = 1 << 0
#: HELLO flag bit 1: the worker has been told to drain.
FLAG_DRAINING = 1 << 1
#: HELLO flag bit 2 (1.1): send CONN fds in non-blocking mode. The asyncio server asks for it (its
#: sockets are non-blocking: one ``ioctl`` less per connection); the blocking API does not.
FLAG_NONBLOCK = 1 << 2
#: HELLO flag bit 3 (1.2): this worker takes ``CONNS`` (up to :data:`MAX_BATCH` connections and
#: their fds in one message). This module always asks for it.
FLAG_BATCH = 1 << 3
#: Most connections one ``CONNS`` carries.
MAX_BATCH = 16
#: HELLO flag bit 4 (1.4): this worker answers ``MIGRATE`` and takes ``RESUME`` (live session
#: migration). Asked for with ``Worker(migrate=True)`` / ``start_server(..., migrate=True)``.
FLAG_MIGRATE = 1 << 4
#: Largest ``HANDBACK`` or ``RESUME``, header included (the ``u16`` body length's limit): the
#: only messages allowed past :data:`MAX_MESSAGE`, on a channel whose WELCOME has
#: :data:`WELCOME_MIGRATE`.
MAX_LARGE_MESSAGE = HEADER_LEN + 0xFFFF
#: Largest state a migrating session may carry (60 KiB).
MAX_STATE = 60 << 10

#: WELCOME flag bit 0 (1.1): every CONN fd on this channel arrives with ``O_NONBLOCK`` set (only
#: granted to a worker whose HELLO has :data:`FLAG_NONBLOCK`).
WELCOME_NONBLOCK = 1 << 0
#: WELCOME flag bit 1 (1.1): the gateway understands ``REFUSE``: a ``CONN`` whose fd this process
#: could not receive is refused and goes to another worker. Without it (a 1.0 gateway) such a
#: ``CONN`` is acked and reported ``CLOSED`` at once, and its client is disconnected.
WELCOME_REFUSE = 1 << 1
#: WELCOME flag bit 2 (1.2): the gateway may send ``CONNS`` (only to a HELLO with :data:`FLAG_BATCH`).
WELCOME_BATCH = 1 << 2
#: WELCOME flag bit 3 (1.4): the gateway may send ``MIGRATE`` and ``RESUME`` and reads
#: ``HANDBACK`` and ``DECLINE`` (only to a HELLO with :data:`FLAG_MIGRATE`).
WELCOME_MIGRATE = 1 << 3

#: Backoff between re-registration attempts: first delay and cap, in seconds.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0


class MsgType(enum.IntEnum):
    """Message types (PROTOCOL.md, "Messages")."""

    HELLO = 0x01
    WELCOME = 0x02
    ERROR = 0x03
    READY = 0x04
    ACK = 0x05
    CLOSED = 0x06
    PING = 0x07
    PONG = 0x08
    CONN = 0x09
    DRAIN = 0x0A
    REFUSE = 0x0B  # 1.1: only to a gateway whose WELCOME has WELCOME_REFUSE
    CONNS = 0x0C  # 1.2: only to a worker whose WELCOME has WELCOME_BATCH
    MIGRATE = 0x0D  # 1.4: the rest only on a channel whose WELCOME has WELCOME_MIGRATE
    HANDBACK = 0x0E
    DECLINE = 0x0F
    RESUME = 0x10


#: The types that may exceed MAX_MESSAGE (up to MAX_LARGE_MESSAGE).
_LARGE_TYPES = frozenset({MsgType.HANDBACK, MsgType.RESUME})


class ErrorCode(enum.IntEnum):
    """``ERROR`` codes (PROTOCOL.md, "Errors")."""

    VERSION = 1
    TOKEN = 2
    PEER = 3
    MALFORMED = 4
    UNEXPECTED = 5
    TOO_BIG = 6
    UNKNOWN_TYPE = 7
    FDS = 8
    SLOT = 9
    SHUTDOWN = 10
    STALLED = 11


#: The final codes (PROTOCOL.md, "Errors"): re-sending the same HELLO cannot succeed (wrong
#: protocol version, token or peer, or a slot that belongs to another process), so the worker
#: stops registering. Every other code (``SHUTDOWN`` among them) ends only the current channel.
FATAL_CODES = frozenset({ErrorCode.VERSION, ErrorCode.TOKEN, ErrorCode.PEER, ErrorCode.SLOT})


def _type_name(t: int) -> str:
    try:
        return MsgType(t).name
    except ValueError:
        return "type(0x%02x)" % t


def _code_name(c: int) -> str:
    try:
        return ErrorCode(c).name
    except ValueError:
        return "code(%d)" % c


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class BatonException(Exception):
    """Base class of every exception this module raises on purpose."""


class BatonError(BatonException):
    """``batond`` answered with an ``ERROR`` message.

    ``code`` is the machine-readable :class:`ErrorCode` (an ``int`` if the code is unknown to
    this module), ``reason`` the text meant for people. ``fatal`` is true for the final codes
    (``VERSION``, ``TOKEN``, ``PEER``, ``SLOT``): retrying cannot help, the module stops
    registering and the worker should exit once its sessions end.
    """

    def __init__(self, code: int, reason: str) -> None:
        try:
            code = ErrorCode(code)
        except ValueError:
            pass
        self.code: Union[ErrorCode, int] = code
        self.reason = reason
        super().__init__(code, reason)

    @property
    def fatal(self) -> bool:
        """True if the worker cannot recover by registering again."""
        return self.code in FATAL_CODES

    def __str__(self) -> str:
        return "batond refused this worker: %s (code %d): %s" % (
            _code_name(int(self.code)),
            int(self.code),
            self.reason,
        )


class ProtocolError(BatonException):
    """A message broke the protocol. ``code`` is the :class:`ErrorCode` to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        super().__init__(message)


class NotUnderBaton(BatonException):
    """The program was started without ``BATON_SOCKET``, that is, not by ``batond``."""


class ConfigError(BatonException, ValueError):
    """The ``BATON_*`` environment (or a parameter) is present but invalid."""


class RegistrationError(BatonException):
    """The worker could not register: ``batond`` unreachable, silent, or hung up."""


class StateTooBig(BatonException, ValueError):
    """A session's state is longer than :data:`MAX_STATE`: it cannot be handed back. The
    library declined the session (it stays with this worker and drains as without
    migration)."""


class NotAsked(BatonException):
    """``hand_back`` or ``decline`` of a session ``batond`` has not asked for: no ``MIGRATE``
    named it, the request was answered already, its deadline passed (the library declined
    it), or the channel it came on dropped meanwhile. The session is still the program's."""


class Draining(BatonException):
    """``batond`` drains this worker: no new connections will come.

    Connections already delivered are still served; exit once they have ended (see
    :meth:`Worker.wait_idle`).
    """


class WorkerClosed(BatonException):
    """The worker was closed with :meth:`Worker.close`."""


class NoFDError(BatonException):
    """A ``CONN`` (or ``CONNS``) arrived whole but without (some of) its fds: the kernel could not
    install them in this process (out of file descriptors: ``recvmsg`` reported ``MSG_CTRUNC``).

    Raised by :func:`recv_message` and :func:`recv_batch`. Not a protocol error (PROTOCOL.md, "A
    CONN without its fd"): the receiver answers ``REFUSE`` with each id left without an fd (if
    ``WELCOME`` has :data:`WELCOME_REFUSE`), else ``ACK`` then ``CLOSED``, and keeps the channel.
    ``message`` is the whole, undecoded message. ``fds`` are the fds that did arrive (the kernel
    installs them in order: they belong to the first entries of a ``CONNS``); they now belong to
    whoever catches the exception, who must close them or hand them on.
    """

    def __init__(self, message: bytes, flags: int, fds: Sequence[int] = ()) -> None:
        self.message = message
        self.flags = flags
        self.fds: List[int] = list(fds)
        super().__init__(
            "%s arrived without %s fd(s) (out of file descriptors?) (recvmsg flags 0x%x, %d fds came)"
            % (_type_name(message[0]) if message else "message", "some of its" if fds else "its", flags, len(self.fds))
        )


# --------------------------------------------------------------------------------------------
# Messages and their encoding
# --------------------------------------------------------------------------------------------

Address = Optional[Tuple[str, int]]

_HDR = struct.Struct("<BBH")
_HELLO = struct.Struct("<HHIIQIII")
_WELCOME = struct.Struct("<HHIQI")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_FAM_PORT = struct.Struct("<BH")


@dataclass
class Hello:
    """A ``HELLO`` (worker -> gateway)."""

    min_version: int = VERSION
    max_version: int = VERSION
    pid: int = 0
    slot: int = 0
    generation: int = 0
    capacity: int = 0
    flags: int = 0
    live: int = 0
    token: str = ""


@dataclass
class Welcome:
    """A ``WELCOME`` (gateway -> worker): the chosen version, the ping interval in
    milliseconds, the gateway's current generation and (1.1) its flags
    (:data:`WELCOME_NONBLOCK`, :data:`WELCOME_REFUSE`; 0 from a 1.0 gateway, which sends none)."""

    version: int = VERSION
    ping_interval_ms: int = 0
    generation: int = 0
    flags: int = 0


@dataclass
class ConnInfo:
    """The metadata of a ``CONN``.

    ``client`` and ``local`` are ``(host, port)`` tuples, or ``None`` when the gateway does not
    know the address (family 0). ``client`` is the real client (behind a PROXY-protocol balancer
    it differs from ``getpeername()``). ``listener`` names the gateway listener that accepted it.
    """

    id: int
    client: Address
    local: Address
    listener: str
    #: Set when the session is a migrated one (it came as a ``RESUME``): its state and lineage.
    resumed: Optional["Resumed"] = None


@dataclass
class Resumed:
    """What a migrated session brought along (from its ``RESUME``).

    ``state`` is the opaque state the previous worker handed back (at most :data:`MAX_STATE`
    bytes), ``previous_id`` the id the session had there, ``hops`` how many times it has been
    handed back (>= 1), ``group`` the group key the previous worker gave it ("" for none; it
    is not this session's group: call ``set_group`` to keep it together at the next move).
    """

    state: bytes
    previous_id: int
    hops: int
    group: str


@dataclass
class Migrate:
    """A ``MIGRATE`` (gateway -> worker, 1.4): hand back the sessions ``ids`` (every session
    the worker holds if empty) within ``deadline_ms`` milliseconds."""

    deadline_ms: int
    ids: List[int]


@dataclass
class Handback:
    """A ``HANDBACK`` (worker -> gateway, 1.4): one session, whose socket travels with it."""

    conn: ConnInfo
    hops: int
    group: str
    group_size: int
    state: bytes


def _frame(t: int, body: bytes) -> bytes:
    limit = MAX_LARGE_MESSAGE if t in _LARGE_TYPES else MAX_MESSAGE
    if HEADER_LEN + len(body) > limit:
        raise ValueError("message of %d bytes exceeds %d" % (HEADER_LEN + len(body), limit))
    return _HDR.pack(t, 0, len(body)) + body


def _enc_str(s: str, truncate: bool = False) -> bytes:
    b = s.encode("utf-8")
    if len(b) > MAX_STRING:
        if not truncate:
            raise ValueError("string of %d bytes exceeds %d" % (len(b), MAX_STRING))
        b = b[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return _U16.pack(len(b)) + b


def _enc_addr(addr: Address) -> bytes:
    if addr is None:
        return b"\x00"
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return _FAM_PORT.pack(4 if ip.version == 4 else 6, int(addr[1])) + ip.packed


def encode_hello(h: Hello) -> bytes:
    """Encode a ``HELLO``. Raises ``ValueError`` if the token exceeds 1024 bytes."""
    body = _HELLO.pack(
        h.min_version,
        h.max_version,
        h.pid,
        h.slot,
        h.generation,
        h.capacity,
        h.flags,
        h.live,
    ) + _enc_str(h.token)
    return _frame(MsgType.HELLO, body)


def encode_welcome(w: Welcome) -> bytes:
    """Encode a ``WELCOME`` as of 1.1, ``flags`` included (gateway side; for tests and tools).
    A 1.0 gateway's WELCOME is the same without its last 4 body bytes."""
    return _frame(MsgType.WELCOME, _WELCOME.pack(w.version, 0, w.ping_interval_ms, w.generation, w.flags))


def encode_error(code: int, reason: str) -> bytes:
    """Encode an ``ERROR``; a reason longer than 1024 bytes is cut at a character boundary."""
    return _frame(MsgType.ERROR, _U16.pack(int(code)) + _enc_str(reason, truncate=True))


def encode_ready() -> bytes:
    """Encode a ``READY``: ``04 00 00 00``."""
    return _frame(MsgType.READY, b"")


def encode_ids(t: int, ids: Sequence[int]) -> bytes:
    """Encode an ``ACK``, ``CLOSED`` or ``REFUSE`` with 1..511 ids (callers batch longer lists)."""
    if not 1 <= len(ids) <= MAX_IDS:
        raise ValueError("%s carries 1..%d ids, not %d" % (_type_name(t), MAX_IDS, len(ids)))
    return _frame(t, _U16.pack(len(ids)) + struct.pack("<%dQ" % len(ids), *ids))


def encode_ack(ids: Sequence[int]) -> bytes:
    """Encode an ``ACK`` for ``ids``."""
    return encode_ids(MsgType.ACK, ids)


def encode_closed(ids: Sequence[int]) -> bytes:
    """Encode a ``CLOSED`` for ``ids``."""
    return encode_ids(MsgType.CLOSED, ids)


def encode_refuse(ids: Sequence[int]) -> bytes:
    """Encode a ``REFUSE`` for ``ids`` (1.1; only to a gateway whose WELCOME has
    :data:`WELCOME_REFUSE`)."""
    return encode_ids(MsgType.REFUSE, ids)


def encode_ping(nonce: int) -> bytes:
    """Encode a ``PING`` (gateway side)."""
    return _frame(MsgType.PING, _U64.pack(nonce))


def encode_pong(nonce: int) -> bytes:
    """Encode a ``PONG`` echoing ``nonce``."""
    return _frame(MsgType.PONG, _U64.pack(nonce))


def _conn_body(c: ConnInfo) -> bytes:
    return _U64.pack(c.id) + _enc_addr(c.client) + _enc_addr(c.local) + _enc_str(c.listener)


def encode_conn(c: ConnInfo) -> bytes:
    """Encode a ``CONN`` (gateway side; the fd travels as SCM_RIGHTS next to it)."""
    return _frame(MsgType.CONN, _conn_body(c))


def encode_conns(conns: Sequence[ConnInfo]) -> bytes:
    """Encode a ``CONNS`` of 1..16 connections (gateway side; for tests and tools). Their fds
    travel as SCM_RIGHTS next to it, in the same order."""
    if not 1 <= len(conns) <= MAX_BATCH:
        raise ValueError("CONNS carries 1..%d connections, not %d" % (MAX_BATCH, len(conns)))
    parts = [_U16.pack(len(conns))]
    for c in conns:
        b = _conn_body(c)
        parts.append(_U16.pack(len(b)) + b)
    return _frame(MsgType.CONNS, b"".join(parts))


def encode_drain(deadline_ms: int) -> bytes:
    """Encode a ``DRAIN`` (gateway side)."""
    return _frame(MsgType.DRAIN, _U32.pack(deadline_ms))


def encode_migrate(m: Migrate) -> bytes:
    """Encode a ``MIGRATE`` (gateway side; for tests and tools): at most 510 ids."""
    if len(m.ids) > MAX_IDS - 1:
        raise ValueError("MIGRATE lists at most %d ids, not %d" % (MAX_IDS - 1, len(m.ids)))
    return _frame(MsgType.MIGRATE, _U32.pack(m.deadline_ms) + _U16.pack(len(m.ids)) + struct.pack("<%dQ" % len(m.ids), *m.ids))


def _enc_state(state: bytes) -> bytes:
    if len(state) > MAX_STATE:
        raise StateTooBig("session state is %d bytes, at most %d" % (len(state), MAX_STATE))
    return _U32.pack(len(state)) + bytes(state)


def encode_handback(h: Handback) -> bytes:
    """Encode a ``HANDBACK`` (its socket travels next to it as SCM_RIGHTS). Raises
    :class:`StateTooBig` for a state longer than :data:`MAX_STATE`, ``ValueError`` for a group
    longer than :data:`MAX_STRING` bytes."""
    body = _conn_body(h.conn) + _U32.pack(h.hops) + _enc_str(h.group) + _U32.pack(h.group_size) + _enc_state(h.state)
    return _frame(MsgType.HANDBACK, body)


def encode_decline(ids: Sequence[int]) -> bytes:
    """Encode a ``DECLINE`` for 1..511 ids: the sessions the worker keeps."""
    return encode_ids(MsgType.DECLINE, ids)


def encode_resume(c: ConnInfo) -> bytes:
    """Encode a ``RESUME`` (gateway side; for tests and tools) from ``c`` and ``c.resumed``."""
    r = c.resumed
    if r is None:
        raise ValueError("a RESUME needs ConnInfo.resumed")
    body = _conn_body(c) + _U64.pack(r.previous_id) + _U32.pack(r.hops) + _enc_str(r.group) + _enc_state(r.state)
    return _frame(MsgType.RESUME, body)


def split(msg: bytes) -> Tuple[int, bytes]:
    """Check a message's header against its length; return ``(type, body)``.

    Raises :class:`ProtocolError` with ``MALFORMED`` (shorter than the header, or the header's
    length differs from the message's) or ``TOO_BIG`` (longer than 4096 bytes).
    """
    if len(msg) < HEADER_LEN:
        raise ProtocolError(
            ErrorCode.MALFORMED, "%d-byte message is shorter than the header" % len(msg)
        )
    if len(msg) > MAX_MESSAGE and (len(msg) > MAX_LARGE_MESSAGE or msg[0] not in _LARGE_TYPES):
        raise ProtocolError(ErrorCode.TOO_BIG, "%d-byte %s exceeds %d" % (len(msg), _type_name(msg[0]), MAX_MESSAGE))
    t, _flags, n = _HDR.unpack_from(msg)
    if n != len(msg) - HEADER_LEN:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            "%s header says %d body bytes, message has %d" % (_type_name(t), n, len(msg) - HEADER_LEN),
        )
    return t, bytes(msg[HEADER_LEN:])


class _Reader:
    """Decodes fields in order; a short body raises ProtocolError(MALFORMED)."""

    __slots__ = ("b", "pos", "msg")

    def __init__(self, body: bytes, msg: int) -> None:
        self.b = body
        self.pos = 0
        self.msg = msg

    def _take(self, n: int, field: str) -> int:
        p = self.pos
        if len(self.b) - p < n:
            raise ProtocolError(
                ErrorCode.MALFORMED, "%s body too short for %s" % (_type_name(self.msg), field)
            )
        self.pos = p + n
        return p

    def u8(self, field: str) -> int:
        return self.b[self._take(1, field)]

    def u16(self, field: str) -> int:
        return _U16.unpack_from(self.b, self._take(2, field))[0]

    def u32(self, field: str) -> int:
        return _U32.unpack_from(self.b, self._take(4, field))[0]

    def u64(self, field: str) -> int:
        return _U64.unpack_from(self.b, self._take(8, field))[0]

    def opt_u32(self) -> int:
        """A field appended by a later revision: absent (an older sender) reads as 0."""
        if len(self.b) - self.pos < 4:
            return 0
        return self.u32("")

    def raw(self, n: int, field: str) -> bytes:
        p = self._take(n, field)
        return self.b[p : p + n]

    def str(self, field: str) -> str:
        n = self.u16(field)
        if n > MAX_STRING:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                "%s %s is %d bytes, more than %d" % (_type_name(self.msg), field, n, MAX_STRING),
            )
        try:
            return self.raw(n, field).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(
                ErrorCode.MALFORMED, "%s %s is not UTF-8: %s" % (_type_name(self.msg), field, e)
            ) from None

    def addr(self, field: str) -> Address:
        fam = self.u8(field)
        if fam == 0:
            return None
        if fam == 4:
            port = self.u16(field)
            return socket.inet_ntop(socket.AF_INET, self.raw(4, field)), port
        if fam == 6:
            port = self.u16(field)
            return socket.inet_ntop(socket.AF_INET6, self.raw(16, field)), port
        raise ProtocolError(
            ErrorCode.MALFORMED, "%s %s has address family %d" % (_type_name(self.msg), field, fam)
        )


def parse_hello(body: bytes) -> Hello:
    """Decode a ``HELLO`` body (gateway side; for tests and tools)."""
    r = _Reader(body, MsgType.HELLO)
    return Hello(
        min_version=r.u16("min_version"),
        max_version=r.u16("max_version"),
        pid=r.u32("pid"),
        slot=r.u32("slot"),
        generation=r.u64("generation"),
        capacity=r.u32("capacity"),
        flags=r.u32("flags"),
        live=r.u32("live"),
        token=r.str("token"),
    )


def parse_welcome(body: bytes) -> Welcome:
    """Decode a ``WELCOME`` body: 1.0 (ending after ``generation``; ``flags`` reads as 0) or 1.1."""
    r = _Reader(body, MsgType.WELCOME)
    version = r.u16("version")
    r.u16("reserved")
    return Welcome(
        version=version,
        ping_interval_ms=r.u32("ping_interval_ms"),
        generation=r.u64("generation"),
        flags=r.opt_u32(),
    )


def parse_error(body: bytes) -> BatonError:
    """Decode an ``ERROR`` body into a :class:`BatonError` (not raised)."""
    r = _Reader(body, MsgType.ERROR)
    code = r.u16("code")
    return BatonError(code, r.str("reason"))


def parse_ids(t: int, body: bytes) -> List[int]:
    """Decode an ``ACK``, ``CLOSED`` or ``REFUSE`` body: 1..511 ids."""
    r = _Reader(body, t)
    n = r.u16("count")
    if not 1 <= n <= MAX_IDS:
        raise ProtocolError(ErrorCode.MALFORMED, "%s count %d not in 1..%d" % (_type_name(t), n, MAX_IDS))
    p = r._take(8 * n, "%d ids" % n)
    return list(struct.unpack_from("<%dQ" % n, body, p))


def parse_nonce(t: int, body: bytes) -> int:
    """Decode a ``PING`` or ``PONG`` body."""
    return _Reader(body, t).u64("nonce")


def parse_conn(body: bytes) -> ConnInfo:
    """Decode a ``CONN`` body."""
    r = _Reader(body, MsgType.CONN)
    return ConnInfo(id=r.u64("conn_id"), client=r.addr("client"), local=r.addr("local"), listener=r.str("listener"))


def parse_conns(body: bytes) -> List[ConnInfo]:
    """Decode a ``CONNS`` body: 1..16 entries, each a ``CONN`` body behind its ``u16`` length
    (bytes of an entry after the fields this module knows are ignored, as for any message)."""
    r = _Reader(body, MsgType.CONNS)
    n = r.u16("count")
    if not 1 <= n <= MAX_BATCH:
        raise ProtocolError(ErrorCode.MALFORMED, "CONNS count %d not in 1..%d" % (n, MAX_BATCH))
    out = []
    for i in range(n):
        size = r.u16("entry %d length" % (i + 1))
        out.append(parse_conn(r.raw(size, "entry %d" % (i + 1))))
    return out


def parse_drain(body: bytes) -> int:
    """Decode a ``DRAIN`` body: the deadline in milliseconds."""
    return _Reader(body, MsgType.DRAIN).u32("deadline_ms")


def parse_migrate(body: bytes) -> Migrate:
    """Decode a ``MIGRATE`` body: the deadline and 0..510 ids (0: every session)."""
    r = _Reader(body, MsgType.MIGRATE)
    deadline = r.u32("deadline_ms")
    n = r.u16("count")
    p = r._take(8 * n, "%d ids" % n)
    return Migrate(deadline, list(struct.unpack_from("<%dQ" % n, body, p)))


def _state(r: _Reader) -> bytes:
    n = r.u32("state_length")
    if n > MAX_STATE:
        raise ProtocolError(ErrorCode.MALFORMED, "%s state is %d bytes, more than %d" % (_type_name(r.msg), n, MAX_STATE))
    return bytes(r.raw(n, "state"))


def _conn_fields(r: _Reader) -> ConnInfo:
    return ConnInfo(id=r.u64("conn_id"), client=r.addr("client"), local=r.addr("local"), listener=r.str("listener"))


def parse_handback(body: bytes) -> Handback:
    """Decode a ``HANDBACK`` body (gateway side; for tests and tools)."""
    r = _Reader(body, MsgType.HANDBACK)
    conn = _conn_fields(r)
    hops = r.u32("hops")
    group = r.str("group")
    size = r.u32("group_size")
    return Handback(conn, hops, group, size, _state(r))


def parse_resume(body: bytes) -> ConnInfo:
    """Decode a ``RESUME`` body: a :class:`ConnInfo` whose ``resumed`` holds the state."""
    r = _Reader(body, MsgType.RESUME)
    c = _conn_fields(r)
    prev = r.u64("previous_id")
    hops = r.u32("hops")
    group = r.str("group")
    c.resumed = Resumed(_state(r), prev, hops, group)
    return c


# --------------------------------------------------------------------------------------------
# The channel: one message per datagram, fds as SCM_RIGHTS
# --------------------------------------------------------------------------------------------

_FD_SIZE = array.array("i").itemsize
# Room for a few fds, so that a peer sending two or three is reported as FDS (and the extra fds
# closed) rather than truncated by the kernel.
_ANC_SPACE = socket.CMSG_SPACE(4 * _FD_SIZE)
# The same for a worker that asked for BATCH: a CONNS carries up to 16 (PROTOCOL.md, Transport).
_ANC_SPACE_BATCH = socket.CMSG_SPACE((MAX_BATCH + 4) * _FD_SIZE)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _recvmsg(sock: socket.socket, anc_space: int, bufsize: int = MAX_MESSAGE) -> Tuple[bytes, List[int], int]:
    """One ``recvmsg``: the datagram, the fds that came with it (now ours), the flags."""
    data, anc, flags, _addr = sock.recvmsg(bufsize, anc_space, _RECV_FLAGS)
    fds: List[int] = []
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
            fds.extend(a)
    return data, fds, flags


def _fds_expected(data: bytes, batch: bool, migrate: bool = False) -> int:
    """How many fds the message should carry: 1 for CONN (and RESUME if ``migrate``), its
    count for CONNS (if ``batch``)."""
    if not data:
        return 0
    if data[0] == MsgType.CONN or (migrate and data[0] == MsgType.RESUME):
        return 1
    if batch and data[0] == MsgType.CONNS and len(data) >= HEADER_LEN + 2:
        return int(_U16.unpack_from(data, HEADER_LEN)[0])
    return 0


def _check_fds(
    data: bytes, fds: List[int], flags: int, batch: bool, migrate: bool = False
) -> Optional[Tuple[bytes, List[int]]]:
    """The transport rules of PROTOCOL.md for one received datagram (see :func:`recv_batch`)."""
    want = _fds_expected(data, batch, migrate)
    if want and len(fds) < want and flags & socket.MSG_CTRUNC and not flags & socket.MSG_TRUNC:
        # Whole, but (some of) its fds could not be installed here (EMFILE): PROTOCOL.md, "A CONN
        # without its fd". The receiver refuses (or acks and closes) those clients, not the
        # channel. The fds that came go with the exception.
        raise NoFDError(data, flags, fds)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError(
                ErrorCode.TOO_BIG,
                "message or its fds truncated (flags 0x%x, %d bytes, %d fds)" % (flags, len(data), len(fds)),
            )
        if not data:
            if fds:
                raise ProtocolError(ErrorCode.FDS, "empty message with %d fds" % len(fds))
            return None
        if len(fds) != want:
            t = data[0]
            if want:
                raise ProtocolError(ErrorCode.FDS, "%s with %d fds, not %d" % (_type_name(t), len(fds), want))
            raise ProtocolError(ErrorCode.FDS, "%s with %d fds" % (_type_name(t), len(fds)))
        return data, fds
    except BaseException:
        _close_fds(fds)
        raise


def recv_message(sock: socket.socket) -> Optional[Tuple[bytes, Optional[int]]]:
    """Receive one message from a ``SOCK_SEQPACKET`` channel of a worker that did not ask for
    ``BATCH`` (this module asks, and uses :func:`recv_batch`).

    Returns ``(message, fd)`` where ``fd`` is the one fd a ``CONN`` carries (``None`` for any other
    message), or ``None`` at end of stream. It enforces the transport rules: ``MSG_TRUNC`` or
    ``MSG_CTRUNC`` raise :class:`ProtocolError` ``TOO_BIG``; not exactly one fd on ``CONN``, or
    any fd on another message, raise ``FDS``. Every fd received with a rejected message is closed.
    One case is not an error of the peer: a whole ``CONN`` (no ``MSG_TRUNC``) with ``MSG_CTRUNC``
    and no fd at all, which is what this process gets when it is out of file descriptors, raises
    :class:`NoFDError` carrying the message. The message itself is not decoded (see
    :func:`split`). ``BlockingIOError`` and other ``OSError`` propagate.
    """
    data, fds, flags = _recvmsg(sock, _ANC_SPACE)
    got = _check_fds(data, fds, flags, batch=False)
    if got is None:
        return None
    return got[0], (got[1][0] if got[1] else None)


def recv_batch(sock: socket.socket, migrate: bool = False) -> Optional[Tuple[bytes, List[int]]]:
    """Receive one message from the channel of a worker that asked for ``BATCH``.

    Returns ``(message, fds)``, or ``None`` at end of stream: a ``CONN`` comes with exactly one
    fd, a ``CONNS`` with exactly as many as its count says (in entry order), any other message
    with none; else :class:`ProtocolError` ``FDS`` (``TOO_BIG`` on ``MSG_TRUNC`` or
    ``MSG_CTRUNC``), and every fd received with it is closed. A whole ``CONN`` or ``CONNS`` that
    came with fewer fds than it lists and ``MSG_CTRUNC`` (this process is out of file
    descriptors) raises :class:`NoFDError` carrying the message and the fds that did come. The
    message itself is not decoded (see :func:`split`). ``BlockingIOError`` and other ``OSError``
    propagate.

    With ``migrate`` (the channel's WELCOME granted :data:`WELCOME_MIGRATE`) it reads messages
    up to :data:`MAX_LARGE_MESSAGE` bytes, and a ``RESUME`` comes with exactly one fd, as a
    ``CONN``.
    """
    if migrate:
        data, fds, flags = _recvmsg(sock, _ANC_SPACE_BATCH, MAX_LARGE_MESSAGE)
    else:
        data, fds, flags = _recvmsg(sock, _ANC_SPACE_BATCH)
    return _check_fds(data, fds, flags, batch=True, migrate=migrate)


# --------------------------------------------------------------------------------------------
# Client sockets
# --------------------------------------------------------------------------------------------


class BatonSocket(socket.socket):
    """A client connection received from ``batond`` (or, in fallback mode, accepted locally).

    It is an ordinary :class:`socket.socket`. The connection counts as ended for ``batond``
    exactly once, at the first of: :meth:`close` (once every ``makefile`` object is closed too),
    :meth:`detach` (the fd then belongs to the caller and is no longer counted), or garbage
    collection of an unclosed socket. ``conn_info`` holds the :class:`ConnInfo` from ``CONN``
    (or ``RESUME``: then ``conn_info.resumed`` has the migrated session's state), ``session``
    the :class:`Session` through which the program answers a migration request.
    """

    __slots__ = ("conn_info", "session", "_baton_done", "_baton_key")

    def _real_close(self, *args: Any, **kwargs: Any) -> None:
        # This function should not reference globals (it may run during interpreter shutdown).
        try:
            super()._real_close(*args, **kwargs)  # type: ignore[misc]
        finally:
            try:
                done = self._baton_done
            except AttributeError:
                done = None
            if done is not None:
                done()

    def detach(self) -> int:
        """Give up the fd without closing it; the connection stops counting in ``batond``."""
        fd = super().detach()
        try:
            done = self._baton_done
        except AttributeError:
            done = None
        if done is not None:
            done()
        return fd

    def setblocking(self, flag: bool) -> None:
        """As :meth:`socket.socket.setblocking`, without a system call when the socket is
        non-blocking already and asked to stay so (asyncio asks for every connection; the
        socket was made non-blocking by ``batond``, NONBLOCK, or by an earlier call)."""
        if not flag and self.gettimeout() == 0.0:
            return
        super().setblocking(flag)

    def dup(self) -> socket.socket:
        """Return a plain :class:`socket.socket` on a duplicate fd.

        The copy is not counted: the connection counts as ended when this socket is closed.
        """
        sock = socket.socket(self.family, self.type, self.proto, fileno=socket.dup(self.fileno()))
        sock.settimeout(self.gettimeout())
        return sock


def _make_socket(
    fd: int,
    info: ConnInfo,
    done: Callable[[int], None],
    key: int,
    family: int = -1,
    nonblocking: bool = False,
) -> BatonSocket:
    """Wrap a received fd; on failure the fd is closed and the error re-raised.

    With a known ``family`` no system call is made (``socket.socket(fileno=...)`` alone asks the
    kernel for family, type and protocol: a ``getsockname`` and two ``getsockopt``). The type is
    ``SOCK_STREAM``, with ``nonblocking`` (the gateway set ``O_NONBLOCK``) the socket starts with
    timeout 0. The protocol is given as 0 (the family's default, TCP): asyncio then does not set
    ``TCP_NODELAY`` again, which ``batond`` set on its listener and the socket inherited.
    """
    try:
        if family < 0:
            sock = BatonSocket(fileno=fd)
        else:
            typ = socket.SOCK_STREAM | (socket.SOCK_NONBLOCK if nonblocking else 0)
            sock = BatonSocket(family, typ, 0, fd)
    except BaseException:
        _close_fds((fd,))
        raise
    sock.conn_info = info
    sock._baton_key = key
    fin = weakref.finalize(sock, done, key)
    fin.atexit = False
    sock._baton_done = fin
    return sock


def _silence(sock: BatonSocket) -> None:
    """Close a socket without counting it as a CLOSED connection (it was never acked)."""
    try:
        fin = sock._baton_done
    except AttributeError:
        fin = None
    if fin is not None:
        fin.detach()
    sock._baton_done = None
    sock.close()


_current_conn: contextvars.ContextVar[Optional[ConnInfo]] = contextvars.ContextVar(
    "baton_worker_conn", default=None
)
_current_session: contextvars.ContextVar[Optional["AsyncSession"]] = contextvars.ContextVar(
    "baton_worker_session", default=None
)


def connection_info() -> Optional[ConnInfo]:
    """Inside an asyncio handler started by :func:`start_server`, the connection's :class:`ConnInfo`
    (its real client address, gateway id and listener; for a migrated session, ``resumed``
    with its state); ``None`` elsewhere."""
    return _current_conn.get()


def session() -> Optional["AsyncSession"]:
    """Inside an asyncio handler started by :func:`start_server`, the connection's
    :class:`AsyncSession` (to learn that ``batond`` asks for it, and hand it back); ``None``
    elsewhere."""
    return _current_session.get()


# --------------------------------------------------------------------------------------------
# Live session migration (PROTOCOL.md "Migration (1.4)")
# --------------------------------------------------------------------------------------------


class _Round:
    """One ``MIGRATE``: the channel it came on, when unanswered sessions are declined, and the
    sessions it named. Owned by the driver."""

    __slots__ = ("chan", "deadline", "members")

    def __init__(self, chan: socket.socket, deadline: float) -> None:
        self.chan = chan
        self.deadline = deadline
        self.members: List["_SessionBase"] = []


class _Ask:
    """A session's pending request: its round, and its group and the group's size as they were
    when the ``MIGRATE`` arrived (what ``HANDBACK`` carries)."""

    __slots__ = ("round", "group", "size")

    def __init__(self, rnd: _Round, group: str, size: int) -> None:
        self.round = rnd
        self.group = group
        self.size = size


class _SessionBase:
    """What the blocking and the asyncio session share: identity, group, the pending request.

    ``_ask`` and ``_group`` are guarded by the worker's lock; only the driver (channel thread or
    event loop) sets and clears ``_ask``.
    """

    def __init__(self, worker: "Worker", info: ConnInfo) -> None:
        self.info = info
        self._worker = worker
        self._group = ""
        self._ask: Optional[_Ask] = None
        self._sock: Optional["weakref.ReferenceType[BatonSocket]"] = None  # weak: GC still closes it
        #: Called (with the session) in the driver when ``batond`` asks for this session: in the
        #: channel thread for :class:`Worker`, in the event loop for :func:`start_server`. Keep it
        #: short; an exception is logged.
        self.on_migrate: Optional[Callable[[Any], None]] = None

    @property
    def id(self) -> int:
        """The id ``batond`` gave the session (from its ``CONN`` or ``RESUME``)."""
        return self.info.id

    @property
    def resumed(self) -> Optional[Resumed]:
        """What a migrated session brought (its state, previous id, hops, group); ``None`` for a
        session that came as a plain ``CONN``."""
        return self.info.resumed

    @property
    def group(self) -> str:
        """The session's group key ("" for none); see :meth:`set_group`."""
        return self._group

    def set_group(self, key: str) -> None:
        """Set the group key, at any time (when a player joins a room, say). Sessions this worker
        hands back with the same key in answer to one ``MIGRATE`` land on the same worker; the
        key and the group's size are taken when the ``MIGRATE`` arrives. Keys are this worker's
        own. "" is no group. ``ValueError`` past :data:`MAX_STRING` bytes of UTF-8."""
        if len(key.encode("utf-8")) > MAX_STRING:
            raise ValueError("group key longer than %d bytes" % MAX_STRING)
        with self._worker._cond:
            self._group = key

    @property
    def migrate_requested(self) -> bool:
        """True while ``batond`` asks for this session and the program has not answered."""
        return self._ask is not None

    @property
    def migrate_deadline(self) -> Optional[float]:
        """When (``time.monotonic()``) the library declines the request if the program has not
        answered it; ``None`` without a request. ``batond``'s clock started a little earlier:
        answer well before it."""
        ask = self._ask
        return ask.round.deadline if ask is not None else None

    def decline(self) -> None:
        """Keep the session: it stays here and drains as without migration. Raises
        :class:`NotAsked` without a pending request."""
        w = self._worker
        with w._cond:
            if self._ask is None:
                raise NotAsked("batond has not asked for connection %#x" % self.info.id)
        w._call(lambda: w._decline(self))

    def _check_state(self, state: bytes) -> None:
        """Before a hand-back: NotAsked without a request; a state that cannot travel is declined
        (StateTooBig)."""
        if len(state) <= MAX_STATE:
            if self._ask is None:
                raise NotAsked("batond has not asked for connection %#x" % self.info.id)
            return
        msg = "connection %#x: state of %d bytes, at most %d" % (self.info.id, len(state), MAX_STATE)
        if self._ask is None:
            raise StateTooBig(msg)
        w = self._worker
        w._call(lambda: w._decline(self))
        raise StateTooBig(msg + "; declined (the session stays here)")

    # Driver hooks: the request arrived, or it was answered (or lapsed).
    def _asked(self) -> None:
        cb = self.on_migrate
        if cb is not None:
            try:
                cb(self)
            except Exception:
                log.exception("on_migrate callback of connection %#x failed", self.info.id)

    def _answered(self) -> None:
        pass


class Session(_SessionBase):
    """A connection of the blocking API (``sock.session``), for live session migration.

    With ``Worker(migrate=True)``, ``batond`` may ask for the session (a migrating reload, or
    ``batonctl migrate``): :attr:`migrate_requested` turns true, :meth:`wait_migrate` returns,
    and :attr:`on_migrate` is called in the channel thread. The program then stops reading the
    socket, finishes its writes, and calls :meth:`hand_back` (or :meth:`decline`) before
    :attr:`migrate_deadline`; unanswered, the library declines it at the deadline. A thread
    blocked in ``recv`` is not woken by the library: read with a timeout (``settimeout``) or
    ``select`` and check :attr:`migrate_requested`, or wake it from :attr:`on_migrate`.
    """

    def __init__(self, worker: "Worker", info: ConnInfo) -> None:
        super().__init__(worker, info)
        self._event = threading.Event()

    def wait_migrate(self, timeout: Optional[float] = None) -> bool:
        """Block until ``batond`` asks for this session; False on timeout."""
        return self._event.wait(timeout)

    def hand_back(self, state: bytes) -> None:
        """Give the session to ``batond`` with ``state`` (at most :data:`MAX_STATE` bytes),
        which the next worker reads from ``conn_info.resumed.state``.

        Before calling it, no thread may read or write the socket any more; put into ``state``
        whatever the program read but did not process (a partial line, say). Bytes the client
        sent that the program did not read stay in the kernel's buffer and travel with the
        socket. On success the socket is closed here (no ``shutdown``: the connection lives on,
        elsewhere), no ``CLOSED`` is sent for it and :attr:`Worker.live` drops by one.

        Raises :class:`StateTooBig` (the session was declined and stays here), :class:`NotAsked`
        (no pending request, or its deadline passed), or ``OSError``/:class:`WorkerClosed` if
        the ``HANDBACK`` could not be sent: then the session is still the program's, usable as
        before (keep serving it, or close it).
        """
        state = bytes(state)
        ref = self._sock
        sock = ref() if ref is not None else None
        if sock is None or sock.fileno() < 0:
            raise NotAsked("connection %#x is closed" % self.info.id)
        self._check_state(state)
        w = self._worker
        done = threading.Event()
        box: List[Optional[BaseException]] = []

        def finish(err: Optional[BaseException]) -> None:
            box.append(err)
            done.set()

        w._call(lambda: w._handback(self, sock, state, finish))
        while not done.wait(0.5):
            t = w._thread
            if w._stopping and (t is None or not t.is_alive()):
                raise WorkerClosed("worker closed before the HANDBACK was sent")
        if box[0] is not None:
            raise box[0]
        sock.close()  # only this process's descriptor: batond holds the connection now

    def _asked(self) -> None:
        self._event.set()
        super()._asked()

    def _answered(self) -> None:
        self._event.clear()


class AsyncSession(_SessionBase):
    """A connection of the asyncio API (:func:`session` inside the handler), for live session
    migration.

    With ``start_server(..., migrate=True)``, ``batond`` may ask for the session:
    :attr:`migrate_requested` turns true, ``await wait_migrate()`` returns and
    :attr:`on_migrate` is called in the event loop (a handler waiting in ``reader.readline()``
    can be woken from there, for instance by cancelling that read). The handler then stops
    reading, takes what its ``StreamReader`` holds (:meth:`unread`) into the state, and
    ``await hand_back(state)`` (or :meth:`decline`) before :attr:`migrate_deadline`.
    """

    def __init__(self, worker: "Worker", info: ConnInfo) -> None:
        super().__init__(worker, info)
        self._event: Optional[asyncio.Event] = None
        self._transport: Optional[asyncio.Transport] = None
        self._writer: Optional[asyncio.StreamWriter] = None

    async def wait_migrate(self) -> None:
        """Wait until ``batond`` asks for this session."""
        if self._ask is not None:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    @staticmethod
    def unread(reader: asyncio.StreamReader) -> bytes:
        """What ``reader`` has read from the socket and the handler has not consumed yet (a
        copy; nothing is consumed). Such bytes belong in the state: take them, then call
        :meth:`hand_back` with no ``await`` in between (it stops reading first)."""
        buf = getattr(reader, "_buffer", None)  # the StreamReader's own buffer (every CPython 3)
        return bytes(buf) if buf is not None else b""

    async def hand_back(self, state: bytes) -> None:
        """Give the session to ``batond`` with ``state`` (at most :data:`MAX_STATE` bytes),
        which the next worker reads from ``connection_info().resumed.state``.

        It stops reading the socket at once, waits until everything written to the transport
        has gone to the kernel (bytes written after the hand-back would interleave with the next
        worker's), sends the ``HANDBACK`` with the socket, and closes this process's descriptor
        (no ``shutdown``; no ``CLOSED``; ``live`` drops by one): the handler should then return
        without writing. Bytes its ``StreamReader`` holds go nowhere: see :meth:`unread`.

        Raises :class:`StateTooBig` (declined: the session stays here), :class:`NotAsked` (no
        pending request; the deadline passed; or the client did not take its output before it,
        and the session was declined), ``ConnectionError`` if the client went away, or
        ``OSError`` if the ``HANDBACK`` could not be sent. In every such case the session is
        still the handler's and reading resumes.
        """
        state = bytes(state)
        t, writer, w = self._transport, self._writer, self._worker
        sock = self._sock() if self._sock is not None else None
        if t is None or writer is None or sock is None:
            raise NotAsked("connection %#x is not served by start_server" % self.info.id)
        self._check_state(state)
        if t.is_closing():
            raise ConnectionResetError(errno.ECONNRESET, "connection %#x is closing" % self.info.id)
        t.pause_reading()
        low, high = t.get_write_buffer_limits()
        sent = False
        try:
            if t.get_write_buffer_size():
                # drain() waits while the buffer is above the low-water mark: at 0, until empty.
                t.set_write_buffer_limits(0, 0)
                ask = self._ask
                left = ask.round.deadline - time.monotonic() if ask is not None else 0.0
                try:
                    await asyncio.wait_for(writer.drain(), max(0.0, left))
                except asyncio.TimeoutError:
                    if self._ask is not None:
                        w._decline(self)
                    raise NotAsked(
                        "connection %#x: the client did not take its output before the deadline; declined"
                        % self.info.id
                    ) from None
            fut = asyncio.get_running_loop().create_future()

            def finish(err: Optional[BaseException]) -> None:
                if not fut.done():
                    if err is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(err)

            w._handback(self, sock, state, finish)
            await fut
            sent = True
        finally:
            if not sent:
                t.set_write_buffer_limits(high, low)
                if not t.is_closing():
                    t.resume_reading()
        t.abort()  # closes only this process's descriptor (no shutdown): the client stays

    def _asked(self) -> None:
        if self._event is not None:
            self._event.set()
        super()._asked()

    def _answered(self) -> None:
        if self._event is not None:
            self._event.clear()


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------

_NOT_UNDER_BATON = (
    "BATON_SOCKET is not set: this program is a baton worker and expects to be started by "
    "batond (for example `batond -- python3 %s`). To run it on its own for development, set "
    "BATON_FALLBACK_LISTEN=127.0.0.1:7000 (or pass fallback=(host, port)) and it will listen on "
    "that TCP address itself."
)


def _env_int(env: Mapping[str, str], name: str, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        raise ConfigError(
            "%s is not set although BATON_SOCKET is: the worker environment from batond is incomplete" % name
        )
    try:
        v = int(raw, 10)
    except ValueError:
        raise ConfigError("%s=%r is not a decimal integer" % (name, raw)) from None
    if not lo <= v <= hi:
        raise ConfigError("%s=%d is out of range %d..%d" % (name, v, lo, hi))
    return v


def _parse_hostport(s: str, what: str) -> Tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep:
        raise ConfigError("%s=%r: want HOST:PORT" % (what, s))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        p = int(port, 10)
    except ValueError:
        raise ConfigError("%s=%r: port %r is not a number" % (what, s, port)) from None
    if not 0 <= p <= 65535:
        raise ConfigError("%s=%r: port out of range" % (what, s))
    return host, p


def _socket_path(path: str) -> str:
    # Go's convention: a leading '@' names a socket in the abstract namespace.
    if path.startswith("@"):
        return "\0" + path[1:]
    return path


# --------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------

_Conn = Tuple[BatonSocket, ConnInfo]
_KNOWN_TYPES = frozenset(int(t) for t in MsgType)
_MODE_THREAD = "thread"
_MODE_ASYNCIO = "asyncio"
_CHANNEL_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED)


class Worker:
    """One registration with ``batond`` (or, outside it, an opt-in fallback TCP listener).

    ``capacity`` is the most client connections wanted at once (0: let ``batond`` decide).
    ``fallback`` is a ``(host, port)`` to listen on when not started by ``batond``; the
    environment variable ``BATON_FALLBACK_LISTEN=host:port`` wins over it. ``env`` replaces
    ``os.environ`` (for tests). ``register_timeout`` bounds the initial registration (connecting
    and waiting for ``WELCOME``) and each re-registration's wait for ``WELCOME``.

    With ``start=True`` (the default) the constructor registers at once, in blocking mode (a
    daemon thread then owns the channel): it raises :class:`NotUnderBaton`, :class:`ConfigError`,
    :class:`BatonError` or :class:`RegistrationError`. :func:`start_server` creates its worker
    with ``start=False`` and drives it from the event loop instead. A worker is used either
    through :meth:`accept` or through :func:`start_server`, not both.

    With ``migrate=True`` the worker asks ``batond`` for live session migration (HELLO's
    ``MIGRATE`` bit): ``batond`` may then ask for sessions (a migrating reload; see
    :class:`Session`, reached as ``sock.session``) and deliver sessions other workers handed
    back (``sock.conn_info.resumed`` says so and carries their state).

    Thread safety: every public method may be called from any thread.
    """

    def __init__(
        self,
        capacity: int = 0,
        *,
        fallback: Optional[Tuple[str, int]] = None,
        env: Optional[Mapping[str, str]] = None,
        register_timeout: float = 10.0,
        start: bool = True,
        migrate: bool = False,
    ) -> None:
        if env is None:
            env = os.environ
        if not 0 <= int(capacity) <= 0xFFFFFFFF:
            raise ConfigError("capacity %d out of range" % capacity)
        self.capacity = int(capacity)
        self.pid = os.getpid()
        self._register_timeout = float(register_timeout)
        path = env.get("BATON_SOCKET") or ""
        self._path: Optional[str] = None
        self._fallback: Optional[Tuple[str, int]] = None
        #: The slot (``BATON_WORKER``), or ``None`` outside ``batond``.
        self.slot: Optional[int] = None
        #: The generation that started this worker (``BATON_GENERATION``), or ``None``.
        self.generation: Optional[int] = None
        self._token = ""
        if path:
            self._path = path
            self.slot = _env_int(env, "BATON_WORKER", 0, 0xFFFFFFFF)
            self.generation = _env_int(env, "BATON_GENERATION", 0, 0xFFFFFFFFFFFFFFFF)
            self._token = env.get("BATON_TOKEN", "")
            if len(self._token.encode("utf-8")) > MAX_STRING:
                raise ConfigError("BATON_TOKEN is longer than %d bytes" % MAX_STRING)
        else:
            fb = env.get("BATON_FALLBACK_LISTEN") or ""
            if fb:
                self._fallback = _parse_hostport(fb, "BATON_FALLBACK_LISTEN")
            elif fallback is not None:
                self._fallback = (str(fallback[0]), int(fallback[1]))
            else:
                import sys

                prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "worker.py"
                raise NotUnderBaton(_NOT_UNDER_BATON % prog)

        #: The last ``WELCOME`` (``None`` before registration and in fallback mode).
        self.welcome: Optional[Welcome] = None

        # Guarded by _cond: the sets and flags that other threads read or wait on.
        self._cond = threading.Condition(threading.Lock())
        self._live: Dict[int, int] = {}  # local key -> gateway conn id
        self._accept_q: Deque[_Conn] = collections.deque()
        self._draining = False
        self._drain_deadline: Optional[float] = None
        self._fatal: Optional[BaseException] = None
        self._closed = False
        self._ready_wanted = False
        self._inflight = 0  # received, not yet acked and handed to the program
        self._migrate_wanted = bool(migrate)
        # Acked sessions by batond's id (driver writes, under _cond): what MIGRATE names.
        self._by_id: Dict[int, _SessionBase] = {}

        # Owned by the driver (the channel thread, or the event loop).
        self._mode: Optional[str] = None
        self._chan: Optional[socket.socket] = None
        # (message, connections it ACKs, connection ids it reports CLOSED, ids it ACKs whose fd
        # never arrived: to report CLOSED once it is written, the hand-back it is)
        self._outq: Deque[
            Tuple[bytes, Optional[List[_Conn]], Optional[List[int]], Optional[List[int]], Optional[_HandbackJob]]
        ] = collections.deque()
        # This channel's: whether MIGRATE was asked for and granted, and its pending requests.
        self._migrate = False
        self._rounds: List[_Round] = []
        # Any thread -> driver: work the program asked for (DECLINE, HANDBACK).
        self._calls: Deque[Callable[[], None]] = collections.deque()
        # Ended connections whose CLOSED is not sent yet (the channel was down): counted in the
        # next HELLO's live and reported after its WELCOME (PROTOCOL.md, Re-registration).
        self._unreported: List[int] = []
        self._ready_sent = False
        self._hello_flags = 0
        # This channel's: the address family of each gateway listener (see _wrap), and whether
        # client fds arrive non-blocking (asked for and granted).
        self._families: Dict[str, int] = {}
        self._nonblocking = False
        self._backoff = BACKOFF_MIN
        self._reconnect_due: Optional[float] = None
        self._reconnect_task: Optional[asyncio.Task] = None
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[int] = None
        self._state_cb: Optional[Callable[[], None]] = None
        self._conn_cb: Optional[Callable[[BatonSocket, ConnInfo], None]] = None
        self._listener: Optional[socket.socket] = None
        self._closing_pipe: Optional[Tuple[int, int]] = None  # fallback accept's wake-up on close
        self._keys = iter(range(1, 1 << 62))  # next() is atomic under the GIL

        # Any thread (and finalizers) -> driver: ended connections and a wake-up pipe.
        self._closed_q: Deque[int] = collections.deque()
        self._wake_pending = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Closed only when the worker itself goes away: its sockets' finalizers hold it alive,
        # so no finalizer can ever write into a closed (and reused) fd number.
        self._pipe_fin = weakref.finalize(self, _close_fds, (self._wake_r, self._wake_w))
        self._pipe_fin.atexit = False
        if start:
            self.start()

    # ---------------------------------------------------------------- public state

    @property
    def under_baton(self) -> bool:
        """True when started by ``batond`` (``BATON_SOCKET`` set); False in fallback mode."""
        return self._path is not None

    @property
    def live(self) -> int:
        """Client connections this worker holds (delivered and not yet ended)."""
        return len(self._live)

    @property
    def draining(self) -> bool:
        """True once ``batond`` sent ``DRAIN``: no new connections will come."""
        return self._draining

    @property
    def drain_deadline(self) -> Optional[float]:
        """When (``time.monotonic()``) ``batond`` will stop a draining worker; ``None`` if not
        draining. A later ``DRAIN`` replaces it: read it again rather than keep a copy."""
        return self._drain_deadline

    @property
    def migration(self) -> bool:
        """True while the channel to ``batond`` has live session migration (asked for with
        ``migrate=True`` and granted in ``WELCOME``): ``batond`` may ask for sessions."""
        return self._migrate

    @property
    def registered(self) -> bool:
        """True while the channel to ``batond`` is up."""
        return self._chan is not None

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        """The fallback listener's bound address (blocking fallback mode), else ``None``."""
        lst = self._listener
        return lst.getsockname()[:2] if lst is not None else None

    def __repr__(self) -> str:
        if self._path is None:
            where = "fallback %s:%d" % self._fallback if self._fallback else "unstarted"
        else:
            where = "slot %s generation %s" % (self.slot, self.generation)
        return "<baton_worker.Worker pid %d %s live %d%s>" % (
            self.pid,
            where,
            self.live,
            " draining" if self._draining else "",
        )

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- blocking API

    def start(self) -> None:
        """Register with ``batond`` (or open the fallback listener) and start the channel thread.

        Called by the constructor unless ``start=False``; idempotent.
        """
        with self._cond:
            if self._mode is not None:
                return
            if self._closed:
                raise WorkerClosed("worker is closed")
            self._mode = _MODE_THREAD
        try:
            if self._path is None:
                assert self._fallback is not None
                fam = socket.AF_INET6 if ":" in self._fallback[0] else socket.AF_INET
                self._listener = socket.create_server(self._fallback, family=fam)
                self._listener.setblocking(False)
                log.warning(
                    "not started by batond: listening on %s:%d myself (fallback)", *self.address  # type: ignore[misc]
                )
            else:
                sock, welcome = self._register_initial_blocking()
                self._attach(sock, welcome)
        except BaseException:
            with self._cond:
                self._mode = None
            raise
        self._thread = threading.Thread(target=self._thread_main, name="baton-worker", daemon=True)
        self._thread.start()

    def ready(self) -> None:
        """Tell ``batond`` this worker serves (sends ``READY`` once). :meth:`accept` and
        :func:`start_server` call it; call it yourself to become ready before accepting."""
        with self._cond:
            if self._ready_wanted:
                return
            self._ready_wanted = True
        self._wake()

    def accept(self, timeout: Optional[float] = None) -> Tuple[BatonSocket, Address]:
        """Wait for the next client connection; return ``(socket, client_address)``.

        The address is the real client from ``CONN`` (``getpeername()`` if ``batond`` did not
        know it). The socket is in blocking mode (or has the default timeout), like
        :meth:`socket.socket.accept`. The first call sends ``READY``.

        Raises :class:`Draining` once ``batond`` drains this worker and every delivered
        connection has been handed out; :class:`WorkerClosed` after :meth:`close`;
        :class:`BatonError` if ``batond`` refused this worker with a final code (then it
        registers no more: exit once the sessions end); ``socket.timeout``
        after ``timeout`` seconds.
        """
        if self._mode is None:
            self.start()
        if self._mode != _MODE_THREAD:
            raise RuntimeError("this worker is driven by asyncio (start_server); accept() is for the blocking API")
        if self._listener is not None:
            return self._accept_fallback(timeout)
        self.ready()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._accept_q:
                    sock, info = self._accept_q.popleft()
                    break
                self._raise_if_done()
                if deadline is None:
                    self._cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout("accept timed out")
                    self._cond.wait(left)
        sock.settimeout(socket.getdefaulttimeout())  # also clears the gateway's O_NONBLOCK
        addr = info.client
        if addr is None:
            try:
                addr = sock.getpeername()[:2]
            except OSError:
                addr = None
        return sock, addr

    def _raise_if_done(self) -> None:
        # Called with _cond held.
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise WorkerClosed("worker is closed")
        if self._draining and not self._inflight:
            raise Draining(
                "batond is draining this worker: no new connections; serve the ones you have "
                "and exit when they have ended (wait_idle())"
            )

    def _accept_fallback(self, timeout: Optional[float]) -> Tuple[BatonSocket, Address]:
        lst = self._listener
        assert lst is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(lst.fileno(), select.POLLIN)
        poller.register(self._closing_fd(), select.POLLIN)
        while True:
            with self._cond:
                self._raise_if_done()
            if deadline is None:
                wait_ms = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("accept timed out")
                wait_ms = int(left * 1000) + 1
            poller.poll(wait_ms)
            with self._cond:
                self._raise_if_done()
            try:
                plain, addr = lst.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                with self._cond:
                    self._raise_if_done()
                raise
            fd = plain.detach()
            key = next(self._keys)
            info = ConnInfo(id=key, client=addr[:2], local=None, listener="fallback")
            sock = _make_socket(fd, info, self._conn_ended, key)
            sess = Session(self, info)  # never asked: no batond here
            sess._sock = weakref.ref(sock)
            sock.session = sess
            with self._cond:
                self._live[key] = key
            sock.settimeout(socket.getdefaulttimeout())
            try:
                info.local = sock.getsockname()[:2]
            except OSError:
                pass
            return sock, info.client

    def _closing_fd(self) -> int:
        """A pipe fd that becomes readable (forever) once the worker is closed."""
        with self._cond:
            if self._closing_pipe is None:
                r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._closing_pipe = (r, w)
                fin = weakref.finalize(self, _close_fds, (r, w))
                fin.atexit = False
                if self._closed:
                    os.write(w, b"x")
            return self._closing_pipe[0]

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until the worker holds no connection; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._live, timeout)

    def wait_drained(self, timeout: Optional[float] = None) -> bool:
        """Block until ``batond`` has drained this worker and its last connection ended (time to
        exit); False on timeout. Raises the fatal :class:`BatonError`, if any."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._fatal is not None or self._closed or (self._draining and not self._live), timeout
            )
            if self._fatal is not None:
                raise self._fatal
            return ok

    def wait_draining(self, timeout: Optional[float] = None) -> bool:
        """Block until ``DRAIN`` arrives (or the worker is closed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._draining or self._closed or self._fatal is not None, timeout)

    def close(self) -> None:
        """Stop: close connections not yet accepted, report them, close the channel.

        Sessions already handed to the program are left alone. Idempotent.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            queued = list(self._accept_q)
            self._accept_q.clear()
            self._cond.notify_all()
            closing = self._closing_pipe
        if closing is not None:
            try:
                os.write(closing[1], b"x")
            except OSError:
                pass
        for sock, _ in queued:
            sock.close()
        if self._mode == _MODE_THREAD:
            self._stopping = True
            self._wake()
            t = self._thread
            if t is not None and t is not threading.current_thread():
                t.join(5.0)
            if self._listener is not None:
                self._listener.close()
        elif self._mode == _MODE_ASYNCIO:
            loop = self._loop
            assert loop is not None
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                self._shutdown_async()
            elif not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._shutdown_async)
                except RuntimeError:
                    pass

    # ---------------------------------------------------------------- any thread -> driver

    def _conn_ended(self, key: int) -> None:
        """A connection ended (close, detach, GC). Any thread, finalizers included: no locks."""
        self._closed_q.append(key)
        self._wake()

    def _wake(self) -> None:
        if self._wake_pending:
            return
        self._wake_pending = True
        if self._loop_thread == threading.get_ident():
            # On the event loop's own thread (the usual case for asyncio): no pipe needed. All
            # the connections that end in this loop iteration are reported in one CLOSED.
            try:
                self._loop.call_soon(self._service_soon)  # type: ignore[union-attr]
                return
            except RuntimeError:  # the loop is closed
                pass
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    # ---------------------------------------------------------------- driver: shared logic

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
        cb = self._state_cb
        if cb is not None:
            cb()

    def _service(self) -> None:
        """Driver: handle wake-ups (READY wanted, ended connections)."""
        # Empty the pipe first, then re-arm: a waker that sees _wake_pending False writes a byte
        # after this point, so the driver wakes again; one that saw it True before the reset
        # appended before it, and the flush below sees its id.
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return
        self._service_soon()

    def _service_soon(self) -> None:
        """Driver: :meth:`_service` as scheduled by a waker on the loop's own thread, which
        wrote nothing to the pipe (a byte another thread wrote wakes :meth:`_service` later,
        which reads it): no ``read`` system call per wake-up."""
        self._wake_pending = False
        while self._calls:
            self._calls.popleft()()
        if self._chan is not None and self._ready_wanted and not self._ready_sent and not self._draining:
            self._ready_sent = True
            self._send(encode_ready())
        self._flush_closed()

    def _flush_closed(self) -> None:
        """Driver: forget ended connections and report them (CLOSED) if the channel is up.

        While it is down their ids wait in ``_unreported``: the next HELLO counts them in
        ``live`` and they are reported right after its WELCOME.
        """
        ids: List[int] = []
        with self._cond:
            while True:
                try:
                    key = self._closed_q.popleft()
                except IndexError:
                    break
                cid = self._live.pop(key, None)
                if cid is not None:
                    ids.append(cid)
                    self._by_id.pop(cid, None)
        if self._path is None:  # fallback: nobody to tell
            if ids:
                self._notify()
            return
        if self._chan is None:
            self._unreported.extend(ids)
        elif self._unreported or ids:
            ids = self._unreported + ids
            self._unreported = []
            for i in range(0, len(ids), MAX_IDS):
                part = ids[i : i + MAX_IDS]
                self._send(encode_closed(part), cids=part)
        if ids:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%d connection(s) ended, %d live", len(ids), len(self._live))
            self._notify()

    def _hello(self) -> bytes:
        """Driver: the HELLO for now, with live connections and READY/DRAINING flags."""
        self._flush_closed()  # the channel is down: ended ones move to _unreported
        flags = (FLAG_READY if self._ready_wanted else 0) | (FLAG_DRAINING if self._draining else 0)
        # CONNS always; non-blocking fds for asyncio, which wants them so (the blocking API
        # hands out blocking sockets).
        flags |= FLAG_BATCH | (FLAG_NONBLOCK if self._mode == _MODE_ASYNCIO else 0)
        flags |= FLAG_MIGRATE if self._migrate_wanted else 0
        self._hello_flags = flags
        return encode_hello(
            Hello(
                min_version=VERSION,
                max_version=VERSION,
                pid=self.pid,
                slot=self.slot or 0,
                generation=self.generation or 0,
                capacity=self.capacity,
                flags=flags,
                live=len(self._live) + len(self._unreported),
                token=self._token,
            )
        )

    def _connect(self) -> socket.socket:
        """Driver: connect to BATON_SOCKET and send HELLO (non-blocking; AF_UNIX connects at once)."""
        assert self._path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setblocking(False)
            sock.connect(_socket_path(self._path))
            sock.send(self._hello(), _SEND_FLAGS)
        except BaseException:
            sock.close()
            raise
        return sock

    def _read_welcome(self, sock: socket.socket) -> Welcome:
        """Driver: read the answer to HELLO. BlockingIOError if it has not arrived yet."""
        try:
            got: Optional[Tuple[bytes, List[int]]] = recv_batch(sock)
        except NoFDError as e:
            got = (e.message, e.fds)  # a CONN before WELCOME: UNEXPECTED below, fds or not
        except ProtocolError as e:
            _send_error(sock, e)
            raise
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as e:
            raise RegistrationError("batond hung up before answering HELLO: %s" % e) from e
        if got is None:
            raise RegistrationError("batond closed the registration channel before answering HELLO")
        data, fds = got
        try:
            t, body = split(data)
            if t == MsgType.ERROR:
                raise parse_error(body)
            if t != MsgType.WELCOME:
                raise ProtocolError(ErrorCode.UNEXPECTED, "%s before WELCOME" % _type_name(t))
            w = parse_welcome(body)
            if w.version != VERSION:
                raise ProtocolError(
                    ErrorCode.VERSION, "WELCOME chose version %d, this worker speaks %d" % (w.version, VERSION)
                )
            return w
        except ProtocolError as e:
            _send_error(sock, e)
            raise
        finally:
            _close_fds(fds)

    def _attach(self, sock: socket.socket, w: Welcome) -> None:
        """Driver: the handshake succeeded; start using ``sock`` as the channel."""
        self._chan = sock
        self.welcome = w
        self._families = {}
        self._nonblocking = bool(self._hello_flags & FLAG_NONBLOCK and w.flags & WELCOME_NONBLOCK)
        self._migrate = bool(self._hello_flags & FLAG_MIGRATE and w.flags & WELCOME_MIGRATE)
        self._backoff = BACKOFF_MIN
        self._reconnect_due = None
        self._ready_sent = bool(self._hello_flags & FLAG_READY)
        log.info(
            "registered with batond at %s: pid %d, slot %s, generation %s, %d live%s%s (protocol v%d, gateway generation %d, ping every %d ms, flags 0x%x)",
            self._path,
            self.pid,
            self.slot,
            self.generation,
            len(self._live),
            ", ready" if self._hello_flags & FLAG_READY else "",
            ", draining" if self._hello_flags & FLAG_DRAINING else "",
            w.version,
            w.generation,
            w.ping_interval_ms,
            w.flags,
        )
        if self._mode == _MODE_ASYNCIO:
            assert self._loop is not None
            self._loop.add_reader(sock.fileno(), self._on_readable)
        self._service()
        self._notify()

    def _send(
        self,
        data: bytes,
        conns: Optional[List[_Conn]] = None,
        cids: Optional[List[int]] = None,
        unusable: Optional[List[int]] = None,
        hb: Optional[_HandbackJob] = None,
    ) -> None:
        """Driver: send one message. ``conns`` are handed to the program once it is written
        (it is their ACK); if it cannot be, they are closed unreported. ``cids`` are the ids a
        CLOSED reports; if it cannot be sent, they wait for the next registration. ``unusable``
        are ids this ACK acknowledges whose fd never arrived: once it is written they are
        reported CLOSED; if it cannot be, they are forgotten (batond still owns them). ``hb`` is
        the hand-back this HANDBACK is: its socket goes with it, and it learns the outcome."""
        chan = self._chan
        if chan is None:
            self._discard(conns)
            if cids:
                self._unreported.extend(cids)
            if hb is not None:
                hb.failed(ConnectionResetError(errno.ENOTCONN, "no channel to batond"))
            return
        if self._outq:
            self._outq.append((data, conns, cids, unusable, hb))
            return
        try:
            _send_on(chan, data, hb)
        except (BlockingIOError, InterruptedError):
            self._outq.append((data, conns, cids, unusable, hb))
            self._want_write(True)
            return
        except OSError as e:
            self._discard(conns)
            if cids:
                self._unreported.extend(cids)
            if hb is not None:
                hb.failed(e)
            self._lost(e)
            return
        self._sent(conns, unusable, hb)

    def _sent(self, conns: Optional[List[_Conn]], unusable: Optional[List[int]], hb: Optional[_HandbackJob] = None) -> None:
        """Driver: an ACK is written: its connections go to the program, and the ids among it
        whose fd never arrived are reported CLOSED at once (batond counts them from the ACK).
        A HANDBACK is written: the session is batond's."""
        if hb is not None:
            self._handed_back(hb)
        if conns:
            self._publish(conns)
        if unusable:
            self._send(encode_closed(unusable), cids=unusable)

    def _on_writable(self) -> None:
        """Driver: the channel can take more: send what waits."""
        chan = self._chan
        while chan is not None and self._chan is chan and self._outq:
            data, conns, _, unusable, hb = self._outq[0]
            try:
                _send_on(chan, data, hb)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._lost(e)
                return
            self._outq.popleft()
            self._sent(conns, unusable, hb)
        self._want_write(False)

    def _on_readable(self) -> None:
        """Driver: read and handle up to 64 messages; ACK the connections among them (each
        CONN, each entry of a CONNS) in one message at the end: one ``sendmsg`` per wake-up."""
        chan = self._chan
        if chan is None:
            return
        conns: List[_Conn] = []
        refused: List[int] = []  # CONNs whose fd never arrived, to REFUSE (batond knows it)
        unusable: List[int] = []  # the same without REFUSE: ACK, then CLOSED at once
        try:
            for _ in range(64):
                try:
                    got = recv_batch(chan, self._migrate)
                except (BlockingIOError, InterruptedError):
                    break
                except NoFDError as e:
                    self._take_conns(e.message, e.fds, conns, refused, unusable)
                    continue
                if got is None:
                    raise ConnectionResetError(errno.ECONNRESET, "batond closed the channel")
                data, fds = got
                if fds:
                    self._take_conns(data, fds, conns, refused, unusable)
                    continue
                t, body = split(data)
                if t == MsgType.PING:
                    self._send(encode_pong(parse_nonce(t, body)))
                elif t == MsgType.DRAIN:
                    self._on_drain(parse_drain(body))
                elif t == MsgType.MIGRATE and self._migrate:
                    self._on_migrate(parse_migrate(body))
                elif t == MsgType.ERROR:
                    err = parse_error(body)
                    if err.fatal:
                        self._fatal_error(err)
                    else:
                        self._lost(err)
                    self._discard(conns)
                    conns = []
                    return
                elif t >= OPTIONAL_TYPE:
                    continue
                elif t in _KNOWN_TYPES:
                    raise ProtocolError(ErrorCode.UNEXPECTED, "unexpected %s from batond" % _type_name(t))
                else:
                    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "unknown message %s" % _type_name(t))
                if self._chan is not chan:
                    self._discard(conns)
                    return
        except ProtocolError as e:
            log.error("protocol error from batond: %s", e)
            if self._chan is chan:
                _send_error(chan, e)
                self._lost(e)
            self._discard(conns)
            return
        except OSError as e:
            self._discard(conns)
            if self._chan is chan:
                self._lost(e)
            return
        except BaseException:
            self._discard(conns)
            raise
        for i in range(0, len(refused), MAX_IDS):
            self._send(encode_refuse(refused[i : i + MAX_IDS]))
        if conns or unusable:
            if log.isEnabledFor(logging.DEBUG):
                for _, info in conns:
                    log.debug("CONN %#x from %s on %r", info.id, info.client, info.listener)
            # One ACK per batch: the received connections' ids, then those whose fd never came.
            ids = [c[1].id for c in conns] + unusable
            for i in range(0, len(ids), MAX_IDS):
                part = conns[i : i + MAX_IDS]
                ack = ids[i : i + MAX_IDS]
                self._send(encode_ack(ack), part or None, unusable=ack[len(part) :] or None)

    def _take_conns(
        self, data: bytes, fds: List[int], conns: List[_Conn], refused: List[int], unusable: List[int]
    ) -> None:
        """Driver: a CONN or CONNS with its fds (``fds`` may be short of the count when this
        process ran out of fds: the kernel installs them in order, so they are the first
        entries'). Every fd ends up in a socket appended to ``conns`` or closed, whatever
        happens; the ids without an fd go to ``refused`` or ``unusable`` (see :meth:`_no_fd`)."""
        taken = 0
        made: List[_Conn] = []
        try:
            t, body = split(data)
            if t == MsgType.CONN:
                infos = [parse_conn(body)]
            elif t == MsgType.RESUME and self._migrate:
                infos = [parse_resume(body)]
            elif t == MsgType.CONNS and self._hello_flags & FLAG_BATCH:
                infos = parse_conns(body)
            else:
                raise ProtocolError(ErrorCode.FDS, "%s with %d fds" % (_type_name(t), len(fds)))
            for info, fd in zip(infos, fds):  # recv_batch checked: never more fds than entries
                taken += 1  # _wrap owns the fd now: it closes it if it fails
                made.append((self._wrap(fd, info), info))
        except BaseException:
            _close_fds(fds[taken:])
            for sock, _ in made:
                _silence(sock)
            raise
        if made:
            with self._cond:
                for sock, info in made:
                    self._live[sock._baton_key] = info.id
                self._inflight += len(made)
            conns.extend(made)
        for info in infos[len(fds) :]:
            self._no_fd(info, refused, unusable)

    def _wrap(self, fd: int, info: ConnInfo) -> BatonSocket:
        """Driver: a received client fd as a :class:`BatonSocket`, without a system call but
        for the first connection of each listener on this channel (one ``getsockopt`` to learn
        its address family, which the CONN does not say: behind the PROXY protocol, or on a
        dual-stack listener, the addresses need not be of the socket's family). A listener's
        name names one socket of the gateway, so its family does not change."""
        key = next(self._keys)
        fam = self._families.get(info.listener)
        if fam is None:
            try:
                probe = socket.socket(fileno=fd)
            except OSError as e:
                _close_fds((fd,))
                raise ProtocolError(ErrorCode.FDS, "CONN %#x: fd is not a socket: %s" % (info.id, e)) from e
            fam, typ = int(probe.family), int(probe.type)
            probe.detach()
            if fam not in (socket.AF_INET, socket.AF_INET6) or typ != socket.SOCK_STREAM:
                _close_fds((fd,))
                raise ProtocolError(ErrorCode.FDS, "CONN %#x: fd is not a TCP socket (family %d, type %d)" % (info.id, fam, typ))
            self._families[info.listener] = fam
        sock = _make_socket(fd, info, self._conn_ended, key, fam, self._nonblocking)
        sess: _SessionBase = AsyncSession(self, info) if self._mode == _MODE_ASYNCIO else Session(self, info)
        sess._sock = weakref.ref(sock)
        sock.session = sess
        return sock

    def _no_fd(self, info: ConnInfo, refused: List[int], unusable: List[int]) -> None:
        """Driver: a CONN arrived without its fd (this process is out of file descriptors).
        Not a protocol error: where batond understands REFUSE the client goes back to it for
        another worker; else it is acked and reported CLOSED at once, so batond closes it (one
        client lost, and logged, rather than the channel and every session with it)."""
        w = self.welcome
        if w is not None and w.flags & WELCOME_REFUSE:
            log.warning(
                "CONN %#x from %s arrived without its fd (out of file descriptors? raise the open "
                "files limit or lower capacity); refused: batond gives the client to another worker",
                info.id,
                info.client,
            )
            refused.append(info.id)
        else:
            log.error(
                "CONN %#x from %s arrived without its fd (out of file descriptors? raise the open "
                "files limit or lower capacity); batond does not know REFUSE (protocol 1.0): acked "
                "and reported closed, the client is disconnected",
                info.id,
                info.client,
            )
            unusable.append(info.id)

    def _on_drain(self, deadline_ms: int) -> None:
        """Driver: DRAIN. A later DRAIN (after a reload the old batond drains this worker and
        the new one drains it again when it re-registers) replaces the deadline, earlier or
        later: the batond that sent the latest enforces it (PROTOCOL.md, DRAIN)."""
        with self._cond:
            first = not self._draining
            self._draining = True
            self._drain_deadline = time.monotonic() + deadline_ms / 1000.0
        if first:
            log.info(
                "batond drains this worker: no new connections; %d live, deadline in %.1fs",
                self.live,
                deadline_ms / 1000.0,
            )
        self._notify()

    def _publish(self, conns: List[_Conn]) -> None:
        """Driver: acked connections go to the program (and batond may ask for them now)."""
        with self._cond:
            self._inflight -= len(conns)
            for sock, info in conns:
                if sock._baton_key in self._live:
                    self._by_id[info.id] = sock.session
        if self._closed:
            for sock, _ in conns:
                sock.close()
            return
        if self._mode == _MODE_ASYNCIO:
            cb = self._conn_cb
            for sock, info in conns:
                if cb is None:
                    sock.close()
                else:
                    cb(sock, info)
        else:
            with self._cond:
                self._accept_q.extend(conns)
                self._cond.notify_all()

    def _discard(self, conns: Optional[List[_Conn]]) -> None:
        """Driver: close connections that were never acked; batond still owns them."""
        if not conns:
            return
        with self._cond:
            self._inflight -= len(conns)
            for sock, _ in conns:
                self._live.pop(sock._baton_key, None)
        for sock, _ in conns:
            _silence(sock)
        self._notify()

    def _lost(self, why: BaseException) -> None:
        """Driver: the channel is gone: keep the sessions, re-register with backoff."""
        if self._chan is None:
            return
        self._drop_channel()
        if self._closed or self._stopping:
            return
        log.warning(
            "channel to batond lost (%s); keeping %d connection(s), re-registering",
            str(why) or type(why).__name__,
            self.live,
        )
        self._notify()
        self._schedule_reconnect()

    def _fatal_error(self, err: BaseException) -> None:
        """Driver: batond refused us for good: stop talking to it; sessions are kept."""
        log.error("%s; the error is final: not registering again (%d connection(s) kept)", err, self.live)
        with self._cond:
            self._fatal = err
            self._cond.notify_all()
        self._drop_channel()
        self._reconnect_due = None
        self._notify()

    def _drop_channel(self) -> None:
        """Driver: close the channel; unacked connections waiting in the send queue are
        closed unreported (batond still owns them)."""
        chan = self._chan
        self._chan = None
        if chan is not None:
            self._stop_io(chan)
            chan.close()
        pending = list(self._outq)
        self._outq.clear()
        for _, conns, cids, _unusable, hb in pending:  # an unsent ACK: batond still owns them all
            self._discard(conns)
            if cids:
                self._unreported.extend(cids)
            if hb is not None:  # an unsent HANDBACK: the session is still the program's
                hb.failed(ConnectionResetError(errno.ECONNRESET, "channel to batond lost before the HANDBACK was sent"))
        self._ready_sent = False
        self._lapse_rounds()

    def _registration_failed(self, e: BaseException) -> None:
        """Driver: one re-registration attempt failed."""
        if self._stopping or self._closed:
            return
        if isinstance(e, BatonError) and e.fatal:
            self._fatal_error(e)
            return
        lvl = logging.WARNING if self._backoff <= BACKOFF_MIN * 2 else logging.DEBUG
        log.log(lvl, "re-registration with batond failed: %s; retrying in %.1fs", e, self._backoff)
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        if self._mode == _MODE_ASYNCIO:
            assert self._loop is not None
            self._reconnect_task = self._loop.create_task(self._reconnect_async(delay))
        else:
            self._reconnect_due = time.monotonic() + delay

    def _stop_io(self, chan: socket.socket) -> None:
        if self._mode == _MODE_ASYNCIO and self._loop is not None and not self._loop.is_closed():
            fd = chan.fileno()
            if fd >= 0:
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)

    def _want_write(self, on: bool) -> None:
        if self._mode == _MODE_ASYNCIO and self._chan is not None:
            assert self._loop is not None
            if on:
                self._loop.add_writer(self._chan.fileno(), self._on_writable)
            else:
                self._loop.remove_writer(self._chan.fileno())
        # The channel thread derives its poll mask from _outq.

    # ---------------------------------------------------------------- driver: migration

    def _call(self, fn: Callable[[], None]) -> None:
        """Any thread: run ``fn`` in the driver (at once if this is the event loop's thread)."""
        if self._mode == _MODE_ASYNCIO and self._loop_thread == threading.get_ident():
            fn()
            return
        self._calls.append(fn)
        self._wake()

    def _on_migrate(self, m: Migrate) -> None:
        """Driver: MIGRATE. Mark the sessions named (every one held if none is) as asked, with
        their group and its size among them, and arm the deadline."""
        chan = self._chan
        assert chan is not None
        rnd = _Round(chan, time.monotonic() + m.deadline_ms / 1000.0)
        with self._cond:
            if m.ids:
                seen: Set[int] = set()
                for cid in m.ids:
                    sess = self._by_id.get(cid)
                    if sess is not None and cid not in seen:
                        seen.add(cid)
                        rnd.members.append(sess)
            else:
                rnd.members = list(self._by_id.values())
            sizes: Dict[str, int] = collections.Counter(x._group for x in rnd.members if x._group)
            for sess in rnd.members:
                # A session still pending from an earlier MIGRATE moves to this one.
                sess._ask = _Ask(rnd, sess._group, sizes.get(sess._group, 0))
        log.info("batond asks for sessions: %d asked (%d listed), deadline in %.1fs", len(rnd.members), len(m.ids), m.deadline_ms / 1000.0)
        if not rnd.members:
            return
        self._rounds.append(rnd)
        if self._mode == _MODE_ASYNCIO:
            assert self._loop is not None
            self._loop.call_later(m.deadline_ms / 1000.0, self._expire_rounds)
        for sess in rnd.members:
            sess._asked()

    def _answer(self, sess: _SessionBase) -> None:
        """Driver, with _cond held: the session's request is answered (or lapsed)."""
        sess._ask = None
        sess._answered()

    def _decline(self, sess: _SessionBase) -> None:
        """Driver: DECLINE the session, if it is still asked."""
        with self._cond:
            ask = sess._ask
            if ask is None:
                return
            self._answer(sess)
        if ask.round.chan is self._chan:
            self._send(encode_decline([sess.info.id]))

    def _expire_rounds(self) -> None:
        """Driver: decline, in one DECLINE, the sessions of requests past their deadline that
        the program did not answer."""
        now = time.monotonic()
        ids: List[int] = []
        with self._cond:
            kept = []
            for rnd in self._rounds:
                if now < rnd.deadline:
                    kept.append(rnd)
                    continue
                for sess in rnd.members:
                    if sess._ask is not None and sess._ask.round is rnd:
                        self._answer(sess)
                        ids.append(sess.info.id)
            self._rounds = kept
        if ids:
            log.info("%d session(s) not handed back by the deadline: declined (they stay here)", len(ids))
            for i in range(0, len(ids), MAX_IDS):
                self._send(encode_decline(ids[i : i + MAX_IDS]))

    def _lapse_rounds(self) -> None:
        """Driver: the channel the requests came on is gone; so are they (the next batond knows
        nothing of them, and a HANDBACK on the next channel would answer a MIGRATE it never sent)."""
        with self._cond:
            for rnd in self._rounds:
                for sess in rnd.members:
                    if sess._ask is not None and sess._ask.round is rnd:
                        self._answer(sess)
            self._rounds = []

    def _handback(
        self, sess: _SessionBase, sock: BatonSocket, state: bytes, finish: Callable[[Optional[BaseException]], None]
    ) -> None:
        """Driver: send the session's HANDBACK with its socket; ``finish`` learns the outcome."""
        with self._cond:
            ask = sess._ask
            if ask is None or ask.round.chan is not self._chan or self._chan is None:
                finish(NotAsked("batond has not asked for connection %#x (or the request lapsed)" % sess.info.id))
                return
            self._answer(sess)
        if time.monotonic() >= ask.round.deadline:
            self._send(encode_decline([sess.info.id]))  # batond counts it declined already
            finish(NotAsked("connection %#x: the deadline passed; declined (it stays here)" % sess.info.id))
            return
        if sock.fileno() < 0:
            self._send(encode_decline([sess.info.id]))
            finish(NotAsked("connection %#x is closed" % sess.info.id))
            return
        info = sess.info
        hops = info.resumed.hops if info.resumed is not None else 0
        try:
            msg = encode_handback(Handback(ConnInfo(info.id, info.client, info.local, info.listener), hops, ask.group, ask.size, state))
        except (ValueError, BatonException) as e:  # checked by the caller; kept safe anyway
            self._send(encode_decline([sess.info.id]))
            finish(e)
            return
        self._send(msg, hb=_HandbackJob(sess, sock, finish))

    def _handed_back(self, hb: "_HandbackJob") -> None:
        """Driver: the HANDBACK is in the channel: batond owns the socket. Forget the session
        (no CLOSED: the HANDBACK counts as one); the caller closes our descriptor."""
        sock = hb.sock
        with self._cond:
            self._live.pop(sock._baton_key, None)
            self._by_id.pop(hb.sess.info.id, None)
        fin = sock._baton_done
        if fin is not None:
            fin.detach()
        sock._baton_done = None
        hb.finish(None)
        self._notify()

    # ---------------------------------------------------------------- driver: thread mode

    def _register_initial_blocking(self) -> Tuple[socket.socket, Welcome]:
        deadline = time.monotonic() + self._register_timeout
        delay = BACKOFF_MIN
        while True:
            try:
                sock = self._connect()
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError, InterruptedError) as e:
                if time.monotonic() + delay >= deadline:
                    raise RegistrationError("cannot reach batond at %s: %s" % (self._path, e)) from e
                log.debug("batond at %s not reachable yet (%s); retrying", self._path, e)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            except OSError as e:
                raise RegistrationError("cannot connect to batond at %s: %s" % (self._path, e)) from e
            try:
                return sock, self._wait_welcome_blocking(sock, deadline)
            except BaseException:
                sock.close()
                raise

    def _wait_welcome_blocking(self, sock: socket.socket, deadline: float) -> Welcome:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        if self._thread is not None:
            poller.register(self._wake_r, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RegistrationError("batond did not answer HELLO within %.1fs" % self._register_timeout)
            for fd, _ in poller.poll(int(left * 1000) + 1):
                if fd == self._wake_r:
                    self._service()
                    if self._stopping:
                        raise RegistrationError("worker closed during registration")
            try:
                return self._read_welcome(sock)
            except (BlockingIOError, InterruptedError):
                continue

    def _thread_main(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        cur_fd, cur_mask = -1, 0
        try:
            while not self._stopping:
                chan = self._chan
                timeout_ms: Optional[int] = None
                if chan is not None:
                    fd = chan.fileno()
                    mask = select.POLLIN | (select.POLLOUT if self._outq else 0)
                else:
                    fd, mask = -1, 0
                    if self._reconnect_due is not None:
                        timeout_ms = max(0, int((self._reconnect_due - time.monotonic()) * 1000) + 1)
                if self._rounds:
                    due = max(0, int((min(r.deadline for r in self._rounds) - time.monotonic()) * 1000) + 1)
                    timeout_ms = due if timeout_ms is None else min(timeout_ms, due)
                if fd != cur_fd:
                    if cur_fd >= 0:
                        try:
                            poller.unregister(cur_fd)
                        except KeyError:
                            pass
                    if fd >= 0:
                        poller.register(fd, mask)
                    cur_fd, cur_mask = fd, mask
                elif fd >= 0 and mask != cur_mask:
                    poller.modify(fd, mask)
                    cur_mask = mask
                for efd, ev in poller.poll(timeout_ms):
                    if efd == self._wake_r:
                        self._service()
                    elif chan is not None and self._chan is chan and efd == fd:
                        if ev & select.POLLOUT:
                            self._on_writable()
                        if self._chan is chan and ev & (select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLNVAL):
                            self._on_readable()
                if self._rounds:
                    self._expire_rounds()
                if (
                    self._chan is None
                    and self._reconnect_due is not None
                    and not self._stopping
                    and time.monotonic() >= self._reconnect_due
                ):
                    self._reconnect_due = None
                    self._reregister_blocking()
        except BaseException as e:  # a bug: make it visible to accept() rather than hang
            log.exception("baton_worker channel thread failed")
            with self._cond:
                if self._fatal is None:
                    self._fatal = RegistrationError("baton_worker channel thread failed: %r" % e)
                self._cond.notify_all()
        finally:
            self._service()
            self._drop_channel()

    def _reregister_blocking(self) -> None:
        try:
            sock = self._connect()
        except OSError as e:
            self._registration_failed(e)
            return
        try:
            w = self._wait_welcome_blocking(sock, time.monotonic() + self._register_timeout)
        except BaseException as e:
            sock.close()
            if isinstance(e, (BatonException, OSError)):
                self._registration_failed(e)
                return
            raise
        self._attach(sock, w)

    # ---------------------------------------------------------------- driver: asyncio mode

    async def _start_async(
        self,
        on_conn: Callable[[BatonSocket, ConnInfo], None],
        on_state: Callable[[], None],
    ) -> None:
        """Register from the running event loop (used by :func:`start_server`)."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._mode is not None:
                raise RuntimeError("worker already started")
            if self._closed:
                raise WorkerClosed("worker is closed")
            self._mode = _MODE_ASYNCIO
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._conn_cb = on_conn
        self._state_cb = on_state
        loop.add_reader(self._wake_r, self._service)
        if self._path is None:
            return
        try:
            sock, w = await self._register_initial_async()
        except BaseException:
            loop.remove_reader(self._wake_r)
            with self._cond:
                self._mode = None
            raise
        self._attach(sock, w)

    async def _wait_readable(self, sock: socket.socket, timeout: float) -> None:
        assert self._loop is not None
        fut = self._loop.create_future()
        fd = sock.fileno()

        def on_ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_reader(fd, on_ready)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RegistrationError("batond did not answer HELLO within %.1fs" % self._register_timeout) from None
        finally:
            self._loop.remove_reader(fd)

    async def _welcome_async(self, sock: socket.socket, deadline: float) -> Welcome:
        while True:
            await self._wait_readable(sock, max(0.0, deadline - time.monotonic()))
            try:
                return self._read_welcome(sock)
            except (BlockingIOError, InterruptedError):
                continue

    async def _register_initial_async(self) -> Tuple[socket.socket, Welcome]:
        deadline = time.monotonic() + self._register_timeout
        delay = BACKOFF_MIN
        while True:
            try:
                sock = self._connect()
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError, InterruptedError) as e:
                if time.monotonic() + delay >= deadline:
                    raise RegistrationError("cannot reach batond at %s: %s" % (self._path, e)) from e
                log.debug("batond at %s not reachable yet (%s); retrying", self._path, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            except OSError as e:
                raise RegistrationError("cannot connect to batond at %s: %s" % (self._path, e)) from e
            try:
                return sock, await self._welcome_async(sock, deadline)
            except BaseException:
                sock.close()
                raise

    async def _reconnect_async(self, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            return
        if self._closed or self._stopping or self._fatal is not None or self._chan is not None:
            return
        try:
            sock = self._connect()
        except OSError as e:
            self._registration_failed(e)
            return
        try:
            w = await self._welcome_async(sock, time.monotonic() + self._register_timeout)
        except asyncio.CancelledError:
            sock.close()
            return
        except (BatonException, OSError) as e:
            sock.close()
            self._registration_failed(e)
            return
        except BaseException:
            sock.close()
            raise
        if self._closed or self._stopping:
            sock.close()
            return
        self._attach(sock, w)

    def _shutdown_async(self) -> None:
        """Driver (loop thread): report what ended, close the channel, stop re-registering."""
        self._stopping = True
        loop = self._loop
        self._service()
        task = self._reconnect_task
        if task is not None and not task.done():
            task.cancel()
        self._drop_channel()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._wake_r)
        self._loop_thread = None
        self._notify()


class _HandbackJob:
    """A HANDBACK on its way: the session, its socket (whose fd travels with the message) and
    who learns the outcome."""

    __slots__ = ("sess", "sock", "finish")

    def __init__(self, sess: _SessionBase, sock: BatonSocket, finish: Callable[[Optional[BaseException]], None]) -> None:
        self.sess = sess
        self.sock = sock
        self.finish = finish

    def failed(self, err: BaseException) -> None:
        self.finish(err)


def _send_on(chan: socket.socket, data: bytes, hb: Optional[_HandbackJob]) -> None:
    """One message on the channel; a HANDBACK with its socket's fd as SCM_RIGHTS."""
    if hb is None:
        chan.send(data, _SEND_FLAGS)
        return
    fds = array.array("i", [hb.sock.fileno()])
    chan.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], _SEND_FLAGS)


def _send_error(sock: socket.socket, e: ProtocolError) -> None:
    """Best effort: tell the peer why we hang up."""
    try:
        sock.send(encode_error(e.code, str(e)), _SEND_FLAGS)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# asyncio API
# --------------------------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Union[Awaitable[None], None]]
_DEFAULT_LIMIT = 2**16


class Server:
    """The asyncio face of a :class:`Worker`, returned by :func:`start_server`.

    It hands each connection from ``batond`` to the handler as ``(reader, writer)``, exactly
    like :func:`asyncio.start_server`, and closes the connection when the handler returns or
    raises (the exception is logged). :meth:`serve_forever` returns once ``batond`` has drained
    this worker and its last connection has ended: the worker's cue to exit.
    """

    def __init__(
        self,
        worker: Worker,
        handler: Handler,
        *,
        limit: int = _DEFAULT_LIMIT,
        close_timeout: float = 10.0,
    ) -> None:
        self.worker = worker
        self._handler = handler
        self._limit = limit
        self._close_timeout = close_timeout
        self._loop = asyncio.get_running_loop()
        self._tasks: Set[asyncio.Task] = set()
        self._waiters: List[asyncio.Future] = []
        self._tcp: Optional[asyncio.AbstractServer] = None
        self._fallback_live = 0
        self._closed = False

    async def _start(self, ready: bool) -> None:
        w = self.worker
        await w._start_async(self._on_conn, self._state_changed)
        if w._fallback is not None:
            self._tcp = await asyncio.start_server(self._on_tcp, w._fallback[0], w._fallback[1], limit=self._limit)
            addrs = ", ".join("%s:%d" % s.getsockname()[:2] for s in self._tcp.sockets or ())
            log.warning("not started by batond: listening on %s myself (fallback)", addrs)
        if ready:
            self.ready()

    # ---------------------------------------------------------------- state

    @property
    def live(self) -> int:
        """Client connections being served."""
        return self.worker.live if self._tcp is None else self._fallback_live

    @property
    def draining(self) -> bool:
        """True once ``batond`` sent ``DRAIN``."""
        return self.worker.draining

    @property
    def sockets(self) -> Tuple[socket.socket, ...]:
        """The fallback listener's sockets (empty under ``batond``)."""
        return tuple(self._tcp.sockets) if self._tcp is not None and self._tcp.sockets else ()

    def is_serving(self) -> bool:
        """True while new connections may arrive (not closed, not draining)."""
        return not self._closed and not self.worker.draining and self.worker._fatal is None

    def ready(self) -> None:
        """Send ``READY`` (done by :func:`start_server` unless ``ready=False``)."""
        w = self.worker
        with w._cond:
            w._ready_wanted = True
        w._service()

    def close(self) -> None:
        """Stop: close the fallback listener or the channel to ``batond``. Running handlers
        keep going (cancel them yourself, or let ``asyncio.run`` do it)."""
        if self._closed:
            return
        self._closed = True
        if self._tcp is not None:
            self._tcp.close()
        self.worker.close()
        self._state_changed()

    async def wait_closed(self) -> None:
        """Wait until the fallback listener is closed."""
        if self._tcp is not None:
            await self._tcp.wait_closed()

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()

    async def _until(self, pred: Callable[[], bool], raise_fatal: bool = True) -> None:
        while True:
            fatal = self.worker._fatal
            if fatal is not None and raise_fatal:
                raise fatal
            if pred():
                return
            fut = self._loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    async def serve_forever(self) -> None:
        """Serve until ``batond`` has drained this worker and the last connection has ended
        (then return: exit the process), or until :meth:`close`. Raises the :class:`BatonError`
        with which ``batond`` refused this worker for good (a final code: ``VERSION``,
        ``TOKEN``, ``PEER``, ``SLOT``); the module registers no more, but the connections
        being served go on: ``await wait_idle()`` before exiting to let them end."""
        await self._until(lambda: self._closed or (self.worker.draining and self.live == 0))

    wait_drained = serve_forever

    async def wait_draining(self) -> None:
        """Wait until ``DRAIN`` arrives (or :meth:`close`)."""
        await self._until(lambda: self._closed or self.worker.draining)

    async def wait_idle(self) -> None:
        """Wait until no connection is being served. Unlike the other waits it does not raise
        a final :class:`BatonError`: it is how a refused worker lets its sessions end."""
        await self._until(lambda: self.live == 0, raise_fatal=False)

    def _state_changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # ---------------------------------------------------------------- connections

    def _on_conn(self, sock: BatonSocket, info: ConnInfo) -> None:
        if self._closed:
            sock.close()
            return
        task = self._loop.create_task(self._serve(sock, info))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: BatonSocket, info: ConnInfo) -> None:
        _current_conn.set(info)
        loop = self._loop
        try:
            reader = asyncio.StreamReader(limit=self._limit, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=sock)
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception:
            log.exception("cannot set up connection %#x from %s", info.id, info.client)
            sock.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        sess = sock.session
        sess._transport, sess._writer = transport, writer
        _current_session.set(sess)
        await self._run(reader, writer, info)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        info = ConnInfo(
            id=0,
            client=tuple(peer[:2]) if peer else None,  # type: ignore[arg-type]
            local=tuple(local[:2]) if local else None,  # type: ignore[arg-type]
            listener="fallback",
        )
        _current_conn.set(info)
        sess = AsyncSession(self.worker, info)  # never asked: no batond here
        sess._transport, sess._writer = writer.transport, writer  # type: ignore[assignment]
        _current_session.set(sess)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._fallback_live += 1
        try:
            await self._run(reader, writer, info)
        finally:
            self._fallback_live -= 1
            if task is not None:
                self._tasks.discard(task)
            self._state_changed()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: ConnInfo) -> None:
        try:
            res = self._handler(reader, writer)
            if inspect.isawaitable(res):
                await res
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception:
            log.exception("handler failed on connection %#x from %s; closing it", info.id, info.client)
        # Close, giving buffered output close_timeout to leave, then reset. A timer rather than
        # asyncio.wait_for, which wraps the wait in a task of its own: one loop iteration and
        # a few objects more per connection, and usually the handler has closed it already.
        transport = writer.transport
        timer = self._loop.call_later(self._close_timeout, transport.abort)
        try:
            writer.close()
            await writer.wait_closed()
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception:
            transport.abort()
        finally:
            timer.cancel()


async def start_server(
    handler: Handler,
    *,
    capacity: int = 0,
    fallback: Optional[Tuple[str, int]] = None,
    env: Optional[Mapping[str, str]] = None,
    limit: int = _DEFAULT_LIMIT,
    register_timeout: float = 10.0,
    close_timeout: float = 10.0,
    ready: bool = True,
    migrate: bool = False,
) -> Server:
    """Register with ``batond`` and serve each handed-over connection with ``handler``.

    ``handler(reader, writer)`` is called exactly as by :func:`asyncio.start_server` (a
    coroutine function or a plain function); when it returns or raises, the connection is
    closed (waiting up to ``close_timeout`` for buffered data to be sent) and reported to
    ``batond``. ``limit`` is the :class:`asyncio.StreamReader` buffer limit. With ``ready=True``
    the worker reports ``READY`` at once. ``capacity``, ``fallback``, ``env`` and
    ``register_timeout`` are as for :class:`Worker`. With ``migrate=True`` the worker takes
    part in live session migration: see :class:`AsyncSession` (:func:`session` in the handler).

    Raises :class:`NotUnderBaton` (no ``BATON_SOCKET`` and no fallback), :class:`ConfigError`,
    :class:`BatonError` (``batond`` refused the registration) or :class:`RegistrationError`.
    """
    worker = Worker(capacity, fallback=fallback, env=env, register_timeout=register_timeout, start=False, migrate=migrate)
    server = Server(worker, handler, limit=limit, close_timeout=close_timeout)
    try:
        await server._start(ready)
    except BaseException:
        worker.close()
        raise
    return server
