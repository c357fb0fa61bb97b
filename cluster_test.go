package clusterclient

// Tests of the cluster with real processes on real TCP: election,
// planned close, subscriptions across processes, a stopped leader and
// single mode. Failover after SIGKILL is in failover_test.go.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// startCluster starts n members with spec and returns them with the index
// of the one that leads.
func startCluster(t *testing.T, n int, spec childSpec) ([]*child, int) {
	t.Helper()
	kids := make([]*child, n)
	for i := range kids {
		kids[i] = startChild(t, spec)
	}
	lead := -1
	for i, k := range kids {
		if k.ready(20 * time.Second) {
			if lead >= 0 {
				t.Fatalf("children %d and %d both lead", lead, i)
			}
			lead = i
		}
	}
	if lead < 0 {
		t.Fatal("no child leads")
	}
	return kids, lead
}

// waitUntil polls cond until it holds, failing the test after timeout.
func waitUntil(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// leaderOf asks each child whether it leads and returns the one that
// does, waiting until exactly one does.
// mustReach checks that a call from each of kids is answered by lead's
// real client.
func mustReach(t *testing.T, kids []*child, lead *child) {
	t.Helper()
	for _, k := range kids {
		if got := k.call("pid"); got != float64(lead.pid) {
			t.Fatalf("%v reached %v, want the leader %d", k, got, lead.pid)
		}
	}
}

func leaderOf(t *testing.T, kids []*child) *child {
	t.Helper()
	var lead *child
	waitUntil(t, 10*time.Second, "single leader", func() bool {
		lead = nil
		n := 0
		for _, k := range kids {
			if k.do(msg{"op": "status"}, 10*time.Second)["leader"] == true {
				lead = k
				n++
			}
		}
		return n == 1
	})
	return lead
}

// TestElectionThreeProcesses starts three processes on one port: exactly
// one leads, and every one of them reaches the leader's real client.
func TestElectionThreeProcesses(t *testing.T) {
	t.Parallel()
	port := freePort(t)
	var kids []*child
	for range 3 {
		kids = append(kids, startChild(t, childSpec{Port: port}))
	}
	leaders := 0
	for _, k := range kids {
		if k.ready(20 * time.Second) {
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

// TestPlannedCloseNoFailedCalls closes the leader on purpose while the
// followers call it without pause: the followers drain, elect a new
// leader among themselves, and not one call fails.
func TestPlannedCloseNoFailedCalls(t *testing.T) {
	t.Parallel()
	kids, li := startCluster(t, 3, childSpec{Port: freePort(t)})
	old := kids[li]
	var fols []*child
	for i, k := range kids {
		if i != li {
			fols = append(fols, k)
		}
	}
	reg := msg{"topic": "after-close"}
	for i, f := range fols {
		f.ok(msg{"op": "subscribe", "reg": reg, "as": "a"})
		f.ok(msg{"op": "publish", "reg": msg{"pub": i}})
		f.ok(msg{"op": "hammer", "method": "pid", "workers": 3})
	}
	// Let each follower's calls reach the old leader before it closes.
	for _, f := range fols {
		waitUntil(t, 10*time.Second, "calls on the old leader", func() bool {
			res, _ := f.do(msg{"op": "hammered"}, 10*time.Second)["results"].(map[string]any)
			n, _ := res[fmt.Sprint(old.pid)].(float64)
			return n >= 10
		})
	}
	old.ok(msg{"op": "close"})
	<-old.exited

	lead := leaderOf(t, fols)
	// Calls keep flowing on the new leader for a while.
	mustReach(t, fols, lead)
	// Subscriptions and publications moved to the new leader.
	waitUntil(t, 10*time.Second, "publications on the new leader", func() bool {
		got := fmt.Sprint(lead.call("published"))
		return strings.Contains(got, "pub:0") && strings.Contains(got, "pub:1")
	})
	lead.call("push", reg, "new leader")
	for _, f := range fols {
		f.waitLog(isValue("a", "new leader"), 5*time.Second)
	}
	for _, f := range fols {
		m := f.do(msg{"op": "stop"}, 10*time.Second)
		t.Logf("%v: %v calls ok, %v failed, results %v", f, m["ok"], m["failed"], m["results"])
		if m["failed"] != float64(0) {
			t.Errorf("%v: %v calls failed across a planned close: %v", f, m["failed"], m["errs"])
		}
		res, _ := m["results"].(map[string]any)
		if res[fmt.Sprint(old.pid)] == nil || res[fmt.Sprint(lead.pid)] == nil {
			t.Errorf("%v: calls did not span the change of leader: %v", f, res)
		}
	}
}

// TestSubscribeAcrossProcesses checks subscriptions over three processes
// and a late fourth: one real Subscribe per key, every listener gets
// every value, late listeners get the latest value at once, and the real
// subscription is released when the last listener anywhere leaves,
// including by the death of its process.
func TestSubscribeAcrossProcesses(t *testing.T) {
	t.Parallel()
	port := freePort(t)
	kids, li := startCluster(t, 3, childSpec{Port: port})
	reg := msg{"topic": "prices", "n": 1}
	for _, k := range kids {
		k.ok(msg{"op": "subscribe", "reg": reg, "as": "a"})
		k.ok(msg{"op": "subscribe", "reg": reg, "as": "b"})
	}
	// Pushed from a follower's call, so the leader's real client pushes
	// while the subscriptions of all three processes are in place.
	fol := kids[(li+1)%3]
	waitUntil(t, 10*time.Second, "value at every listener", func() bool {
		fol.call("push", reg, "v1")
		for _, k := range kids {
			if k.countLog(isValue("a", "v1")) == 0 || k.countLog(isValue("b", "v1")) == 0 {
				return false
			}
		}
		return true
	})
	if n := kids[li].call("subscribes", reg); n != float64(1) {
		t.Fatalf("real client subscribed %v times, want 1", n)
	}

	// Latest value to a late local listener and to a late process.
	fol.ok(msg{"op": "subscribe", "reg": reg, "as": "late"})
	fol.waitLog(isValue("late", "v1"), 5*time.Second)
	late := startChild(t, childSpec{Port: port})
	late.ready(20 * time.Second)
	late.ok(msg{"op": "subscribe", "reg": reg, "as": "a"})
	late.waitLog(isValue("a", "v1"), 5*time.Second)
	if n := late.call("subscribes", reg); n != float64(1) {
		t.Fatalf("real client subscribed %v times after late listeners, want 1", n)
	}

	// A new value reaches every listener, the late ones too.
	fol.call("push", reg, "v2")
	for _, k := range append(kids, late) {
		k.waitLog(isValue("a", "v2"), 5*time.Second)
	}
	fol.waitLog(isValue("late", "v2"), 5*time.Second)

	// Every listener but the late process's leaves: the subscription
	// stays; then that process dies and the subscription goes.
	for _, k := range kids {
		k.ok(msg{"op": "unsubscribe", "as": "a"})
		k.ok(msg{"op": "unsubscribe", "as": "b"})
	}
	fol.ok(msg{"op": "unsubscribe", "as": "late"})
	if kids[li].call("active", reg) != true {
		t.Fatal("subscription released while a listener remains")
	}
	late.kill()
	waitUntil(t, 10*time.Second, "release after the last listener's process died", func() bool {
		return kids[li].call("active", reg) == false
	})

	// A follower's last listener leaving releases the subscription too.
	reg2 := msg{"topic": "other"}
	fol.ok(msg{"op": "subscribe", "reg": reg2, "as": "x"})
	waitUntil(t, 10*time.Second, "subscription of reg2", func() bool { return fol.call("active", reg2) == true })
	fol.ok(msg{"op": "unsubscribe", "as": "x"})
	waitUntil(t, 10*time.Second, "release of reg2", func() bool { return fol.call("active", reg2) == false })
}

// TestBroadcastOff sends each value to one subscriber picked at random:
// every value reaches exactly one process.
func TestBroadcastOff(t *testing.T) {
	t.Parallel()
	kids, li := startCluster(t, 3, childSpec{Port: freePort(t), NoBroadcast: true})
	reg := msg{"topic": "jobs"}
	for _, k := range kids {
		k.ok(msg{"op": "subscribe", "reg": reg, "as": "a"})
	}
	// The followers' subscribe requests are in place once the leader's
	// subscribes count has been read through each of them: each read is
	// answered after the subscribe sent before it on the same connection
	// has been handled.
	for _, k := range kids {
		if n := k.call("subscribes", reg); n != float64(1) {
			t.Fatalf("real client subscribed %v times, want 1", n)
		}
	}
	const values = 30
	got := map[int]int{} // child index -> values received
	for v := range values {
		kids[li].call("push", reg, v)
		waitUntil(t, 5*time.Second, fmt.Sprintf("value %d", v), func() bool {
			n := 0
			for _, k := range kids {
				n += k.countLog(isValue("a", v))
			}
			return n > 0
		})
	}
	for v := range values {
		n := 0
		for i, k := range kids {
			if c := k.countLog(isValue("a", v)); c > 0 {
				n += c
				got[i]++
			}
		}
		if n != 1 {
			t.Errorf("value %d reached %d listeners, want 1", v, n)
		}
	}
	t.Logf("values per process: %v", got)
	if len(got) < 2 {
		t.Errorf("all %d values went to one process: %v", values, got)
	}
}

// TestStoppedLeader stops the leader with SIGSTOP: the followers notice
// through the heartbeat, their calls fail with a clear error instead of
// hanging, and once the stopped leader is killed one of them takes over.
func TestStoppedLeader(t *testing.T) {
	t.Parallel()
	kids, li := startCluster(t, 3, childSpec{Port: freePort(t), HeartbeatMS: 150, ResponseMS: 1000})
	stopped := kids[li]
	var fols []*child
	for i, k := range kids {
		if i != li {
			fols = append(fols, k)
		}
	}
	stopped.stop()
	start := time.Now()
	for round := range 2 {
		var replies []<-chan msg
		for _, f := range fols {
			replies = append(replies, f.send(msg{"op": "invoke", "method": "pid", "timeoutMS": 8000}))
		}
		for i, ch := range replies {
			select {
			case m := <-ch:
				if m["lost"] != true && m["timeout"] != true {
					t.Fatalf("round %d: %v: call to a stopped leader returned %v, want ErrLeaderLost or ErrTimeout", round, fols[i], m)
				}
				t.Logf("round %d: %v failed after %v: %v", round, fols[i], time.Since(start).Round(time.Millisecond), m["err"])
			case <-time.After(5 * time.Second):
				t.Fatalf("round %d: %v: call to a stopped leader still waiting after 5s", round, fols[i])
			}
		}
	}
	stopped.kill()
	var pids []any
	for _, f := range fols {
		var got any
		waitUntil(t, 10*time.Second, "call on a new leader", func() bool {
			m := f.do(msg{"op": "invoke", "method": "pid", "timeoutMS": 3000}, 10*time.Second)
			got = m["result"]
			return got != nil
		})
		pids = append(pids, got)
	}
	if pids[0] != pids[1] || (pids[0] != float64(fols[0].pid) && pids[0] != float64(fols[1].pid)) {
		t.Fatalf("after the kill the followers reached %v, want one of them (%d, %d)", pids, fols[0].pid, fols[1].pid)
	}
}

// TestSingleModeProcesses: in single mode every process builds its own
// real client and no port is used.
func TestSingleModeProcesses(t *testing.T) {
	t.Parallel()
	port := freePort(t)
	kids := []*child{startChild(t, childSpec{Port: port, SingleMode: true}), startChild(t, childSpec{Port: port, SingleMode: true})}
	for _, k := range kids {
		if !k.ready(20 * time.Second) {
			t.Fatalf("%v does not lead in single mode", k)
		}
	}
	for _, k := range kids {
		if got := k.call("pid"); got != float64(k.pid) {
			t.Fatalf("%v reached the real client of %v", k, got)
		}
	}
	ln, err := net.Listen("tcp", loopback(port))
	if err != nil {
		t.Fatalf("port %d is in use with single mode on: %v", port, err)
	}
	ln.Close()
}

// TestRemoteErrorAcrossProcesses: an error of the leader's real client
// reaches a follower process with its name, message, code and stack.
func TestRemoteErrorAcrossProcesses(t *testing.T) {
	t.Parallel()
	kids, li := startCluster(t, 2, childSpec{Port: freePort(t)})
	fol := kids[1-li]
	m := fol.do(msg{"op": "invoke", "method": "throw", "args": []any{"TypeError", "bad input", "ERR_BAD", "at leader.js:1"}}, 10*time.Second)
	for k, want := range map[string]string{"name": "TypeError", "message": "bad input", "code": "ERR_BAD", "stack": "at leader.js:1"} {
		if m[k] != want {
			t.Errorf("%s = %v, want %q (reply %v)", k, m[k], want, m)
		}
	}
	m = fol.do(msg{"op": "invoke", "method": "fail", "args": []any{"E_CODE"}}, 10*time.Second)
	if m["name"] != "Error" || m["code"] != "E_CODE" || m["message"] != "failed on purpose" {
		t.Errorf("fail: reply %v", m)
	}
	if got := fol.call("echo", []any{1, "two", msg{"three": 3.5}}); fmt.Sprint(got) != fmt.Sprint([]any{1, "two", msg{"three": 3.5}}) {
		t.Errorf("echo returned %v", got)
	}
}

// newClient creates a client that the test closes when it ends.
func newClient(t testing.TB, name string, cfg *Config, real *testReal) *Client {
	t.Helper()
	c, err := New(name, cfg, buildTestReal(real))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// inProcessPair starts a leader and a follower of the channel name in
// this process, on a free port; tune, if set, changes the follower's
// Config.
func inProcessPair(t *testing.T, name string, tune func(fcfg *Config)) (lead, fol *Client) {
	t.Helper()
	port := freePort(t)
	cfg := testConfig(t, port)
	cfg.Role = RoleLeader
	lead = newClient(t, name, cfg, newTestReal())
	mustReady(t, lead)
	fcfg := testConfig(t, port)
	fcfg.Role = RoleFollower
	if tune != nil {
		tune(fcfg)
	}
	fol = newClient(t, name, fcfg, newTestReal())
	mustReady(t, fol)
	return lead, fol
}

// leadOf returns the leader of c, which leads.
func leadOf(c *Client) *leader {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lead()
}

// lead and fol return the route of c's calls as a leader or as a follower,
// nil if it is not one. The caller holds c.mu, or knows that the route is
// settled.
func (c *Client) lead() *leader {
	l, _ := c.cur.(*leader)
	return l
}

func (c *Client) fol() *follower {
	f, _ := c.cur.(*follower)
	return f
}

func mustReady(t testing.TB, c *Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Ready(ctx); err != nil {
		t.Fatal(err)
	}
}

// whoami returns the name of the real client that served c's call.
func whoami(t testing.TB, c *Client) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	name, err := Invoke[string](ctx, c, "whoami")
	if err != nil {
		t.Fatal(err)
	}
	return name
}

// TestForcedLeaderPortTaken: a forced leader fails at once from New, and
// the error names the port.
func TestForcedLeaderPortTaken(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	cfg := testConfig(t, port)
	cfg.Role = RoleLeader
	start := time.Now()
	c, err := New("forced", cfg, buildTestReal(newTestReal()))
	if err == nil {
		c.Close()
		t.Fatal("forced leader created on a taken port")
	}
	if !strings.Contains(err.Error(), strconv.Itoa(port)) {
		t.Errorf("error does not name port %d: %v", port, err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("New took %v to fail", d)
	}
	t.Log(err)
}

// TestForcedFollowerNoLeader: a forced follower with no leader gives up
// after MaxWaitTime; Ready's error wraps ErrNoLeader and names the port
// and the last dial error. It never listens on the port.
func TestForcedFollowerNoLeader(t *testing.T) {
	t.Parallel()
	port := freePort(t)
	cfg := testConfig(t, port)
	cfg.Role = RoleFollower
	cfg.MaxWaitTime = 300 * time.Millisecond
	c := newClient(t, "lonely", cfg, newTestReal())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	err := c.Ready(ctx)
	if !errors.Is(err, ErrNoLeader) {
		t.Fatalf("Ready: %v, want ErrNoLeader", err)
	}
	if d := time.Since(start); d < cfg.MaxWaitTime {
		t.Errorf("gave up after %v, before MaxWaitTime %v", d, cfg.MaxWaitTime)
	}
	for _, want := range []string{strconv.Itoa(port), "connection refused"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Ready error lacks %q: %v", want, err)
		}
	}
	if _, err := c.Invoke(ctx, "pid"); !errors.Is(err, ErrNoLeader) {
		t.Errorf("Invoke after MaxWaitTime: %v, want ErrNoLeader", err)
	}
	if c.IsLeader() {
		t.Error("forced follower leads")
	}
	t.Log(err)
}

// TestForcedFollowerWaitsForLeader: a forced follower keeps dialing, does
// not take the free port, and follows the leader that comes later; a
// call made before that waits for it.
func TestForcedFollowerWaitsForLeader(t *testing.T) {
	t.Parallel()
	port := freePort(t)
	cfg := testConfig(t, port)
	cfg.Role = RoleFollower
	fol := newClient(t, "svc", cfg, &testReal{name: "follower's"})

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	_, err := fol.Invoke(ctx, "whoami")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call with no leader: %v, want the context's deadline", err)
	}
	waiting := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		name, err := Invoke[string](ctx, fol, "whoami")
		if err == nil && name != "leader's" {
			err = fmt.Errorf("served by %q", name)
		}
		waiting <- err
	}()
	// The follower never listens: the port is still free.
	ln, err := net.Listen("tcp", loopback(port))
	if err != nil {
		t.Fatalf("forced follower holds port %d: %v", port, err)
	}
	ln.Close()

	lcfg := testConfig(t, port)
	lcfg.Role = RoleLeader
	lead := newClient(t, "svc", lcfg, &testReal{name: "leader's"})
	mustReady(t, lead)
	if err := <-waiting; err != nil {
		t.Fatalf("call made before the leader came: %v", err)
	}
	if fol.IsLeader() || !lead.IsLeader() {
		t.Fatal("roles not as forced")
	}
}

// TestThreeClientsOneProcess: three clients of one channel in one
// process, as in the package README: one leads, the other two reach it
// over loopback, and closing the leader moves leadership to one of them.
func TestThreeClientsOneProcess(t *testing.T) {
	t.Parallel()
	port := freePort(t)
	var cs []*Client
	reals := map[string]*testReal{}
	for i := range 3 {
		r := &testReal{name: fmt.Sprint("real", i)}
		r.push, r.subscribes = map[string]func(any){}, map[string]int{}
		reals[r.name] = r
		cs = append(cs, newClient(t, "svc", testConfig(t, port), r))
	}
	for _, c := range cs {
		mustReady(t, c)
	}
	lead := -1
	for i, c := range cs {
		if c.IsLeader() {
			if lead >= 0 {
				t.Fatalf("clients %d and %d both lead", lead, i)
			}
			lead = i
		}
	}
	if lead < 0 {
		t.Fatal("no client leads")
	}
	want := fmt.Sprint("real", lead)
	for i, c := range cs {
		if got := whoami(t, c); got != want {
			t.Fatalf("client %d served by %s, want %s", i, got, want)
		}
	}
	l := cs[lead].lead()
	l.mu.Lock()
	conns := len(l.conns)
	l.mu.Unlock()
	if conns != 2 {
		t.Fatalf("leader has %d follower connections, want 2", conns)
	}

	cs[lead].Close()
	old := reals[want]
	old.mu.Lock()
	closed := old.closed
	old.mu.Unlock()
	if !closed {
		t.Error("old leader's real client not closed")
	}
	rest := slices.Delete(slices.Clone(cs), lead, lead+1)
	waitUntil(t, 10*time.Second, "new leader", func() bool { return rest[0].IsLeader() || rest[1].IsLeader() })
	var next string
	for _, c := range rest {
		if c.IsLeader() {
			next = fmt.Sprint("real", slices.Index(cs, c))
		}
	}
	for i, c := range rest {
		if got := whoami(t, c); got != next {
			t.Fatalf("survivor %d served by %s, want %s", i, got, next)
		}
	}
}

// TestInvokeInProcess checks calls from the leader's own client and from
// a follower over loopback: results, remote errors with every field,
// timeouts, oneway calls and publish.
func TestInvokeInProcess(t *testing.T) {
	t.Parallel()
	port := freePort(t)
	real := newTestReal()
	real.name = "leader"
	cfg := testConfig(t, port)
	cfg.ResponseTimeout = time.Second // short, with room for a loaded machine under -race
	lead := newClient(t, "calls", cfg, real)
	mustReady(t, lead)
	fcfg := *cfg
	fcfg.Role = RoleFollower
	fol := newClient(t, "calls", &fcfg, newTestReal())
	mustReady(t, fol)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, tc := range []struct {
		name string
		c    *Client
	}{{"leader", lead}, {"follower", fol}} {
		c := tc.c
		t.Run(tc.name, func(t *testing.T) {
			type point struct{ X, Y int }
			p, err := Invoke[point](ctx, c, "echo", point{3, 4})
			if err != nil || p != (point{3, 4}) {
				t.Fatalf("echo: %v, %v", p, err)
			}
			v, err := c.Invoke(ctx, "echo", "a<b>&c")
			if err != nil || v.String() != `"a<b>&c"` {
				t.Fatalf("echo: %s, %v", v, err)
			}

			_, err = c.Invoke(ctx, "throw", "RangeError", "out of range", "ERR_RANGE", "RangeError: out of range\n    at f (x.js:1:1)")
			var re *RemoteError
			if !errors.As(err, &re) {
				t.Fatalf("throw: %v, want a *RemoteError", err)
			}
			if re.Name != "RangeError" || re.Message != "out of range" || re.Code != "ERR_RANGE" || !strings.Contains(re.Stack, "x.js:1:1") {
				t.Errorf("throw: %+v", re)
			}
			_, err = c.Invoke(ctx, "fail", "E_FAIL")
			if !errors.As(err, &re) || re.Name != "Error" || re.Message != "failed on purpose" || re.Code != "E_FAIL" {
				t.Errorf("fail: %v", err)
			}
			_, err = c.Invoke(ctx, "nosuchmethod")
			if !errors.As(err, &re) || !strings.Contains(re.Message, "nosuchmethod") {
				t.Errorf("unknown method: %v", err)
			}

			start := time.Now()
			_, err = c.Invoke(ctx, "sleep", 5000)
			if !errors.Is(err, ErrTimeout) {
				t.Fatalf("sleep 5s with a 1s response timeout: %v, want ErrTimeout", err)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("timeout took %v", d)
			}
			// The connection is still good after a timeout.
			if got := whoami(t, c); got != "leader" {
				t.Fatalf("after a timeout served by %q", got)
			}

			note := "oneway from " + tc.name
			if err := c.InvokeOneway(ctx, "note", note); err != nil {
				t.Fatal(err)
			}
			waitUntil(t, 5*time.Second, "oneway call", func() bool {
				real.mu.Lock()
				defer real.mu.Unlock()
				return slices.Contains(real.notes, any(note))
			})

			reg := map[string]string{"publishedBy": tc.name}
			if err := c.Publish(ctx, reg); err != nil {
				t.Fatal(err)
			}
			waitUntil(t, 5*time.Second, "publication", func() bool {
				real.mu.Lock()
				defer real.mu.Unlock()
				return slices.ContainsFunc(real.published, func(r json.RawMessage) bool {
					return string(r) == `{"publishedBy":"`+tc.name+`"}`
				})
			})
		})
	}
}

// TestCallsWaitForLeaderAfterLoss: when the connection to the leader is
// lost, the call in flight fails at once with ErrLeaderLost, and calls
// made meanwhile wait for the next leader.
func TestCallsWaitForLeaderAfterLoss(t *testing.T) {
	t.Parallel()
	port := freePort(t)
	lcfg := testConfig(t, port)
	lcfg.Role = RoleLeader
	lcfg.DrainTimeout = 100 * time.Millisecond // the orphaned sleep need not finish
	lead := newClient(t, "svc", lcfg, &testReal{name: "first"})
	mustReady(t, lead)
	fcfg := testConfig(t, port)
	fcfg.Role = RoleFollower
	fol := newClient(t, "svc", fcfg, newTestReal())
	mustReady(t, fol)

	inflight := sleepInFlight(t, lead, fol)
	// Break the connection under the follower, as a dying leader does.
	fol.mu.Lock()
	f := fol.fol()
	fol.mu.Unlock()
	start := time.Now()
	f.nc.Close()
	select {
	case err := <-inflight:
		if !errors.Is(err, ErrLeaderLost) {
			t.Fatalf("call in flight: %v, want ErrLeaderLost", err)
		}
		t.Logf("call in flight failed after %v", time.Since(start))
	case <-time.After(2 * time.Second):
		t.Fatal("call in flight still waiting 2s after the connection broke")
	}
	// Calls made now wait: none fails while the follower finds the
	// leader again.
	var errs []error
	for range 20 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := fol.Invoke(ctx, "whoami")
		cancel()
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		t.Fatalf("%d calls made after the loss failed, first: %v", len(errs), errs[0])
	}
}

// TestLeaderNoReplayWithoutBroadcast: with DisableBroadcast set, the leader's
// own first listener on a key that already has a value gets no replay of
// it, as no late subscriber does.
func TestLeaderNoReplayWithoutBroadcast(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, freePort(t))
	cfg.DisableBroadcast = true
	lead := newClient(t, "nb", cfg, newTestReal())
	mustReady(t, lead)
	fol := newClient(t, "nb", cfg, newTestReal())
	mustReady(t, fol)
	reg := map[string]string{"k": "v"}
	folGot := make(chan string, 100)
	if _, err := fol.Subscribe(reg, func(v Value) { folGot <- v.String() }); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	waitUntil(t, 5*time.Second, "follower's subscription", func() bool {
		n, err := Invoke[int](ctx, fol, "subscribes", reg)
		return err == nil && n == 1
	})
	if ok, err := Invoke[bool](ctx, lead, "push", reg, 0); !ok || err != nil {
		t.Fatalf("push: %v %v", ok, err)
	}
	if v := <-folGot; v != "0" {
		t.Fatalf("follower got %s, want 0", v)
	}
	leadGot := make(chan string, 100)
	if _, err := lead.Subscribe(reg, func(v Value) { leadGot <- v.String() }); err != nil {
		t.Fatal(err)
	}
	for i := 1; ; i++ {
		if ok, err := Invoke[bool](ctx, lead, "push", reg, i); !ok || err != nil {
			t.Fatalf("push: %v %v", ok, err)
		}
		select {
		case v := <-leadGot:
			if v == "0" {
				t.Fatal("the leader's late listener got the latest value replayed with DisableBroadcast set")
			}
			return
		case <-folGot:
		case <-ctx.Done():
			t.Fatal("the leader's listener got no value")
		}
	}
}

