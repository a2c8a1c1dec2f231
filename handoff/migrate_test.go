package handoff

import (
	"bytes"
	"errors"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestMigrateRoundTrip(t *testing.T) {
	m := &Migrate{Deadline: 1500 * time.Millisecond, IDs: []uint64{7, 9}}
	typ, body, err := Split(AppendMigrate(nil, m))
	if err != nil || typ != TypeMigrate {
		t.Fatalf("split: %v %v", typ, err)
	}
	got, err := ParseMigrate(nil, body)
	if err != nil || !reflect.DeepEqual(&got, m) {
		t.Fatalf("got %+v %v", got, err)
	}
	// An empty list means every session.
	_, body, _ = Split(AppendMigrate(nil, &Migrate{Deadline: time.Second}))
	if got, err := ParseMigrate(nil, body); err != nil || len(got.IDs) != 0 || got.Deadline != time.Second {
		t.Fatalf("all: %+v %v", got, err)
	}
	// A list longer than one message holds is cut to what fits (the caller sends the rest).
	long := make([]uint64, 2*MaxIDs)
	msg := AppendMigrate(nil, &Migrate{IDs: long})
	if len(msg) > MaxMessage {
		t.Fatalf("MIGRATE of %d bytes", len(msg))
	}
	if _, _, err := Split(msg); err != nil {
		t.Fatal(err)
	}
}

func TestHandbackAndResumeRoundTrip(t *testing.T) {
	conn := ConnInfo{ID: 42, Client: netip.MustParseAddrPort("[2001:db8::1]:4000"),
		Local: netip.MustParseAddrPort("10.0.0.1:7000"), Listener: "game"}
	state := bytes.Repeat([]byte{0xab}, MaxState)
	h := &Handback{Conn: conn, Hops: 1, Group: "room 3", GroupSize: 10, State: state}
	msg, err := AppendHandback(nil, h)
	if err != nil {
		t.Fatal(err)
	}
	if len(msg) <= MaxMessage || len(msg) > MaxLargeMessage {
		t.Fatalf("a HANDBACK with the largest state is %d bytes", len(msg))
	}
	typ, body, err := Split(msg)
	if err != nil || typ != TypeHandback {
		t.Fatalf("split: %v %v", typ, err)
	}
	gotH, err := ParseHandback(body)
	if err != nil || !reflect.DeepEqual(&gotH, h) {
		t.Fatalf("handback: %v", err)
	}
	r := &Resume{Conn: conn, PreviousID: 41, Hops: 2, Group: "room 3", State: []byte("name=ann")}
	msg, err = AppendResume(nil, r)
	if err != nil {
		t.Fatal(err)
	}
	_, body, err = Split(msg)
	if err != nil {
		t.Fatal(err)
	}
	gotR, err := ParseResume(body)
	if err != nil || !reflect.DeepEqual(&gotR, r) {
		t.Fatalf("resume: %+v %v", gotR, err)
	}
	// The state is copied out of the receive buffer.
	body[len(body)-1] = 0
	if gotR.State[len(gotR.State)-1] != 'n' {
		t.Fatal("state aliases the message buffer")
	}
}

func TestStateTooBig(t *testing.T) {
	big := make([]byte, MaxState+1)
	if _, err := AppendHandback(nil, &Handback{State: big}); !errors.Is(err, ErrStateTooBig) {
		t.Fatalf("handback: %v", err)
	}
	if _, err := AppendResume(nil, &Resume{State: big}); !errors.Is(err, ErrStateTooBig) {
		t.Fatalf("resume: %v", err)
	}
	// A peer claiming a longer state is malformed, not a huge allocation.
	msg, _ := AppendHandback(nil, &Handback{})
	_, body, _ := Split(msg)
	body = body[:len(body)-4]
	body = le.AppendUint32(body, MaxState+1)
	if _, err := ParseHandback(body); !errors.Is(err, ErrMalformed) {
		t.Fatalf("oversized state_length: %v", err)
	}
}

// Only HANDBACK and RESUME may exceed MaxMessage.
func TestLargeOnlyForMigration(t *testing.T) {
	big := make([]byte, MaxMessage+4)
	big[0] = byte(TypeClosed)
	le.PutUint16(big[2:], uint16(len(big)-HeaderLen))
	if _, _, err := Split(big); !errors.Is(err, ErrTooBig) {
		t.Fatalf("a large CLOSED: %v", err)
	}
	big[0] = byte(TypeResume)
	if _, _, err := Split(big); err != nil {
		t.Fatalf("a large RESUME: %v", err)
	}
}

// A HANDBACK with the largest state crosses a real SOCK_SEQPACKET pair whole, with its fd.
func TestHandbackOverChannel(t *testing.T) {
	a, b := pair(t)
	p := make([]int, 2)
	if err := unix.Pipe2(p, unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	msg, err := AppendHandback(nil, &Handback{Conn: ConnInfo{ID: 1}, State: make([]byte, MaxState)})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.TrySend(msg, p[0]); err != nil {
		t.Fatal(err)
	}
	got, fd, err := b.Recv(make([]byte, MaxLargeMessage))
	if err != nil || fd < 0 || len(got) != len(msg) {
		t.Fatalf("recv: %d bytes, fd %d, %v", len(got), fd, err)
	}
	unix.Close(fd)
	// Without its fd a HANDBACK is malformed (FDS).
	if err := a.TrySend(msg, -1); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Recv(make([]byte, MaxLargeMessage)); !errors.Is(err, ErrFDs) {
		t.Fatalf("HANDBACK without fd: %v", err)
	}
}

func FuzzMigration(f *testing.F) {
	hb, _ := AppendHandback(nil, &Handback{Conn: ConnInfo{ID: 1}, Group: "g", GroupSize: 1, State: []byte("s")})
	rs, _ := AppendResume(nil, &Resume{Conn: ConnInfo{ID: 2}, PreviousID: 1, Hops: 1, State: []byte("s")})
	f.Add(byte(TypeHandback), hb[HeaderLen:])
	f.Add(byte(TypeResume), rs[HeaderLen:])
	f.Add(byte(TypeMigrate), AppendMigrate(nil, &Migrate{IDs: []uint64{3}})[HeaderLen:])
	f.Fuzz(func(t *testing.T, typ byte, body []byte) {
		switch Type(typ) {
		case TypeHandback:
			h, err := ParseHandback(body)
			if err != nil {
				return
			}
			b2, err := AppendHandback(nil, &h)
			if err != nil {
				t.Fatal(err)
			}
			_, body2, _ := Split(b2)
			if h2, err := ParseHandback(body2); err != nil || !reflect.DeepEqual(h2, h) {
				t.Fatalf("re-encode: %+v %v vs %+v", h2, err, h)
			}
		case TypeResume:
			r, err := ParseResume(body)
			if err != nil {
				return
			}
			b2, err := AppendResume(nil, &r)
			if err != nil {
				t.Fatal(err)
			}
			_, body2, _ := Split(b2)
			if r2, err := ParseResume(body2); err != nil || !reflect.DeepEqual(r2, r) {
				t.Fatalf("re-encode: %+v %v vs %+v", r2, err, r)
			}
		default:
			ParseMigrate(nil, body)
		}
	})
}
