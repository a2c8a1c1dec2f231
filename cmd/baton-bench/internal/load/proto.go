package load

import (
	"bytes"
	"fmt"
	"strings"
)

// Proto is what the client sends and how it knows a reply is complete.
type Proto struct {
	// Name is "echo" (the reply is the request's bytes) or "lobby" (examples/python/lobby.py:
	// two greeting lines on connect, one line answering each request).
	Name string
	// Greeting is the number of lines the server sends on connect, before any reply.
	Greeting int
	// Storm is the request of a storm connection.
	Storm []byte
	// Session is the 64-byte request of the sessions scenario.
	Session []byte
	// Probe is what idle connections send once to check that the server really serves them.
	Probe []byte
	// Reply is the exact answer to one Session request: the sessions scenario checks every
	// byte it reads against Reply repeated.
	Reply []byte
	lines bool
}

// ProtoByName returns the protocol "echo" or "lobby".
func ProtoByName(name string) (*Proto, error) {
	switch name {
	case "echo":
		return &Proto{
			Name:    "echo",
			Storm:   []byte("baton-bench ping\n"),
			Session: []byte(strings.Repeat("x", 63) + "\n"),
			Probe:   []byte("?"),
			Reply:   []byte(strings.Repeat("x", 63) + "\n"),
		}, nil
	case "lobby":
		// "/ping\n" takes the lobby's short path; the 64-byte request goes through its ordinary
		// command path (as cmd/batond's BenchmarkPythonLobby does). Both are answered "pong\n".
		return &Proto{
			Name:     "lobby",
			Greeting: 2,
			Storm:    []byte("/ping\n"),
			Session:  []byte("/ping " + strings.Repeat("x", 57) + "\n"),
			Probe:    []byte("/ping\n"),
			Reply:    []byte("pong\n"),
			lines:    true,
		}, nil
	}
	return nil, fmt.Errorf("unknown protocol %q (echo, lobby)", name)
}

// expect is what answers req: bytes for echo, lines for the line protocol.
func (p *Proto) expect(req []byte) int {
	if p.lines {
		return 1
	}
	return len(req)
}

// greeting is what arrives on connect before any reply, in the unit of expect.
func (p *Proto) greeting() int { return p.Greeting }

// consume returns how much of the expected reply b holds.
func (p *Proto) consume(b []byte) int {
	if p.lines {
		return bytes.Count(b, []byte{'\n'})
	}
	return len(b)
}

// checkReply compares b with the stream of session replies (Reply repeated), from position off
// within Reply. It returns the position after b, and false at the first byte that differs.
func (p *Proto) checkReply(off int, b []byte) (int, bool) {
	for len(b) > 0 {
		n := min(len(p.Reply)-off, len(b))
		if !bytes.Equal(b[:n], p.Reply[off:off+n]) {
			return off, false
		}
		b, off = b[n:], (off+n)%len(p.Reply)
	}
	return off, true
}
