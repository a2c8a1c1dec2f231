// Package handoff owns the wire protocol between batond and its workers: the message
// encodings of PROTOCOL.md (version 1, revision 1.3) and Channel, one SOCK_SEQPACKET connection
// that carries those messages and, as SCM_RIGHTS, exactly one client fd on CONN and one per
// connection on CONNS.
//
// It knows nothing of processes, balancing or policy; the gateway (proxy, supervisor) and the
// Go worker library (worker) both build on it. It uses only the standard library and x/sys, so
// that the worker library, which game servers import, stays small.
//
// ErrorCode.Final is the one statement of which rejections end a worker's registration for good
// (PROTOCOL.md, "Final errors"); RecvErrorCode the one mapping from a receive error to the
// ERROR owed to the peer.
//
// Ownership of fds is explicit everywhere: TrySend never closes the fd it sends (the caller
// keeps its copy until the peer acknowledges), and Recv hands received fds to the caller only
// on success (RecvFDs also with ErrNoFD, the ones that arrived); on every other error path it
// closes them itself.
package handoff
