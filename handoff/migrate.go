package handoff

import (
	"errors"
	"fmt"
	"time"
)

// Session migration (PROTOCOL.md "Migration", 1.4): the gateway asks a worker for its sessions
// (MIGRATE), the worker hands each back with its socket and an opaque state (HANDBACK) or keeps
// it (DECLINE), and the gateway delivers a handed-back session to another worker as a CONN that
// carries the state (RESUME).

// MaxLargeMessage is the largest HANDBACK or RESUME, header included: the u16 body length's
// limit. Every other message stays within MaxMessage.
const MaxLargeMessage = HeaderLen + 0xFFFF

// MaxState is the largest state a session may carry (60 KiB). It leaves room in a
// MaxLargeMessage for the other fields at their largest (two addresses and two strings).
const MaxState = 60 << 10

// ErrStateTooBig is returned for a state longer than MaxState: the session cannot be handed
// back (the worker declines it, and it drains as without migration).
var ErrStateTooBig = errors.New("handoff: session state exceeds MaxState")

// Large says whether messages of type t may exceed MaxMessage (up to MaxLargeMessage).
func (t Type) Large() bool { return t == TypeHandback || t == TypeResume }

func tooBig(msg []byte) bool {
	if len(msg) <= MaxMessage {
		return false
	}
	return len(msg) > MaxLargeMessage || !Type(msg[0]).Large()
}

// Migrate is a MIGRATE: hand back the sessions listed (all the worker holds if IDs is empty)
// before Deadline.
type Migrate struct {
	Deadline time.Duration // encoded in whole milliseconds
	IDs      []uint64
}

// Handback is a HANDBACK: one session given back to the gateway, whose socket travels with it.
type Handback struct {
	Conn      ConnInfo // the session's id as the worker knows it, and its addresses
	Hops      uint32   // times the session moved before (its RESUME's hops; 0 if it came as a CONN)
	Group     string   // sessions of one group (a room, a match) land on one worker; "" for none
	GroupSize uint32   // sessions of Group this worker hands back for this MIGRATE (0 without a group)
	State     []byte   // opaque to the gateway, at most MaxState bytes
}

// Resume is a RESUME: a CONN for a session that another worker handed back.
type Resume struct {
	Conn       ConnInfo // a new id; the addresses as the client made the connection
	PreviousID uint64   // the id the session had with the worker that handed it back
	Hops       uint32   // how many times this session has been handed back, ≥ 1
	Group      string
	State      []byte
}

// AppendMigrate appends a MIGRATE. It lists at most MaxIDs ids: a longer request is several
// messages (the caller splits it).
func AppendMigrate(b []byte, m *Migrate) []byte {
	b, s := begin(b, TypeMigrate)
	b = le.AppendUint32(b, uint32(m.Deadline/time.Millisecond))
	ids := m.IDs[:min(len(m.IDs), MaxIDs-1)]
	b = le.AppendUint16(b, uint16(len(ids)))
	for _, id := range ids {
		b = le.AppendUint64(b, id)
	}
	return finish(b, s)
}

// ParseMigrate decodes a MIGRATE body, appending its ids to dst.
func ParseMigrate(dst []uint64, body []byte) (Migrate, error) {
	r := reader{b: body, msg: TypeMigrate}
	m := Migrate{Deadline: time.Duration(r.u32("deadline_ms")) * time.Millisecond}
	n := int(r.u16("count"))
	if r.err != nil {
		return m, r.err
	}
	if len(r.b) < 8*n {
		return m, fmt.Errorf("%w: MIGRATE count %d needs %d bytes, body has %d", ErrMalformed, n, 8*n, len(r.b))
	}
	for i := 0; i < n; i++ {
		dst = append(dst, le.Uint64(r.b[8*i:]))
	}
	m.IDs = dst
	return m, nil
}

func appendConnFields(b []byte, c *ConnInfo) []byte {
	b = le.AppendUint64(b, c.ID)
	b = appendAddr(b, c.Client)
	b = appendAddr(b, c.Local)
	return appendStr(b, c.Listener)
}

func appendState(b, state []byte) []byte {
	b = le.AppendUint32(b, uint32(len(state)))
	return append(b, state...)
}

// AppendHandback appends a HANDBACK; ErrStateTooBig if h.State is longer than MaxState.
func AppendHandback(b []byte, h *Handback) ([]byte, error) {
	if len(h.State) > MaxState {
		return b, fmt.Errorf("%w: %d bytes, at most %d", ErrStateTooBig, len(h.State), MaxState)
	}
	b, s := begin(b, TypeHandback)
	b = appendConnFields(b, &h.Conn)
	b = le.AppendUint32(b, h.Hops)
	b = appendStr(b, h.Group)
	b = le.AppendUint32(b, h.GroupSize)
	b = appendState(b, h.State)
	return finish(b, s), nil
}

// AppendResume appends a RESUME; ErrStateTooBig if r.State is longer than MaxState.
func AppendResume(b []byte, r *Resume) ([]byte, error) {
	if len(r.State) > MaxState {
		return b, fmt.Errorf("%w: %d bytes, at most %d", ErrStateTooBig, len(r.State), MaxState)
	}
	b, s := begin(b, TypeResume)
	b = appendConnFields(b, &r.Conn)
	b = le.AppendUint64(b, r.PreviousID)
	b = le.AppendUint32(b, r.Hops)
	b = appendStr(b, r.Group)
	b = appendState(b, r.State)
	return finish(b, s), nil
}

func (r *reader) conn(c *ConnInfo) {
	c.ID = r.u64("conn_id")
	c.Client = r.addr("client")
	c.Local = r.addr("local")
	c.Listener = r.str("listener")
}

// state decodes a u32-length state; the bytes are copied, so they outlive the receive buffer.
func (r *reader) state() []byte {
	n := r.u32("state_length")
	if r.err == nil && n > MaxState {
		r.err = fmt.Errorf("%w: %s state is %d bytes, more than %d", ErrMalformed, r.msg, n, MaxState)
		return nil
	}
	return append([]byte(nil), r.bytes(int(n), "state")...)
}

// ParseHandback decodes a HANDBACK body.
func ParseHandback(body []byte) (Handback, error) {
	r := reader{b: body, msg: TypeHandback}
	var h Handback
	r.conn(&h.Conn)
	h.Hops = r.u32("hops")
	h.Group = r.str("group")
	h.GroupSize = r.u32("group_size")
	h.State = r.state()
	return h, r.err
}

// ParseResume decodes a RESUME body.
func ParseResume(body []byte) (Resume, error) {
	r := reader{b: body, msg: TypeResume}
	var m Resume
	r.conn(&m.Conn)
	m.PreviousID = r.u64("previous_id")
	m.Hops = r.u32("hops")
	m.Group = r.str("group")
	m.State = r.state()
	return m, r.err
}
