package handoff

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"
	"unicode/utf8"
)

// Version is the protocol version this package speaks.
const Version = 1

// MaxMessage is the largest message, header included, that either side may send.
const MaxMessage = 4096

// HeaderLen is the size of the fixed header in front of every message body.
const HeaderLen = 4

// MaxString is the longest str field.
const MaxString = 1024

// MaxIDs is the most connection ids one ACK or CLOSED carries.
const MaxIDs = (MaxMessage - HeaderLen - 2) / 8

// Type is a message type (PROTOCOL.md, "Messages").
type Type uint8

// Message types.
const (
	TypeHello   Type = 0x01
	TypeWelcome Type = 0x02
	TypeError   Type = 0x03
	TypeReady   Type = 0x04
	TypeAck     Type = 0x05
	TypeClosed  Type = 0x06
	TypePing    Type = 0x07
	TypePong    Type = 0x08
	TypeConn    Type = 0x09
	TypeDrain   Type = 0x0A
	TypeRefuse  Type = 0x0B // 1.1: only to a gateway whose WELCOME has WelcomeRefuse
	TypeConns   Type = 0x0C // 1.2: only to a worker whose WELCOME has WelcomeBatch
	// 1.4, only where WELCOME has WelcomeMigrate (migrate.go):
	TypeMigrate  Type = 0x0D // gateway → worker: hand these sessions back
	TypeHandback Type = 0x0E // worker → gateway: one session, its socket and its state
	TypeDecline  Type = 0x0F // worker → gateway: sessions it keeps
	TypeResume   Type = 0x10 // gateway → worker: a CONN carrying a migrated session's state

	// TypeOptional is the first optional type: receivers ignore unknown types at or above it.
	TypeOptional Type = 0x80
)

var typeNames = [...]string{
	TypeHello: "HELLO", TypeWelcome: "WELCOME", TypeError: "ERROR", TypeReady: "READY",
	TypeAck: "ACK", TypeClosed: "CLOSED", TypePing: "PING", TypePong: "PONG",
	TypeConn: "CONN", TypeDrain: "DRAIN", TypeRefuse: "REFUSE", TypeConns: "CONNS",
	TypeMigrate: "MIGRATE", TypeHandback: "HANDBACK", TypeDecline: "DECLINE", TypeResume: "RESUME",
}

func (t Type) String() string {
	if int(t) < len(typeNames) && typeNames[t] != "" {
		return typeNames[t]
	}
	return fmt.Sprintf("type(0x%02x)", uint8(t))
}

// Known reports whether this package knows t.
func (t Type) Known() bool { return int(t) < len(typeNames) && typeNames[t] != "" }

// Optional reports whether a receiver that does not know t must ignore it.
func (t Type) Optional() bool { return t >= TypeOptional }

// Sentinel errors. Decoders wrap ErrMalformed; Channel.Recv returns ErrTruncated and ErrFDs.
var (
	ErrMalformed = errors.New("handoff: malformed message")
	ErrTruncated = errors.New("handoff: message or its fds truncated")
	// ErrNoFD: a CONN arrived whole but the kernel could not give its fd to this process (out
	// of descriptors: recvmsg reported MSG_CTRUNC with no fd). Recv returns the message with it.
	ErrNoFD   = errors.New("handoff: CONN arrived without its fd (out of file descriptors?)")
	ErrFDs    = errors.New("handoff: wrong number of fds for message")
	ErrTooBig = errors.New("handoff: message exceeds MaxMessage")
)

// HelloFlags are the flags of a HELLO.
type HelloFlags uint32

// HELLO flags.
const (
	HelloReady    HelloFlags = 1 << 0 // already serving (re-registration after READY)
	HelloDraining HelloFlags = 1 << 1 // told to drain before the channel dropped
	HelloNonblock HelloFlags = 1 << 2 // asks for CONN fds in non-blocking mode
	HelloBatch    HelloFlags = 1 << 3 // takes CONNS: several connections, and fds, in one message
	HelloMigrate  HelloFlags = 1 << 4 // answers MIGRATE and takes RESUME (1.4)
)

// WelcomeFlags are the flags of a WELCOME: what the gateway granted of what HELLO asked.
type WelcomeFlags uint32

