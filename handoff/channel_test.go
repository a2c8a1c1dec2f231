package handoff

import (
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// pair returns two connected Channels over a real SOCK_SEQPACKET socket pair.
func pair(t testing.TB) (*Channel, *Channel) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(fd int) *Channel {
		f := os.NewFile(uintptr(fd), "seqpacket")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		ch, err := NewChannel(c.(*net.UnixConn))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ch.Close() })
		return ch
	}
	return mk(fds[0]), mk(fds[1])
}

// rawSend sends bytes with the given fds attached, bypassing Channel's own rules.
func rawSend(t testing.TB, ch *Channel, msg []byte, fds ...int) {
	t.Helper()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := ch.c.WriteMsgUnix(msg, oob, nil); err != nil {
		t.Fatal(err)
	}
}

func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func devnull(t testing.TB) int {
	fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

func TestConnCarriesOneFD(t *testing.T) {
	a, b := pair(t)
	fd := devnull(t)
	defer unix.Close(fd)
	if err := a.TrySend(AppendConn(nil, &ConnInfo{ID: 5, Listener: "l"}), fd); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, MaxMessage)
	msg, got, err := b.Recv(buf)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(got)
	if got < 0 || got == fd {
		t.Fatalf("received fd %d (sent %d)", got, fd)
	}
	flags, _ := unix.FcntlInt(uintptr(got), unix.F_GETFD, 0)
	if flags&unix.FD_CLOEXEC == 0 {
		t.Error("received fd is not close-on-exec")
	}
	expectConn(t, msg, 5)
}

// Every bad message is rejected and every fd that came with it is closed.
func TestRecvRejectsAndCloses(t *testing.T) {
	a, b := pair(t)
	buf := make([]byte, MaxMessage)
	before := openFDs(t)
	conn := AppendConn(nil, &ConnInfo{ID: 1})
	cases := []struct {
		name string
		send func()
		want error
	}{
		{"conn without fd", func() { rawSend(t, a, conn) }, ErrFDs},
		{"conn with two fds", func() { x, y := devnull(t), devnull(t); rawSend(t, a, conn, x, y); unix.Close(x); unix.Close(y) }, ErrFDs},
		{"ack with an fd", func() { x := devnull(t); rawSend(t, a, AppendIDs(nil, TypeAck, []uint64{1}), x); unix.Close(x) }, ErrFDs},
		{"too many fds", func() {
			var xs []int
			for i := 0; i < MaxConns+8; i++ {
				xs = append(xs, devnull(t))
			}
			rawSend(t, a, conn, xs...)
			for _, x := range xs {
				unix.Close(x)
			}
		}, ErrTruncated},
	}
	for _, c := range cases {
		c.send()
		_, fd, err := b.Recv(buf)
		if !errors.Is(err, c.want) || fd != -1 {
			t.Errorf("%s: fd %d err %v, want %v", c.name, fd, err, c.want)
		}
	}
	// An oversized message is truncated by the kernel and reported, never half-parsed.
	big := make([]byte, MaxMessage+100)
	big[0] = byte(TypeAck)
	rawSend(t, a, big)
	if _, _, err := b.Recv(buf); !errors.Is(err, ErrTruncated) {
		t.Errorf("oversized: %v", err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("fds before %d, after %d", before, after)
	}
	a.Close()
	if _, _, err := b.Recv(buf); !errors.Is(err, io.EOF) {
		t.Errorf("after close: %v, want EOF", err)
	}
}

func TestTrySendWouldBlock(t *testing.T) {
	a, _ := pair(t)
	msg := AppendNonce(nil, TypePing, 1)
	for i := 0; i < 1_000_000; i++ {
		if err := a.TrySend(msg, -1); err != nil {
			if !errors.Is(err, ErrWouldBlock) {
				t.Fatal(err)
			}
			return
		}
	}
	t.Fatal("a peer that never reads never filled up")
}

func TestListenModeAndStale(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "w.sock")
	l, err := Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 || st.Mode()&os.ModeSocket == 0 {
		t.Fatalf("mode %v %v", st.Mode(), err)
	}
	if _, err := Listen(path, 0o600); !errors.Is(err, ErrInUse) {
		t.Fatalf("second listen on a live socket: %v", err)
	}
	l.Close() // the file stays (no unlink on close): a stale socket
	l2, err := Listen(path, 0o600)
	if err != nil {
		t.Fatalf("listen over a stale socket: %v", err)
	}
	l2.Close()
	ch, err := Dial(filepath.Join(dir, "missing.sock"))
	if err == nil {
		ch.Close()
		t.Fatal("dial of a missing socket succeeded")
	}
}

