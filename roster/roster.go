package roster

import (
	"sort"
	"sync"
	"time"
)

// State is a worker's state as status shows it.
type State string

// States.
const (
	Starting  State = "starting"  // spawned (or waiting to be adopted), not yet READY
	Ready     State = "ready"     // serving
	Draining  State = "draining"  // takes no new clients; finishes its sessions
	Backoff   State = "backoff"   // exited; waiting to restart
	CrashLoop State = "crashloop" // exited repeatedly soon after start; restarts at the capped delay
	Stopped   State = "stopped"
)

// Kind says what an Event reports.
type Kind string

// Event kinds.
const (
	Created      Kind = "created"      // a slot's record, before anything runs in it
	Spawned      Kind = "spawned"      // a process was started for a slot
	Registered   Kind = "registered"   // the worker's channel is up (again)
	Disconnected Kind = "disconnected" // its channel ended; the process may re-register
	BecameReady  Kind = "ready"
	Drained      Kind = "draining"
	Adopted      Kind = "adopted"   // a worker of a crashed batond taken back into its slot
	Migrating    Kind = "migrating" // asked to hand its sessions back (MIGRATE)
	Exited       Kind = "exited"
	Removed      Kind = "removed" // a worker of another generation is gone
)

// Load is where a worker's live client count and capacity are read from (the gateway's
// Backend).
type Load interface {
	Clients() int
	Capacity() int
}

// Worker is one worker as status shows it.
type Worker struct {
	Slot          int       `json:"slot"`
	PID           int       `json:"pid"`
	Generation    uint64    `json:"generation"`
	State         State     `json:"state"`
	Adopted       bool      `json:"adopted,omitempty"`   // taken back after a batond crash
	Connected     bool      `json:"connected"`           // its registration channel is up
	Clients       int       `json:"clients"`             // live connections (read from its Load)
	Capacity      int       `json:"capacity,omitempty"`  // most connections it takes (from its Load)
	Restarts      int       `json:"restarts"`            // of this slot, in this generation
	Started       time.Time `json:"started,omitzero"`    // process start (or registration)
	Uptime        string    `json:"uptime"`              // since Started, at the snapshot
	LastExit      string    `json:"last_exit,omitempty"` // why the slot's last process ended
	DrainDeadline time.Time `json:"drain_deadline,omitzero"`
	// Migrate: the worker takes part in session migration (HELLO MIGRATE); Migrating: it was
	// asked to hand its sessions back.
	Migrate   bool `json:"migrate,omitempty"`
	Migrating bool `json:"migrating,omitempty"`
}

// Event is one change, with the record as it stands after it.
type Event struct {
	Kind   Kind
	At     time.Time
	Worker Worker
}

// Entry is the handle of one record, for its writer.
type Entry struct {
	w    Worker
	load Load
	seq  int // order of creation, for a stable listing
}

// Roster is the one table of workers.
type Roster struct {
	mu      sync.Mutex
	entries map[*Entry]struct{}
	seq     int
	changed chan struct{} // closed and replaced on every change
	subs    map[chan Event]struct{}
}

// New returns an empty roster.
func New() *Roster {
	return &Roster{entries: map[*Entry]struct{}{}, changed: make(chan struct{}), subs: map[chan Event]struct{}{}}
}

// Add creates a record and publishes it as kind.
func (r *Roster) Add(kind Kind, w Worker) *Entry {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seq++
	e := &Entry{w: w, seq: r.seq}
	r.entries[e] = struct{}{}
	r.publishLocked(kind, e)
	return e
}

// Update changes a record with f and publishes the change as kind.
func (r *Roster) Update(e *Entry, kind Kind, f func(w *Worker)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.entries[e]; !ok {
		return
	}
	f(&e.w)
	r.publishLocked(kind, e)
}

// SetLoad points the record at where its client count is read (nil: none, 0 clients).
func (r *Roster) SetLoad(e *Entry, l Load) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e.load = l
}

// Remove deletes a record (a worker of another generation that is gone).
func (r *Roster) Remove(e *Entry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.entries[e]; !ok {
		return
	}
	delete(r.entries, e)
	r.publishLocked(Removed, e)
}

// Get returns one record as it stands.
func (r *Roster) Get(e *Entry) Worker {
	r.mu.Lock()
	defer r.mu.Unlock()
	return e.w
}

func (r *Roster) publishLocked(kind Kind, e *Entry) {
	close(r.changed)
	r.changed = make(chan struct{})
	ev := Event{Kind: kind, At: time.Now(), Worker: e.w}
	for c := range r.subs {
		select {
		case c <- ev:
		default: // a subscriber that does not keep up misses events, never blocks a writer
		}
	}
}

// Snapshot lists every worker: this generation's slots in slot order first (records are
// listed in the order they were added), with client counts read now.
func (r *Roster) Snapshot() []Worker {
	ws, _ := r.Watch()
	return ws
}

// Watch returns the snapshot and a channel closed at the next change, so a waiter re-checks
// exactly when something changed (level-triggered: nothing to miss).
func (r *Roster) Watch() ([]Worker, <-chan struct{}) {
	r.mu.Lock()
	es := make([]*Entry, 0, len(r.entries))
	for e := range r.entries {
		es = append(es, e)
	}
	sort.Slice(es, func(i, j int) bool { return es[i].seq < es[j].seq })
	out := make([]Worker, len(es))
	loads := make([]Load, len(es))
	for i, e := range es {
		out[i], loads[i] = e.w, e.load
	}
	changed := r.changed
	r.mu.Unlock()
	// Loads are read outside the roster's lock: the gateway takes its own lock to answer, and
	// the roster never holds one lock while taking another.
	now := time.Now()
	for i := range out {
		if loads[i] != nil {
			out[i].Clients, out[i].Capacity = loads[i].Clients(), loads[i].Capacity()
		}
		if !out[i].Started.IsZero() && out[i].PID != 0 {
			out[i].Uptime = now.Sub(out[i].Started).Round(time.Second).String()
		}
	}
	return out, changed
}

// Subscribe returns a channel of events (buffered n) and a function that ends the
// subscription. A subscriber that falls n events behind misses the ones in between; for a
// complete picture read Snapshot.
func (r *Roster) Subscribe(n int) (<-chan Event, func()) {
	c := make(chan Event, n)
	r.mu.Lock()
	r.subs[c] = struct{}{}
	r.mu.Unlock()
	return c, func() {
		r.mu.Lock()
		delete(r.subs, c)
		r.mu.Unlock()
	}
}
