package clusterclient

// Faults with real processes: a leader killed again and again while its
// followers work, a leader stopped and resumed, a port held by something
// that is not a leader, followers that die or stop reading.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// faultMember is a child in TestFaultKillLeaderTenTimes, with what it has
// published and subscribed.
type faultMember struct {
	c      *child
	i      int
	pubs   []msg          // every registration it published
	extras map[string]msg // listener label -> reg, subscribed while a leader died
}

func ownReg(i int) msg { return msg{"k": "own", "i": i} }

var sharedReg = msg{"k": "shared"}

// TestFaultKillLeaderTenTimes kills the leader with SIGKILL ten times in a
// row while the followers invoke, publish and subscribe; a new process
// replaces each dead one. After every election and at the end, every
// subscriber holds the latest value of each of its keys, and every
// registration that a living process published has reached the real
// client of the final leader. (What a killed process published dies with
// it: nobody is left to publish it again.)
func TestFaultKillLeaderTenTimes(t *testing.T) {
	t.Parallel()
	const kills = 10
	spec := childSpec{Port: freePort(t), ResponseMS: 2000}
	var live []*faultMember
	next := 0
	add := func() {
		m := &faultMember{c: startChild(t, spec), i: next, extras: map[string]msg{}}
		next++
		m.c.ready(20 * time.Second)
		m.c.ok(msg{"op": "subscribe", "reg": sharedReg, "as": "shared"})
		m.c.ok(msg{"op": "subscribe", "reg": ownReg(m.i), "as": "own"})
		pub := msg{"pub": m.i, "round": 0}
		m.c.ok(msg{"op": "publish", "reg": pub})
		m.pubs = append(m.pubs, pub)
		live = append(live, m)
	}
	// settle waits until every live member reaches the same leader, one
	// of them, and returns it.
	settle := func() *faultMember {
		t.Helper()
		var lead *faultMember
		waitUntil(t, 20*time.Second, "one leader for every member", func() bool {
			var pid any
			for j, m := range live {
				r := m.c.do(msg{"op": "invoke", "method": "pid", "timeoutMS": 2000}, 10*time.Second)
				if r["result"] == nil || (j > 0 && r["result"] != pid) {
					return false
				}
				pid = r["result"]
			}
			for _, m := range live {
				if float64(m.c.pid) == pid {
					lead = m
				}
			}
			return lead != nil
		})
		return lead
	}
	// check pushes a new value to every key through the leader and
	// waits until every listener holds it.
	check := func(lead *faultMember, round string) {
		t.Helper()
		if ok := lead.c.call("push", sharedReg, "shared "+round); ok != true {
			t.Fatalf("round %s: the leader's real client has no subscription for %v", round, sharedReg)
		}
		for _, m := range live {
			if ok := m.c.call("push", ownReg(m.i), fmt.Sprintf("own %d %s", m.i, round)); ok != true {
				t.Fatalf("round %s: the leader's real client has no subscription for %v", round, ownReg(m.i))
			}
			for as, reg := range m.extras {
				if ok := m.c.call("push", reg, as+" "+round); ok != true {
					t.Fatalf("round %s: the leader's real client has no subscription for %v", round, reg)
				}
			}
		}
		for _, m := range live {
			want := map[string]any{"shared": "shared " + round, "own": fmt.Sprintf("own %d %s", m.i, round)}
			for as := range m.extras {
				want[as] = as + " " + round
			}
			for as, v := range want {
				m.c.waitLog(isValue(as, v), 10*time.Second)
			}
		}
	}

	for range 3 {
		add()
	}
	for round := 1; round <= kills; round++ {
		lead := settle()
		check(lead, fmt.Sprint(round))

		// Load on every follower, then the kill.
		var fols []*faultMember
		for _, m := range live {
			if m != lead {
				fols = append(fols, m)
			}
		}
		var pending []<-chan msg
		for _, m := range fols {
			m.c.ok(msg{"op": "hammer", "method": "echo", "args": []any{m.i}, "workers": 2, "timeoutMS": 5000})
		}
		for _, m := range fols {
			pub := msg{"pub": m.i, "round": round}
			m.pubs = append(m.pubs, pub)
			pending = append(pending, m.c.send(msg{"op": "publish", "reg": pub}))
			as := fmt.Sprintf("extra%d", round)
			m.extras[as] = msg{"k": "extra", "i": m.i, "round": round}
			pending = append(pending, m.c.send(msg{"op": "subscribe", "reg": m.extras[as], "as": as}))
		}
		lead.c.kill()
		live = fols
		// Publish and subscribe return at once, whatever the leader
		// does: a publish that met the dead connection reports it and
		// is published again on the next leader anyway.
		for _, ch := range pending {
			select {
			case <-ch:
			case <-time.After(10 * time.Second):
				t.Fatalf("round %d: publish or subscribe still waiting 10s after the kill", round)
			}
		}
		settle()
		for _, m := range fols {
			r := m.c.do(msg{"op": "stop"}, 20*time.Second)
			if n, _ := r["ok"].(float64); n == 0 {
				t.Errorf("round %d: %v: no call succeeded: %v", round, m.c, r)
			}
			t.Logf("round %d: %v: %v calls ok, %v failed %v", round, m.c, r["ok"], r["failed"], r["errs"])
		}
		add()
	}

	lead := settle()
	check(lead, "final")
	// The last value each listener got is the final one: nothing older
	// arrived after it.
	for _, m := range live {
		last := map[string]any{}
		m.c.mu.Lock()
		for _, e := range m.c.log {
			if e["event"] == "value" {
				last[e["as"].(string)] = e["value"]
			}
		}
		m.c.mu.Unlock()
		for as, v := range last {
			if s, _ := v.(string); !strings.HasSuffix(s, " final") {
				t.Errorf("%v: listener %s holds %v after the final value", m.c, as, v)
			}
		}
	}
	got := map[string]bool{}
	for _, r := range lead.c.call("published").([]any) {
		b, _ := json.Marshal(r)
		got[string(b)] = true
	}
	published := 0
	for _, m := range live {
		for _, pub := range m.pubs {
			b, _ := json.Marshal(pub)
			if !got[string(b)] {
				t.Errorf("%v published %s; the final leader's real client does not have it", m.c, b)
			}
			published++
		}
	}
	if n := lead.c.call("subscribes", sharedReg); n != float64(1) {
		t.Errorf("the final real client subscribed %v %v times, want once", sharedReg, n)
	}
	t.Logf("%d kills; %d members alive hold the final values; %d publications on the final leader", kills, len(live), published)
}