func TestFDsStableOverManyHandoffs(t *testing.T) {
	a, b := pair(t)
	buf := make([]byte, MaxMessage)
	before := openFDs(t)
	msg := AppendConn(nil, &ConnInfo{ID: 1})
	for i := 0; i < 2000; i++ {
		fd := devnull(t)
		if err := a.TrySend(msg, fd); err != nil {
			t.Fatal(err)
		}
		unix.Close(fd)
		_, got, err := b.Recv(buf)
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(got)
	}
	if after := openFDs(t); after != before {
		t.Fatalf("fds before %d, after %d", before, after)
	}
}

// BenchmarkHandoffRoundTrip is one gateway-side handoff: CONN with an fd out, the worker side
// receives it and answers ACK, the gateway receives and decodes the ACK. Allocations reported are
// for both sides together; the gateway's part (encode, TrySend, Recv, ParseIDs) allocates nothing.
func BenchmarkHandoffRoundTrip(b *testing.B) {
	gw, wk := pair(b)
	fd := devnull(b)
	defer unix.Close(fd)
	gbuf := make([]byte, MaxMessage)
	wbuf := make([]byte, MaxMessage)
	out := make([]byte, 0, MaxMessage)
	ackOut := make([]byte, 0, 64)
	ids := make([]uint64, 0, 16)
	ci := ConnInfo{Client: netipAP("127.0.0.1:40000"), Local: netipAP("127.0.0.1:7000"), Listener: "tcp"}
	var got ConnInfo
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ci.ID = uint64(i)
		if err := gw.TrySend(AppendConn(out[:0], &ci), fd); err != nil {
			b.Fatal(err)
		}
		msg, rfd, err := wk.Recv(wbuf)
		if err != nil {
			b.Fatal(err)
		}
		unix.Close(rfd)
		_, body, _ := Split(msg)
		if err := ParseConn(body, &got); err != nil {
			b.Fatal(err)
		}
		if err := wk.TrySend(AppendIDs(ackOut[:0], TypeAck, []uint64{got.ID}), -1); err != nil {
			b.Fatal(err)
		}
		msg, _, err = gw.Recv(gbuf)
		if err != nil {
			b.Fatal(err)
		}
		typ, body, _ := Split(msg)
		if ids, err = ParseIDs(ids[:0], typ, body); err != nil || ids[0] != uint64(i) {
			b.Fatal(err)
		}
	}
}

// BenchmarkGatewaySide measures only what the gateway does per handoff (CONN out, ACK in) with
// the worker side played by raw syscalls outside the timer's allocation count.
func BenchmarkGatewaySide(b *testing.B) {
	gw, wk := pair(b)
	fd := devnull(b)
	defer unix.Close(fd)
	gbuf := make([]byte, MaxMessage)
	out := make([]byte, 0, MaxMessage)
	ack := AppendIDs(nil, TypeAck, []uint64{1})
	ids := make([]uint64, 0, 16)
	ci := ConnInfo{ID: 1, Client: netipAP("127.0.0.1:40000"), Local: netipAP("127.0.0.1:7000"), Listener: "tcp"}
	rc, _ := wk.c.SyscallConn()
	var wfd int
	rc.Control(func(f uintptr) { wfd = int(f) })
	wbuf := make([]byte, MaxMessage)
	woob := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := gw.TrySend(AppendConn(out[:0], &ci), fd); err != nil {
			b.Fatal(err)
		}
		// worker side, raw: receive, close the fd, ack
		// x/sys's Recvmsg allocates its sockaddr; a hand-built msghdr keeps the stand-in
		// worker out of the allocation count, so the figure is the gateway's alone.
		iov := unix.Iovec{Base: &wbuf[0]}
		iov.SetLen(len(wbuf))
		mh := unix.Msghdr{Iov: &iov, Iovlen: 1, Control: &woob[0]}
		mh.SetControllen(len(woob))
		if _, _, errno := unix.Syscall(unix.SYS_RECVMSG, uintptr(wfd), uintptr(unsafe.Pointer(&mh)), unix.MSG_CMSG_CLOEXEC); errno != 0 || mh.Controllen == 0 {
			b.Fatal(errno)
		}
		unix.Close(int(int32(le.Uint32(woob[unix.CmsgLen(0):]))))
		if err := unix.Send(wfd, ack, 0); err != nil {
			b.Fatal(err)
		}
		msg, _, err := gw.Recv(gbuf)
		if err != nil {
			b.Fatal(err)
		}
		typ, body, _ := Split(msg)
		if ids, err = ParseIDs(ids[:0], typ, body); err != nil {
			b.Fatal(err)
		}
	}
}

