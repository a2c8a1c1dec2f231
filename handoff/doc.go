// Package handoff owns the wire protocol between batond and its workers: the message
// encodings of PROTOCOL.md (version 1, revision 1.1) and Channel, one SOCK_SEQPACKET connection that carries
// those messages and, on CONN, exactly one client fd as SCM_RIGHTS.
//
// It knows nothing of processes, balancing or policy; the gateway (proxy, supervisor) and the
// Go worker library (worker) both build on it. It uses only the standard library and x/sys, so
// that the worker library, which game servers import, stays small.
//
// Ownership of fds is explicit everywhere: TrySend never closes the fd it sends (the caller
// keeps its copy until the peer acknowledges), and Recv hands received fds to the caller only
// on success; on every error path it closes them itself.
package handoff
