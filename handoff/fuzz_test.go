package handoff

import (
	"testing"
)

// Every decoder is fuzzed: none may panic, and whatever decodes must re-encode to a message that
// decodes to the same value.
func FuzzSplit(f *testing.F) {
	f.Add(AppendEmpty(nil, TypeReady))
	f.Add(AppendIDs(nil, TypeAck, []uint64{1, 2}))
	f.Add([]byte{1, 0, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		typ, body, err := Split(b)
		if err == nil && len(body)+HeaderLen != len(b) {
			t.Fatalf("type %v: body %d of %d", typ, len(body), len(b))
		}
	})
}

func FuzzHello(f *testing.F) {
	f.Add(AppendHello(nil, &Hello{MinVersion: 1, MaxVersion: 1, PID: 1, Token: "t"})[HeaderLen:])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, body []byte) {
		h, err := ParseHello(body)
		if err != nil {
			return
		}
		_, b2, _ := Split(AppendHello(nil, &h))
		if h2, err := ParseHello(b2); err != nil || h2 != h {
			t.Fatalf("re-encode: %+v %v vs %+v", h2, err, h)
		}
	})
}

func FuzzConn(f *testing.F) {
	f.Add(AppendConn(nil, &ConnInfo{ID: 1, Listener: "x"})[HeaderLen:])
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0, 6, 1, 0})
	f.Fuzz(func(t *testing.T, body []byte) {
		var c ConnInfo
		if err := ParseConn(body, &c); err != nil {
			return
		}
		_, b2, _ := Split(AppendConn(nil, &c))
		var c2 ConnInfo
		if err := ParseConn(b2, &c2); err != nil || c2 != c {
			t.Fatalf("re-encode: %+v %v vs %+v", c2, err, c)
		}
	})
}

func FuzzIDs(f *testing.F) {
	f.Add(AppendIDs(nil, TypeClosed, []uint64{9})[HeaderLen:])
	f.Add([]byte{0xff, 0xff})
	f.Fuzz(func(t *testing.T, body []byte) {
		ids, err := ParseIDs(nil, TypeAck, body)
		if err != nil {
			return
		}
		if len(ids) == 0 || len(ids) > MaxIDs {
			t.Fatalf("%d ids decoded", len(ids))
		}
	})
}

func FuzzControl(f *testing.F) {
	f.Add(byte(TypeWelcome), AppendWelcome(nil, &Welcome{Version: 1})[HeaderLen:])
	f.Add(byte(TypeError), AppendError(nil, &Error{Code: 1, Reason: "r"})[HeaderLen:])
	f.Add(byte(TypeDrain), AppendDrain(nil, &Drain{})[HeaderLen:])
	f.Add(byte(TypePing), AppendNonce(nil, TypePing, 3)[HeaderLen:])
	f.Fuzz(func(t *testing.T, typ byte, body []byte) {
		switch Type(typ) {
		case TypeWelcome:
			ParseWelcome(body)
		case TypeError:
			if e, err := ParseError(body); err == nil && len(e.Reason) > MaxString {
				t.Fatal("reason longer than MaxString")
			}
		case TypeDrain:
			ParseDrain(body)
		default:
			ParseNonce(Type(typ), body)
		}
	})
}

func FuzzConns(f *testing.F) {
	two := []ConnInfo{{ID: 1, Listener: "tcp"}, {ID: 2, Listener: "x"}}
	f.Add(AppendConns(nil, 2, func(i int) *ConnInfo { return &two[i] })[HeaderLen:])
	f.Add([]byte{1, 0, 0xff, 0xff})
	f.Add([]byte{0x11, 0})
	f.Fuzz(func(t *testing.T, body []byte) {
		cs, err := ParseConns(nil, body)
		if err != nil {
			return
		}
		if len(cs) == 0 || len(cs) > MaxConns {
			t.Fatalf("decoded %d connections", len(cs))
		}
		msg := AppendConns(nil, len(cs), func(i int) *ConnInfo { return &cs[i] })
		if ConnsCount(msg) != len(cs) {
			t.Fatalf("ConnsCount %d of %d", ConnsCount(msg), len(cs))
		}
		_, b2, _ := Split(msg)
		cs2, err := ParseConns(nil, b2)
		if err != nil || len(cs2) != len(cs) {
			t.Fatalf("re-encode: %d %v vs %d", len(cs2), err, len(cs))
		}
		for i := range cs {
			if cs2[i] != cs[i] {
				t.Fatalf("entry %d: %+v vs %+v", i, cs2[i], cs[i])
			}
		}
	})
}
