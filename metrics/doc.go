// Package metrics exposes batond to Prometheus (github.com/prometheus/client_golang). Every
// value is collected at scrape time from the state batond keeps anyway: the roster (workers,
// their clients, states, restarts), the gateway's atomic counters and latency histograms, and
// the daemon's reload record. Nothing is pushed from the hot path, so a scrape costs the
// accept loop nothing and the gateway nothing per connection beyond what it counted before.
//
// Labels have bounded cardinality: a worker's slot and generation, a close reason, a state,
// a reload outcome; never a client address.
package metrics
