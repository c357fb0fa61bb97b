package clusterclient

import (
	"testing"
	"time"
)

// TestElectionThreeProcesses starts three processes on one port: exactly
// one leads, and every one of them reaches the leader's real client.
func TestElectionThreeProcesses(t *testing.T) {
	port := freePort(t)
	var kids []*child
	for range 3 {
		kids = append(kids, startChild(t, childSpec{Port: port}))
	}
	leaders := 0
	for _, k := range kids {
		if k.ready(10 * time.Second) {
			leaders++
		}
	}
	if leaders != 1 {
		t.Fatalf("%d leaders, want 1", leaders)
	}
	var pid any
	for i, k := range kids {
		m := k.do(msg{"op": "invoke", "method": "pid"}, 5*time.Second)
		if m["err"] != nil {
			t.Fatalf("child %d: %v", i, m["err"])
		}
		if i > 0 && m["result"] != pid {
			t.Fatalf("child %d reached leader %v, child 0 reached %v", i, m["result"], pid)
		}
		pid = m["result"]
	}
}