func netipAP(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// TryRecv never waits: nothing queued is ErrWouldBlock, a queued message (fd included) is
// returned as Recv would, and a hang-up is io.EOF.
func TestTryRecv(t *testing.T) {
	a, b := pair(t)
	buf := make([]byte, MaxMessage)
	if _, _, err := b.TryRecv(buf); !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("empty channel: %v, want ErrWouldBlock", err)
	}
	fd := devnull(t)
	defer unix.Close(fd)
	if err := a.TrySend(AppendConn(nil, &ConnInfo{ID: 9, Listener: "l"}), fd); err != nil {
		t.Fatal(err)
	}
	msg, got, err := b.TryRecv(buf)
	if err != nil || got < 0 {
		t.Fatalf("TryRecv: fd %d, %v", got, err)
	}
	unix.Close(got)
	if typ, _, _ := Split(msg); typ != TypeConn {
		t.Fatalf("got %v", typ)
	}
	if _, _, err := b.TryRecv(buf); !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("drained channel: %v, want ErrWouldBlock", err)
	}
	a.Close()
	if _, _, err := b.TryRecv(buf); !errors.Is(err, io.EOF) {
		t.Fatalf("after hang-up: %v, want io.EOF", err)
	}
}

// WELCOME's flags were appended in 1.1: a WELCOME from an older gateway (without them) still
// decodes, with no flags, and one with them round-trips.
func TestWelcomeFlagsAppended(t *testing.T) {
	w := Welcome{Version: 1, PingInterval: 2 * time.Second, Generation: 7, Flags: WelcomeNonblock}
	msg := AppendWelcome(nil, &w)
	_, body, err := Split(msg)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ParseWelcome(body); err != nil || got != w {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	old, err := ParseWelcome(body[:len(body)-4])
	if err != nil || old.Flags != 0 || old.Generation != 7 {
		t.Fatalf("WELCOME without flags: %+v, %v", old, err)
	}
}

// A receiver out of descriptors gets the CONN without its fd (MSG_CTRUNC, no fd): Recv returns
// the whole message with ErrNoFD, so the worker can REFUSE it by id, not a truncation error
// that would end the channel.
func TestRecvNoFD(t *testing.T) {
	a, b := pair(t)
	fd := devnull(t)
	defer unix.Close(fd)
	if err := a.TrySend(AppendConn(nil, &ConnInfo{ID: 77, Listener: "l"}), fd); err != nil {
		t.Fatal(err)
	}
	restore := roomForFDs(t, 0)
	buf := make([]byte, MaxMessage)
	msg, got, err := b.Recv(buf)
	restore()
	if !errors.Is(err, ErrNoFD) || got != -1 {
		if got >= 0 {
			unix.Close(got)
		}
		t.Fatalf("Recv out of fds: fd %d, %v; want ErrNoFD", got, err)
	}
	expectConn(t, msg, 77)
}

// CONNS carries several connections and their fds, in order, in one message; RecvFDs returns
// them all, and the fd rules hold for it as for CONN.
func TestConnsCarryTheirFDs(t *testing.T) {
	a, b := pair(t)
	infos := []ConnInfo{
		{ID: 1, Client: netip.MustParseAddrPort("10.0.0.1:1000"), Local: netip.MustParseAddrPort("[::1]:7000"), Listener: "public"},
		{ID: 2, Listener: "admin"},
		{ID: 3, Client: netip.MustParseAddrPort("[2001:db8::3]:3"), Listener: strings.Repeat("x", 40)},
	}
	// Three different files, so the test can tell which fd arrived where.
	var sent []int
	var want []uint64
	for range infos {
		p := make([]int, 2)
		if err := unix.Pipe2(p, unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
		sent = append(sent, p[0])
		var st unix.Stat_t
		unix.Fstat(p[0], &st)
		want = append(want, st.Ino)
	}
	msg := AppendConns(nil, len(infos), func(i int) *ConnInfo { return &infos[i] })
	if len(msg) != ConnsOverhead+ConnEntryLen(&infos[0])+ConnEntryLen(&infos[1])+ConnEntryLen(&infos[2]) {
		t.Errorf("CONNS of %d bytes; ConnEntryLen says otherwise", len(msg))
	}
	if err := a.TrySendFDs(msg, sent); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, MaxMessage)
	got, fds, err := b.RecvFDs(buf, make([]int, 0, MaxConns))
	if err != nil || len(fds) != 3 {
		t.Fatalf("RecvFDs: %d fds, %v", len(fds), err)
	}
	for i, fd := range fds {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Ino != want[i] {
			t.Errorf("fd %d of the CONNS is not the %d-th file sent", i, i)
		}
		if flags, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); flags&unix.FD_CLOEXEC == 0 {
			t.Errorf("received fd %d without CLOEXEC", fd)
		}
		unix.Close(fd)
	}
	typ, body, err := Split(got)
	if err != nil || typ != TypeConns {
		t.Fatalf("%v %v", typ, err)
	}
	parsed, err := ParseConns(nil, body)
	if err != nil || len(parsed) != 3 {
		t.Fatalf("ParseConns: %v %v", parsed, err)
	}
	for i := range infos {
		if parsed[i] != infos[i] {
			t.Errorf("entry %d: %+v, want %+v", i, parsed[i], infos[i])
		}
	}

	// Recv, which hands out one fd, refuses a CONNS and closes its fds.
	if err := a.TrySendFDs(msg, sent); err != nil {
		t.Fatal(err)
	}
	if _, fd, err := b.Recv(buf); !errors.Is(err, ErrFDs) || fd != -1 {
		t.Errorf("Recv of a CONNS: fd %d, %v; want ErrFDs", fd, err)
	}
	// A count that does not match the fds is ErrFDs, whichever way.
	for _, n := range []int{2, 4} {
		if err := a.TrySendFDs(msg, append(append([]int{}, sent...), sent...)[:n]); err != nil {
			t.Fatal(err)
		}
		if _, fds, err := b.RecvFDs(buf, nil); !errors.Is(err, ErrFDs) || len(fds) != 0 {
			t.Errorf("CONNS of 3 with %d fds: %d fds, %v; want ErrFDs", n, len(fds), err)
		}
	}
	if err := a.TrySendFDs(msg, make([]int, MaxConns+1)); !errors.Is(err, ErrFDs) {
		t.Errorf("TrySendFDs with %d fds: %v", MaxConns+1, err)
	}
	assertDrained(t, b)
}

