package systemd_test

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// heavyTest holds, for the rest of the test, a lock that the load-heavy integration tests of
// every package take (the real-systemd tests, the multi-host test): go test runs packages in
// parallel, and two of them at once on a 2-core CI machine starve workers into missing their
// handoff timeout, which is not what either test is about. The lock file is shared by name.
func heavyTest(t *testing.T) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(os.TempDir(), "baton-heavy-tests.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("heavy-test lock: %v", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		t.Fatalf("heavy-test lock: %v", err)
	}
	t.Cleanup(func() { f.Close() }) // closing releases the lock
}
