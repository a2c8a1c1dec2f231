package proxy

import "sync/atomic"

// CloseReason says why the gateway closed a connection it had accepted instead of handing it
// off.
type CloseReason int

// Reasons for a gateway-side close.
const (
	ReasonNoWorker       CloseReason = iota // waited the queue timeout with no worker available
	ReasonShutdown                          // batond stopped while the connection waited
	ReasonRetries                           // handed to too many workers that failed before acking
	ReasonWorkerLost                        // its worker failed and could not be confirmed dead
	ReasonSocket                            // the socket could not be prepared for its worker (fcntl)
	ReasonProxyUntrusted                    // a PROXY listener's peer is not among the allowed balancers
	ReasonProxyInvalid                      // no valid PROXY header (garbage, or closed before one)
	ReasonProxyTimeout                      // no complete PROXY header within its timeout
	ReasonProxyLocal                        // a PROXY LOCAL header: the balancer's own health check
	ReasonProxyBusy                         // too many connections already waited for their PROXY header
	numReasons
)

var reasonNames = [numReasons]string{"no_worker", "shutdown", "retries", "worker_lost", "socket_error",
	"proxy_untrusted", "proxy_invalid", "proxy_timeout", "proxy_local", "proxy_busy"}

func (r CloseReason) String() string { return reasonNames[r] }

// stats are the gateway's counters; every field is atomic so the hot path takes no lock for them.
//
// The invariant, exact whenever the gateway's lock is free: accepted = acked + closed (all
// reasons) + in flight (Gateway.inflight). A connection is counted accepted at the moment it
// becomes the gateway's, together with its entry in flight: in dispatchBurst, or when it
// enters the PROXY header stage (then never again); it leaves flight exactly once, acked by a
// worker or closed with a reason. A connection refused outright (an untrusted PROXY peer, a
// full header stage) is counted accepted and closed at once. Outside the sum: the
// self-check's probe (briefly in flight, never counted), and sessions handed back for
// migration (migrate.go), which are not new clients: they have their own counters
// (MigrationStats: handed back, resumed, lost) and are left out of InFlight.
type stats struct {
	accepted     atomic.Uint64
	acked        atomic.Uint64
	redispatched atomic.Uint64
	acceptErrors atomic.Uint64
	// acceptBackoffs counts the accept errors that made a loop back off (EMFILE, ENFILE, ...),
	// the ones worth an operator's attention; the rest (a client gone before accept) are
	// retried at once and only counted in acceptErrors.
	acceptBackoffs atomic.Uint64
	closed         [numReasons]atomic.Uint64
	mig            migStats
}

// Stats is a snapshot of the gateway's counters.
type Stats struct {
	Accepted     uint64            `json:"accepted"`
	Acked        uint64            `json:"acked"`
	Redispatched uint64            `json:"redispatched"`
	AcceptErrors uint64            `json:"accept_errors"`
	Closed       map[string]uint64 `json:"closed_by_gateway"`
	InFlight     int               `json:"in_flight"` // handed off and not acked, or waiting
}

// ClosedTotal is the sum of the gateway-side closes over all reasons.
func (s Stats) ClosedTotal() uint64 {
	var n uint64
	for _, v := range s.Closed {
		n += v
	}
	return n
}