// WELCOME flags.
const (
	// WelcomeNonblock: every CONN fd on this channel arrives with O_NONBLOCK set. Without it
	// (an older gateway sends no flags at all) fds arrive blocking.
	WelcomeNonblock WelcomeFlags = 1 << 0
	// WelcomeRefuse: the gateway understands REFUSE (a CONN whose fd the worker could not
	// receive goes to another worker). Without it a worker acks such a CONN and reports it
	// CLOSED at once.
	WelcomeRefuse WelcomeFlags = 1 << 1
	// WelcomeBatch: the gateway may send CONNS (granted to a HELLO with HelloBatch).
	WelcomeBatch WelcomeFlags = 1 << 2
	// WelcomeMigrate (1.4): the gateway may send MIGRATE and RESUME, and reads HANDBACK and
	// DECLINE (granted to a HELLO with HelloMigrate).
	WelcomeMigrate WelcomeFlags = 1 << 3
)

// MaxConns is the most connections (and so fds) one CONNS carries. Past 16 fds a message,
// sendmsg's and recvmsg's fixed cost per message is already small next to the per-fd cost.
const MaxConns = 16

// Hello is the worker's first message.
type Hello struct {
	MinVersion, MaxVersion uint16
	PID                    uint32
	Slot                   uint32
	Generation             uint64
	Capacity               uint32
	Flags                  HelloFlags
	Live                   uint32
	Token                  string
}

// Welcome accepts a HELLO.
type Welcome struct {
	Version      uint16
	PingInterval time.Duration // encoded in whole milliseconds
	Generation   uint64        // the gateway's current generation
	Flags        WelcomeFlags  // appended in 1.1; absent (0) from older gateways
}

// ErrorCode is the machine-readable part of an ERROR.
type ErrorCode uint16

// ERROR codes (PROTOCOL.md, "Errors").
const (
	CodeVersion     ErrorCode = 1
	CodeToken       ErrorCode = 2
	CodePeer        ErrorCode = 3
	CodeMalformed   ErrorCode = 4
	CodeUnexpected  ErrorCode = 5
	CodeTooBig      ErrorCode = 6
	CodeUnknownType ErrorCode = 7
	CodeFDs         ErrorCode = 8
	CodeSlot        ErrorCode = 9
	CodeShutdown    ErrorCode = 10
	CodeStalled     ErrorCode = 11
)

var codeNames = [...]string{
	CodeVersion: "VERSION", CodeToken: "TOKEN", CodePeer: "PEER", CodeMalformed: "MALFORMED",
	CodeUnexpected: "UNEXPECTED", CodeTooBig: "TOO_BIG", CodeUnknownType: "UNKNOWN_TYPE",
	CodeFDs: "FDS", CodeSlot: "SLOT", CodeShutdown: "SHUTDOWN", CodeStalled: "STALLED",
}

func (c ErrorCode) String() string {
	if int(c) < len(codeNames) && codeNames[c] != "" {
		return codeNames[c]
	}
	return fmt.Sprintf("code(%d)", uint16(c))
}

// Error is an ERROR message; it is also a Go error, so a peer's rejection can be returned as is.
type Error struct {
	Code   ErrorCode
	Reason string
}

func (e *Error) Error() string { return fmt.Sprintf("handoff: %s: %s", e.Code, e.Reason) }

// ConnInfo is the metadata of a CONN.
type ConnInfo struct {
	ID       uint64
	Client   netip.AddrPort // zero if unknown
	Local    netip.AddrPort
	Listener string
}

// Drain is a DRAIN message.
type Drain struct {
	Deadline time.Duration // encoded in whole milliseconds
}

var le = binary.LittleEndian

// begin appends a header with a zero length; finish fills the length in.
func begin(b []byte, t Type) ([]byte, int) {
	start := len(b)
	return append(b, byte(t), 0, 0, 0), start
}

func finish(b []byte, start int) []byte {
	le.PutUint16(b[start+2:], uint16(len(b)-start-HeaderLen))
	return b
}