// assertDrained checks that nothing is left queued: every message sent was received and
// accounted for above.
func assertDrained(t *testing.T, b *Channel) {
	t.Helper()
	if _, _, err := b.TryRecv(make([]byte, MaxMessage)); !errors.Is(err, ErrWouldBlock) {
		t.Errorf("left in the channel: %v", err)
	}
}

func TestParseConnsRejects(t *testing.T) {
	one := ConnInfo{ID: 9, Listener: "p"}
	ok := AppendConns(nil, 1, func(int) *ConnInfo { return &one })
	_, body, _ := Split(ok)
	if cs, err := ParseConns(nil, body); err != nil || len(cs) != 1 || cs[0] != one {
		t.Fatalf("%v %v", cs, err)
	}
	zero := []byte{0, 0}
	tooMany := binary.LittleEndian.AppendUint16(nil, MaxConns+1)
	short := append([]byte{2, 0}, body[2:]...) // says 2, has 1
	cut := body[:len(body)-1]
	for name, b := range map[string][]byte{"count 0": zero, "count > MaxConns": tooMany, "fewer entries": short, "entry cut": cut, "empty": nil} {
		if _, err := ParseConns(nil, b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", name, err)
		}
	}
	// An entry with bytes after its fields (a later revision's) and bytes after the last entry
	// are ignored.
	longer := append([]byte{}, body...)
	longer[2] += 3 // entry length
	longer = append(longer, 1, 2, 3, 0xEE)
	if cs, err := ParseConns(nil, longer); err != nil || len(cs) != 1 || cs[0] != one {
		t.Errorf("room for new fields: %v %v", cs, err)
	}
}

// A CONNS whose fds do not all fit (the receiver is at RLIMIT_NOFILE) arrives with the first
// ones and ErrNoFD: the receiver refuses the rest.
func TestRecvFDsPartial(t *testing.T) {
	a, b := pair(t)
	infos := []ConnInfo{{ID: 1}, {ID: 2}, {ID: 3}}
	fd := devnull(t)
	defer unix.Close(fd)
	msg := AppendConns(nil, 3, func(i int) *ConnInfo { return &infos[i] })
	if err := a.TrySendFDs(msg, []int{fd, fd, fd}); err != nil {
		t.Fatal(err)
	}
	restore := roomForFDs(t, 1)
	got, fds, err := b.RecvFDs(make([]byte, MaxMessage), nil)
	restore()
	defer closeAll(fds)
	if !errors.Is(err, ErrNoFD) || len(fds) != 1 || ConnsCount(got) != 3 {
		t.Fatalf("RecvFDs out of fds: %d fds, count %d, %v; want 1 fd and ErrNoFD", len(fds), ConnsCount(got), err)
	}
}

