// Package conformance holds the protocol conformance suite: it drives a worker implementation
// from outside, as batond would (handshake, CONN, ACK, CLOSED, READY, PING, DRAIN,
// re-registration), against PROTOCOL.md. Every implementation in the repository is listed in
// conformance_test.go, one line each; the suite runs in `go test ./...`.
package conformance
