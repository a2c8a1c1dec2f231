package echo

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

func TestReuseportServeAndDrain(t *testing.T) {
	l1, err := Listen("127.0.0.1:0", true)
	if err != nil {
		t.Fatal(err)
	}
	addr := l1.Addr().String()
	l2, err := Listen(addr, true)
	if err != nil {
		t.Fatalf("second SO_REUSEPORT listener on %s: %v", addr, err)
	}
	if _, err := Listen(addr, false); err == nil {
		t.Fatal("a listener without SO_REUSEPORT shared the port")
	}
	ctx1, cancel1 := context.WithCancel(context.Background())
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	done1 := make(chan struct{})
	go func() { Serve(ctx1, l1, false, 10*time.Second); close(done1) }()
	go Serve(ctx2, l2, true, time.Second)

	// Sessions on both processes' listeners (the kernel spreads them).
	var conns []net.Conn
	for range 8 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		echoOnce(t, c, "hi")
		conns = append(conns, c)
	}
	// Stopping one server closes its listener but keeps its sessions: every session still echoes,
	// and new connections reach the other server.
	cancel1()
	time.Sleep(50 * time.Millisecond)
	for _, c := range conns {
		echoOnce(t, c, "still here")
	}
	for range 4 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		echoOnce(t, c, "new")
		c.Close()
	}
	select {
	case <-done1:
		t.Fatal("Serve returned with sessions open")
	default:
	}
	for _, c := range conns {
		c.Close()
	}
	select {
	case <-done1:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return once its sessions ended")
	}
}

func echoOnce(t *testing.T, c net.Conn, s string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(s))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != s {
		t.Fatalf("echo %q: got %q, %v", s, buf, err)
	}
}