// TestFaultLeaderStopped stops the leader with SIGSTOP while its
// followers keep their connections (heartbeats far apart): their calls
// fail within the response timeout with an error that says the leader
// did not answer, never hang; after SIGCONT the same leader serves
// again; stopped again and then killed, a survivor takes over.
func TestFaultLeaderStopped(t *testing.T) {
	t.Parallel()
	const response = 500 * time.Millisecond
	kids, li := startCluster(t, 3, childSpec{Port: freePort(t), ResponseMS: int(response / time.Millisecond), HeartbeatMS: 60000})
	lead := kids[li]
	var fols []*child
	for i, k := range kids {
		if i != li {
			fols = append(fols, k)
		}
	}
	mustReach(t, fols, lead)

	lead.stop()
	start := time.Now()
	var replies []<-chan msg
	for _, f := range fols {
		replies = append(replies, f.send(msg{"op": "invoke", "method": "echo", "args": []any{1}}))
	}
	for i, ch := range replies {
		select {
		case m := <-ch:
			d := time.Since(start)
			e, _ := m["err"].(string)
			if m["timeout"] != true || !strings.Contains(e, "no answer from the leader") {
				t.Fatalf("%v: call to a stopped leader: %v", fols[i], m)
			}
			if d < response*8/10 {
				t.Errorf("%v: call failed after %v, before the response timeout %v", fols[i], d, response)
			}
			t.Logf("%v: failed after %v: %s", fols[i], d.Round(time.Millisecond), e)
		case <-time.After(5 * time.Second):
			t.Fatalf("%v: call to a stopped leader still waiting after 5s (response timeout %v)", fols[i], response)
		}
	}

	lead.signal(syscall.SIGCONT)
	for _, f := range fols {
		waitUntil(t, 10*time.Second, "service after SIGCONT", func() bool {
			return f.do(msg{"op": "invoke", "method": "pid"}, 10*time.Second)["result"] == float64(lead.pid)
		})
	}

	lead.stop()
	lead.kill()
	var pids []any
	for _, f := range fols {
		var got any
		waitUntil(t, 10*time.Second, "a call served by a survivor", func() bool {
			got = f.do(msg{"op": "invoke", "method": "pid", "timeoutMS": 3000}, 10*time.Second)["result"]
			return got != nil
		})
		pids = append(pids, got)
	}
	if pids[0] != pids[1] || (pids[0] != float64(fols[0].pid) && pids[0] != float64(fols[1].pid)) {
		t.Fatalf("after the kill the followers reached %v, want one of them (%d, %d)", pids, fols[0].pid, fols[1].pid)
	}
}

