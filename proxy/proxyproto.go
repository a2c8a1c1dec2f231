package proxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"
)

// PROXY protocol (v1 and v2) in front of a listener. A balancer that proxies TCP (HAProxy with
// send-proxy-v2) sends a header with the real client's and destination's addresses before the
// client's first byte; batond reads exactly that header and not one byte more (the rest is the
// game's, and goes with the socket to the worker), and hands the addresses on in CONN.
//
// The accept loop never waits for a header: connections whose header has not fully arrived
// wait in one epoll set served by one goroutine (the header stage), with a deadline each.

// ProxyProtocol configures a listener that expects a PROXY header on every connection.
type ProxyProtocol struct {
	// From are the networks a header is accepted from (the balancers). A connection from
	// elsewhere is closed and counted (ReasonProxyUntrusted). Empty: from anywhere.
	From []netip.Prefix
	// Timeout bounds how long a connection may take to send its header [3s].
	Timeout time.Duration
}

// maxHeader bounds a header batond accepts: a v1 header is at most 107 bytes; a v2 header from
// a balancer carries addresses and a few TLVs.
const maxHeader = 2048

// Errors of header parsing.
var (
	ErrNotProxy     = errors.New("proxy protocol: the connection does not start with a PROXY header")
	ErrHeaderTooBig = fmt.Errorf("proxy protocol: header longer than %d bytes", maxHeader)
)

var sigV2 = []byte("\r\n\r\n\x00\r\nQUIT\n")

// headerLen returns the length of the PROXY header that b starts with, or 0 if b is a
// prefix of one and more bytes are needed.
func headerLen(b []byte) (int, error) {
	switch {
	case len(b) == 0:
		return 0, nil
	case b[0] == sigV2[0]:
		if !bytes.HasPrefix(b, sigV2[:min(len(b), len(sigV2))]) {
			return 0, ErrNotProxy
		}
		if len(b) < 16 {
			return 0, nil
		}
		n := 16 + int(binary.BigEndian.Uint16(b[14:16]))
		if n > maxHeader {
			return 0, ErrHeaderTooBig
		}
		return n, nil
	case b[0] == 'P':
		if !bytes.HasPrefix(b, []byte("PROXY ")[:min(len(b), 6)]) {
			return 0, ErrNotProxy
		}
		if i := bytes.Index(b, []byte("\r\n")); i >= 0 && i+2 <= 107 {
			return i + 2, nil
		}
		if len(b) >= 107 {
			return 0, fmt.Errorf("%w: v1 header without CRLF in 107 bytes", ErrNotProxy)
		}
		return 0, nil
	}
	return 0, ErrNotProxy
}

// errLocal: a LOCAL header, which a balancer sends on its own health checks: nothing to hand
// to a worker.
var errLocal = errors.New("proxy protocol: LOCAL (a balancer's health check)")

// parseHeader parses a complete header (go-proxyproto) and returns the addresses it gives.
func parseHeader(b []byte, client, local netip.AddrPort) (netip.AddrPort, netip.AddrPort, error) {
	h, err := proxyproto.Read(bufio.NewReaderSize(bytes.NewReader(b), len(b)+16))
	if err != nil {
		return client, local, fmt.Errorf("proxy protocol: %w", err)
	}
	if h.Command.IsLocal() {
		return client, local, errLocal
	}
	src, dst, ok := h.TCPAddrs()
	if !ok {
		return client, local, nil // UNKNOWN / UNSPEC: the socket's own addresses
	}
	s, d := src.AddrPort(), dst.AddrPort()
	return netip.AddrPortFrom(s.Addr().Unmap(), s.Port()), netip.AddrPortFrom(d.Addr().Unmap(), d.Port()), nil
}

// allowed says whether a header may come from addr.
func (pp *ProxyProtocol) allowed(addr netip.Addr) bool {
	if len(pp.From) == 0 {
		return true
	}
	for _, p := range pp.From {
		if p.Contains(addr.Unmap()) {
			return true
		}
	}
	return false
}

// ExpectProxy makes every connection accepted on l start with a PROXY header (call it before
// Serve). A listener that does not expect one never parses one.
func (l *Listener) ExpectProxy(pp ProxyProtocol) {
	if pp.Timeout <= 0 {
		pp.Timeout = 3 * time.Second
	}
	l.pp = &pp
}

// headers returns the gateway's header stage, started on first use.
func (g *Gateway) headers() (*headerStage, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.hs == nil {
		hs, err := newHeaderStage(g)
		if err != nil {
			return nil, err
		}
		g.hs = hs
	}
	return g.hs, nil
}

// refuse closes a connection the gateway will not hand off and has not counted yet (it never
// entered the header stage), counting it as accepted and closed for reason r.
func (g *Gateway) refuse(fd int, r CloseReason) {
	unix.Close(fd)
	g.mu.Lock()
	g.stats.accepted.Add(1)
	g.stats.closed[r].Add(1)
	g.mu.Unlock()
}

