package conformance

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
)

// An implementation is a command that runs an echo worker: it registers per the BATON_*
// environment, echoes every byte on every handed-off connection, and after DRAIN exits 0 once
// its last connection has closed. On a final ERROR (PROTOCOL.md "Final errors") it registers no
// more, serves the connections it holds until they close, and exits non-zero with the reason on
// stderr; after any other ERROR it registers again.
type implementation struct {
	name    string
	command func(t *testing.T) []string
}

// To add an implementation, add one line here.
var implementations = []implementation{
	{"go", goBuild("./examples/go/echo")},
	{"python", fixed("python3", "examples/python/echo.py")},
}

func repoRoot() string { return filepath.Join("..", "..") }

func fixed(args ...string) func(*testing.T) []string {
	return func(t *testing.T) []string {
		out := append([]string(nil), args...)
		for i, a := range out {
			if strings.HasSuffix(a, ".py") {
				out[i], _ = filepath.Abs(filepath.Join(repoRoot(), a))
			}
		}
		return out
	}
}

func goBuild(pkg string) func(*testing.T) []string {
	var once sync.Once
	var bin string
	var err error
	return func(t *testing.T) []string {
		once.Do(func() {
			dir, derr := os.MkdirTemp("", "conformance-")
			if derr != nil {
				err = derr
				return
			}
			bin = filepath.Join(dir, "worker")
			cmd := exec.Command("go", "build", "-o", bin, pkg)
			cmd.Dir = repoRoot()
			if out, berr := cmd.CombinedOutput(); berr != nil {
				err = fmt.Errorf("go build %s: %v\n%s", pkg, berr, out)
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		return []string{bin}
	}
}

const token = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

// fakeGateway plays batond for one worker process.
type fakeGateway struct {
	t       *testing.T
	ln      *net.UnixListener
	cmd     *exec.Cmd
	stderr  strings.Builder
	exited  chan struct{}
	exitErr error
	ch      *handoff.Channel
	buf     []byte
	tcp     net.Listener
	hello   handoff.Hello // the last HELLO
	// old plays a 1.0 gateway: its WELCOME has no flags field, so it grants nothing.
	old bool
	// nonblock: WELCOME granted NONBLOCK, so CONN fds go out non-blocking (PROTOCOL.md 1.1).
	nonblock bool
	// batch: WELCOME granted BATCH, so several connections go out in one CONNS (1.2).
	batch bool
}

func start(t *testing.T, impl implementation) *fakeGateway {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "workers.sock")
	ln, err := handoff.Listen(sock, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &fakeGateway{t: t, ln: ln, exited: make(chan struct{}), buf: make([]byte, handoff.MaxMessage), tcp: tcp}
	args := impl.command(t)
	g.cmd = exec.Command(args[0], args[1:]...)
	g.cmd.Env = append(os.Environ(), "BATON_SOCKET="+sock, "BATON_WORKER=3", "BATON_GENERATION=7", "BATON_TOKEN="+token)
	g.cmd.Stderr = &lockedWriter{w: &g.stderr}
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { g.exitErr = g.cmd.Wait(); close(g.exited) }()
	t.Cleanup(func() {
		g.cmd.Process.Kill()
		<-g.exited
		ln.Close()
		tcp.Close()
		if g.ch != nil {
			g.ch.Close()
		}
		if t.Failed() {
			t.Logf("worker stderr:\n%s", g.stderr.String())
		}
	})
	return g
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// accept waits for the worker to connect to the registration socket and returns its HELLO.
func (g *fakeGateway) accept() handoff.Hello {
	g.t.Helper()
	g.ln.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := g.ln.AcceptUnix()
	if err != nil {
		g.t.Fatalf("worker did not connect: %v", err)
	}
	if g.ch != nil {
		g.ch.Close()
	}
	if g.ch, err = handoff.NewChannel(c); err != nil {
		g.t.Fatal(err)
	}
	typ, body := g.recv()
	if typ != handoff.TypeHello {
		g.t.Fatalf("first message %s, want HELLO", typ)
	}
	h, err := handoff.ParseHello(body)
	if err != nil {
		g.t.Fatal(err)
	}
	g.hello = h
	return h
}

// recv reads the next message, with a deadline.
func (g *fakeGateway) recv() (handoff.Type, []byte) {
	g.t.Helper()
	g.ch.Conn().SetReadDeadline(time.Now().Add(5 * time.Second))
	msg, fd, err := g.ch.Recv(g.buf)
	if err != nil {
		g.t.Fatalf("recv: %v", err)
	}
	if fd >= 0 {
		g.t.Fatalf("worker sent an fd")
	}
	typ, body, err := handoff.Split(msg)
	if err != nil {
		g.t.Fatal(err)
	}
	return typ, body
}

// expect reads messages until one of type want arrives, failing on anything unexpected (PONG
// and READY may interleave and are skipped when not wanted).
func (g *fakeGateway) expect(want handoff.Type) []byte {
	g.t.Helper()
	for {
		typ, body := g.recv()
		if typ == want {
			return body
		}
		if typ != handoff.TypePong && typ != handoff.TypeReady {
			g.t.Fatalf("got %s while waiting for %s", typ, want)
		}
	}
}

// expectIDs collects ACK or CLOSED ids until it has all of want.
func (g *fakeGateway) expectIDs(t handoff.Type, want ...uint64) {
	g.t.Helper()
	got := map[uint64]bool{}
	for len(got) < len(want) {
		ids, err := handoff.ParseIDs(nil, t, g.expect(t))
		if err != nil {
			g.t.Fatal(err)
		}
		for _, id := range ids {
			got[id] = true
		}
	}
	for _, id := range want {
		if !got[id] {
			g.t.Fatalf("%s: got %v, want %v", t, got, want)
		}
	}
}

func (g *fakeGateway) send(msg []byte) {
	g.t.Helper()
	if err := g.ch.Send(msg); err != nil {
		g.t.Fatal(err)
	}
}

// welcome answers the last HELLO as batond does: NONBLOCK and BATCH are granted when asked,
// except by a 1.0 gateway (g.old), whose WELCOME ends before the flags field.
func (g *fakeGateway) welcome() {
	w := handoff.Welcome{Version: 1, PingInterval: time.Second, Generation: 7}
	g.nonblock = !g.old && g.hello.Flags&handoff.HelloNonblock != 0
	if g.nonblock {
		w.Flags |= handoff.WelcomeNonblock
	}
	g.batch = !g.old && g.hello.Flags&handoff.HelloBatch != 0
	if g.batch {
		w.Flags |= handoff.WelcomeBatch
	}
	msg := handoff.AppendWelcome(nil, &w)
	if g.old {
		msg = msg[:len(msg)-4]
		binary.LittleEndian.PutUint16(msg[2:], uint16(len(msg)-4))
	}
	g.send(msg)
}

// handshake does a good handshake and waits for READY.
func (g *fakeGateway) handshake() handoff.Hello {
	g.t.Helper()
	h := g.accept()
	g.welcome()
	g.expect(handoff.TypeReady)
	return h
}

// handOff connects a real TCP client, sends the server side to the worker as CONN id, and
// returns the client side once the worker ACKs it.
// peer is a test client whose server side was handed to the worker.
type peer struct {
	*bufio.ReadWriter
	c net.Conn
}

func closeClient(p *peer) { p.c.Close() }

func (g *fakeGateway) handOff(id uint64) *peer {
	g.t.Helper()
	return g.handOffAll(id)[0]
}

// handOffAll hands over one connection per id at once, as batond does with what one wake-up
// accepted: in one CONNS if WELCOME granted BATCH, else as CONNs back to back. It returns the
// client sides once the worker has ACKed every id.
func (g *fakeGateway) handOffAll(ids ...uint64) []*peer {
	g.t.Helper()
	peers := make([]*peer, len(ids))
	infos := make([]handoff.ConnInfo, len(ids))
	fds := make([]int, len(ids))
	for i, id := range ids {
		client, err := net.Dial("tcp", g.tcp.Addr().String())
		if err != nil {
			g.t.Fatal(err)
		}
		g.t.Cleanup(func() { client.Close() })
		server, err := g.tcp.Accept()
		if err != nil {
			g.t.Fatal(err)
		}
		f, err := server.(*net.TCPConn).File() // a private dup: this socket is not shared yet
		server.Close()
		if err != nil {
			g.t.Fatal(err)
		}
		defer f.Close() // the gateway's copy goes once the worker has it
		// File() made it blocking, as a 1.0 gateway sends it; batond sets O_NONBLOCK for a
		// worker that asked for it. The dup is this test's alone: Fd is safe here.
		fds[i] = int(f.Fd())
		if err := unix.SetNonblock(fds[i], g.nonblock); err != nil {
			g.t.Fatal(err)
		}
		infos[i] = handoff.ConnInfo{ID: id, Client: client.LocalAddr().(*net.TCPAddr).AddrPort(),
			Local: netip.MustParseAddrPort(g.tcp.Addr().String()), Listener: "public"}
		client.SetDeadline(time.Now().Add(10 * time.Second))
		peers[i] = &peer{bufio.NewReadWriter(bufio.NewReader(client), bufio.NewWriter(client)), client}
	}
	if g.batch && len(ids) > 1 {
		msg := handoff.AppendConns(nil, len(ids), func(i int) *handoff.ConnInfo { return &infos[i] })
		if err := g.ch.TrySendFDs(msg, fds); err != nil {
			g.t.Fatal(err)
		}
	} else {
		for i := range ids {
			if err := g.ch.TrySend(handoff.AppendConn(nil, &infos[i]), fds[i]); err != nil {
				g.t.Fatal(err)
			}
		}
	}
	g.expectIDs(handoff.TypeAck, ids...)
	return peers
}

func echo(t *testing.T, c *peer, s string) {
	t.Helper()
	c.WriteString(s + "\n")
	c.Flush()
	line, err := c.ReadString('\n')
	if err != nil || line != s+"\n" {
		t.Fatalf("echo %q: got %q, %v", s, line, err)
	}
}

// noRegistration fails if the worker connects to the registration socket within d.
func (g *fakeGateway) noRegistration(d time.Duration) {
	g.t.Helper()
	g.ln.SetDeadline(time.Now().Add(d))
	if c, err := g.ln.AcceptUnix(); err == nil {
		c.Close()
		g.t.Fatal("the worker registered again after a final rejection")
	}
}

func (g *fakeGateway) waitExit(wantOK bool) {
	g.t.Helper()
	select {
	case <-g.exited:
	case <-time.After(10 * time.Second):
		g.t.Fatal("worker did not exit")
	}
	if ok := g.exitErr == nil; ok != wantOK {
		g.t.Fatalf("worker exit: %v (want success=%v)", g.exitErr, wantOK)
	}
}

func TestConformance(t *testing.T) {
	for _, impl := range implementations {
		t.Run(impl.name, func(t *testing.T) {
			t.Run("hello", func(t *testing.T) {
				g := start(t, impl)
				h := g.accept()
				if h.MinVersion > 1 || h.MaxVersion < 1 {
					t.Errorf("versions %d..%d do not include 1", h.MinVersion, h.MaxVersion)
				}
				if int(h.PID) != g.cmd.Process.Pid || h.Slot != 3 || h.Generation != 7 || h.Token != token {
					t.Errorf("HELLO %+v does not match pid %d, BATON_WORKER=3, BATON_GENERATION=7, BATON_TOKEN", h, g.cmd.Process.Pid)
				}
				// NONBLOCK is a request a worker may make or not (PROTOCOL.md 1.1); READY and
				// DRAINING must be clear on a first registration.
				if h.Flags&^(handoff.HelloNonblock|handoff.HelloBatch) != 0 || h.Live != 0 {
					t.Errorf("first HELLO has flags %#x live %d, want no READY/DRAINING and 0", h.Flags, h.Live)
				}
				g.welcome()
				g.expect(handoff.TypeReady)
			})
			for _, code := range []handoff.ErrorCode{handoff.CodeVersion, handoff.CodeToken, handoff.CodePeer, handoff.CodeSlot} {
				t.Run("rejected-"+code.String(), func(t *testing.T) {
					g := start(t, impl)
					g.accept()
					g.send(handoff.AppendError(nil, &handoff.Error{Code: code, Reason: "conformance test says no"}))
					g.ch.Close()
					g.waitExit(false)
					if !strings.Contains(g.stderr.String(), "conformance test says no") {
						t.Errorf("the worker did not tell its operator why it was rejected")
					}
				})
			}
			t.Run("conn-ack-closed", func(t *testing.T) {
				g := start(t, impl)
				g.handshake()
				c := g.handOff(0xABCD00000001)
				echo(t, c, "hello through the handoff")
				c2 := g.handOff(0xABCD00000002)
				echo(t, c2, "second")
				echo(t, c, "first again")
				closeClient(c)
				g.expectIDs(handoff.TypeClosed, 0xABCD00000001)
				closeClient(c2)
				g.expectIDs(handoff.TypeClosed, 0xABCD00000002)
			})
			t.Run("several-at-once", func(t *testing.T) {
				// What one wake-up of batond accepted: one CONNS to a worker that asked for
				// BATCH, else CONNs back to back. Each is acked, served on its own socket, and
				// reported closed.
				g := start(t, impl)
				g.handshake()
				ids := []uint64{0xABCD00000011, 0xABCD00000012, 0xABCD00000013, 0xABCD00000014, 0xABCD00000015}
				peers := g.handOffAll(ids...)
				for i := len(peers) - 1; i >= 0; i-- {
					echo(t, peers[i], fmt.Sprintf("connection %d of the burst", i))
				}
				for i, p := range peers {
					closeClient(p)
					g.expectIDs(handoff.TypeClosed, ids[i])
				}
			})
			t.Run("gateway-1.0", func(t *testing.T) {
				// A 1.0 gateway: WELCOME without flags, blocking fds, whatever HELLO asked.
				g := start(t, impl)
				g.old = true
				g.handshake()
				c := g.handOff(0xABCD00000003)
				echo(t, c, "blocking fd from an older gateway")
				closeClient(c)
				g.expectIDs(handoff.TypeClosed, 0xABCD00000003)
			})
			t.Run("ping", func(t *testing.T) {
				g := start(t, impl)
				g.handshake()
				g.send(handoff.AppendNonce(nil, handoff.TypePing, 0x1122334455667788))
				body := g.expect(handoff.TypePong)
				if n, err := handoff.ParseNonce(handoff.TypePong, body); err != nil || n != 0x1122334455667788 {
					t.Fatalf("PONG nonce %#x %v", n, err)
				}
			})
			t.Run("optional-type-ignored", func(t *testing.T) {
				g := start(t, impl)
				g.handshake()
				g.send([]byte{0x80, 0, 2, 0, 1, 2}) // an optional message from a future version
				g.send(handoff.AppendNonce(nil, handoff.TypePing, 5))
				g.expect(handoff.TypePong)
			})
			t.Run("drain", func(t *testing.T) {
				g := start(t, impl)
				g.handshake()
				c1 := g.handOff(11)
				c2 := g.handOff(12)
				g.send(handoff.AppendDrain(nil, &handoff.Drain{Deadline: 30 * time.Second}))
				time.Sleep(100 * time.Millisecond)
				echo(t, c1, "still served after DRAIN")
				echo(t, c2, "me too")
				select {
				case <-g.exited:
					t.Fatal("worker exited with sessions open")
				default:
				}
				closeClient(c1)
				g.expectIDs(handoff.TypeClosed, 11)
				closeClient(c2)
				g.expectIDs(handoff.TypeClosed, 12)
				g.waitExit(true)
			})
			t.Run("reregister-refused-final", func(t *testing.T) {
				// SLOT on re-registration (say, another process group now holds the slot):
				// final, so no further HELLO; the session held is served to its end, then the
				// worker exits non-zero and says why.
				g := start(t, impl)
				g.handshake()
				c := g.handOff(31)
				g.ch.Close()
				g.accept()
				g.send(handoff.AppendError(nil, &handoff.Error{Code: handoff.CodeSlot, Reason: "conformance test: slot 3 is taken"}))
				g.ch.Close()
				g.noRegistration(time.Second)
				echo(t, c, "still served after a final rejection")
				select {
				case <-g.exited:
					t.Fatal("worker exited with a session open")
				default:
				}
				closeClient(c)
				g.waitExit(false)
				if !strings.Contains(g.stderr.String(), "slot 3 is taken") {
					t.Errorf("the worker did not tell its operator why it was rejected")
				}
			})
			t.Run("reregister-shutdown-retries", func(t *testing.T) {
				// SHUTDOWN is not final: the worker comes back (with backoff) until welcomed.
				g := start(t, impl)
				g.handshake()
				c := g.handOff(41)
				g.ch.Close()
				for range 2 {
					g.accept()
					g.send(handoff.AppendError(nil, &handoff.Error{Code: handoff.CodeShutdown, Reason: "batond is stopping"}))
					g.ch.Close()
				}
				if h := g.accept(); h.Live != 1 || h.Flags&handoff.HelloReady == 0 {
					t.Fatalf("HELLO after SHUTDOWN: live=%d flags=%#x, want live=1 with READY", h.Live, h.Flags)
				}
				g.welcome()
				echo(t, c, "after SHUTDOWN")
				closeClient(c)
				g.expectIDs(handoff.TypeClosed, 41)
			})
			t.Run("reregister", func(t *testing.T) {
				g := start(t, impl)
				g.handshake()
				c := g.handOff(21)
				echo(t, c, "before the drop")
				g.ch.Close() // batond "crashes"
				h := g.accept()
				if h.Live != 1 || h.Flags&handoff.HelloReady == 0 {
					t.Fatalf("re-registration HELLO live=%d flags=%#x, want live=1 with READY", h.Live, h.Flags)
				}
				g.welcome()
				echo(t, c, "after the drop")
				c2 := g.handOff(22)
				echo(t, c2, "new one")
				closeClient(c)
				g.expectIDs(handoff.TypeClosed, 21)
				closeClient(c2)
				g.expectIDs(handoff.TypeClosed, 22)
			})
		})
	}
}
