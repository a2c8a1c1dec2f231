package proxy

import (
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// closeFD closes with a raw syscall, except a socket with a linger timeout: its close can wait
// (up to the timeout) for unsent data, and must then not hold the runtime's only P, or batond's
// accept loop and readers stop meanwhile.
func TestCloseFDLingerDoesNotStallTheRuntime(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	_, fd := acceptedFD(t) // the client stays open, and never reads
	// Unsent data the client never reads (its window full), and a 1 s linger: the last close
	// waits for the data, up to 1 s.
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 1}); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	for i := 0; i < 4096; i++ {
		if _, err := unix.Write(fd, chunk); err == unix.EAGAIN {
			break
		} else if err != nil {
			t.Fatal(err)
		}
	}
	var ticks atomic.Int64
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
				ticks.Add(1)
			}
		}
	}()
	time.Sleep(10 * time.Millisecond)
	before, start := ticks.Load(), time.Now()
	closeFD(fd)
	took, ran := time.Since(start), ticks.Load()-before
	close(stop)
	t.Logf("close took %v; the other goroutine ticked %d times meanwhile", took, ran)
	// The check below means something only if close did wait: the setup must have left unsent
	// data behind a full window. (A raw close still waits 14-18 ms, until the runtime's
	// preemption signal cuts it short.)
	if took < 10*time.Millisecond {
		t.Fatalf("close took %v: the setup did not make it linger", took)
	}
	// A 1 ms ticker on the one P: while close waits, it must keep ticking (a raw close held the
	// P: 1 tick in those 14-18 ms).
	if ran < int64(took/(4*time.Millisecond)) {
		t.Errorf("close waited %v and the other goroutine ticked only %d times: it held the runtime", took, ran)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
		t.Errorf("fd still open after closeFD: %v", err)
	}
}

// Without a linger timeout closeFD is a plain close: the fd is gone, and the peer sees the
// connection end once batond's was the last copy.
func TestCloseFDPlain(t *testing.T) {
	client, fd := acceptedFD(t)
	closeFD(fd)
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
		t.Errorf("fd still open after closeFD: %v", err)
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := client.Read(make([]byte, 1)); err == nil {
		t.Errorf("client read %d bytes; want EOF after the last copy closed", n)
	}
}

// acceptedFD returns the client end of a loopback TCP connection and the accepted end as a bare
// fd, the only copy of it, as batond holds one.
func acceptedFD(t *testing.T) (*net.TCPConn, int) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	f, err := server.File() // a dup, not shared with the runtime's poller
	server.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	return client, fd
}