// muteEvent is what a muteLeader saw on one connection.
type muteEvent struct {
	conn int    // connection number, from 1
	what string // "accepted", a request's type, or "closed"
	at   time.Time
}

// startMuteLeader listens on a free port and, when register is set,
// answers each register_channel with success; it answers nothing else.
// It reports what it sees.
func startMuteLeader(t *testing.T, register bool) (int, <-chan muteEvent) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	events := make(chan muteEvent, 1000)
	report := func(n int, what string) {
		select {
		case events <- muteEvent{n, what, time.Now()}:
		default:
		}
	}
	go func() {
		for n := 1; ; n++ {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { nc.Close() })
			report(n, "accepted")
			go func() {
				r := NewReader(nc, DefaultMaxPacketSize)
				for {
					var p Packet
					if err := r.ReadPacket(&p); err != nil {
						report(n, "closed")
						return
					}
					_, typ, _ := parseConn(p.Conn)
					report(n, typ)
					if typ == "register_channel" && register {
						b, _ := appendPacket(nil, true, p.ID, p.Timeout, registerChannelRes{}, []byte(`{"success":true}`))
						nc.Write(b)
					}
				}
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port, events
}

// nextMute waits for the next event that match accepts.
func nextMute(t *testing.T, events <-chan muteEvent, match func(muteEvent) bool) muteEvent {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case e := <-events:
			if match(e) {
				return e
			}
		case <-deadline:
			t.Fatal("mute leader: no matching event within 10s")
		}
	}
}

