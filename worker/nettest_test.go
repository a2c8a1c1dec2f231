package worker

import (
	"net"
	"testing"

	"golang.org/x/net/nettest"
)

// TestNettestConn runs x/net's net.Conn conformance suite over handed-off connections: c1 is the
// worker's *Conn, c2 the client.
func TestNettestConn(t *testing.T) {
	g := newGateway(t)
	l, c := startReady(t, g)
	nettest.TestConn(t, func() (c1, c2 net.Conn, stop func(), err error) {
		client, id := g.handOff(c)
		conn, err := l.AcceptConn()
		if err != nil {
			return nil, nil, nil, err
		}
		if conn.ID() != id {
			t.Errorf("accepted conn %d, want %d", conn.ID(), id)
		}
		stop = func() {
			conn.Close()
			client.Close()
		}
		return conn, client, stop, nil
	})
	// Every conn the suite closed, often concurrently with reads and writes, was reported
	// exactly once (awaitClosed fails on a duplicate).
	var ids []uint64
	for id := uint64(1); id <= g.next.Load(); id++ {
		ids = append(ids, id)
	}
	c.awaitClosed(ids...)
	c.barrier()
	if l.Live() != 0 {
		t.Fatalf("Live %d after the suite, want 0", l.Live())
	}
}
