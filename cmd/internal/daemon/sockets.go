package daemon

import (
	"fmt"
	"net"
	"os"
	"strconv"

	"github.com/cloudflare/tableflip"
	"github.com/coreos/go-systemd/v22/activation"
	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
	"github.com/baton-gw/baton/proxy"
)

// Socket sources, in order: inherited from the previous batond (tableflip), passed by systemd
// (socket activation, by FileDescriptorName), created here. Whatever this batond uses is
// registered with tableflip so that the next one inherits it.
//
// Unix sockets travel as tableflip "files", not listeners: tableflip unlinks the paths of Unix
// listeners when a process stops without upgrading, which would pull the registration socket
// out from under the batond still serving when a new one fails to start.

const (
	fdNamePublic  = "public"  // baton.socket's FileDescriptorName= for client listeners
	fdNameWorkers = "workers" // ... for the registration socket
	fdKeyAdmin    = "admin"
)

// activated holds what systemd passed, by name.
type activated map[string][]*os.File

func takeActivation() activated {
	a := activated{}
	for _, f := range activation.Files(true) {
		a[f.Name()] = append(a[f.Name()], f)
	}
	return a
}

func (a activated) close() {
	for _, fs := range a {
		for _, f := range fs {
			f.Close()
		}
	}
}

// publicListeners returns the client listeners: inherited ones first (keys tcp/systemd:public:N
// or tcp/ADDR), then systemd's, then -listen addresses.
func publicListeners(upg *tableflip.Upgrader, act activated, addrs []string) ([]*proxy.Listener, error) {
	var out []*proxy.Listener
	add := func(name string, ln net.Listener) error {
		tl, ok := ln.(*net.TCPListener)
		if !ok {
			ln.Close()
			return fmt.Errorf("listener %s is not TCP", name)
		}
		if err := proxy.SetNoDelay(tl); err != nil {
			return fmt.Errorf("listener %s: %w", name, err)
		}
		l, err := proxy.NewListener(name, tl)
		if err != nil {
			return err
		}
		out = append(out, l)
		return nil
	}
	// systemd's sockets, inherited through tableflip after the first upgrade
	for i := 0; ; i++ {
		key := "systemd:" + fdNamePublic + ":" + strconv.Itoa(i)
		ln, err := upg.Fds.Listener("tcp", key)
		if err != nil {
			return nil, err
		}
		if ln == nil {
			break
		}
		if err := add(ln.Addr().String(), ln); err != nil {
			return nil, err
		}
	}
	if len(out) == 0 {
		for i, f := range act[fdNamePublic] {
			ln, err := net.FileListener(f)
			f.Close()
			if err != nil {
				return nil, fmt.Errorf("systemd socket %q #%d: %w", fdNamePublic, i, err)
			}
			key := "systemd:" + fdNamePublic + ":" + strconv.Itoa(i)
			if err := upg.Fds.AddListener("tcp", key, ln.(tableflip.Listener)); err != nil {
				ln.Close()
				return nil, err
			}
			if err := add(ln.Addr().String(), ln); err != nil {
				return nil, err
			}
		}
		delete(act, fdNamePublic)
	}
	if len(out) > 0 {
		return out, nil // systemd decides the addresses; -listen is ignored
	}
	for _, addr := range addrs {
		ln, err := upg.Listen("tcp", addr) // inherits or creates
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		if err := add(addr, ln); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// unixListener returns the Unix socket at path under key: inherited, else systemd's (for the
// registration socket), else created with mode.
func unixListener(upg *tableflip.Upgrader, act activated, key, actName, network, path string, mode os.FileMode) (*net.UnixListener, error) {
	f, err := upg.Fds.File(key)
	if err != nil {
		return nil, err
	}
	fromSystemd := false
	if f == nil && actName != "" && len(act[actName]) > 0 {
		f = act[actName][0]
		act[actName] = act[actName][1:]
		fromSystemd = true
	}
	var ul *net.UnixListener
	if f != nil {
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		var ok bool
		if ul, ok = ln.(*net.UnixListener); !ok {
			ln.Close()
			return nil, fmt.Errorf("%s: inherited socket is not a Unix listener", path)
		}
		ul.SetUnlinkOnClose(false)
		// (A socket we created was bound under a temporary name and renamed, so only
		// systemd's can be checked by name.)
		if got := ul.Addr().String(); fromSystemd && got != path {
			ul.Close()
			return nil, fmt.Errorf("systemd's %q socket is bound to %s, but the configuration says %s", actName, got, path)
		}
	} else {
		if ul, err = handoff.ListenUnix(network, path, mode); err != nil {
			return nil, err
		}
	}
	if err := passOn(upg, key, ul); err != nil {
		ul.Close()
		return nil, err
	}
	return ul, nil
}

// passOn registers a Unix listener with tableflip as a file (see above), through a CLOEXEC
// duplicate made with F_DUPFD_CLOEXEC, never Fd().
func passOn(upg *tableflip.Upgrader, key string, ul *net.UnixListener) error {
	raw, err := ul.SyscallConn()
	if err != nil {
		return err
	}
	dup, derr := -1, error(nil)
	if err := raw.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return err
	}
	if derr != nil {
		return os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", derr)
	}
	f := os.NewFile(uintptr(dup), key)
	defer f.Close()
	return upg.Fds.AddFile(key, f)
}