func appendStr(b []byte, s string) []byte {
	if len(s) > MaxString {
		// Cut at a character boundary: a receiver may check that the string is UTF-8.
		n := MaxString
		for n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
		s = s[:n]
	}
	b = le.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func appendAddr(b []byte, a netip.AddrPort) []byte {
	ip := a.Addr()
	switch {
	case ip.Is4():
		b = append(b, 4)
		b = le.AppendUint16(b, a.Port())
		v := ip.As4()
		return append(b, v[:]...)
	case ip.Is6():
		if ip.Is4In6() {
			return appendAddr(b, netip.AddrPortFrom(ip.Unmap(), a.Port()))
		}
		b = append(b, 6)
		b = le.AppendUint16(b, a.Port())
		v := ip.As16()
		return append(b, v[:]...)
	default:
		return append(b, 0)
	}
}

// AppendHello appends an encoded HELLO to b.
func AppendHello(b []byte, h *Hello) []byte {
	b, s := begin(b, TypeHello)
	b = le.AppendUint16(b, h.MinVersion)
	b = le.AppendUint16(b, h.MaxVersion)
	b = le.AppendUint32(b, h.PID)
	b = le.AppendUint32(b, h.Slot)
	b = le.AppendUint64(b, h.Generation)
	b = le.AppendUint32(b, h.Capacity)
	b = le.AppendUint32(b, uint32(h.Flags))
	b = le.AppendUint32(b, h.Live)
	b = appendStr(b, h.Token)
	return finish(b, s)
}

// AppendWelcome appends an encoded WELCOME to b.
func AppendWelcome(b []byte, w *Welcome) []byte {
	b, s := begin(b, TypeWelcome)
	b = le.AppendUint16(b, w.Version)
	b = le.AppendUint16(b, 0)
	b = le.AppendUint32(b, uint32(w.PingInterval/time.Millisecond))
	b = le.AppendUint64(b, w.Generation)
	b = le.AppendUint32(b, uint32(w.Flags))
	return finish(b, s)
}

// AppendError appends an encoded ERROR to b.
func AppendError(b []byte, e *Error) []byte {
	b, s := begin(b, TypeError)
	b = le.AppendUint16(b, uint16(e.Code))
	b = appendStr(b, e.Reason)
	return finish(b, s)
}

// AppendEmpty appends a message without a body (READY).
func AppendEmpty(b []byte, t Type) []byte {
	b, s := begin(b, t)
	return finish(b, s)
}

// AppendIDs appends an ACK or CLOSED carrying ids (at most MaxIDs; the caller batches).
func AppendIDs(b []byte, t Type, ids []uint64) []byte {
	if len(ids) > MaxIDs {
		ids = ids[:MaxIDs]
	}
	b, s := begin(b, t)
	b = le.AppendUint16(b, uint16(len(ids)))
	for _, id := range ids {
		b = le.AppendUint64(b, id)
	}
	return finish(b, s)
}

// AppendNonce appends a PING or PONG.
func AppendNonce(b []byte, t Type, nonce uint64) []byte {
	b, s := begin(b, t)
	b = le.AppendUint64(b, nonce)
	return finish(b, s)
}

// AppendConn appends a CONN (its fd travels separately, see Channel.TrySend).
func AppendConn(b []byte, c *ConnInfo) []byte {
	b, s := begin(b, TypeConn)
	b = appendConnFields(b, c)
	return finish(b, s)
}

// ConnEntryLen is the room c takes in a CONNS body, its length prefix included: a sender keeps
// HeaderLen + 2 + the entries' sum within MaxMessage.
func ConnEntryLen(c *ConnInfo) int {
	return 2 + 8 + addrLen(c.Client) + addrLen(c.Local) + 2 + min(len(c.Listener), MaxString)
}

// ConnsOverhead is the room a CONNS takes besides its entries (header and count).
const ConnsOverhead = HeaderLen + 2

func addrLen(a netip.AddrPort) int {
	ip := a.Addr()
	switch {
	case ip.Is4(), ip.Is4In6():
		return 1 + 2 + 4
	case ip.Is6():
		return 1 + 2 + 16
	}
	return 1
}

// AppendConns appends a CONNS carrying n connections (1..MaxConns), info(i) being the i-th;
// their fds travel separately, in the same order (see Channel.TrySendFDs). The caller keeps
// the message within MaxMessage (ConnsOverhead plus each ConnEntryLen).
func AppendConns(b []byte, n int, info func(i int) *ConnInfo) []byte {
	b, s := begin(b, TypeConns)
	b = le.AppendUint16(b, uint16(n))
	for i := 0; i < n; i++ {
		c := info(i)
		at := len(b)
		b = append(b, 0, 0)
		b = appendConnFields(b, c)
		le.PutUint16(b[at:], uint16(len(b)-at-2))
	}
	return finish(b, s)
}

// ConnsCount returns the count of a CONNS message (header included), or 0 if msg is too short
// to say: the number of fds it must carry.
func ConnsCount(msg []byte) int {
	if len(msg) < ConnsOverhead || Type(msg[0]) != TypeConns {
		return 0
	}
	return int(le.Uint16(msg[HeaderLen:]))
}

// ParseConns decodes a CONNS body, appending its connections to dst (pass a reused slice).
// Each entry is a CONN body behind a u16 length; bytes after the fields an entry's decoder
// knows, and after the last entry, are ignored (room for new fields).
func ParseConns(dst []ConnInfo, body []byte) ([]ConnInfo, error) {
	r := reader{b: body, msg: TypeConns}
	n := int(r.u16("count"))
	if r.err != nil {
		return dst, r.err
	}
	if n == 0 || n > MaxConns {
		return dst, fmt.Errorf("%w: CONNS count %d not in 1..%d", ErrMalformed, n, MaxConns)
	}
	for i := 0; i < n; i++ {
		l := int(r.u16("entry length"))
		e := r.bytes(l, "entry")
		if r.err != nil {
			return dst, fmt.Errorf("%w (entry %d of %d)", r.err, i+1, n)
		}
		dst = append(dst, ConnInfo{})
		if err := ParseConn(e, &dst[len(dst)-1]); err != nil {
			return dst[:len(dst)-1], fmt.Errorf("%w (entry %d of %d)", err, i+1, n)
		}
	}
	return dst, nil
}

// AppendDrain appends a DRAIN.
func AppendDrain(b []byte, d *Drain) []byte {
	b, s := begin(b, TypeDrain)
	b = le.AppendUint32(b, uint32(d.Deadline/time.Millisecond))
	return finish(b, s)
}

// Split checks a message's header against its length and returns its type and body.
func Split(msg []byte) (Type, []byte, error) {
	if len(msg) < HeaderLen {
		return 0, nil, fmt.Errorf("%w: %d bytes, shorter than the header", ErrMalformed, len(msg))
	}
	if len(msg) > MaxMessage && (len(msg) > MaxLargeMessage || !Type(msg[0]).Large()) {
		return 0, nil, fmt.Errorf("%w: %d bytes", ErrTooBig, len(msg))
	}
	n := int(le.Uint16(msg[2:]))
	if n != len(msg)-HeaderLen {
		return 0, nil, fmt.Errorf("%w: header says %d body bytes, message has %d", ErrMalformed, n, len(msg)-HeaderLen)
	}
	return Type(msg[0]), msg[HeaderLen:], nil
}

// reader decodes fields in order; the first short read sets err and all later reads return zero.
type reader struct {
	b   []byte
	err error
	msg Type
}

func (r *reader) short(field string) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: %s body too short for %s", ErrMalformed, r.msg, field)
	}
	r.b = nil
}

