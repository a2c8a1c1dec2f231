package roster

import (
	"testing"
	"time"
)

type fixedLoad int

func (f fixedLoad) Clients() int  { return int(f) }
func (f fixedLoad) Capacity() int { return 100 }

func TestUpdatesArePublished(t *testing.T) {
	r := New()
	events, cancel := r.Subscribe(8)
	defer cancel()
	a := r.Add(Spawned, Worker{Slot: 0, Generation: 3, State: Starting})
	b := r.Add(Registered, Worker{Slot: 1, Generation: 2, State: Draining, PID: 42, Started: time.Now()})
	ws, changed := r.Watch()
	if len(ws) != 2 || ws[0].Slot != 0 || ws[1].PID != 42 {
		t.Fatalf("snapshot %+v: want records in the order added", ws)
	}
	r.SetLoad(b, fixedLoad(7))
	r.Update(a, BecameReady, func(w *Worker) { w.State, w.PID, w.Connected = Ready, 9, true })
	select {
	case <-changed:
	default:
		t.Fatal("Watch's channel did not close on a change")
	}
	ws = r.Snapshot()
	if ws[0].State != Ready || ws[1].Clients != 7 || ws[1].Capacity != 100 || ws[1].Uptime == "" {
		t.Fatalf("snapshot %+v", ws)
	}
	r.Remove(b)
	if ws = r.Snapshot(); len(ws) != 1 {
		t.Fatalf("after Remove: %+v", ws)
	}
	var kinds []Kind
	for len(events) > 0 {
		kinds = append(kinds, (<-events).Kind)
	}
	want := []Kind{Spawned, Registered, BecameReady, Removed}
	if len(kinds) != len(want) {
		t.Fatalf("events %v, want %v", kinds, want)
	}
	for i := range want {
		if kinds[i] != want[i] {
			t.Fatalf("events %v, want %v", kinds, want)
		}
	}
	r.Update(b, Exited, func(w *Worker) { t.Fatal("a removed record must not be updated") })
}

func TestSlowSubscriberNeverBlocksWriters(t *testing.T) {
	r := New()
	_, cancel := r.Subscribe(1)
	defer cancel()
	e := r.Add(Spawned, Worker{})
	done := make(chan struct{})
	go func() {
		for i := 0; i < 100; i++ {
			r.Update(e, Registered, func(w *Worker) { w.PID = i })
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a full subscriber blocked the writer")
	}
	if got := r.Get(e).PID; got != 99 {
		t.Fatalf("PID %d, want 99", got)
	}
}