// TestHeartbeatSilentLeader: an idle follower whose leader answers
// nothing, not even heartbeats, leaves it after about two intervals and
// connects again.
func TestHeartbeatSilentLeader(t *testing.T) {
	t.Parallel()
	port, events := startMuteLeader(t, true)
	cfg := testConfig(t, port)
	cfg.Role = RoleFollower
	cfg.HeartbeatInterval = 50 * time.Millisecond
	c := newClient(t, "hb", cfg, newTestReal())
	mustReady(t, c)
	reg := nextMute(t, events, func(e muteEvent) bool { return e.what == "register_channel" })
	hb := nextMute(t, events, func(e muteEvent) bool { return e.conn == reg.conn && e.what == "heartbeat" })
	closed := nextMute(t, events, func(e muteEvent) bool { return e.conn == reg.conn && e.what == "closed" })
	t.Logf("heartbeat %v after register, connection closed %v after it", hb.at.Sub(reg.at), closed.at.Sub(hb.at))
	if d := closed.at.Sub(reg.at); d < 2*cfg.HeartbeatInterval*9/10 {
		t.Errorf("connection dropped %v after register, before two heartbeat intervals", d)
	}
	nextMute(t, events, func(e muteEvent) bool { return e.conn > reg.conn && e.what == "register_channel" })
}

