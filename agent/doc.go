// Package agent answers HAProxy's agent-check on a TCP listener: one line per connection,
// computed from the roster at that moment, so that a balancer in front of several batond hosts
// weighs each host by the capacity it really has free, stops sending new clients to a host an
// operator drains, and takes a host that cannot serve out of rotation.
//
// The reply (HAProxy configuration.txt, "agent-check"):
//
//	drain                        the host is drained (batonctl drain -host)
//	down#no ready workers        no worker of the serving generation can take a client
//	up ready P% maxconn:M        otherwise: P = free ÷ total capacity of the serving workers
//	                             (1..100, 0 only when all are full), M = the clients the host
//	                             holds now + its free capacity
//
// "up" and "ready" undo an earlier "down" or "drain": only the agent can revert what it set.
package agent