// foreignListener holds a port with something that is not a leader: on
// each connection it writes garbage (when garbage is not nil) and then
// keeps the connection open without reading.
func foreignListener(t *testing.T, garbage []byte) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var conns []net.Conn // accept goroutine only, until done
	go func() {
		defer close(done)
		for {
			nc, err := ln.Accept()
			if err != nil {
				for _, nc := range conns {
					nc.Close()
				}
				return
			}
			conns = append(conns, nc)
			if garbage != nil {
				nc.Write(garbage)
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().(*net.TCPAddr).Port
}

// TestFaultPortNotLeader: the port is held by a process that does not
// speak the protocol. A client gives up within its wait with an error
// that wraps ErrNoLeader, names the port and says that what answers there
// is not a cluster-client leader.
func TestFaultPortNotLeader(t *testing.T) {
	const wait = 600 * time.Millisecond
	for _, tc := range []struct {
		name    string
		garbage []byte
	}{
		{"garbage", []byte("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")},
		{"header of a huge packet", rawHeader(true, 1, 1<<30, 1<<30)},
		{"not a register answer", packetBytes(t, true, 1, heartbeatRes{}, nil)},
		{"silent", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			port := foreignListener(t, tc.garbage)
			addr := loopback(port)
			cfg := testConfig(t, port)
			cfg.MaxWaitTime = wait
			cfg.ResponseTimeout = 200 * time.Millisecond
			start := time.Now()
			c, err := New("TestChannel", cfg, buildTestReal(newTestReal()))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if c.IsLeader() {
				t.Fatal("leads on a port held by another process")
			}
			// Ready may report an attempt that timed out before the wait
			// ran out; the error once it has run out wraps ErrNoLeader.
			var last error
			waitUntil(t, wait+5*time.Second, "ErrNoLeader", func() bool {
				last = c.Ready(context.Background())
				return errors.Is(last, ErrNoLeader)
			})
			d := time.Since(start)
			t.Logf("after %v: %v", d.Round(time.Millisecond), last)
			if d > wait+3*time.Second {
				t.Errorf("gave up after %v, MaxWaitTime %v", d, wait)
			}
			msg := last.Error()
			if !strings.Contains(msg, addr) || !strings.Contains(msg, "not a cluster-client leader") {
				t.Errorf("error does not name %s or say what is wrong: %v", addr, last)
			}
			var nl *errNotLeader
			if tc.garbage != nil && !errors.As(last, &nl) {
				t.Errorf("error does not carry errNotLeader: %v", last)
			}
			_, err = c.Invoke(context.Background(), "echo", 1)
			if !errors.Is(err, ErrNoLeader) {
				t.Errorf("Invoke: %v", err)
			}
		})
	}
}

// faultLeader is a leader in this process for child followers, logging
// into a capture.
func faultLeader(t *testing.T, tune func(*Config)) (*Client, *testReal, *logCapture, int) {
	t.Helper()
	real := newTestReal()
	c, logs := captureLeader(t, "TestChannel", real, tune)
	return c, real, logs, c.cfg.Port
}

// captureLeader starts a leader of channel name on a free port with the
// real client real, logging into the capture it returns; tune, if set,
// changes its Config. It returns once the leader is ready.
func captureLeader(t *testing.T, name string, real RealClient, tune func(*Config)) (*Client, *logCapture) {
	t.Helper()
	logs := newLogCapture()
	cfg := testConfig(t, freePort(t))
	cfg.Role = RoleLeader
	cfg.Logger = slog.New(logs)
	if tune != nil {
		tune(cfg)
	}
	c, err := New(name, cfg, func(context.Context) (RealClient, error) { return real, nil })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		if t.Failed() {
			t.Logf("leader log:\n%s", logs.dump())
		}
	})
	mustReady(t, c)
	return c, logs
}

// realActive reports whether r is subscribed to reg now.
func realActive(r *testReal, reg msg) bool {
	b, _ := marshalReg(reg)
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.push[string(b)] != nil
}

