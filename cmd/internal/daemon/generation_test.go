package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestChooseGeneration(t *testing.T) {
	for _, c := range []struct {
		name      string
		st        genState
		ok, upg   bool
		gen       uint64
		wantAdopt bool
	}{
		{"first start", genState{}, false, false, 1, false},
		{"reload", genState{Generation: 4}, true, true, 5, false},
		{"reload after a crash-restart", genState{Generation: 4, Stopped: false}, true, true, 5, false},
		{"fresh start after a clean stop", genState{Generation: 4, Stopped: true}, true, false, 5, false},
		{"fresh start after a crash", genState{Generation: 4}, true, false, 4, true},
	} {
		got := chooseGeneration(c.st, c.ok, c.upg)
		if got.gen != c.gen || got.adopt != c.wantAdopt {
			t.Errorf("%s: generation %d adopt %v, want %d %v", c.name, got.gen, got.adopt, c.gen, c.wantAdopt)
		}
	}
}

func TestGenStateFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, generationFile)
	if _, ok, err := readGenState(p); ok || err != nil {
		t.Fatalf("missing file: ok %v err %v", ok, err)
	}
	os.WriteFile(p, []byte("7\n"), 0o600) // the counter of earlier versions
	if st, ok, err := readGenState(p); !ok || err != nil || st.Generation != 7 || !st.Stopped {
		t.Errorf("legacy counter: %+v %v %v", st, ok, err)
	}
	os.WriteFile(p, []byte("{garbage"), 0o600)
	if _, _, err := readGenState(p); err == nil || !strings.Contains(err.Error(), p) {
		t.Errorf("a corrupt file must be an error naming it: %v", err)
	}
	want := genState{Generation: 9, PID: 42, Since: time.Now().Round(0).UTC(), Stopped: true}
	if err := writeGenState(p, want); err != nil {
		t.Fatal(err)
	}
	got, ok, err := readGenState(p)
	if !ok || err != nil || got.Generation != 9 || got.PID != 42 || !got.Stopped || !got.Since.Equal(want.Since) {
		t.Errorf("round trip: %+v %v %v", got, ok, err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode())
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("temporary files left: %v", ents)
	}
	// A write that fails names the file and leaves nothing behind.
	bad := filepath.Join(dir, "missing", generationFile)
	if err := writeGenState(bad, genState{Generation: 10}); err == nil || !strings.Contains(err.Error(), bad) {
		t.Errorf("writing into a missing directory: %v", err)
	}
	if got, _, _ := readGenState(p); got.Generation != 9 {
		t.Errorf("the record changed: %+v", got)
	}
}
