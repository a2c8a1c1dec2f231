// Package worker is the Go side of a baton worker process: it registers with batond over the
// handoff protocol (handoff/PROTOCOL.md) and turns the client connections batond hands over into
// an ordinary net.Listener, so that a program written for net.Listen (an accept loop, http.Serve,
// a game server's session loop) runs under batond unchanged.
//
// It owns the worker's end of the registration channel: the handshake (HELLO/WELCOME), READY,
// acknowledging each handed-off connection before the program can read from it, reporting each
// close (CLOSED) exactly once, answering PING, obeying DRAIN, and re-registering with its current
// counts when the channel drops (a batond crash or upgrade), without touching the client
// connections the program holds. It owns no client connection once Accept has returned it: the
// program does, and closes it.
//
// A typical program:
//
//	l, err := worker.Listen(worker.WithCapacity(500))
//	if err != nil {
//		log.Fatal(err) // says clearly when the program was not started by batond
//	}
//	err = http.Serve(l, handler) // returns an error wrapping net.ErrClosed on DRAIN
//	ctx, cancel := context.WithDeadline(context.Background(), l.DrainDeadline())
//	defer cancel()
//	l.Wait(ctx) // until every connection handed to this process is closed
//
// Without BATON_SOCKET in the environment, Listen fails with ErrNotUnderBaton unless a fallback
// address is configured (WithFallback or BATON_FALLBACK_LISTEN), in which case the Listener
// listens on that TCP address itself, for local development.
//
// A handed-off connection is not a *net.TCPConn (Conn.TCPConn makes one on demand): it is the
// received socket itself on the runtime poller, read and written with non-blocking raw syscalls
// (an ordinary syscall wakes the runtime's sysmon thread whenever the process was idle, a fifth
// of a worker's CPU at a few thousand connections a second), and io.Copy between it and another
// TCP socket splices through a pipe the copy holds only while bytes move. The Listener asks for
// BATCH (PROTOCOL.md 1.2): batond then hands over a burst of clients in one CONNS, up to 16
// connections and their fds in one message. Connections that arrive together are acked with one
// ACK; one whose fd could not be received (the process is out of descriptors) is REFUSEd, so
// batond gives it to another worker.
//
// Live session migration (PROTOCOL.md 1.4, WithMigration): batond may ask for sessions back,
// for instance at a reload with -migrate, so that an old version's worker can exit at once
// instead of waiting for its last player. The program decides per connection: it learns of the
// request from Conn.MigrateRequested, stops reading, finishes its writes, and calls
// Conn.HandBack with the session's state (at most handoff.MaxState bytes) and, through
// Conn.SetGroup, a group key that keeps a room's players together; or it calls Conn.Decline,
// and the session plays on here. Requests the program leaves unanswered are declined at their
// deadline. A session another worker handed back arrives through Accept like any other, acked
// before the program reads it; Conn.Resumed gives its state. The client's socket itself moves,
// with the bytes it sent that nobody read: the client notices nothing.
//
// The package uses only the standard library, golang.org/x/sys and baton's handoff package,
// because game servers import it.
package worker