// TestHeartbeatBusyFollower: a follower that calls without pause, with
// calls quicker and slower than the heartbeat interval, never takes its
// leader for dead, and the leader never drops it.
func TestHeartbeatBusyFollower(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, freePort(t))
	// Long enough that a test process starved by a loaded machine does
	// not go silent for a whole interval.
	cfg.HeartbeatInterval = 250 * time.Millisecond
	lead := newClient(t, "busy", cfg, newTestReal())
	mustReady(t, lead)
	fol := newClient(t, "busy", cfg, newTestReal())
	mustReady(t, fol)
	fol.mu.Lock()
	f := fol.fol()
	fol.mu.Unlock()

	const intervals = 5
	end := time.Now().Add(intervals * cfg.HeartbeatInterval)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var calls int
	var errs []error
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				var err error
				if w == 0 {
					_, err = fol.Invoke(context.Background(), "sleep", 3*cfg.HeartbeatInterval/time.Millisecond)
				} else {
					_, err = fol.Invoke(context.Background(), "echo", w)
				}
				mu.Lock()
				calls++
				if err != nil {
					errs = append(errs, err)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	t.Logf("%d calls in %d heartbeat intervals", calls, intervals)
	if len(errs) > 0 {
		t.Fatalf("%d calls failed, first: %v", len(errs), errs[0])
	}
	fol.mu.Lock()
	same := fol.fol() == f
	fol.mu.Unlock()
	if !same {
		t.Fatal("the busy follower changed connection")
	}
}