// TestFaultFollowerDies: when a follower process dies, the leader drops
// its subscriptions, and releases the real subscription of a key whose
// last listener it was; a key that another follower still listens to
// stays.
func TestFaultFollowerDies(t *testing.T) {
	t.Parallel()
	lead, real, _, port := faultLeader(t, nil)
	only, shared := msg{"k": "only-a"}, msg{"k": "both"}
	a := startChild(t, childSpec{Port: port, Role: RoleFollower})
	b := startChild(t, childSpec{Port: port, Role: RoleFollower})
	a.ready(10 * time.Second)
	b.ready(10 * time.Second)
	a.ok(msg{"op": "subscribe", "reg": only, "as": "only"})
	a.ok(msg{"op": "subscribe", "reg": shared, "as": "both"})
	b.ok(msg{"op": "subscribe", "reg": shared, "as": "both"})
	waitUntil(t, 10*time.Second, "real subscriptions", func() bool {
		return realActive(real, only) && realActive(real, shared) && topicConns(lead, shared) == 2
	})

	a.kill()
	waitUntil(t, 10*time.Second, "release of the dead follower's key", func() bool { return !realActive(real, only) })
	if !realActive(real, shared) {
		t.Fatal("the key that another follower listens to was released")
	}
	waitUntil(t, 10*time.Second, "the dead follower's subscriptions dropped", func() bool {
		return topicConns(lead, shared) == 1
	})
	lead.lead().mu.Lock()
	conns := len(lead.lead().conns)
	lead.lead().mu.Unlock()
	if conns != 1 {
		t.Fatalf("leader holds %d connections, want 1", conns)
	}
	if ok, err := Invoke[bool](context.Background(), lead, "push", shared, "after"); err != nil || !ok {
		t.Fatalf("push: %v, %v", ok, err)
	}
	b.waitLog(isValue("both", "after"), 10*time.Second)
}

// topicConns is the number of follower connections subscribed to reg on
// c's leader.
func topicConns(c *Client, reg msg) int {
	raw, _ := marshalReg(reg)
	l := c.lead()
	l.mu.Lock()
	defer l.mu.Unlock()
	t := l.topics[subscriptionKey(raw)]
	if t == nil {
		return 0
	}
	n := len(t.subs)
	if _, local := t.subs[nil]; local {
		n--
	}
	return n
}

// TestFaultFollowerStopsReading stops a follower process with SIGSTOP
// while the leader pushes large values: the leader drops it once its
// queue passes Config.MaxQueuedBytes, logging why, and keeps serving the
// other follower without waiting. After SIGCONT the stopped follower
// reconnects by itself and gets the latest value.
func TestFaultFollowerStopsReading(t *testing.T) {
	t.Parallel()
	const maxPkt = 64 << 10
	// The other follower is in this process, so that the pushes can be
	// paced by it cheaply; the response timeout, which bounds a write,
	// is long, so that only the queue bound can drop the stopped one.
	r := newRig(t, func(c *Config) {
		c.MaxPacketSize = maxPkt
		c.MaxQueuedBytes = 4 * maxPkt
		c.ResponseTimeout = 10 * time.Second
	})
	stuck := startChild(t, childSpec{Port: r.port, Role: RoleFollower})
	stuck.ready(10 * time.Second)
	stuck.ok(msg{"op": "subscribe", "reg": goodReg, "as": "big"})
	reg := msg(goodReg)
	waitUntil(t, 10*time.Second, "both subscribed", func() bool { return topicConns(r.lead, reg) == 2 })

	stuck.stop()
	stopped := time.Now()
	value := strings.Repeat("v", 32<<10)
	var last string
	var slowest time.Duration
	pushes := 0
	deadline := time.Now().Add(60 * time.Second)
	for {
		if l, _ := r.logs.find("closing follower connection", "not reading"); l != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stopped follower not dropped after %d pushes of 32 KiB", pushes)
		}
		pushes++
		last = fmt.Sprintf("%d %s", pushes, value)
		start := time.Now()
		if ok, err := Invoke[bool](context.Background(), r.lead, "push", reg, last); err != nil || !ok {
			t.Fatalf("push %d: %v, %v", pushes, ok, err)
		}
		slowest = max(slowest, time.Since(start))
		r.waitValue(`"`+last+`"`, 10*time.Second)
	}
	t.Logf("dropped after %d pushes of 32 KiB in %v; slowest push %v", pushes, time.Since(stopped).Round(time.Millisecond), slowest)
	if slowest > 5*time.Second {
		t.Errorf("a push took %v: the stopped follower blocked the leader", slowest)
	}
	waitUntil(t, 10*time.Second, "the stopped follower's subscription dropped", func() bool { return topicConns(r.lead, reg) == 1 })

	stuck.signal(syscall.SIGCONT)
	resumed := time.Now()
	stuck.waitLog(isValue("big", last), 20*time.Second)
	t.Logf("the follower holds the latest value %v after SIGCONT", time.Since(resumed).Round(time.Millisecond))
	waitUntil(t, 10*time.Second, "the follower back on the key", func() bool { return topicConns(r.lead, reg) == 2 })
	if got := stuck.call("pid"); got == nil {
		t.Fatal("no service after reconnecting")
	}
	r.serving() // the other follower kept its connection throughout
}