func (r *reader) u8(field string) uint8 {
	if len(r.b) < 1 {
		r.short(field)
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *reader) u16(field string) uint16 {
	if len(r.b) < 2 {
		r.short(field)
		return 0
	}
	v := le.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

// optU32 reads a field appended by a later revision: absent (an older sender) reads as 0.
func (r *reader) optU32() uint32 {
	if r.err != nil || len(r.b) < 4 {
		return 0
	}
	v := le.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

func (r *reader) u32(field string) uint32 {
	if len(r.b) < 4 {
		r.short(field)
		return 0
	}
	v := le.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

func (r *reader) u64(field string) uint64 {
	if len(r.b) < 8 {
		r.short(field)
		return 0
	}
	v := le.Uint64(r.b)
	r.b = r.b[8:]
	return v
}

func (r *reader) bytes(n int, field string) []byte {
	if len(r.b) < n {
		r.short(field)
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) str(field string) string {
	n := int(r.u16(field))
	if r.err == nil && n > MaxString {
		r.err = fmt.Errorf("%w: %s %s is %d bytes, more than %d", ErrMalformed, r.msg, field, n, MaxString)
		return ""
	}
	return string(r.bytes(n, field))
}

func (r *reader) addr(field string) netip.AddrPort {
	switch fam := r.u8(field); fam {
	case 0:
		return netip.AddrPort{}
	case 4:
		port := r.u16(field)
		var a [4]byte
		copy(a[:], r.bytes(4, field))
		return netip.AddrPortFrom(netip.AddrFrom4(a), port)
	case 6:
		port := r.u16(field)
		var a [16]byte
		copy(a[:], r.bytes(16, field))
		return netip.AddrPortFrom(netip.AddrFrom16(a), port)
	default:
		if r.err == nil {
			r.err = fmt.Errorf("%w: %s %s has address family %d", ErrMalformed, r.msg, field, fam)
		}
		return netip.AddrPort{}
	}
}

// ParseHello decodes a HELLO body.
func ParseHello(body []byte) (Hello, error) {
	r := reader{b: body, msg: TypeHello}
	h := Hello{
		MinVersion: r.u16("min_version"),
		MaxVersion: r.u16("max_version"),
		PID:        r.u32("pid"),
		Slot:       r.u32("slot"),
		Generation: r.u64("generation"),
		Capacity:   r.u32("capacity"),
		Flags:      HelloFlags(r.u32("flags")),
		Live:       r.u32("live"),
		Token:      r.str("token"),
	}
	return h, r.err
}

// ParseWelcome decodes a WELCOME body.
func ParseWelcome(body []byte) (Welcome, error) {
	r := reader{b: body, msg: TypeWelcome}
	w := Welcome{Version: r.u16("version")}
	r.u16("reserved")
	w.PingInterval = time.Duration(r.u32("ping_interval_ms")) * time.Millisecond
	w.Generation = r.u64("generation")
	w.Flags = WelcomeFlags(r.optU32())
	return w, r.err
}

// ParseError decodes an ERROR body.
func ParseError(body []byte) (*Error, error) {
	r := reader{b: body, msg: TypeError}
	e := &Error{Code: ErrorCode(r.u16("code")), Reason: r.str("reason")}
	return e, r.err
}

// ParseIDs decodes an ACK, CLOSED or REFUSE body, appending its ids to dst (pass a reused slice to
// decode without allocating).
func ParseIDs(dst []uint64, t Type, body []byte) ([]uint64, error) {
	r := reader{b: body, msg: t}
	n := int(r.u16("count"))
	if r.err != nil {
		return dst, r.err
	}
	if n == 0 || n > MaxIDs {
		return dst, fmt.Errorf("%w: %s count %d not in 1..%d", ErrMalformed, t, n, MaxIDs)
	}
	if len(r.b) < 8*n {
		return dst, fmt.Errorf("%w: %s count %d needs %d bytes, body has %d", ErrMalformed, t, n, 8*n, len(r.b))
	}
	for i := 0; i < n; i++ {
		dst = append(dst, le.Uint64(r.b[8*i:]))
	}
	return dst, nil
}

// ParseNonce decodes a PING or PONG body.
func ParseNonce(t Type, body []byte) (uint64, error) {
	r := reader{b: body, msg: t}
	v := r.u64("nonce")
	return v, r.err
}

// ParseConn decodes a CONN body into c.
func ParseConn(body []byte, c *ConnInfo) error {
	r := reader{b: body, msg: TypeConn}
	r.conn(c)
	return r.err
}

// ParseDrain decodes a DRAIN body.
func ParseDrain(body []byte) (Drain, error) {
	r := reader{b: body, msg: TypeDrain}
	d := Drain{Deadline: time.Duration(r.u32("deadline_ms")) * time.Millisecond}
	return d, r.err
}

// ChooseVersion returns the highest version in [lo, hi] that this package speaks.
func ChooseVersion(lo, hi uint16) (uint16, bool) {
	if lo <= Version && Version <= hi {
		return Version, true
	}
	return 0, false
}
