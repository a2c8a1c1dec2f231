package admin

import "runtime/metrics"

// Runtime is batond's own Go runtime state. It separates what batond keeps (live heap) from what
// the allocator has not yet given back (RSS), so memory per held session can be measured as state
// and not as GC timing; allocs lets a benchmark count allocations per connection.
type Runtime struct {
	HeapLiveBytes uint64 `json:"heap_live_bytes"` // heap marked live by the last GC
	HeapObjects   uint64 `json:"heap_objects"`    // live + not yet swept objects now
	Allocs        uint64 `json:"allocs"`          // heap allocations since start (cumulative)
	AllocBytes    uint64 `json:"alloc_bytes"`     // bytes allocated since start (cumulative)
	Goroutines    uint64 `json:"goroutines"`
	GCCycles      uint64 `json:"gc_cycles"`
}

// ReadRuntime samples this process's runtime.
func ReadRuntime() Runtime {
	// Read without stopping the world (unlike runtime.ReadMemStats), so a status request costs
	// the gateway nothing measurable.
	names := [...]string{
		"/gc/heap/live:bytes",
		"/gc/heap/objects:objects",
		"/gc/heap/allocs:objects",
		"/gc/heap/allocs:bytes",
		"/sched/goroutines:goroutines",
		"/gc/cycles/total:gc-cycles",
	}
	var s [len(names)]metrics.Sample
	for i, name := range names {
		s[i].Name = name
	}
	metrics.Read(s[:])
	v := func(i int) uint64 {
		if s[i].Value.Kind() == metrics.KindUint64 {
			return s[i].Value.Uint64()
		}
		return 0
	}
	return Runtime{HeapLiveBytes: v(0), HeapObjects: v(1), Allocs: v(2), AllocBytes: v(3), Goroutines: v(4), GCCycles: v(5)}
}
