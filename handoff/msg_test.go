package handoff

import (
	"bytes"
	"errors"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

func TestHelloRoundTrip(t *testing.T) {
	in := Hello{MinVersion: 1, MaxVersion: 3, PID: 4242, Slot: 7, Generation: 9, Capacity: 100,
		Flags: HelloReady | HelloDraining, Live: 12, Token: "abc"}
	typ, body, err := Split(AppendHello(nil, &in))
	if err != nil || typ != TypeHello {
		t.Fatalf("Split: %v %v", typ, err)
	}
	out, err := ParseHello(body)
	if err != nil || out != in {
		t.Fatalf("got %+v, %v; want %+v", out, err, in)
	}
}

func TestControlRoundTrips(t *testing.T) {
	w := Welcome{Version: 1, PingInterval: 1500 * time.Millisecond, Generation: 3}
	_, body, _ := Split(AppendWelcome(nil, &w))
	if got, err := ParseWelcome(body); err != nil || got != w {
		t.Errorf("welcome: %+v %v", got, err)
	}
	e := Error{Code: CodeToken, Reason: "bad token"}
	_, body, _ = Split(AppendError(nil, &e))
	if got, err := ParseError(body); err != nil || *got != e {
		t.Errorf("error: %+v %v", got, err)
	}
	d := Drain{Deadline: 30 * time.Second}
	_, body, _ = Split(AppendDrain(nil, &d))
	if got, err := ParseDrain(body); err != nil || got != d {
		t.Errorf("drain: %+v %v", got, err)
	}
	_, body, _ = Split(AppendNonce(nil, TypePing, 1<<60+5))
	if got, err := ParseNonce(TypePing, body); err != nil || got != 1<<60+5 {
		t.Errorf("ping: %d %v", got, err)
	}
	ids := []uint64{1, 2, 1 << 63}
	typ, body, _ := Split(AppendIDs(nil, TypeClosed, ids))
	if got, err := ParseIDs(nil, typ, body); err != nil || !reflect.DeepEqual(got, ids) || typ != TypeClosed {
		t.Errorf("ids: %v %v", got, err)
	}
}

func TestConnRoundTrip(t *testing.T) {
	for _, c := range []ConnInfo{
		{ID: 1, Client: netip.MustParseAddrPort("127.0.0.1:40000"), Local: netip.MustParseAddrPort("127.0.0.1:7000"), Listener: "tcp"},
		{ID: 2, Client: netip.MustParseAddrPort("[2001:db8::1]:5"), Local: netip.MustParseAddrPort("[::1]:7000"), Listener: ""},
		{ID: 3},
	} {
		_, body, err := Split(AppendConn(nil, &c))
		if err != nil {
			t.Fatal(err)
		}
		var got ConnInfo
		if err := ParseConn(body, &got); err != nil || got != c {
			t.Errorf("got %+v %v, want %+v", got, err, c)
		}
	}
	// A v4-mapped v6 address is sent as plain v4.
	c := ConnInfo{Client: netip.MustParseAddrPort("[::ffff:10.0.0.1]:9")}
	_, body, _ := Split(AppendConn(nil, &c))
	var got ConnInfo
	if err := ParseConn(body, &got); err != nil || got.Client != netip.MustParseAddrPort("10.0.0.1:9") {
		t.Errorf("mapped: %v %v", got.Client, err)
	}
}

// The byte examples in PROTOCOL.md are normative; keep them true.
func TestProtocolExampleBytes(t *testing.T) {
	c := ConnInfo{ID: 1, Client: netip.MustParseAddrPort("127.0.0.1:40000"), Local: netip.MustParseAddrPort("127.0.0.1:7000"), Listener: "tcp"}
	want := []byte{0x09, 0, 0x1b, 0, 1, 0, 0, 0, 0, 0, 0, 0,
		4, 0x40, 0x9c, 127, 0, 0, 1, 4, 0x58, 0x1b, 127, 0, 0, 1, 3, 0, 't', 'c', 'p'}
	if got := AppendConn(nil, &c); !bytes.Equal(got, want) {
		t.Errorf("CONN\n got % x\nwant % x", got, want)
	}
	// CONNS of that CONN and the same with id 2 from port 40001: each entry is the CONN body
	// behind its length.
	c2 := c
	c2.ID, c2.Client = 2, netip.MustParseAddrPort("127.0.0.1:40001")
	conns := []byte{0x0c, 0, 0x3c, 0, 2, 0,
		0x1b, 0, 1, 0, 0, 0, 0, 0, 0, 0, 4, 0x40, 0x9c, 127, 0, 0, 1, 4, 0x58, 0x1b, 127, 0, 0, 1, 3, 0, 't', 'c', 'p',
		0x1b, 0, 2, 0, 0, 0, 0, 0, 0, 0, 4, 0x41, 0x9c, 127, 0, 0, 1, 4, 0x58, 0x1b, 127, 0, 0, 1, 3, 0, 't', 'c', 'p'}
	pair := []ConnInfo{c, c2}
	if got := AppendConns(nil, 2, func(i int) *ConnInfo { return &pair[i] }); !bytes.Equal(got, conns) {
		t.Errorf("CONNS\n got % x\nwant % x", got, conns)
	}
	if got := AppendEmpty(nil, TypeReady); !bytes.Equal(got, []byte{4, 0, 0, 0}) {
		t.Errorf("READY % x", got)
	}
	ack := []byte{5, 0, 0x12, 0, 2, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0}
	if got := AppendIDs(nil, TypeAck, []uint64{7, 9}); !bytes.Equal(got, ack) {
		t.Errorf("ACK % x", got)
	}
}

func TestMalformed(t *testing.T) {
	hello := AppendHello(nil, &Hello{Token: "tok"})
	cases := map[string][]byte{
		"short header":  {1, 0},
		"length lies":   {4, 0, 5, 0},
		"hello cut":     append([]byte{1, 0, 10, 0}, hello[4:14]...),
		"token too big": func() []byte { b := append([]byte(nil), hello...); b[len(b)-5] = 0xff; b[len(b)-4] = 0xff; return b }(),
	}
	for name, m := range cases {
		typ, body, err := Split(m)
		if err == nil {
			_, err = ParseHello(body)
		}
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: type %v err %v, want ErrMalformed", name, typ, err)
		}
	}
	if _, err := ParseIDs(nil, TypeAck, []byte{0, 0}); !errors.Is(err, ErrMalformed) {
		t.Errorf("zero count: %v", err)
	}
	if _, err := ParseIDs(nil, TypeAck, []byte{2, 0, 1, 0, 0, 0, 0, 0, 0, 0}); !errors.Is(err, ErrMalformed) {
		t.Errorf("count beyond body: %v", err)
	}
	var c ConnInfo
	if err := ParseConn([]byte{1, 0, 0, 0, 0, 0, 0, 0, 5}, &c); !errors.Is(err, ErrMalformed) {
		t.Errorf("bad family: %v", err)
	}
	if _, _, err := Split(make([]byte, MaxMessage+1)); !errors.Is(err, ErrTooBig) {
		t.Errorf("oversized: %v", err)
	}
}

// Trailing bytes are room for new fields: a receiver ignores them.
func TestTrailingFieldsIgnored(t *testing.T) {
	m := AppendNonce(nil, TypePong, 77)
	m = append(m, 1, 2, 3)
	le.PutUint16(m[2:], uint16(len(m)-HeaderLen))
	_, body, err := Split(m)
	if err != nil {
		t.Fatal(err)
	}
	if v, err := ParseNonce(TypePong, body); err != nil || v != 77 {
		t.Fatalf("%d %v", v, err)
	}
}

func TestTypeClasses(t *testing.T) {
	if !TypeConn.Known() || Type(0x11).Known() || Type(0x11).Optional() || !TypeResume.Known() || !TypeConns.Known() || !TypeRefuse.Known() || !Type(0x80).Optional() {
		t.Fatal("type classes wrong")
	}
	if v, ok := ChooseVersion(1, 5); !ok || v != 1 {
		t.Fatal("version 1..5 must pick 1")
	}
	if _, ok := ChooseVersion(2, 5); ok {
		t.Fatal("version 2..5 must fail")
	}
}