// refusePending closes a connection of the header stage, which was counted accepted and in
// flight when it entered: now closed for reason r, and out of flight.
func (g *Gateway) refusePending(fd int, r CloseReason) {
	unix.Close(fd)
	g.mu.Lock()
	g.stats.closed[r].Add(1)
	g.doneInflightLocked(1)
	g.mu.Unlock()
}

// pendingHeader is a connection whose header has not fully arrived.
type pendingHeader struct {
	l             *Listener
	fd            int
	client, local netip.AddrPort
	deadline      time.Time
}

// headerStage waits for the headers of PROXY connections, off the accept loop.
//
// Ownership of a pending connection's fd: the stage owns it while its entry is in pending, and
// taking the entry out of pending (claim) is the one claim on it: whoever deletes the entry
// closes the fd or passes it on, and nobody else touches it. add publishes the entry before
// the fd joins the epoll set, so the run loop never sees an event for an fd it cannot find.
type headerStage struct {
	g       *Gateway
	epfd    int
	max     int // pending connections at most; more are refused (ReasonProxyBusy)
	buf     []byte
	bu      *burst // one connection at a time, from run's goroutine only
	mu      sync.Mutex
	pending map[int]*pendingHeader
	closed  bool
	done    chan struct{}
}

func newHeaderStage(g *Gateway) (*headerStage, error) {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("proxy protocol: %w", err)
	}
	bu := newBurst()
	bu.counted = true // counted accepted and in flight when they entered the stage (add)
	h := &headerStage{g: g, epfd: ep, max: g.cfg.MaxPendingHeaders, buf: make([]byte, maxHeader), bu: bu,
		pending: map[int]*pendingHeader{}, done: make(chan struct{})}
	go h.run()
	return h, nil
}

// add takes over fd (accepted on l) until its header is read or it is closed. From here on
// the connection counts as accepted and in flight (a stopping or handing-over batond waits
// for it: WaitIdle).
func (h *headerStage) add(l *Listener, fd int, client, local netip.AddrPort, now time.Time) {
	if !l.pp.allowed(client.Addr()) {
		h.g.refuse(fd, ReasonProxyUntrusted)
		return
	}
	p := &pendingHeader{l: l, fd: fd, client: client, local: local, deadline: now.Add(l.pp.Timeout)}
	// Edge-triggered: the stage only peeks, so a partial header would keep a level-triggered
	// socket ready (and the loop spinning) until its timeout; each new segment is a new edge.
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd)}
	h.mu.Lock()
	switch {
	case h.closed:
		h.mu.Unlock()
		h.g.refuse(fd, ReasonShutdown)
		return
	case len(h.pending) >= h.max:
		// A flood of connections that send nothing must not take every fd batond has.
		h.mu.Unlock()
		h.g.refuse(fd, ReasonProxyBusy)
		return
	}
	h.g.mu.Lock()
	h.g.stats.accepted.Add(1)
	h.g.inflight++
	h.g.mu.Unlock()
	h.pending[fd] = p
	// Under the stage's lock: close cannot have closed epfd, nor claimed p, meanwhile.
	err := unix.EpollCtl(h.epfd, unix.EPOLL_CTL_ADD, fd, &ev)
	if err != nil {
		delete(h.pending, fd)
	}
	h.mu.Unlock()
	if err != nil {
		h.g.refusePending(fd, ReasonSocket)
	}
}

// errPeerGone: the connection was reset or closed before its header came.
var errPeerGone = errors.New("proxy protocol: the connection ended before its header")

// takeHeader peeks at fd's first bytes and, once the header is all there, parses it and consumes
// exactly it. done is false while more bytes are needed (nothing was consumed).
func takeHeader(fd int, buf []byte, client, local netip.AddrPort) (c, lo netip.AddrPort, done bool, err error) {
	n, _, err := unix.Recvfrom(fd, buf, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	switch {
	case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR):
		return client, local, false, nil
	case err != nil || n == 0:
		return client, local, true, errPeerGone
	}
	hl, err := headerLen(buf[:n])
	if err == nil && (hl == 0 || hl > n) {
		return client, local, false, nil
	}
	if err == nil {
		client, local, err = parseHeader(buf[:hl], client, local)
	}
	if err == nil {
		// The header's bytes are in the socket: this read takes them and nothing else.
		if m, rerr := unix.Read(fd, buf[:hl]); rerr != nil || m != hl {
			err = fmt.Errorf("proxy protocol: consuming the header: %d of %d bytes, %v", m, hl, rerr)
		}
	}
	return client, local, true, err
}

// reasonFor is the close reason of a header that failed.
func reasonFor(err error) CloseReason {
	if errors.Is(err, errLocal) {
		return ReasonProxyLocal
	}
	return ReasonProxyInvalid
}

