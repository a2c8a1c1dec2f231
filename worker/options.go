package worker

import (
	"fmt"
	"log/slog"
	"math"
	"os"
	"strconv"
	"time"
)

// An Option configures Listen.
type Option func(*options)

type options struct {
	capacity         uint32
	fallback         string
	handshakeTimeout time.Duration
	log              *slog.Logger
	migration        bool // ask for MIGRATE and RESUME (WithMigration)
}

// defaultHandshakeTimeout bounds the wait for WELCOME: batond answers at once, so a silent
// gateway is a wedged one, and a worker should fail loudly rather than hang at startup.
const defaultHandshakeTimeout = 10 * time.Second

// WithCapacity declares the most client connections this worker wants at once. Zero (the
// default) lets batond decide (its -capacity flag); negative values count as zero.
func WithCapacity(n int) Option {
	return func(o *options) {
		switch {
		case n <= 0:
			o.capacity = 0
		case n > math.MaxUint32:
			o.capacity = math.MaxUint32
		default:
			o.capacity = uint32(n)
		}
	}
}

// WithFallback makes Listen listen on the TCP address addr itself when the program was not
// started by batond (BATON_SOCKET unset), instead of failing with ErrNotUnderBaton. It is meant
// for local development: the program's code stays the same. The environment variable
// BATON_FALLBACK_LISTEN, when set, takes precedence, so a developer can change the address
// without rebuilding. Under batond, the fallback is never used.
func WithFallback(addr string) Option {
	return func(o *options) { o.fallback = addr }
}

// WithHandshakeTimeout sets how long a registration waits for batond's WELCOME (default 10 s).
func WithHandshakeTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.handshakeTimeout = d
		}
	}
}

// WithLogger receives the Listener's diagnostics (channel drops, re-registrations, handed-off
// fds that could not be used). The default discards them: errors that matter to the program
// reach it through Listen and Accept.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.log = l
		}
	}
}

// Environment variables set by batond for a spawned worker (PROTOCOL.md).
const (
	envSocket     = "BATON_SOCKET"
	envSlot       = "BATON_WORKER"
	envGeneration = "BATON_GENERATION"
	envToken      = "BATON_TOKEN"
	envFallback   = "BATON_FALLBACK_LISTEN"
)

// env is what batond told this worker about itself.
type env struct {
	socket     string
	slot       uint32
	generation uint64
	token      string
}

// readEnv reads the BATON_* variables. An empty variable counts as unset, so that
// `BATON_SOCKET= prog` behaves like not setting it at all.
func readEnv() (env, error) {
	e := env{socket: os.Getenv(envSocket), token: os.Getenv(envToken)}
	if e.socket == "" {
		return e, nil
	}
	slot, err := strconv.ParseUint(os.Getenv(envSlot), 10, 32)
	if err != nil {
		return e, fmt.Errorf("%w: %s=%q is not a slot number (a decimal integer >= 0)", ErrEnvironment, envSlot, os.Getenv(envSlot))
	}
	gen, err := strconv.ParseUint(os.Getenv(envGeneration), 10, 64)
	if err != nil || gen == 0 {
		return e, fmt.Errorf("%w: %s=%q is not a generation (a decimal integer >= 1)", ErrEnvironment, envGeneration, os.Getenv(envGeneration))
	}
	e.slot, e.generation = uint32(slot), gen
	return e, nil
}