// roomForFDs lowers RLIMIT_NOFILE so that exactly n more descriptors can be opened (the limit is
// on fd numbers: it is set just above the n lowest free ones) and returns what restores it.
// Nothing else in the test process may open fds until then.
func roomForFDs(t *testing.T, n int) (restore func()) {
	t.Helper()
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	var held []int
	for range n + 1 {
		fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, fd)
	}
	closeAll(held)
	limit := held[len(held)-1] // the (n+1)-th lowest free fd: n fit below it
	tight := old
	tight.Cur = uint64(limit)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &tight); err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
			t.Fatal(err)
		}
	}
}

// Recv, which hands out one fd, refuses a CONNS that arrived with only some of its fds too, and
// closes the ones that did arrive.
func TestRecvPartialConnsClosesFDs(t *testing.T) {
	a, b := pair(t)
	infos := []ConnInfo{{ID: 1}, {ID: 2}, {ID: 3}}
	fd := devnull(t)
	defer unix.Close(fd)
	if err := a.TrySendFDs(AppendConns(nil, 3, func(i int) *ConnInfo { return &infos[i] }), []int{fd, fd, fd}); err != nil {
		t.Fatal(err)
	}
	before := openFDs(t)
	restore := roomForFDs(t, 2)
	_, got, err := b.Recv(make([]byte, MaxMessage))
	restore()
	if !errors.Is(err, ErrFDs) || got != -1 {
		t.Fatalf("Recv of a partial CONNS: fd %d, %v; want ErrFDs", got, err)
	}
	if after := openFDs(t); after != before {
		t.Fatalf("%d fds open before Recv, %d after: the ones that arrived leaked", before, after)
	}
}

// expectConn fails unless msg is a CONN for connection id.
func expectConn(t *testing.T, msg []byte, id uint64) {
	t.Helper()
	typ, body, _ := Split(msg)
	var c ConnInfo
	if typ != TypeConn || ParseConn(body, &c) != nil || c.ID != id {
		t.Fatalf("got %v %+v, want CONN %d", typ, c, id)
	}
}

// ListenUnix binds a temporary name and renames it: its errors must name the path asked for,
// never the temporary name, and keep their cause; a long base name must not make the
// temporary name too long for a path that fits.
func TestListenUnixErrorsNameThePath(t *testing.T) {
	dir := t.TempDir()
	check := func(what, path string, err error, cause error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error", what)
		}
		if !strings.Contains(err.Error(), path) || strings.Contains(err.Error(), ".tmp") || strings.Contains(err.Error(), ".baton.") {
			t.Errorf("%s: %q does not name %s alone", what, err, path)
		}
		if cause != nil && !errors.Is(err, cause) {
			t.Errorf("%s: %v is not %v", what, err, cause)
		}
		t.Logf("%s: %v", what, err)
	}
	missing := filepath.Join(dir, "missing", "w.sock")
	_, err := Listen(missing, 0o600)
	check("missing directory", missing, err, fs.ErrNotExist)

	isDir := filepath.Join(dir, "a-directory")
	if err := os.Mkdir(isDir, 0o755); err != nil {
		t.Fatal(err)
	}
	_, err = Listen(isDir, 0o600)
	check("a directory in the way", isDir, err, nil)

	tooLong := filepath.Join(dir, strings.Repeat("x", maxSocketPath-len(dir)))
	_, err = Listen(tooLong, 0o600)
	check("too long", tooLong, err, ErrPathTooLong)

	// Exactly as long as a socket path can be: the usual temporary name would not fit.
	longest := filepath.Join(dir, strings.Repeat("y", maxSocketPath-1-len(dir)))
	if len(longest) != maxSocketPath {
		t.Fatalf("test path is %d bytes, want %d", len(longest), maxSocketPath)
	}
	l, err := Listen(longest, 0o600)
	if err != nil {
		t.Fatalf("listen on a %d-byte path: %v", len(longest), err)
	}
	defer l.Close()
	ch, err := Dial(longest)
	if err != nil {
		t.Fatalf("dial the %d-byte path: %v", len(longest), err)
	}
	ch.Close()
	if ents, _ := os.ReadDir(dir); len(ents) != 2 {
		t.Errorf("%d entries in the directory, want 2 (no temporary name left): %v", len(ents), ents)
	}
}
