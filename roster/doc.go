// Package roster owns what batond knows about its workers: one record per worker (this
// generation's slots, and the workers of other generations that registered), with its state,
// process, restarts and last exit. The supervisor is its only writer; status, the health gate,
// and (next) metrics, agent-check and drain read from it. Every change is published, both as an
// Event to subscribers and by waking whoever waits in Watch for the next change.
//
// A worker's client count changes with every connection, on the gateway's hot path; the roster
// does not copy it there. A record points at the Load it has (the gateway's Backend) and a
// snapshot reads it then: one owner per number, and nothing added per connection. So neither
// Watch nor Subscribe fires when only a client count changes: a reader that wants counts
// (a console, a scrape) reads a snapshot when it needs one.
package roster
