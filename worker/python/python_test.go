// Package python_test runs the Python worker's own unit tests and the Python examples' tests
// with the system python3, so that `go test ./...` covers them.
package python_test

import (
	"os/exec"
	"path/filepath"
	"testing"
)

func runUnittest(t *testing.T, dir string) {
	t.Helper()
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("python3", "-m", "unittest", "discover", "-s", abs, "-t", abs)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("python3 -m unittest discover -s %s: %v\n%s", dir, err, out)
	}
	t.Logf("%s", out)
}

func TestPythonWorkerModule(t *testing.T) { runUnittest(t, ".") }

func TestPythonExamples(t *testing.T) {
	runUnittest(t, filepath.Join("..", "..", "examples", "python"))
}
