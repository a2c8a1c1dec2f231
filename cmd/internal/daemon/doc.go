// Package daemon is batond itself: it parses the flags, wires listeners (inherited through
// tableflip when batond upgrades itself), the registration and admin sockets, the proxy.Gateway
// and the supervisor.Supervisor together, and runs the process's lifecycle: serve, hand over on
// SIGHUP, drain and stop on SIGTERM/SIGINT. cmd/batond only calls Main.
package daemon
