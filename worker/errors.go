package worker

import (
	"errors"
	"fmt"
	"net"
)

// ErrNotUnderBaton is returned (wrapped) by Listen when the program was not started by batond
// and no fallback address is configured.
var ErrNotUnderBaton = errors.New("not started by batond: BATON_SOCKET is not set; run it as " +
	"`batond -- yourprogram` or set worker.WithFallback(addr) (or BATON_FALLBACK_LISTEN=addr) " +
	"for local development")

// ErrEnvironment is returned (wrapped) by Listen when a BATON_* variable is present but unusable.
var ErrEnvironment = errors.New("bad baton environment")

// ErrDraining is what Accept returns (inside a *net.OpError) once batond has told this worker to
// drain and every connection delivered before that has been accepted. It wraps net.ErrClosed, so
// accept loops that stop on net.ErrClosed (http.Serve among them) stop here too.
var ErrDraining = fmt.Errorf("worker is draining: %w", net.ErrClosed)

// errProtocol marks a message from batond that breaks PROTOCOL.md; the channel is dropped and
// the worker re-registers.
var errProtocol = errors.New("protocol error from batond")