// TestHeartbeatLeaderDropsSilentFollower: a leader drops a follower
// connection that sends nothing, not even heartbeats, for three
// intervals.
func TestHeartbeatLeaderDropsSilentFollower(t *testing.T) {
	t.Parallel()
	port := freePort(t)
	cfg := testConfig(t, port)
	cfg.HeartbeatInterval = 50 * time.Millisecond
	lead := newClient(t, "idle", cfg, newTestReal())
	mustReady(t, lead)
	nc, err := net.Dial("tcp", loopback(port))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	b, _ := appendPacket(nil, false, 1, 1000, registerChannel{ChannelName: "idle"}, nil)
	if _, err := nc.Write(b); err != nil {
		t.Fatal(err)
	}
	r := NewReader(nc, DefaultMaxPacketSize)
	var p Packet
	if err := r.ReadPacket(&p); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	err = r.ReadPacket(&p)
	d := time.Since(start)
	if err == nil {
		t.Fatalf("silent follower got a packet: %+v", p)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("silent follower not dropped within 10s")
	}
	t.Logf("dropped after %v: %v", d, err)
	if d < 2*cfg.HeartbeatInterval {
		t.Errorf("dropped after %v, before three intervals of %v", d, cfg.HeartbeatInterval)
	}
}

// TestCloseWhileRegistering: Close returns promptly while the client is
// waiting for a leader's answer to register_channel.
func TestCloseWhileRegistering(t *testing.T) {
	t.Parallel()
	port, events := startMuteLeader(t, false)
	cfg := testConfig(t, port)
	cfg.Role = RoleFollower
	cfg.ResponseTimeout = 20 * time.Second
	c, err := New("stuck", cfg, buildTestReal(newTestReal()))
	if err != nil {
		t.Fatal(err)
	}
	nextMute(t, events, func(e muteEvent) bool { return e.what == "register_channel" })
	start := time.Now()
	c.Close()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Close took %v while waiting for a register answer", d)
	}
}

