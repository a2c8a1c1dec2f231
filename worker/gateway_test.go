package worker

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-gw/baton/handoff"
)

// testTimeout bounds every wait in these tests, so that a bug fails a test instead of hanging.
const testTimeout = 5 * time.Second

var (
	testToken  = strings.Repeat("5a", 32)
	fakeClient = netip.MustParseAddrPort("203.0.113.9:4242")
	fakeLocal  = netip.MustParseAddrPort("198.51.100.1:7000")
)

// fakeGateway plays batond's side of the protocol: a registration socket, a TCP listener whose
// accepted connections it hands to the worker, and strict expectations about what the worker
// sends.
type fakeGateway struct {
	t    *testing.T
	path string
	ln   *net.UnixListener
	tcp  *net.TCPListener
	next atomic.Uint64
}

func newGateway(t *testing.T) *fakeGateway {
	t.Helper()
	path := filepath.Join(t.TempDir(), "workers.sock")
	ln, err := handoff.Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	tcp, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tcp.Close() })
	t.Setenv(envSocket, path)
	t.Setenv(envSlot, "3")
	t.Setenv(envGeneration, "7")
	t.Setenv(envToken, testToken)
	t.Setenv(envFallback, "")
	return &fakeGateway{t: t, path: path, ln: ln, tcp: tcp}
}

// restart simulates a batond crash and restart: the registration socket goes away and comes
// back at the same path.
func (g *fakeGateway) restart() {
	g.t.Helper()
	g.ln.Close()
	ln, err := handoff.Listen(g.path, 0o600)
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { ln.Close() })
	g.ln = ln
}

// gwChan is the gateway's end of one worker channel.
type gwChan struct {
	t      *testing.T
	ch     *handoff.Channel
	buf    []byte
	closed map[uint64]int // CLOSED ids seen so far, with how often
}

// accept waits for the worker to connect.
func (g *fakeGateway) accept() *gwChan {
	g.t.Helper()
	g.ln.SetDeadline(time.Now().Add(testTimeout))
	c, err := g.ln.AcceptUnix()
	if err != nil {
		g.t.Fatalf("worker did not connect: %v", err)
	}
	ch, err := handoff.NewChannel(c)
	if err != nil {
		c.Close()
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { ch.Close() })
	return &gwChan{t: g.t, ch: ch, buf: make([]byte, handoff.MaxMessage), closed: map[uint64]int{}}
}

// recvErr reads the next message from the worker.
func (c *gwChan) recvErr() (handoff.Type, []byte, error) {
	c.ch.Conn().SetReadDeadline(time.Now().Add(testTimeout))
	msg, fd, err := c.ch.Recv(c.buf)
	if err != nil {
		return 0, nil, err
	}
	if fd >= 0 {
		closeFD(fd)
		c.t.Fatalf("worker sent an fd")
	}
	t, body, err := handoff.Split(msg)
	if err != nil {
		c.t.Fatalf("worker sent a malformed message: %v", err)
	}
	return t, body, nil
}

func (c *gwChan) recv() (handoff.Type, []byte) {
	c.t.Helper()
	t, body, err := c.recvErr()
	if err != nil {
		c.t.Fatalf("reading from worker: %v", err)
	}
	return t, body
}

// expect reads the next message and fails unless it has type want.
func (c *gwChan) expect(want handoff.Type) []byte {
	c.t.Helper()
	t, body := c.recv()
	if t != want {
		c.t.Fatalf("worker sent %s, want %s", t, want)
	}
	return body
}

func (c *gwChan) expectIDs(want handoff.Type) []uint64 {
	c.t.Helper()
	ids, err := handoff.ParseIDs(nil, want, c.expect(want))
	if err != nil {
		c.t.Fatal(err)
	}
	return ids
}

// expectEOF fails unless the worker closes the channel (possibly after some CLOSED).
func (c *gwChan) expectEOF() {
	c.t.Helper()
	for {
		t, body, err := c.recvErr()
		switch {
		case errors.Is(err, io.EOF):
			return
		case err != nil:
			c.t.Fatalf("want EOF from worker, got %v", err)
		case t == handoff.TypeClosed:
			c.noteClosed(body)
		default:
			c.t.Fatalf("want EOF from worker, got %s", t)
		}
	}
}

func (c *gwChan) noteClosed(body []byte) {
	c.t.Helper()
	ids, err := handoff.ParseIDs(nil, handoff.TypeClosed, body)
	if err != nil {
		c.t.Fatal(err)
	}
	for _, id := range ids {
		c.closed[id]++
		if c.closed[id] > 1 {
			c.t.Fatalf("CLOSED for id %d sent %d times", id, c.closed[id])
		}
	}
}

// awaitClosed reads until every id in ids has been reported CLOSED; only CLOSED may arrive
// meanwhile.
func (c *gwChan) awaitClosed(ids ...uint64) {
	c.t.Helper()
	for {
		missing := false
		for _, id := range ids {
			if c.closed[id] == 0 {
				missing = true
			}
		}
		if !missing {
			return
		}
		c.noteClosed(c.expect(handoff.TypeClosed))
	}
}

func (c *gwChan) send(msg []byte) {
	c.t.Helper()
	if err := c.ch.Send(msg); err != nil {
		c.t.Fatal(err)
	}
}

func (c *gwChan) hello() handoff.Hello {
	c.t.Helper()
	h, err := handoff.ParseHello(c.expect(handoff.TypeHello))
	if err != nil {
		c.t.Fatal(err)
	}
	return h
}

