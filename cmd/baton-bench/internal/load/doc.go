// Package load owns the client side of the benchmark: a single-threaded epoll loop (engine.go)
// that opens, drives and closes many TCP connections with raw non-blocking syscalls, and the
// scenarios built on it:
//
//   - storm: connect, send one small request, read the reply, close (SO_LINGER 0, so that no
//     TIME_WAIT piles up); closed-loop at a fixed concurrency, or open-loop at a fixed rate.
//   - sessions: N established connections doing request/reply ping-pong (64-byte requests).
//   - bulk: one connection streaming through an echo server.
//   - idle: N connections held open, spread over several load-generator processes (this program
//     re-executed) and several 127.0.0.x source addresses, while the server side's resident
//     memory and descriptors are read from /proc.
//   - reload: an open-loop storm and paced sessions while a reload command runs repeatedly.
//
// The client is kept cheap on purpose (no goroutine per connection, no poller registration
// beyond one epoll_ctl, a handful of syscalls per connection), so that on a two-core machine
// with the server pinned to one core and the client to the other, the server is what saturates.
// Every result carries the client's own CPU use so that a reader can check that.
//
// Every loop is bounded in time (a deadline per run, a timeout per connection) and every
// connection goes to the address given, which callers keep on 127.0.0.0/8.
package load