// panicReal is a real client whose user code panics: Invoke of "panic",
// Subscribe of any key, and the encoding of a boom value by panicCodec.
type panicReal struct{ *testReal }

// boom is a result that panicCodec cannot encode.
type boom struct{}

func (p panicReal) Invoke(ctx context.Context, method string, args []Value) (any, error) {
	switch method {
	case "panic":
		panic("boom on purpose")
	case "badResult":
		return boom{}, nil
	}
	return p.testReal.Invoke(ctx, method, args)
}

func (panicReal) Subscribe(json.RawMessage, func(any)) error { panic("subscribe boom") }

// panicCodec is JSONCodec, but panics on encoding a boom.
type panicCodec struct{ JSONCodec }

func (c panicCodec) Marshal(v any) ([]byte, error) {
	if _, ok := v.(boom); ok {
		panic("marshal boom")
	}
	return c.JSONCodec.Marshal(v)
}

// startLeaderPair starts a leader in this process with the real client
// that build makes and panicCodec, logging into the capture it returns,
// and a follower of it over loopback TCP.
func startLeaderPair(t *testing.T, build BuildFunc) (lead, fol *Client, logs *logCapture) {
	t.Helper()
	logs = newLogCapture()
	cfg := testConfig(t, freePort(t))
	cfg.Role = RoleLeader
	cfg.Logger = slog.New(logs)
	cfg.Codec = panicCodec{}
	var err error
	if lead, err = New("panics", cfg, build); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lead.Close() })
	mustReady(t, lead)
	fcfg := testConfig(t, cfg.Port)
	fcfg.Role = RoleFollower
	fol = newClient(t, "panics", fcfg, newTestReal())
	mustReady(t, fol)
	return lead, fol, logs
}

