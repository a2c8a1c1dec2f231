package proxy

import (
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

func testGateway(caps ...int) (*Gateway, []*Backend) {
	g := &Gateway{cfg: Config{DefaultCapacity: 10}}
	var bs []*Backend
	for i, c := range caps {
		b := &Backend{g: g, info: BackendInfo{Slot: i}, capacity: c, ready: true, pending: map[uint64]*clientConn{}}
		bs = append(bs, b)
	}
	g.backends = bs
	return g, bs
}

func TestPickLeastLoadedByRatio(t *testing.T) {
	g, bs := testGateway(10, 100)
	bs[0].live = 2  // 20%
	bs[1].live = 10 // 10%
	if got := g.pickLocked(); got != bs[1] {
		t.Fatalf("picked slot %d, want 1 (lower live/capacity)", got.info.Slot)
	}
	bs[1].live = 30 // 30%
	if got := g.pickLocked(); got != bs[0] {
		t.Fatalf("picked slot %d, want 0", got.info.Slot)
	}
}

func TestPickTiesRotate(t *testing.T) {
	g, _ := testGateway(10, 10, 10)
	seen := map[int]int{}
	for i := 0; i < 30; i++ {
		seen[g.pickLocked().info.Slot]++
	}
	for s := 0; s < 3; s++ {
		if seen[s] != 10 {
			t.Fatalf("ties did not rotate evenly: %v", seen)
		}
	}
}

func TestPickPendingCountsAsLoad(t *testing.T) {
	g, bs := testGateway(10, 10)
	bs[0].pending[1] = &clientConn{}
	bs[0].pending[2] = &clientConn{}
	bs[1].live = 1
	if got := g.pickLocked(); got != bs[1] {
		t.Fatal("unacked handoffs must count as load")
	}
}

func TestPickSkipsUnavailable(t *testing.T) {
	g, bs := testGateway(2, 10, 10, 10, 10)
	bs[0].live = 0
	bs[1].ready = false
	bs[2].draining = true
	bs[3].full = true
	bs[4].gone = true
	bs[0].live = 2 // at capacity
	if got := g.pickLocked(); got != nil {
		t.Fatalf("picked slot %d; every backend is unavailable", got.info.Slot)
	}
	bs[0].live = 1
	if got := g.pickLocked(); got != bs[0] {
		t.Fatal("a backend below capacity must be picked")
	}
}

func TestPickNone(t *testing.T) {
	g, _ := testGateway()
	if g.pickLocked() != nil {
		t.Fatal("picked from nothing")
	}
}

func TestRawAddrPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	l, err := NewListener("t", ln.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	defer l.f.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a := newAcceptor(l, 0)
	fd, client, local, err := a.accept()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if client.String() != c.LocalAddr().String() || local.String() != ln.Addr().String() {
		t.Fatalf("accepted client %v local %v; dialer is %v, listener %v", client, local, c.LocalAddr(), ln.Addr())
	}
	flags, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if flags&unix.FD_CLOEXEC == 0 {
		t.Fatal("accepted fd is not close-on-exec")
	}
}
