// Package agent answers HAProxy's agent-check on a TCP listener: one line per connection,
// computed from the roster at that moment, so that a balancer in front of several batond hosts
// weighs each host by the capacity it really has free, stops sending new clients to a host an
// operator drains, and takes a host that cannot serve out of rotation.
//
// The reply (HAProxy configuration.txt, "agent-check"):
//
//	drain                        the host is drained (batonctl drain -host)
//	down#no ready workers        no worker of the serving generation can take a client
//	up P% maxconn:M              otherwise: P = free ÷ total capacity of the serving workers
//	                             (1..100, 0 only when all are full), M = the clients the host
//	                             holds now + its free capacity
//	up ready P% maxconn:M        the same within ReadyWindow of an undrain
//
// "up" undoes an earlier "down" (the operational state); "ready" undoes "drain" (the
// administrative state, which HAProxy shares with its runtime API: "ready" would also end an
// operator's MAINT or DRAIN set there, so the agent sends it only after an undrain; see Ready).
package agent
