package proxy

// SetHostDrain drains the whole host (on) or ends that (off). The gateway itself keeps handing
// clients over: a drain is the balancer's to carry out (the agent-check answers "drain",
// /healthz 503), and a client it sent before its next check must not fail. Sessions on the
// workers are not touched either way.
func (g *Gateway) SetHostDrain(on bool) { g.hostDrained.Store(on) }

// HostDrained says whether the host is drained.
func (g *Gateway) HostDrained() bool { return g.hostDrained.Load() }
