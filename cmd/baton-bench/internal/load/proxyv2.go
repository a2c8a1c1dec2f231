package load

import (
	"encoding/binary"
	"net/netip"

	"golang.org/x/sys/unix"
)

// PROXY protocol v2, as an L4 balancer (HAProxy's send-proxy-v2) sends it in front of each
// client's bytes: the binary signature, PROXY over TCP/IPv4, the client's and the destination's
// addresses. The benchmark makes up the client (203.0.113.0/24, TEST-NET-3: addresses that can
// never be a real peer) and gives the real destination, so that the gateway parses what it
// would parse behind a balancer.

// proxyV2Len is the length of a v2 header for TCP over IPv4: 16 bytes of fixed part, 12 of
// addresses.
const proxyV2Len = 16 + 12

var proxyV2Sig = [12]byte{'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'}

// ProxyV2Header returns a PROXY v2 header (command PROXY, TCP over IPv4) saying the connection
// comes from src and goes to dst. Both must be IPv4.
func ProxyV2Header(src, dst netip.AddrPort) []byte {
	b := make([]byte, proxyV2Len)
	putProxyV2(b, src, dst)
	return b
}

func putProxyV2(b []byte, src, dst netip.AddrPort) {
	copy(b, proxyV2Sig[:])
	b[12] = 0x21 // version 2, command PROXY
	b[13] = 0x11 // AF_INET, STREAM
	binary.BigEndian.PutUint16(b[14:16], 12)
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[16:20], s[:])
	copy(b[20:24], d[:])
	binary.BigEndian.PutUint16(b[24:26], src.Port())
	binary.BigEndian.PutUint16(b[26:28], dst.Port())
}

// proxyPrefix builds the first write of each connection: a fresh header followed by the
// request, in one buffer it reuses (engines are single-threaded), so that header and request
// leave in one segment, as they do from a balancer, and nothing is allocated per connection.
type proxyPrefix struct {
	dst netip.AddrPort
	buf []byte
	n   uint32 // connections made: picks the made-up client address and port
}

func newProxyPrefix(dst *unix.SockaddrInet4) *proxyPrefix {
	return &proxyPrefix{dst: netip.AddrPortFrom(netip.AddrFrom4(dst.Addr), uint16(dst.Port)), buf: make([]byte, 0, 256)}
}

// with returns a header for the next made-up client followed by req. The result is valid until
// the next call.
func (p *proxyPrefix) with(req []byte) []byte {
	p.n++
	src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(1 + p.n%254)}), uint16(1024+p.n%64000))
	p.buf = p.buf[:proxyV2Len] // cap ≥ 256 (newProxyPrefix)
	putProxyV2(p.buf, src, p.dst)
	return append(p.buf, req...)
}