// TestCloseDuringBuild: Close returns promptly while the leader's real
// client is still being built, and the build sees its context end.
func TestCloseDuringBuild(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, freePort(t))
	started := make(chan struct{})
	c, err := New("slow", cfg, func(ctx context.Context) (RealClient, error) {
		close(started)
		<-ctx.Done()
		return nil, ctx.Err()
	})
	if err != nil {
		t.Fatal(err)
	}
	<-started
	start := time.Now()
	c.Close()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Close took %v during build", d)
	}
}

// TestCloseLeavesNoGoroutines creates a leader and two followers in this
// process, with subscriptions, calls and a failover, closes them all and
// checks that every goroutine they started has ended. It does not run in
// parallel: it counts the goroutines of the whole process.
func TestCloseLeavesNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		cfg := testConfig(t, freePort(t))
		cfg.DrainTimeout = time.Second
		var cs []*Client
		for i := range 3 {
			r := newTestReal()
			r.name = fmt.Sprint(i)
			c, err := New("leak", cfg, buildTestReal(r))
			if err != nil {
				t.Fatal(err)
			}
			cs = append(cs, c)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		got := make(chan string, 100)
		for i, c := range cs {
			mustReady(t, c)
			if _, err := c.Subscribe(map[string]int{"k": 1}, func(v Value) { got <- v.String() }); err != nil {
				t.Fatal(err)
			}
			if err := c.Publish(ctx, map[string]int{"p": i}); err != nil {
				t.Fatal(err)
			}
			if err := c.InvokeOneway(ctx, "note", i); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := cs[1].Invoke(ctx, "push", map[string]int{"k": 1}, "x"); err != nil {
			t.Fatal(err)
		}
		for range cs {
			<-got
		}
		// Close the leader first: the others elect a new one.
		lead := slices.IndexFunc(cs, (*Client).IsLeader)
		cs[lead].Close()
		cs = slices.Delete(cs, lead, lead+1)
		for _, c := range cs {
			if _, err := c.Invoke(ctx, "echo", 1); err != nil {
				t.Fatal(err)
			}
		}
		for _, c := range cs {
			c.Close()
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines before, %d after Close:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestResubscribeDuringRelease: a key subscribed again while the real
// client is still releasing it ends up subscribed: the release and the
// new subscribe reach the real client in the order they were decided.
func TestResubscribeDuringRelease(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, freePort(t))
	real := newTestReal()
	entered, unblock := make(chan struct{}, 10), make(chan struct{})
	real.unsubHook = func() {
		entered <- struct{}{}
		<-unblock
	}
	lead := newClient(t, "resub", cfg, real)
	mustReady(t, lead)
	fol := newClient(t, "resub", cfg, newTestReal())
	mustReady(t, fol)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reg := map[string]string{"k": "resub"}
	s, err := fol.Subscribe(reg, func(Value) {})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "subscription", func() bool {
		ok, err := Invoke[bool](ctx, lead, "active", reg)
		return err == nil && ok
	})
	s.Unsubscribe() // the last listener: the leader releases the key
	select {
	case <-entered:
	case <-ctx.Done():
		t.Fatal("real client not unsubscribed")
	}
	// While the release is under way the leader's own client subscribes
	// the key again. Give its Subscribe a moment to reach the real
	// client first; it may also wait for the release to end.
	got := make(chan string, 10)
	subscribed := make(chan error, 1)
	go func() {
		_, err := lead.Subscribe(reg, func(v Value) { got <- v.String() })
		subscribed <- err
	}()
	var err2 error
	select {
	case err2 = <-subscribed:
		close(unblock)
	case <-time.After(200 * time.Millisecond):
		close(unblock)
		err2 = <-subscribed
	}
	if err2 != nil {
		t.Fatal(err2)
	}
	waitUntil(t, 5*time.Second, "end of the release", func() bool {
		real.mu.Lock()
		defer real.mu.Unlock()
		return real.unsubscribes == 1
	})
	if ok, err := Invoke[bool](ctx, lead, "active", reg); err != nil || !ok {
		t.Fatalf("key has a listener but the real client is not subscribed (active %v, %v)", ok, err)
	}
	if ok, err := Invoke[bool](ctx, lead, "push", reg, 7); err != nil || !ok {
		t.Fatalf("push: %v %v", ok, err)
	}
	select {
	case v := <-got:
		if v != "7" {
			t.Fatalf("got %s", v)
		}
	case <-ctx.Done():
		t.Fatal("listener got nothing")
	}
}

// sleepInFlight starts a 60 s sleep from fol and waits until the real
// client of lead, a leader in this process, runs it. The call's outcome
// arrives on the channel.
func sleepInFlight(t *testing.T, lead, fol *Client) <-chan error {
	t.Helper()
	inflight := make(chan error, 1)
	go func() {
		_, err := fol.Invoke(context.Background(), "sleep", 60000)
		inflight <- err
	}()
	real := lead.lead().real.(*testReal)
	waitUntil(t, 5*time.Second, "call in flight", func() bool {
		real.mu.Lock()
		defer real.mu.Unlock()
		return real.sleeping == 1
	})
	return inflight
}

// TestCloseFailsCallsInFlight: closing a follower's client fails its
// calls in flight at once with ErrClosed, and later calls too.
func TestCloseFailsCallsInFlight(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, freePort(t))
	cfg.DrainTimeout = 100 * time.Millisecond // the orphaned sleep need not finish
	lead := newClient(t, "closing", cfg, newTestReal())
	mustReady(t, lead)
	fol := newClient(t, "closing", cfg, newTestReal())
	mustReady(t, fol)
	inflight := sleepInFlight(t, lead, fol)
	fol.Close()
	select {
	case err := <-inflight:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("call in flight: %v, want ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("call in flight still waiting 2s after Close")
	}
	if _, err := fol.Invoke(context.Background(), "echo", 1); !errors.Is(err, ErrClosed) {
		t.Fatalf("call after Close: %v, want ErrClosed", err)
	}
}

// TestInvokeArgCounts: an invoke reaches the real client with all its
// arguments and in order, however many it has, from a follower and on
// the leader itself.
func TestInvokeArgCounts(t *testing.T) {
	t.Parallel()
	lead, fol := inProcessPair(t, "argc", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	all := []any{1, "two", []int{3}, map[string]bool{"four": true}, nil, 6.5}
	for n := range len(all) + 1 {
		want, _ := json.Marshal(all[:n])
		for name, c := range map[string]*Client{"follower": fol, "leader": lead} {
			v, err := c.Invoke(ctx, "args", all[:n]...)
			if err != nil {
				t.Fatalf("%s, %d arguments: %v", name, n, err)
			}
			var got []json.RawMessage
			if err := v.Decode(&got); err != nil {
				t.Fatalf("%s, %d arguments: %v", name, n, err)
			}
			if b, _ := json.Marshal(got); string(b) != string(want) {
				t.Errorf("%s, %d arguments: the real client got %s, want %s", name, n, b, want)
			}
		}
	}
}
