package ctl

import (
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// alive must call an exited process that nobody reaped yet (a zombie) gone: batonctl reload
// -migrate waits for the old workers with it, and a batond's workers may stay unreaped for a
// while under an init that reaps late.
func TestAliveSeesZombieAsGone(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	if !alive(pid) {
		t.Fatal("a running process is not alive")
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Not reaped yet: a zombie until cmd.Wait.
	deadline := time.Now().Add(5 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatal("a killed, unreaped process still counts as alive")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("the zombie was reaped before the check: %v", err)
	}
	cmd.Wait()
	if alive(pid) {
		t.Fatal("a reaped process is alive")
	}
}