// TestFaultPanicInRealClient: a panic in the real client's Invoke, or in
// the codec encoding its result, reaches the caller as a RemoteError with
// code ERR_CLUSTER_PANIC, over TCP and on the leader itself; the stack
// goes to the leader's log, and the next calls succeed.
func TestFaultPanicInRealClient(t *testing.T) {
	lead, fol, logs := startLeaderPair(t, func(context.Context) (RealClient, error) {
		return panicReal{newTestReal()}, nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, c := range []struct {
		who    string
		client *Client
		method string
		value  string
	}{
		{"follower", fol, "panic", "boom on purpose"},
		{"leader", lead, "panic", "boom on purpose"},
		{"follower", fol, "badResult", "marshal boom"},
		{"leader", lead, "badResult", "marshal boom"},
	} {
		_, err := c.client.Invoke(ctx, c.method, 1)
		var re *RemoteError
		if !errors.As(err, &re) || re.Code != codePanic || !strings.Contains(re.Message, c.value) {
			t.Fatalf("%s: %s: %v (%#v), want a RemoteError with code %s naming %q", c.who, c.method, err, re, codePanic, c.value)
		}
		if n, err := Invoke[int](ctx, c.client, "echo", 7); err != nil || n != 7 {
			t.Fatalf("%s: echo after a panic: %d, %v", c.who, n, err)
		}
	}
	line := logs.wait(t, 5*time.Second, "ERROR", "panicked", "boom on purpose", "stack=")
	if !strings.Contains(line, "panicReal.Invoke") {
		t.Errorf("the logged stack does not name the panicking method: %.300s", line)
	}
}

// TestFaultPanicInSubscribeAndBuild: a real client whose Subscribe
// panics, and a BuildFunc that panics, crash nothing: the leader keeps
// serving, and the build's panic is the client's build error.
func TestFaultPanicInSubscribeAndBuild(t *testing.T) {
	lead, fol, logs := startLeaderPair(t, func(context.Context) (RealClient, error) {
		return panicReal{newTestReal()}, nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, c := range []*Client{fol, lead} {
		if _, err := c.Subscribe(msg{"k": fmt.Sprint(c.IsLeader())}, func(Value) {}); err != nil {
			t.Fatal(err)
		}
	}
	logs.wait(t, 5*time.Second, "ERROR", "Subscriber.Subscribe panicked", "subscribe boom")
	for _, c := range []*Client{fol, lead} {
		if n, err := Invoke[int](ctx, c, "echo", 3); err != nil || n != 3 {
			t.Fatalf("echo after a panicking Subscribe: %d, %v", n, err)
		}
	}

	cfg := testConfig(t, freePort(t))
	cfg.Role = RoleLeader
	blogs := newLogCapture()
	cfg.Logger = slog.New(blogs)
	c, err := New("panicbuild", cfg, func(context.Context) (RealClient, error) { panic("build boom") })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Ready(ctx)
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != codePanic || !strings.Contains(re.Message, "build boom") {
		t.Fatalf("Ready after a panicking BuildFunc: %v, want a RemoteError with code %s", err, codePanic)
	}
	blogs.wait(t, 5*time.Second, "ERROR", "BuildFunc panicked", "stack=")
}

// ctxReal is a real client whose method "wait" tells started, waits for
// its context to end, then sends why on ended.
type ctxReal struct{ started, ended chan error }

func (r *ctxReal) Invoke(ctx context.Context, method string, _ []Value) (any, error) {
	r.started <- nil
	<-ctx.Done()
	r.ended <- ctx.Err()
	return nil, ctx.Err()
}

// TestFaultConnCloseCancelsInvoke: an invoke's context ends when the
// follower connection that sent it closes, long before the invoke's own
// deadline.
func TestFaultConnCloseCancelsInvoke(t *testing.T) {
	real := &ctxReal{started: make(chan error, 1), ended: make(chan error, 1)}
	cfg := testConfig(t, freePort(t))
	cfg.Role = RoleLeader
	c, err := New("ctxcancel", cfg, func(context.Context) (RealClient, error) { return real, nil })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	mustReady(t, c)
	nc, err := net.Dial("tcp", loopback(cfg.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	registerRaw(t, nc, "ctxcancel", "")
	b, err := appendPacket(nil, false, 2, 600000, invoke{Method: "wait"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, nc, b)
	select {
	case <-real.started:
	case <-time.After(10 * time.Second):
		t.Fatal("the invoke did not start")
	}
	nc.Close()
	select {
	case err := <-real.ended:
		if err != context.Canceled {
			t.Fatalf("the invoke's context ended with %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the invoke's context did not end within 10 s of its connection closing")
	}
}

// TestFaultPortHeldTellsTheFix: a program that holds the port and answers
// garbage, or nothing, is reported by Ready within two response timeouts,
// long before MaxWaitTime, with an error that names the address and the
// setting that moves the cluster elsewhere.
func TestFaultPortHeldTellsTheFix(t *testing.T) {
	for _, tc := range []struct {
		name    string
		garbage []byte
	}{
		{"garbage", []byte("SSH-2.0-OpenSSH_9.6\r\n")},
		{"silent", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			port := foreignListener(t, tc.garbage)
			cfg := testConfig(t, port)
			cfg.ResponseTimeout = 300 * time.Millisecond
			cfg.MaxWaitTime = time.Minute
			c, err := New("TestChannel", cfg, buildTestReal(newTestReal()))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 2*cfg.ResponseTimeout)
			defer cancel()
			err = c.Ready(ctx)
			t.Logf("Ready: %v", err)
			var nl *errNotLeader
			switch {
			case err == nil || errors.Is(err, context.DeadlineExceeded):
				t.Fatalf("Ready after two response timeouts: %v, want the error of the port", err)
			case !errors.As(err, &nl):
				t.Errorf("error does not carry errNotLeader: %v", err)
			}
			for _, want := range []string{loopback(port), "not a cluster-client leader", "Config.Port", EnvPort} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error does not say %q: %v", want, err)
				}
			}
		})
	}
}

// TestFaultLogQuietWhenNothingToDo: warnings are for what someone must
// act on. A method that returns its context's error at the packet's
// deadline, and a follower that resets its connection (as a process
// that exits may), log nothing on the leader.
func TestFaultLogQuietWhenNothingToDo(t *testing.T) {
	c, real, logs, port := faultLeader(t, nil)
	nc, err := net.Dial("tcp", loopback(port))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	registerRaw(t, nc, "TestChannel", "")
	arg, _ := json.Marshal(5000)
	req, err := appendInvoke(nil, 7, 100, "sleep", false, [][]byte{arg}, DefaultMaxPacketSize)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, nc, req)
	sleeping := func() int { real.mu.Lock(); defer real.mu.Unlock(); return real.sleeping }
	waitUntil(t, 5*time.Second, "the sleep started", func() bool { return sleeping() == 1 })
	waitUntil(t, 5*time.Second, "the sleep ended at its 100 ms deadline", func() bool { return sleeping() == 0 })
	nc.(*net.TCPConn).SetLinger(0) // Close sends a reset
	nc.Close()
	l := leadOf(c)
	waitUntil(t, 5*time.Second, "the leader dropped the connection", func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return len(l.conns) == 0
	})
	for _, line := range []string{"outlasted", "closing follower connection"} {
		if got, _ := logs.find(line); got != "" {
			t.Errorf("logged: %s", got)
		}
	}
}

// failingPublisher is a real client whose Publish always fails.
type failingPublisher struct{ *testReal }

func (failingPublisher) Publish(context.Context, json.RawMessage) error {
	return errors.New("registry refused the registration")
}

// TestFaultPublishErrorsAlikeInEveryRole: Publish is a oneway invoke in
// every role, so a caller can rely on the same thing on the leader and on
// a follower: an error only for what fails in its own process, and the
// real client's error in the leader's log, once per publication.
func TestFaultPublishErrorsAlikeInEveryRole(t *testing.T) {
	lead, fol, logs := startLeaderPair(t, func(context.Context) (RealClient, error) {
		return failingPublisher{newTestReal()}, nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for i, c := range []struct {
		who    string
		client *Client
	}{{"leader", lead}, {"follower", fol}} {
		if err := c.client.Publish(ctx, map[string]string{"by": c.who}); err != nil {
			t.Errorf("%s: Publish: %v, want nil: the error goes to the leader's log", c.who, err)
		}
		waitUntil(t, 5*time.Second, c.who+"'s publication in the leader's log", func() bool {
			return logs.count("oneway invoke failed", "method=publish", "registry refused") == i+1
		})
	}
	if err := fol.Publish(ctx, func() {}); err == nil {
		t.Error("a registration that does not encode: Publish returned nil")
	}
}

// TestFaultInvokeTimeBoundedByLeader: a packet that asks for 2^31-1 ms
// gets the leader's Config.MaxInvokeTime: the method's context ends then,
// and the caller is answered with the method's error.
func TestFaultInvokeTimeBoundedByLeader(t *testing.T) {
	_, _, _, port := faultLeader(t, func(cfg *Config) { cfg.MaxInvokeTime = 200 * time.Millisecond })
	nc, err := net.Dial("tcp", loopback(port))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	r := registerRaw(t, nc, "TestChannel", "")
	arg, _ := json.Marshal(60000)
	req, err := appendInvoke(nil, 7, 1<<31-1, "sleep", false, [][]byte{arg}, DefaultMaxPacketSize)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	mustWrite(t, nc, req)
	p := readAnswer(t, r, nc, 7) // fails after 10 s
	took := time.Since(start)
	var res invokeResult
	if c, _, err := parseConn(p.Conn); err == nil {
		res, _ = c.(invokeResult)
	}
	if res.Success || !strings.Contains(string(p.App), "deadline exceeded") || took > 5*time.Second {
		t.Fatalf("after %v: %s %s, want the method's deadline error after about 200 ms", took, p.Conn, p.App)
	}
	t.Logf("answered after %v: %s", took.Round(time.Millisecond), p.App)
}

// TestFaultWarningsRateLimited: a flood of registered connections that
// each break the protocol makes the leader log at most warnPerSecond
// warnings a second, and a line at the end of the second says how many
// were left out, with no later line needed to bring it.
func TestFaultWarningsRateLimited(t *testing.T) {
	c, _, logs, port := faultLeader(t, nil)
	bad := rawHeader(false, 1, 10, 0)
	bad[0] = 9 // an unknown protocol version
	start := time.Now()
	const conns = 60
	for range conns {
		nc, err := net.Dial("tcp", loopback(port))
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		registerRaw(t, nc, "TestChannel", "")
		mustWrite(t, nc, bad)
	}
	l := leadOf(c)
	waitUntil(t, 10*time.Second, "the leader dropped every connection", func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return len(l.conns) == 0
	})
	seconds := int(time.Since(start)/time.Second) + 1
	if n := logs.count("closing follower connection"); n > warnPerSecond*seconds || n == 0 {
		t.Errorf("%d warnings about %d closed connections in %d s, want 1 to %d", n, conns, seconds, warnPerSecond*seconds)
	}
	// The second that left lines out ends with a line that counts them.
	line := logs.wait(t, 5*time.Second, "more warnings than the log takes", "suppressed=")
	t.Logf("%s", line)
}

// smallPacketPair is a leader and a follower in this process, both with
// MaxPacketSize 1 KiB.
func smallPacketPair(t *testing.T) (lead, fol *Client) {
	port := freePort(t)
	cfg := testConfig(t, port)
	cfg.Role, cfg.MaxPacketSize = RoleLeader, 1024
	lead = newClient(t, "small", cfg, newTestReal())
	mustReady(t, lead)
	fcfg := testConfig(t, port)
	fcfg.Role, fcfg.MaxPacketSize = RoleFollower, 1024
	fol = newClient(t, "small", fcfg, newTestReal())
	mustReady(t, fol)
	return lead, fol
}

// callsKeepWorking fails the test if calls from c fail during 300 ms.
func callsKeepWorking(t *testing.T, c *Client, after string) {
	t.Helper()
	for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := c.Invoke(ctx, "echo", 1)
		cancel()
		if err != nil {
			t.Fatalf("a call after %s: %v", after, err)
		}
	}
}

// TestFaultOversizedPushNotSent: a value that with its key is larger than
// MaxPacketSize is not pushed (a follower would refuse the packet, leave,
// and get the same value again on every new connection): the follower's
// calls go on, and listeners get the next value that fits.
func TestFaultOversizedPushNotSent(t *testing.T) {
	lead, fol := smallPacketPair(t)
	reg := msg{"k": 1}
	got := make(chan string, 16)
	for _, c := range []*Client{lead, fol} {
		if _, err := c.Subscribe(reg, func(v Value) { got <- v.String() }); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, 5*time.Second, "the follower subscribed", func() bool { return topicConns(lead, reg) == 1 })
	if ok, err := Invoke[bool](context.Background(), lead, "push", reg, strings.Repeat("x", 2000)); err != nil || !ok {
		t.Fatalf("push: %v, %v", ok, err)
	}
	callsKeepWorking(t, fol, "an oversized push")
	if ok, err := Invoke[bool](context.Background(), lead, "push", reg, "small"); err != nil || !ok {
		t.Fatalf("push: %v, %v", ok, err)
	}
	for range 2 {
		if v := <-got; v != `"small"` {
			t.Fatalf("a listener got %.40s, want only the small value", v)
		}
	}
}

// TestFaultOversizedRegistrationRefused: a registration whose subscribe
// packet would be larger than MaxPacketSize is refused by Subscribe and
// Publish (the leader would close the connection, and every new one that
// replays it), and the follower's calls go on.
func TestFaultOversizedRegistrationRefused(t *testing.T) {
	_, fol := smallPacketPair(t)
	reg := map[string]string{"k": strings.Repeat("y", 600)}
	if _, err := fol.Subscribe(reg, func(Value) {}); !errors.Is(err, ErrPacketTooLarge) {
		t.Errorf("Subscribe: %v, want ErrPacketTooLarge", err)
	}
	if err := fol.Publish(context.Background(), reg); !errors.Is(err, ErrPacketTooLarge) {
		t.Errorf("Publish: %v, want ErrPacketTooLarge", err)
	}
	callsKeepWorking(t, fol, "an oversized registration")
}

// TestFaultReplayNeverStale: while the latest value of a key is replayed
// to a listener that joins, a newer value pushed by the real client waits
// for the replay, so the listener ends up with the newest value.
func TestFaultReplayNeverStale(t *testing.T) {
	var mu sync.Mutex
	var last string
	var replaying atomic.Bool
	blocked, release := make(chan struct{}), make(chan struct{})
	l := newLeader("stale", withDefaultsPtr(), func(key string, data []byte, _ error) {
		if replaying.CompareAndSwap(true, false) {
			close(blocked) // the replay of "1" waits here
			<-release
		}
		mu.Lock()
		last = string(data)
		mu.Unlock()
	})
	real := newTestReal()
	l.real = real
	close(l.ready)
	reg := []byte(`{"k":1}`)
	key := subscriptionKey(reg)
	l.subscribe(nil, key, reg)
	real.mu.Lock()
	push := real.push[string(reg)]
	real.mu.Unlock()
	push(1)
	replaying.Store(true)
	subscribed, pushed := make(chan struct{}), make(chan struct{})
	go func() { l.subscribe(nil, key, reg); close(subscribed) }()
	<-blocked
	go func() { push(2); close(pushed) }()
	select {
	case <-pushed: // the push did not wait for the replay
	case <-time.After(100 * time.Millisecond): // it waits, as it must
	}
	close(release)
	<-subscribed
	<-pushed
	if mu.Lock(); last != "2" {
		t.Errorf("the listener's latest value is %s after pushes of 1 and 2", last)
	}
	mu.Unlock()
}

func withDefaultsPtr() *Config { return withDefaults(nil) }