func (c *gwChan) welcome() {
	c.t.Helper()
	c.send(handoff.AppendWelcome(nil, &handoff.Welcome{Version: 1, PingInterval: time.Second, Generation: 7}))
}

// barrier proves that the worker sent nothing but CLOSED before answering a PING: messages on
// the channel are ordered, so whatever was sent before the PONG arrives before it.
func (c *gwChan) barrier() {
	c.t.Helper()
	const nonce = 0x0123456789abcdef
	c.send(handoff.AppendNonce(nil, handoff.TypePing, nonce))
	for {
		t, body := c.recv()
		switch t {
		case handoff.TypeClosed:
			c.noteClosed(body)
			continue
		case handoff.TypePong:
			if n, err := handoff.ParseNonce(t, body); err != nil || n != nonce {
				c.t.Fatalf("PONG nonce %x (%v), want %x", n, err, uint64(nonce))
			}
			return
		}
		c.t.Fatalf("worker sent %s before PONG", t)
	}
}

// handOff accepts a real TCP connection and hands its server side to the worker, waiting for
// the ACK before closing the gateway's copy, as batond does. It returns the client side.
func (g *fakeGateway) handOff(c *gwChan) (client *net.TCPConn, id uint64) {
	g.t.Helper()
	client, server := g.connect()
	defer server.Close()
	id = g.next.Add(1)
	c.sendFD(server, &handoff.ConnInfo{ID: id, Client: fakeClient, Local: fakeLocal, Listener: "game"})
	c.awaitAck(id)
	return client, id
}

// connect makes a real TCP connection to the gateway's listener and returns both ends (the
// client's closed at cleanup).
func (g *fakeGateway) connect() (client, server *net.TCPConn) {
	g.t.Helper()
	client, err := net.DialTCP("tcp", nil, g.tcp.Addr().(*net.TCPAddr))
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { client.Close() })
	server, err = g.tcp.AcceptTCP()
	if err != nil {
		g.t.Fatal(err)
	}
	return client, server
}

// sendFD sends a CONN carrying the socket behind sc. The fd is reached through the raw conn
// rather than (*os.File).Fd, which would switch the shared socket to blocking mode.
func (c *gwChan) sendFD(sc syscall.Conn, info *handoff.ConnInfo) {
	c.t.Helper()
	raw, err := sc.SyscallConn()
	if err != nil {
		c.t.Fatal(err)
	}
	msg := handoff.AppendConn(nil, info)
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = c.ch.TrySend(msg, int(fd)) }); err != nil {
		c.t.Fatal(err)
	}
	if serr != nil {
		c.t.Fatal(serr)
	}
}

// awaitAck reads until the ACK for id; CLOSED for other ids may arrive meanwhile.
func (c *gwChan) awaitAck(id uint64) {
	c.t.Helper()
	for {
		t, body := c.recv()
		switch t {
		case handoff.TypeClosed:
			c.noteClosed(body)
			continue
		case handoff.TypeAck:
			ids, err := handoff.ParseIDs(nil, t, body)
			if err != nil || len(ids) != 1 || ids[0] != id {
				c.t.Fatalf("ACK %v (%v), want [%d]", ids, err, id)
			}
			return
		}
		c.t.Fatalf("worker sent %s, want ACK %d", t, id)
	}
}

// startWorker runs Listen against the fake gateway and completes the handshake.
func startWorker(t *testing.T, g *fakeGateway, opts ...Option) (*Listener, *gwChan, handoff.Hello) {
	t.Helper()
	type result struct {
		l   *Listener
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := Listen(opts...)
		done <- result{l, err}
	}()
	c := g.accept()
	h := c.hello()
	c.welcome()
	var r result
	select {
	case r = <-done:
	case <-time.After(testTimeout):
		t.Fatal("Listen did not return after WELCOME")
	}
	if r.err != nil {
		t.Fatalf("Listen: %v", r.err)
	}
	t.Cleanup(func() { r.l.Close() })
	return r.l, c, h
}

// startReady is startWorker plus READY, so that the gateway may hand off (PROTOCOL.md: no CONN
// before READY).
func startReady(t *testing.T, g *fakeGateway, opts ...Option) (*Listener, *gwChan) {
	t.Helper()
	l, c, _ := startWorker(t, g, opts...)
	if err := l.Ready(); err != nil {
		t.Fatal(err)
	}
	c.expect(handoff.TypeReady)
	return l, c
}

// acceptTimeout is Accept bounded by testTimeout.
func acceptTimeout(t *testing.T, l *Listener) (*Conn, error) {
	t.Helper()
	type result struct {
		c   *Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := l.AcceptConn()
		done <- result{c, err}
	}()
	select {
	case r := <-done:
		return r.c, r.err
	case <-time.After(testTimeout):
		t.Fatal("Accept did not return")
		return nil, nil
	}
}

func mustAccept(t *testing.T, l *Listener) *Conn {
	t.Helper()
	c, err := acceptTimeout(t, l)
	if err != nil {
		t.Fatalf("Accept: %v", err)
	}
	return c
}

// roundTrip sends msg from client to server and back.
func roundTrip(t *testing.T, client net.Conn, server net.Conn, msg string) {
	t.Helper()
	client.SetDeadline(time.Now().Add(testTimeout))
	server.SetDeadline(time.Now().Add(testTimeout))
	if _, err := client.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(server, buf); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Write(buf); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(client, buf); err != nil {
		t.Fatal(err)
	}
	if string(buf) != msg {
		t.Fatalf("echoed %q, want %q", buf, msg)
	}
}

// countFDs counts this process's open fds.
func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents) - 1 // ReadDir's own fd on the directory
}

// eventually polls cond until it holds or testTimeout passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
