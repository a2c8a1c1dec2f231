// Package supervisor owns the worker processes of one batond generation: it starts N copies of
// the worker command with their BATON_* environment, re-logs their output, admits them on the
// registration socket (SO_PEERCRED, protocol version, token), waits for READY with a start
// timeout, restarts crashed workers with exponential backoff (and says so when a slot is in a
// crash loop), adopts workers of other generations that re-register (they drain), and stops
// everything gracefully: DRAIN, wait, SIGTERM, SIGKILL, every signal through a pidfd. It
// decides when workers are asked to hand their sessions over (migrate.go): older generations'
// workers as they re-register after a migrating reload, and drained slots on an operator's
// batonctl migrate once their successors are ready.
//
// Connections and load are the proxy's business; the supervisor hands each admitted worker to
// the proxy.Gateway as a Backend together with a Process the gateway can kill.
package supervisor
