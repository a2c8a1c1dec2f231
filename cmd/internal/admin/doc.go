// Package admin owns batond's admin socket: HTTP+JSON over a Unix socket (mode 0600 by
// default), served by batond and spoken by batonctl. The types here are the JSON contract
// behind `batonctl status -json`.
package admin
