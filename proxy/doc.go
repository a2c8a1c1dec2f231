// Package proxy owns the front door of batond: the public listeners, the accept loop, the
// choice of worker (least loaded: fewest live connections ÷ capacity, ties rotate) and the
// dispatch of each accepted connection over its worker's handoff channel.
//
// A Gateway owns every accepted connection until a worker ACKs it. If the worker dies, drops its
// channel or stalls before acking, the Gateway has it killed and waits until it is gone (through
// the Process it was registered with) before giving its unacked connections to another worker,
// so that no socket is ever read by two processes. With no worker available a connection waits
// up to the queue timeout and is then closed with a counted reason. The invariant the tests hold
// it to: accepted = acked + closed by the gateway (by reason) + in flight.
//
// It also owns sessions in migration (migrate.go): from a worker's HANDBACK until another
// worker ACKs the RESUME that carries the session's socket and state, on the same paths a new
// connection takes (so a new worker that dies before acking costs nothing), with a group's
// sessions placed on one worker. Their counters are their own, outside the invariant above.
//
// What a connection costs an idle gateway is wake-ups more than syscalls, so the hot path
// avoids them: accept4, sendmsg, recvmsg and close are raw syscalls (no wake-up of the runtime's
// sysmon thread; see closeFD for the closes that are not), nothing is allocated per
// connection, workers' ACKs and CLOSEDs are collected while the accept loop is awake anyway
// instead of each waking it (Backend.recv), and with AcceptCoalesce a busy accept loop wakes at
// most once per interval and hands over what arrived meanwhile as one burst (dispatchBurst): a
// nearly idle worker takes the rest of a burst it got the first of, in CONNS of up to 16
// connections and fds for workers that asked for them. On a busy host each process woken is a
// context switch of its own; a burst dealt out across every worker woke them all.
//
// The Gateway knows nothing of how workers are started or authenticated; the supervisor does
// that and Adds each registered worker as a Backend.
package proxy