// inline deals with a new connection's header in the accept loop when it can do so without
// waiting: the header usually comes in the client's first segment, often before the accept.
// It peeks without blocking; a complete header is consumed and the connection joins the burst
// (bu) with the header's addresses; a peer not allowed or a bad header is closed and counted.
// It returns false, having done nothing, when the header is not all there yet: then the
// header stage waits for it.
func (h *headerStage) inline(l *Listener, fd int, client, local netip.AddrPort, buf []byte, bu *burst) bool {
	if !l.pp.allowed(client.Addr()) {
		h.g.refuse(fd, ReasonProxyUntrusted)
		return true
	}
	c, lo, done, err := takeHeader(fd, buf, client, local)
	switch {
	case !done:
		return false
	case err != nil:
		h.g.log.Debug("proxy protocol: no valid header; closing", "peer", client, "error", err)
		h.g.refuse(fd, reasonFor(err))
	default:
		bu.add(fd, c, lo)
	}
	return true
}

// run serves the epoll set until close: each readable connection is peeked at; a complete
// header is consumed and the connection dispatched; expired ones are closed.
func (h *headerStage) run() {
	defer close(h.done)
	events := make([]unix.EpollEvent, 64)
	for {
		n, err := unix.EpollWait(h.epfd, events, 100)
		if err != nil && !errors.Is(err, unix.EINTR) {
			h.g.log.Error("proxy protocol: epoll_wait failed", "error", err)
			n = 0
			time.Sleep(100 * time.Millisecond)
		}
		h.mu.Lock()
		closed := h.closed
		h.mu.Unlock()
		if closed {
			return
		}
		for _, ev := range events[:max(n, 0)] {
			// Only this goroutine claims entries while the stage runs (close waits for it to
			// end): p stays the stage's until read or drop claims it.
			h.mu.Lock()
			p := h.pending[int(ev.Fd)]
			h.mu.Unlock()
			if p != nil {
				h.read(p, ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0)
			}
		}
		h.expire(time.Now())
	}
}

// read takes p's header once it is all there and dispatches the connection.
func (h *headerStage) read(p *pendingHeader, hangup bool) {
	client, local, done, err := takeHeader(p.fd, h.buf, p.client, p.local)
	switch {
	case !done && hangup:
		h.drop(p, ReasonProxyInvalid) // the peer is done sending and the header is incomplete
		return
	case !done:
		return // more to come (the next segment is a new edge)
	case err != nil:
		h.g.log.Debug("proxy protocol: no valid header; closing", "peer", p.client, "error", err)
		h.drop(p, reasonFor(err))
		return
	}
	if !h.claim(p) {
		return
	}
	h.bu.add(p.fd, client, local)
	h.g.dispatchBurst(p.l, h.bu, time.Now()) // bu.counted: no second count
}

// expire closes the connections whose header did not arrive in time.
func (h *headerStage) expire(now time.Time) {
	var late []*pendingHeader
	h.mu.Lock()
	for _, p := range h.pending {
		if now.After(p.deadline) {
			late = append(late, p)
		}
	}
	h.mu.Unlock()
	for _, p := range late {
		h.drop(p, ReasonProxyTimeout)
	}
}

// claim takes p out of the stage: true if this call did, and with it took p's fd over (out of
// the epoll set, still open). False: someone else claimed it first and owns the fd.
func (h *headerStage) claim(p *pendingHeader) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.pending[p.fd] != p {
		return false
	}
	delete(h.pending, p.fd)
	// The fd is still open (ours), so this cannot touch another connection's registration. The
	// socket may live on in a worker after our close, and with it an epoll registration.
	_ = unix.EpollCtl(h.epfd, unix.EPOLL_CTL_DEL, p.fd, nil)
	return true
}

// drop closes p's connection for reason r, if it can claim it.
func (h *headerStage) drop(p *pendingHeader, r CloseReason) {
	if h.claim(p) {
		h.g.refusePending(p.fd, r)
	}
}

// close stops the stage and closes every connection still waiting for its header. The run
// loop has ended before it claims them: it may have claimed (and closed) some meanwhile.
func (h *headerStage) close() {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return
	}
	h.closed = true
	h.mu.Unlock()
	<-h.done
	h.mu.Lock()
	ps := make([]*pendingHeader, 0, len(h.pending))
	for _, p := range h.pending {
		ps = append(ps, p)
	}
	h.mu.Unlock()
	for _, p := range ps {
		h.drop(p, ReasonShutdown)
	}
	h.mu.Lock()
	unix.Close(h.epfd) // under the lock: add checks closed and uses epfd under it too
	h.mu.Unlock()
}

// Pending returns how many connections wait for their PROXY header.
func (h *headerStage) Pending() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.pending)
}
