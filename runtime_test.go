package clusterclient

// Tests of the runtime's behaviour under load and failure, seen from
// callers in separate processes.

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// TestPanicRealClientThreeProcesses: a real client whose method panics on
// every call, called 1,000 times from a leader and two followers, each in
// a process of its own. Every call returns a *RemoteError with the code
// ERR_CLUSTER_PANIC and the panic value in its message, no process dies
// (a child that crashes fails the test through childStderr too), and a
// normal call works afterwards, served by the same leader.
func TestPanicRealClientThreeProcesses(t *testing.T) {
	t.Parallel()
	const calls = 1000
	port := freePort(t)
	lead := startChild(t, childSpec{Port: port, Role: RoleLeader})
	if !lead.ready(waitLong) {
		t.Fatal("the leader child does not lead")
	}
	kids := []*child{lead}
	for range 2 {
		k := startChild(t, childSpec{Port: port, Role: RoleFollower})
		if k.ready(waitLong) {
			t.Fatal("a follower child leads")
		}
		kids = append(kids, k)
	}
	replies := make([]<-chan msg, len(kids))
	counts := make([]int, len(kids))
	for i, k := range kids {
		counts[i] = calls / len(kids)
		if i == 0 {
			counts[i] += calls % len(kids)
		}
		replies[i] = k.send(msg{"op": "repeat", "method": "panic", "args": []any{"on purpose"},
			"n": counts[i], "workers": 4, "timeoutMS": 10000})
	}
	const want = "code ERR_CLUSTER_PANIC"
	for i, k := range kids {
		var m msg
		select {
		case m = <-replies[i]:
		case <-k.exited:
			t.Fatalf("%v exited during the calls", k)
		case <-time.After(2 * time.Minute):
			t.Fatalf("%v: no reply to the calls within 2 minutes", k)
		}
		outcomes, _ := m["outcomes"].(map[string]any)
		messages, _ := m["messages"].(map[string]any)
		if len(outcomes) != 1 || outcomes[want] != float64(counts[i]) {
			t.Errorf("%v: outcomes %v, want %d of %q; messages %v", k, outcomes, counts[i], want, messages)
		} else if text, _ := messages[want].(string); !strings.Contains(text, "on purpose") {
			t.Errorf("%v: message %q does not hold the panic value", k, text)
		}
	}
	for _, k := range kids {
		if got := k.call("pid"); got != float64(lead.pid) {
			t.Errorf("%v: pid() = %v, want the first leader %d", k, got, lead.pid)
		}
	}
}

// TestCallTimeoutsEach: a call with an earlier deadline than a call
// already waiting times out at its own deadline, and the waiting one at
// its own later.
func TestCallTimeoutsEach(t *testing.T) {
	t.Parallel()
	_, fol := inProcessPair(t, "expiry", func(fcfg *Config) { fcfg.ResponseTimeout = 2 * time.Second })

	long := make(chan error, 1)
	go func() {
		_, err := fol.Invoke(context.Background(), "sleep", 10000)
		long <- err
	}()
	waitUntil(t, 5*time.Second, "the long call running", func() bool {
		n, err := Invoke[int](context.Background(), fol, "sleeping")
		return err == nil && n == 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := fol.Invoke(ctx, "sleep", 10000)
	d := time.Since(start)
	if !errors.Is(err, ErrTimeout) && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("short call: %v, want a timeout", err)
	}
	if d > time.Second {
		t.Errorf("a 100 ms call timed out after %v", d)
	}
	select {
	case err := <-long:
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("long call: %v, want ErrTimeout", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the long call did not time out after its 2 s")
	}
}
