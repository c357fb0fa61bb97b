package clusterclient

// Interoperability with the Node.js package cluster-client 3.7.0, set to a
// JSON transcode. The Node.js side is testdata/node/member.js, driven over
// stdin/stdout like the Go child processes of proc_test.go. The tests skip
// when node or testdata/node/node_modules is missing (install with
// `cd testdata/node && npm ci`), except under CI=true, where they fail.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	nodeDir    = "testdata/node"
	nodeScript = "testdata/node/member.js"
	// interopChannel is the channel name of the interop tests.
	interopChannel = "Interop"
	// waitLong bounds every wait on another process: generous, as the
	// machine is shared.
	waitLong = 10 * time.Second
)

// needNode returns the path of node. When node or the installed package
// is missing the test fails and says how to install them, or skips when
// CLUSTERCLIENT_SKIP_INTEROP=1: the test command runs everything or says
// what it left out.
func needNode(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("node")
	why := ""
	switch {
	case err != nil:
		why = "node is not on PATH: install Node.js and npm, then run (cd " + nodeDir + " && npm ci)"
	default:
		if _, err := os.Stat(nodeDir + "/node_modules/cluster-client/package.json"); err != nil {
			why = nodeDir + "/node_modules is missing: run (cd " + nodeDir + " && npm ci)"
		}
	}
	if why != "" && os.Getenv("CLUSTERCLIENT_SKIP_INTEROP") == "1" {
		t.Skipf("interop with Node.js cluster-client skipped (CLUSTERCLIENT_SKIP_INTEROP=1): %s", why)
	} else if why != "" {
		// A skip would not show: go test prints nothing of a package that
		// passes. So the test fails, and says how to run or skip it.
		t.Fatalf("interop with Node.js cluster-client cannot run: %s; or set CLUSTERCLIENT_SKIP_INTEROP=1 to skip the interop tests", why)
	}
	return path
}

// nodeMember is a Node.js cluster member: testdata/node/member.js, which
// speaks the line protocol of childMain (proc_test.go).
type nodeMember struct {
	lines
	cmd *exec.Cmd

	mu    sync.Mutex
	log   []msg         // guarded by mu: every line without an id
	taken map[int]bool  // guarded by mu: indexes in log handed out by event
	grew  chan struct{} // guarded by mu: closed and replaced when log grows
}

// startNode starts testdata/node/member.js with spec and extra
// environment variables. It is killed when the test ends.
func startNode(t *testing.T, spec childSpec, env ...string) *nodeMember {
	t.Helper()
	node := needNode(t)
	b, _ := json.Marshal(spec)
	cmd := exec.Command(node, nodeScript)
	cmd.Env = append(append(os.Environ(), childEnv+"="+string(b)), env...)
	cmd.Stderr = newTestWriter(t)
	stdin, stdout := startPiped(t, cmd)
	n := &nodeMember{lines: newLines(t, "node", stdin, cmd.Process.Pid), cmd: cmd,
		taken: map[int]bool{}, grew: make(chan struct{})}
	go n.readLoop(stdout)
	t.Cleanup(func() {
		n.cmd.Process.Kill()
		<-n.exited
	})
	return n
}

func (n *nodeMember) readLoop(r io.Reader) {
	n.readMessages(r, n.cmd, func(line []byte) { n.t.Logf("node %d: %s", n.pid, line) }, func(m msg) {
		n.mu.Lock()
		n.log = append(n.log, m)
		close(n.grew)
		n.grew = make(chan struct{})
		n.mu.Unlock()
	})
}

// event waits for the first event named name that no earlier call took.
func (n *nodeMember) event(name string, timeout time.Duration) msg {
	n.t.Helper()
	return n.eventWhere(func(m msg) bool { return m["event"] == name }, timeout)
}

// eventWhere waits for the first event that match accepts and no earlier
// call took.
func (n *nodeMember) eventWhere(match func(msg) bool, timeout time.Duration) msg {
	n.t.Helper()
	deadline := time.After(timeout)
	for {
		n.mu.Lock()
		for i, m := range n.log {
			if !n.taken[i] && match(m) {
				n.taken[i] = true
				n.mu.Unlock()
				return m
			}
		}
		grew := n.grew
		n.mu.Unlock()
		select {
		case <-grew:
		case <-deadline:
			n.t.Fatalf("node %d: no matching event within %v", n.pid, timeout)
			return nil
		}
	}
}

// ready waits for the ready event and says whether the member leads.
func (n *nodeMember) ready(timeout time.Duration) bool {
	n.t.Helper()
	m := n.eventWhere(func(m msg) bool { return m["event"] == "ready" || m["event"] == "error" }, timeout)
	if m["event"] == "error" {
		n.t.Fatalf("node %d: %v", n.pid, m)
	}
	return m["leader"] == true
}

// errors returns the error events that no call to event took.
func (n *nodeMember) errors() []msg {
	n.mu.Lock()
	defer n.mu.Unlock()
	var errs []msg
	for i, m := range n.log {
		if !n.taken[i] && (m["event"] == "nodeerror" || m["event"] == "error") {
			errs = append(errs, m)
		}
	}
	return errs
}

// noNodeErrors fails the test if the member reported an error that the
// test did not expect.
func noNodeErrors(t *testing.T, n *nodeMember) {
	t.Helper()
	for _, m := range n.errors() {
		t.Errorf("node %d: %v", n.pid, m)
	}
}

// kill sends SIGKILL and waits until the process is gone.
func (n *nodeMember) kill() {
	n.cmd.Process.Kill()
	<-n.exited
}

// sameJSON reports whether two JSON texts hold the same value.
func sameJSON(t *testing.T, got any, want string) bool {
	t.Helper()
	var g, w any
	var gb []byte
	switch x := got.(type) {
	case []byte:
		gb = x
	case json.RawMessage:
		gb = x
	default:
		gb, _ = json.Marshal(x)
	}
	if err := json.Unmarshal(gb, &g); err != nil {
		t.Errorf("bad JSON %q: %v", gb, err)
		return false
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("bad JSON %q: %v", want, err)
	}
	return reflect.DeepEqual(g, w)
}

// interopReal is the Go tests' real client plus two methods the Node.js
// tests watch: note (called oneway) and Publish, each reported on a
// channel.
type interopReal struct {
	*testReal
	notes chan json.RawMessage
	pubs  chan json.RawMessage
}

func newInteropReal() *interopReal {
	return &interopReal{testReal: newTestReal(), notes: make(chan json.RawMessage, 64), pubs: make(chan json.RawMessage, 64)}
}

func (r *interopReal) Invoke(ctx context.Context, method string, args []Value) (any, error) {
	if method == "note" && len(args) == 1 {
		r.notes <- json.RawMessage(args[0].Bytes())
		return true, nil
	}
	return r.testReal.Invoke(ctx, method, args)
}

func (r *interopReal) Publish(ctx context.Context, reg json.RawMessage) error {
	r.testReal.Publish(ctx, reg)
	r.pubs <- reg
	return nil
}

func receive[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitLong):
		t.Fatalf("no %s within %v", what, waitLong)
	}
	var zero T
	return zero
}

// TestInteropGoFollowerNodeLeader: a Go follower calls a Node.js leader:
// invoke with results, remote errors with all their fields, oneway,
// subscribe with pushed values, unsubscribe, publish, heartbeats.
func TestInteropGoFollowerNodeLeader(t *testing.T) {
	port := freePort(t)
	node := startNode(t, childSpec{Port: port, Role: RoleLeader, Name: interopChannel, HeartbeatMS: 500})
	if !node.ready(waitLong) {
		t.Fatal("node member does not lead")
	}

	cfg := testConfig(t, port)
	cfg.Role = RoleFollower
	cfg.HeartbeatInterval = 500 * time.Millisecond
	c := newClient(t, interopChannel, cfg, newTestReal())
	mustReady(t, c)
	ctx := context.Background()
	if c.IsLeader() {
		t.Fatal("Go client leads, want follower")
	}

	t.Run("invoke", func(t *testing.T) {
		in := map[string]any{"a": 1.5, "s": "<é & \u2028>", "l": []any{true, nil, "x"}}
		v, err := c.Invoke(ctx, "echo", in)
		if err != nil {
			t.Fatal(err)
		}
		if !sameJSON(t, v.Bytes(), `{"a":1.5,"s":"<é & \u2028>","l":[true,null,"x"]}`) {
			t.Errorf("echo = %s", v.Bytes())
		}
		pid, err := Invoke[int](ctx, c, "pid")
		if err != nil || pid != node.pid {
			t.Errorf("pid = %d, %v; want %d", pid, err, node.pid)
		}
		// No arguments at all, and a result that is undefined in
		// Node.js: the reference writes an app object of zero bytes.
		v, err = c.Invoke(ctx, "sleep", 1)
		if err != nil || v.String() != "1" {
			t.Errorf("sleep(1) = %q, %v", v.String(), err)
		}
	})

	t.Run("remote error", func(t *testing.T) {
		_, err := c.Invoke(ctx, "fail", "E_CODE", "CustomError")
		var re *RemoteError
		if !errors.As(err, &re) {
			t.Fatalf("err = %v, want *RemoteError", err)
		}
		if re.Name != "CustomError" || re.Message != "failed on purpose" || re.Code != "E_CODE" {
			t.Errorf("remote error = %+v", re)
		}
		if !strings.HasPrefix(re.Stack, "CustomError: failed on purpose\n") || !strings.Contains(re.Stack, "member.js") {
			t.Errorf("stack = %q", re.Stack)
		}
		// The reference leader also reports the error on its side.
		m := node.event("nodeerror", waitLong)
		if m["name"] != "CustomError" {
			t.Errorf("leader error event = %v", m)
		}
		// A numeric code and no name.
		_, err = c.Invoke(ctx, "fail", 42)
		if !errors.As(err, &re) || re.Name != "Error" || re.Code != "42" {
			t.Errorf("err = %#v", err)
		}
		node.event("nodeerror", waitLong)
	})

	t.Run("oneway", func(t *testing.T) {
		if err := c.InvokeOneway(ctx, "note", map[string]int{"n": 7}); err != nil {
			t.Fatal(err)
		}
		m := node.event("note", waitLong)
		if !sameJSON(t, m["value"], `{"n":7}`) {
			t.Errorf("note = %v", m["value"])
		}
	})

	t.Run("subscribe", func(t *testing.T) {
		reg1 := map[string]string{"dataId": "d1", "group": "g"}
		reg2 := map[string]string{"dataId": "d2"}
		ch1, ch2 := make(chan Value, 16), make(chan Value, 16)
		s1, err := c.Subscribe(reg1, func(v Value) { ch1 <- v })
		if err != nil {
			t.Fatal(err)
		}
		// The subscribe packet goes out before the invoke on the same
		// connection, so the real client has subscribed by the push.
		pushed, err := Invoke[bool](ctx, c, "push", reg1, map[string]any{"v": 1})
		if err != nil || !pushed {
			t.Fatalf("push = %v, %v", pushed, err)
		}
		if v := receive(t, ch1, "pushed value"); !sameJSON(t, v.Bytes(), `{"v":1}`) {
			t.Errorf("value = %s", v.Bytes())
		}
		// A second listener on the key gets the latest value at once.
		ch1b := make(chan Value, 16)
		s1b, err := c.Subscribe(reg1, func(v Value) { ch1b <- v })
		if err != nil {
			t.Fatal(err)
		}
		if v := receive(t, ch1b, "replayed value"); !sameJSON(t, v.Bytes(), `{"v":1}`) {
			t.Errorf("replayed value = %s", v.Bytes())
		}
		if n, err := Invoke[int](ctx, c, "subscribes", reg1); err != nil || n != 1 {
			t.Errorf("real client subscribed %d times, %v; want 1", n, err)
		}

		// After unsubscribing, the leader stops pushing to this
		// connection: a value of reg1 pushed before one of reg2 never
		// arrives, though the one of reg2 does.
		s1.Unsubscribe()
		s1b.Unsubscribe()
		if _, err := c.Subscribe(reg2, func(v Value) { ch2 <- v }); err != nil {
			t.Fatal(err)
		}
		if _, err := Invoke[bool](ctx, c, "push", reg1, "late"); err != nil {
			t.Fatal(err)
		}
		if pushed, err := Invoke[bool](ctx, c, "push", reg2, "w"); err != nil || !pushed {
			t.Fatalf("push reg2 = %v, %v", pushed, err)
		}
		if v := receive(t, ch2, "value of reg2"); v.String() != `"w"` {
			t.Errorf("reg2 value = %s", v)
		}
		select {
		case v := <-ch1:
			t.Errorf("value %s after unsubscribe", v)
		case v := <-ch1b:
			t.Errorf("value %s after unsubscribe", v)
		default:
		}
	})

	t.Run("publish", func(t *testing.T) {
		if err := c.Publish(ctx, map[string]any{"dataId": "p1", "addr": "127.0.0.1:1"}); err != nil {
			t.Fatal(err)
		}
		m := node.event("published", waitLong)
		if !sameJSON(t, m["reg"], `{"dataId":"p1","addr":"127.0.0.1:1"}`) {
			t.Errorf("published %v", m["reg"])
		}
	})

	t.Run("heartbeat", func(t *testing.T) {
		// Both sides beat every 500 ms; the Node.js leader drops a
		// connection silent for 1.5 s. Stay idle for 2 s: the Go
		// follower's heartbeats must keep the same connection.
		c.mu.Lock()
		f := c.fol()
		c.mu.Unlock()
		time.Sleep(2 * time.Second)
		if _, err := c.Invoke(ctx, "echo", 1); err != nil {
			t.Fatal(err)
		}
		c.mu.Lock()
		same := c.fol() == f
		c.mu.Unlock()
		if !same {
			t.Error("the follower connected again: heartbeats did not keep the connection")
		}
	})
	noNodeErrors(t, node)
}

// TestInteropNodeFollowerGoLeader: a Node.js follower calls a Go leader:
// the same calls from the other side.
func TestInteropNodeFollowerGoLeader(t *testing.T) {
	port := freePort(t)
	cfg := testConfig(t, port)
	cfg.Role = RoleLeader
	cfg.HeartbeatInterval = 500 * time.Millisecond
	cfg.DrainTimeout = 500 * time.Millisecond // a Node.js follower never leaves by itself
	real := newInteropReal()
	c, err := New(interopChannel, cfg, func(context.Context) (RealClient, error) { return real, nil })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if err := c.Ready(ctx); err != nil {
		t.Fatal(err)
	}

	node := startNode(t, childSpec{Port: port, Role: RoleFollower, Name: interopChannel, HeartbeatMS: 500})
	if node.ready(waitLong) {
		t.Fatal("node member leads, want follower")
	}
	do := func(cmd msg) msg {
		t.Helper()
		return node.do(cmd, waitLong)
	}

	t.Run("invoke", func(t *testing.T) {
		m := do(msg{"op": "invoke", "method": "echo", "args": []any{map[string]any{"a": 1.5, "s": "<é & \u2028>"}}})
		if m["err"] != nil || !sameJSON(t, m["result"], `{"a":1.5,"s":"<é & \u2028>"}`) {
			t.Errorf("echo: %v", m)
		}
		m = do(msg{"op": "invoke", "method": "pid"})
		if m["result"] != float64(os.Getpid()) {
			t.Errorf("pid: %v, want %d", m, os.Getpid())
		}
	})

	t.Run("remote error", func(t *testing.T) {
		m := do(msg{"op": "invoke", "method": "fail", "args": []any{"E_CODE"}})
		if m["name"] != "Error" || m["message"] != "failed on purpose" || m["code"] != "E_CODE" {
			t.Errorf("fail: %v", m)
		}
		m = do(msg{"op": "invoke", "method": "nope"})
		if msg, _ := m["message"].(string); !strings.Contains(msg, "not implemented") {
			t.Errorf("unknown method: %v", m)
		}
	})

	t.Run("oneway", func(t *testing.T) {
		do(msg{"op": "oneway", "method": "note", "args": []any{map[string]int{"n": 7}}})
		if v := receive(t, real.notes, "oneway note"); !sameJSON(t, v, `{"n":7}`) {
			t.Errorf("note = %s", v)
		}
	})

	t.Run("subscribe", func(t *testing.T) {
		reg := map[string]string{"dataId": "d1", "group": "g"}
		do(msg{"op": "subscribe", "reg": reg})
		// The leader handles packets of one connection in order, so the
		// real client has subscribed by the time it runs this push.
		m := do(msg{"op": "invoke", "method": "push", "args": []any{reg, map[string]int{"v": 1}}})
		if m["result"] != true {
			t.Fatalf("push: %v", m)
		}
		m = node.event("value", waitLong)
		if !sameJSON(t, m["value"], `{"v":1}`) || !sameJSON(t, m["reg"], `{"dataId":"d1","group":"g"}`) {
			t.Errorf("value event %v", m)
		}
		// A value the real client emits by itself.
		real.mu.Lock()
		push := real.push[`{"dataId":"d1","group":"g"}`]
		real.mu.Unlock()
		if push == nil {
			t.Fatal("real client not subscribed under the reg's JSON")
		}
		push([]int{1, 2})
		if m := node.event("value", waitLong); !sameJSON(t, m["value"], `[1,2]`) {
			t.Errorf("value event %v", m)
		}
		// The Go leader's own listener shares the one subscription and
		// gets the latest value at once.
		local := make(chan Value, 4)
		s, err := c.Subscribe(reg, func(v Value) { local <- v })
		if err != nil {
			t.Fatal(err)
		}
		if v := receive(t, local, "replayed value"); v.String() != "[1,2]" {
			t.Errorf("local value %s", v)
		}
		if n := real.subscribes[`{"dataId":"d1","group":"g"}`]; n != 1 {
			t.Errorf("real client subscribed %d times, want 1", n)
		}
		s.Unsubscribe()
		// The last listener anywhere leaves: the Go leader releases the
		// real client's subscription.
		do(msg{"op": "unsubscribe", "reg": reg})
		m = do(msg{"op": "invoke", "method": "active", "args": []any{reg}})
		if m["result"] != false {
			t.Errorf("real subscription still active after the last unsubscribe: %v", m)
		}
	})

	t.Run("publish", func(t *testing.T) {
		do(msg{"op": "publish", "reg": map[string]any{"dataId": "p1", "addr": "127.0.0.1:1"}})
		if v := receive(t, real.pubs, "publish"); !sameJSON(t, v, `{"dataId":"p1","addr":"127.0.0.1:1"}`) {
			t.Errorf("published %s", v)
		}
	})

	t.Run("heartbeat", func(t *testing.T) {
		// The Go leader drops a connection silent for 3 × 500 ms; the
		// Node.js follower's heartbeats must keep it for 2 s.
		l := leadOf(c)
		l.mu.Lock()
		n := len(l.conns)
		l.mu.Unlock()
		time.Sleep(2 * time.Second)
		m := do(msg{"op": "invoke", "method": "echo", "args": []any{1}})
		if m["result"] != float64(1) {
			t.Fatalf("echo after idle: %v", m)
		}
		l.mu.Lock()
		n2 := len(l.conns)
		l.mu.Unlock()
		if n != 1 || n2 != 1 {
			t.Errorf("leader had %d connections, then %d; want 1 and 1", n, n2)
		}
	})
	noNodeErrors(t, node)
}

// TestInteropLeaderClosing: a Go leader that closes on purpose sends its
// Go-only leader_closing notice; a Node.js follower ignores it without an
// error, still gets the answer of its call in flight, and takes over the
// port once the leader has closed the connection.
func TestInteropLeaderClosing(t *testing.T) {
	port := freePort(t)
	cfg := testConfig(t, port)
	cfg.Role = RoleLeader
	cfg.DrainTimeout = time.Second
	c := newClient(t, interopChannel, cfg, newTestReal())
	mustReady(t, c)
	node := startNode(t, childSpec{Port: port, Name: interopChannel})
	if node.ready(waitLong) {
		t.Fatal("node member leads, want follower")
	}
	reply := node.send(msg{"op": "invoke", "method": "sleep", "args": []any{300}})
	// Close once the call is running on the leader.
	l := leadOf(c)
	for start := time.Now(); ; time.Sleep(5 * time.Millisecond) {
		l.mu.Lock()
		n := len(l.conns)
		l.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Since(start) > waitLong {
			t.Fatal("node follower never registered")
		}
	}
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	c.Close()
	took := time.Since(start)
	m := receive(t, reply, "answer to the call in flight")
	if m["result"] != float64(300) {
		t.Errorf("call in flight during close: %v", m)
	}
	t.Logf("Close of a Go leader with a Node.js follower took %v (DrainTimeout %v)", took, cfg.DrainTimeout)
	// The Node.js follower elects again and leads.
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		if m := node.do(msg{"op": "status"}, waitLong); m["leader"] == true {
			break
		}
		if time.Since(start) > waitLong {
			t.Fatal("node member did not take over the port")
		}
	}
	m = node.do(msg{"op": "invoke", "method": "pid"}, waitLong)
	if m["result"] != float64(node.pid) {
		t.Errorf("pid after takeover: %v", m)
	}
	noNodeErrors(t, node)
}

// TestInteropSubscriptionKeys: a registration's key is the text of
// JSON.stringify(reg) on the Node.js side, and the Node.js leader pushes
// under the key it computes itself. A Go follower must compute the same
// key for registrations that JSON.stringify writes differently from
// encoding/json: U+2028, numbers written as 1.0 or 1e2, index-like keys
// (which a JavaScript object puts first), repeated keys.
func TestInteropSubscriptionKeys(t *testing.T) {
	port := freePort(t)
	node := startNode(t, childSpec{Port: port, Role: RoleLeader, Name: interopChannel})
	if !node.ready(waitLong) {
		t.Fatal("node member does not lead")
	}
	cfg := testConfig(t, port)
	cfg.Role = RoleFollower
	c := newClient(t, interopChannel, cfg, newTestReal())
	mustReady(t, c)
	ctx := context.Background()
	regs := []any{
		map[string]string{"s": "a\u2028b\u2029c<&>"},
		json.RawMessage(`{"n":1.0,"e":1e2,"big":1e21,"small":0.0000001,"neg":-0}`),
		json.RawMessage(`{"b":1,"2":"x","a":2,"1":"y","01":3}`),
		json.RawMessage(`{ "a" : 1, "b" : [ 1 , "\u0041" ], "a" : 3 }`),
		struct {
			Z string `json:"z"`
			A int    `json:"a"`
		}{"last", 1},
	}
	for i, reg := range regs {
		ch := make(chan Value, 4)
		if _, err := c.Subscribe(reg, func(v Value) { ch <- v }); err != nil {
			t.Fatal(err)
		}
		pushed, err := Invoke[bool](ctx, c, "push", reg, i)
		if err != nil || !pushed {
			t.Fatalf("reg %d: push = %v, %v", i, pushed, err)
		}
		select {
		case v := <-ch:
			if v.String() != fmt.Sprint(i) {
				t.Errorf("reg %d: value %s", i, v)
			}
		case <-time.After(2 * time.Second):
			t.Errorf("reg %d (%v): the Node.js leader pushed a value the Go follower did not match to its key", i, reg)
		}
	}
}

// TestStringifyJSONTable checks marshalReg against outputs that
// Node.js gave for JSON.stringify(JSON.parse(text)), so that it is tested
// where Node.js is not installed.
func TestStringifyJSONTable(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"{\"dataId\":\"d1\",\"group\":\"g\"}",
			"{\"dataId\":\"d1\",\"group\":\"g\"}"},
		{"{ \"a\" : 1, \"b\" : [ 1 , \"\\u0041\\u00e9\\u2028\" ], \"a\" : 3 }",
			"{\"a\":3,\"b\":[1,\"A\u00e9\u2028\"]}"},
		{"{\"b\":1,\"2\":\"x\",\"a\":2,\"1\":\"y\",\"01\":3,\"-1\":4,\"4294967294\":5,\"4294967295\":6,\"1.5\":7}",
			"{\"1\":\"y\",\"2\":\"x\",\"4294967294\":5,\"b\":1,\"a\":2,\"01\":3,\"-1\":4,\"4294967295\":6,\"1.5\":7}"},
		{"[1.0,1e2,1E+2,-0,0.1,1e21,1e-7,1.5e-7,0.000001,123456789012345678901234,1e400,-1e400,5e-324,2e-324]",
			"[1,100,100,0,0.1,1e+21,1e-7,1.5e-7,0.000001,1.2345678901234569e+23,null,null,5e-324,0]"},
		{"\"\\u0000\\u001f\\u007f\\\"\\\\/\\b\\f\\n\\r\\t<>&\\u2029\"",
			"\"\\u0000\\u001f\u007f\\\"\\\\/\\b\\f\\n\\r\\t<>&\u2029\""},
		{"{\"\":{\"\":[]},\"x\":{}}",
			"{\"\":{\"\":[]},\"x\":{}}"},
		{"[true,false,null,\"\",[[]],{}]",
			"[true,false,null,\"\",[[]],{}]"},
		{"9007199254740993",
			"9007199254740992"},
		{"-1.7976931348623157e308",
			"-1.7976931348623157e+308"},
	} {
		got, err := marshalReg(json.RawMessage(tc.in))
		if err != nil || string(got) != tc.want {
			t.Errorf("%s:\n got %s, %v\nwant %s", tc.in, got, err, tc.want)
		}
	}
	deep := strings.Repeat("[", maxRegDepth+1) + strings.Repeat("]", maxRegDepth+1)
	if _, err := marshalReg(json.RawMessage(deep[1 : len(deep)-1])); err != nil {
		t.Errorf("nested %d deep: %v", maxRegDepth, err)
	}
	for _, bad := range []string{``, `{`, `{"a":1}x`, `[1,]`, `{"a" 1}`, `nul`, deep} {
		if got, err := marshalReg(json.RawMessage(bad)); err == nil {
			t.Errorf("%.40q: got %.40s, want an error", bad, got)
		}
	}
}

// TestInteropStringifyJSON compares marshalReg, which makes the
// registrations behind subscription keys, with what Node.js makes of the
// same text: JSON.stringify(JSON.parse(text)). Hand-picked cases first,
// then random documents.
func TestInteropStringifyJSON(t *testing.T) {
	node := needNode(t)
	cmd := exec.Command(node, nodeDir+"/stringify.js")
	cmd.Stderr = newTestWriter(t)
	stdin, stdout := startPiped(t, cmd)
	defer cmd.Wait()
	defer stdin.Close()
	lines := bufio.NewScanner(stdout)
	lines.Buffer(make([]byte, 1<<20), 1<<20)
	check := func(in string) {
		t.Helper()
		if _, err := io.WriteString(stdin, in+"\n"); err != nil {
			t.Fatal(err)
		}
		if !lines.Scan() {
			t.Fatalf("stringify.js stopped: %v", lines.Err())
		}
		var want string
		if err := json.Unmarshal(lines.Bytes(), &want); err != nil {
			t.Fatalf("%s: node: %s", in, lines.Bytes())
		}
		got, err := marshalReg(json.RawMessage(in))
		if err != nil {
			t.Errorf("%s: %v", in, err)
		} else if string(got) != want {
			t.Errorf("%s:\n got %s\nwant %s", in, got, want)
		}
	}
	for _, in := range []string{
		`{"dataId":"d1","group":"g"}`,
		`{ "a" : 1, "b" : [ 1 , "\u0041\u00e9\u2028" ], "a" : 3 }`,
		`{"b":1,"2":"x","a":2,"1":"y","01":3,"-1":4,"4294967294":5,"4294967295":6,"1.5":7}`,
		`[1.0,1e2,1E+2,-0,0.1,1e21,1e-7,1.5e-7,0.000001,123456789012345678901234,1e400,-1e400,5e-324,2e-324]`,
		`"\u0000\u001f\u007f\"\\/\b\f\n\r\t<>&\u2029"`,
		`{"":{"":[]},"x":{}}`,
		`[true,false,null,"",[[]],{}]`,
		`9007199254740993`,
		`-1.7976931348623157e308`,
	} {
		check(in)
	}
	rnd := rand.New(rand.NewPCG(1, 2))
	for range 300 {
		var b strings.Builder
		randomJSON(rnd, &b, 3)
		check(b.String())
	}
}

// randomJSON writes a random JSON value, nested at most depth deep,
// drawn from the cases where JavaScript and encoding/json differ.
func randomJSON(r *rand.Rand, b *strings.Builder, depth int) {
	keys := []string{"a", "b", "0", "1", "10", "01", "-1", "x y", `\u2028`, "__proto__", "é"}
	strs := []string{"", "a", `\u2028`, "\u2028", "<&>", `\u00e9`, "é", `\"`, `\\`, `\n`, `\u0001`, `\ud83d\ude00`}
	nums := []string{"0", "-0", "1", "1.0", "1e2", "1.5E-7", "0.1", "1e21", "123456789012345678901", "-12.50", "1e-6"}
	switch k := r.IntN(6); {
	case depth > 0 && k == 0:
		b.WriteByte('[')
		for i := range r.IntN(4) {
			if i > 0 {
				b.WriteByte(',')
			}
			randomJSON(r, b, depth-1)
		}
		b.WriteByte(']')
	case depth > 0 && k <= 2:
		b.WriteByte('{')
		for i := range r.IntN(5) {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(`"` + keys[r.IntN(len(keys))] + `" : `)
			randomJSON(r, b, depth-1)
		}
		b.WriteByte('}')
	case k == 3:
		b.WriteString(`"` + strs[r.IntN(len(strs))] + `"`)
	case k == 4:
		b.WriteString(nums[r.IntN(len(nums))])
	default:
		b.WriteString([]string{"true", "false", "null"}[r.IntN(3)])
	}
}

// rawPacket is one packet as it crossed the wire.
type rawPacket struct {
	raw []byte
	p   Packet
	typ string
}

// readRaw reads one packet and keeps its bytes.
func readRaw(r io.Reader) (rawPacket, error) {
	hdr := make([]byte, HeaderSize)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return rawPacket{}, err
	}
	connLen, appLen := int32(binary.BigEndian.Uint32(hdr[16:])), int32(binary.BigEndian.Uint32(hdr[20:]))
	if connLen < 0 || appLen < 0 || int64(connLen)+int64(appLen) > 1<<20 {
		return rawPacket{}, fmt.Errorf("bad lengths %d, %d", connLen, appLen)
	}
	raw := make([]byte, HeaderSize+int(connLen)+int(appLen))
	copy(raw, hdr)
	if _, err := io.ReadFull(r, raw[HeaderSize:]); err != nil {
		return rawPacket{}, err
	}
	rp := rawPacket{raw: raw}
	if err := decodePacket(raw, &rp.p); err != nil {
		return rawPacket{}, err
	}
	_, typ, err := parseConn(rp.p.Conn)
	rp.typ = typ
	return rp, err
}

func writeRaw(t *testing.T, w io.Writer, response bool, id uint64, timeout int32, conn connObject, app []byte) {
	t.Helper()
	b, err := appendPacket(nil, response, id, timeout, conn, app)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
}

// fakeLeader listens on a port, answers register_channel, heartbeat and
// invoke (echoing the first argument), and hands every packet it reads
// to the test.
type fakeLeader struct {
	t   *testing.T
	ln  net.Listener
	got chan rawPacket

	mu sync.Mutex
	nc net.Conn // guarded by mu: the connection that registered
}

func startFakeLeader(t *testing.T, port int) *fakeLeader {
	ln, err := net.Listen("tcp", loopback(port))
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeLeader{t: t, ln: ln, got: make(chan rawPacket, 64)}
	serveEach(t, ln, f.serve)
	return f
}

func (f *fakeLeader) serve(nc net.Conn) {
	var wmu sync.Mutex
	reply := func(p Packet, conn connObject, app []byte) {
		b, _ := appendPacket(nil, true, p.ID, p.Timeout, conn, app)
		wmu.Lock()
		nc.Write(b)
		wmu.Unlock()
	}
	br := bufio.NewReader(nc)
	for {
		rp, err := readRaw(br)
		if err != nil {
			return // the Node.js follower's probe closes without a byte
		}
		switch c, _, _ := parseConn(rp.p.Conn); c := c.(type) {
		case registerChannel:
			f.mu.Lock()
			f.nc = nc
			f.mu.Unlock()
			reply(rp.p, registerChannelRes{}, []byte(`{"success":true}`))
		case heartbeat:
			reply(rp.p, heartbeatRes{}, nil)
		case invoke:
			if !c.Oneway {
				args, _ := splitArgs(rp.p.App, c.ArgLength)
				result := []byte("null")
				if len(args) > 0 {
					result = args[0]
				}
				reply(rp.p, invokeResult{Success: true}, result)
			}
		}
		f.got <- rp
	}
}

// push sends a subscribe_result to the registered connection.
func (f *fakeLeader) push(key string, value []byte) {
	f.mu.Lock()
	nc := f.nc
	f.mu.Unlock()
	writeRaw(f.t, nc, false, 4242, 3000, subscribeResult{Key: key}, value)
}

// next returns the next packet of type typ, keeping the first heartbeat
// aside and failing on anything else.
func (f *fakeLeader) next(typ string, hb *rawPacket) rawPacket {
	f.t.Helper()
	for {
		select {
		case rp := <-f.got:
			if rp.typ == typ {
				return rp
			}
			if rp.typ == "heartbeat" {
				if hb.raw == nil {
					*hb = rp
				}
				continue
			}
			f.t.Fatalf("got a %s packet, want %s: %s", rp.typ, typ, rp.raw[HeaderSize:])
		case <-time.After(waitLong):
			f.t.Fatalf("no %s packet within %v", typ, waitLong)
		}
	}
}

// TestInteropFollowerBytes: what a Node.js follower writes for register,
// invoke, subscribe, the answer to a push, publish, oneway, unsubscribe
// and heartbeat, byte for byte against what a Go follower writes for the
// same calls. Request ids come from each process's own counter and are
// left out of the comparison; the answer to a push carries the leader's
// id and is compared whole.
func TestInteropFollowerBytes(t *testing.T) {
	needNode(t)
	reg := json.RawMessage(`{"dataId":"d1","group":"g","n":[1,2.5]}`)
	pub := json.RawMessage(`{"dataId":"p1","addr":"127.0.0.1:1"}`)
	arg := json.RawMessage(`{"b":1,"a":[true,null],"s":"<é & \"q\">"}`)
	key := subscriptionKey(reg)
	steps := []string{"register_channel", "invoke", "subscribe", "subscribe_result_res", "invoke", "invoke", "unSubscribe", "heartbeat"}

	collect := func(f *fakeLeader, do func(op string)) []rawPacket {
		var hb rawPacket
		var out []rawPacket
		for _, op := range []string{"start", "invoke", "subscribe", "push", "publish", "oneway", "unsubscribe"} {
			if op == "push" {
				f.push(key, []byte(`{"v":1}`))
			} else {
				do(op)
			}
			out = append(out, f.next(steps[len(out)], &hb))
			if op == "push" {
				do("value")
			}
		}
		if hb.raw == nil {
			hb = f.next("heartbeat", &hb)
		}
		return append(out, hb)
	}

	// The Go follower.
	port := freePort(t)
	f := startFakeLeader(t, port)
	ctx := context.Background()
	var gc *Client
	var sub *Subscription
	values := make(chan Value, 4)
	goPackets := collect(f, func(op string) {
		var err error
		switch op {
		case "start":
			cfg := testConfig(t, port)
			cfg.Role = RoleFollower
			cfg.HeartbeatInterval = 300 * time.Millisecond
			if gc, err = New(interopChannel, cfg, buildTestReal(newTestReal())); err == nil {
				t.Cleanup(func() { gc.Close() })
				err = gc.Ready(ctx)
			}
		case "invoke":
			_, err = gc.Invoke(ctx, "echo", "x", arg)
		case "subscribe":
			sub, err = gc.Subscribe(reg, func(v Value) { values <- v })
		case "value":
			if v := receive(t, values, "pushed value"); v.String() != `{"v":1}` {
				t.Errorf("Go follower got %s", v)
			}
		case "publish":
			err = gc.Publish(ctx, pub)
		case "oneway":
			err = gc.InvokeOneway(ctx, "note", 7)
		case "unsubscribe":
			sub.Unsubscribe()
		}
		if err != nil {
			t.Fatalf("Go follower, %s: %v", op, err)
		}
	})

	// The Node.js follower, same calls.
	port = freePort(t)
	f = startFakeLeader(t, port)
	var node *nodeMember
	nodePackets := collect(f, func(op string) {
		var m msg
		switch op {
		case "start":
			node = startNode(t, childSpec{Port: port, Role: RoleFollower, Name: interopChannel, ResponseMS: 3000, HeartbeatMS: 300})
			node.ready(waitLong)
		case "invoke":
			// The answer comes after the packet is captured.
			node.send(msg{"op": "invoke", "method": "echo", "args": []any{"x", arg}})
		case "subscribe":
			m = node.do(msg{"op": "subscribe", "reg": reg}, waitLong)
		case "value":
			if m := node.event("value", waitLong); !sameJSON(t, m["value"], `{"v":1}`) {
				t.Errorf("Node.js follower got %v", m)
			}
		case "publish":
			m = node.do(msg{"op": "publish", "reg": pub}, waitLong)
		case "oneway":
			m = node.do(msg{"op": "oneway", "method": "note", "args": []any{7}}, waitLong)
		case "unsubscribe":
			m = node.do(msg{"op": "unsubscribe", "reg": reg}, waitLong)
		}
		if e, _ := m["err"].(string); e != "" {
			t.Fatalf("Node.js follower, %s: %v", op, m)
		}
	})
	noNodeErrors(t, node)

	for i, typ := range steps {
		g, n := goPackets[i], nodePackets[i]
		gb, nb := slices.Clone(g.raw), slices.Clone(n.raw)
		if typ != "subscribe_result_res" {
			clear(gb[4:12])
			clear(nb[4:12])
		}
		if !bytes.Equal(gb, nb) {
			t.Errorf("%s packets differ:\n Go      % x\n         %s\n Node.js % x\n         %s",
				typ, g.raw[:HeaderSize], g.raw[HeaderSize:], n.raw[:HeaderSize], n.raw[HeaderSize:])
		} else {
			t.Logf("%-20s %d bytes alike: %s", typ, len(gb), g.raw[HeaderSize:])
		}
	}
}

// TestInteropUnknownChannel: a Node.js follower of a channel that the Go
// leader on the port does not host gets a clear error, does not spin
// (a Node.js follower elects again as soon as its connection closes, so
// the leader holds a refused connection open until RegisterTimeout), and
// joins once the Go process hosts the channel.
func TestInteropUnknownChannel(t *testing.T) {
	port := freePort(t)
	cfg := testConfig(t, port)
	cfg.Role = RoleLeader
	cfg.RegisterTimeout = time.Second
	cfg.DrainTimeout = 500 * time.Millisecond // a Node.js follower never leaves by itself
	c := newClient(t, interopChannel, cfg, newTestReal())
	mustReady(t, c)
	node := startNode(t, childSpec{Port: port, Name: "Other", Role: RoleFollower})
	m := node.event("error", waitLong)
	if m["code"] != codeChannelNotHosted {
		t.Errorf("ready error %v, want code %s", m, codeChannelNotHosted)
	}
	time.Sleep(1500 * time.Millisecond)
	var refusals int
	for _, m := range node.errors() {
		if m["code"] == codeChannelNotHosted {
			refusals++
		}
	}
	// One refusal per RegisterTimeout at most, plus the first.
	if refusals > 3 {
		t.Errorf("%d refusals in 1.5 s: the Node.js follower registers again in a tight loop", refusals)
	}

	// The Go process starts hosting the channel: the Node.js follower
	// joins it.
	other, err := New("Other", cfg, buildTestReal(newTestReal()))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	for start := time.Now(); ; time.Sleep(50 * time.Millisecond) {
		m := node.do(msg{"op": "invoke", "method": "pid"}, waitLong)
		if m["result"] == float64(os.Getpid()) {
			break
		}
		if time.Since(start) > waitLong {
			t.Fatalf("the Node.js follower did not join the channel once hosted: %v", m)
		}
	}
}

// clusterProc is a cluster member process, Go or Node.js, as the election
// tests drive it.
type clusterProc interface {
	do(cmd msg, timeout time.Duration) msg
	ready(timeout time.Duration) bool
	kill()
}

// TestInteropMixedElection: Go and Node.js processes compete for one
// port. Exactly one leads, every one reaches its real client, and after
// the leader is killed, twice, the survivors agree on a new one, where
// their subscriptions and publications follow them.
func TestInteropMixedElection(t *testing.T) {
	needNode(t)
	port := freePort(t)
	type proc struct {
		m    clusterProc
		pid  int
		kind string
	}
	var procs []proc
	for i := range 4 {
		spec := childSpec{Port: port, Name: interopChannel, ResponseMS: 1000}
		if i%2 == 0 {
			c := startChild(t, spec)
			procs = append(procs, proc{c, c.pid, "go"})
		} else {
			n := startNode(t, spec)
			procs = append(procs, proc{n, n.pid, "node"})
		}
	}
	leaders := 0
	for _, p := range procs {
		if p.m.ready(waitLong) {
			leaders++
		}
	}
	if leaders != 1 {
		t.Fatalf("%d leaders, want 1", leaders)
	}

	// agree waits until every member reaches the same leader, which is
	// the only one that says it leads, and returns its index.
	agree := func() int {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			lead, pids, why := -1, map[any]bool{}, ""
			for i, p := range procs {
				if p.m == nil {
					continue
				}
				if m := p.m.do(msg{"op": "status"}, waitLong); m["leader"] == true {
					if lead >= 0 {
						why = "two leaders"
					}
					lead = i
				}
				m := p.m.do(msg{"op": "invoke", "method": "pid"}, waitLong)
				if m["result"] == nil {
					why = fmt.Sprintf("%s %d: %v", p.kind, p.pid, m["err"])
				}
				pids[m["result"]] = true
			}
			if why == "" && lead >= 0 && len(pids) == 1 && pids[float64(procs[lead].pid)] {
				return lead
			}
			if time.Now().After(deadline) {
				t.Fatalf("members do not agree on a leader: leader %d, pids reached %v, %s", lead, pids, why)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	reg := map[string]string{"dataId": "mixed"}
	for _, p := range procs {
		if m := p.m.do(msg{"op": "subscribe", "reg": reg}, waitLong); m["err"] != nil && m["err"] != "" {
			t.Fatal(m)
		}
		if m := p.m.do(msg{"op": "publish", "reg": map[string]int{"pub": p.pid}}, waitLong); m["err"] != nil && m["err"] != "" {
			t.Fatal(m)
		}
	}
	for round := range 3 {
		lead := agree()
		t.Logf("round %d: the %s process %d leads", round, procs[lead].kind, procs[lead].pid)
		// Every survivor's subscription reaches the new leader's real
		// client, and so does every survivor's publication.
		m := procs[lead].m.do(msg{"op": "invoke", "method": "push", "args": []any{reg, round}}, waitLong)
		if m["result"] != true {
			t.Fatalf("round %d: push: %v", round, m)
		}
		isRound := func(m msg) bool { return m["event"] == "value" && m["value"] == float64(round) }
		for _, p := range procs {
			switch m := p.m.(type) {
			case *child:
				m.event(isRound, waitLong)
			case *nodeMember:
				m.eventWhere(isRound, waitLong)
			}
		}
		for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
			m := procs[lead].m.do(msg{"op": "invoke", "method": "published"}, waitLong)
			got, _ := json.Marshal(m["result"])
			missing := 0
			for _, p := range procs {
				if p.m != nil && !strings.Contains(string(got), fmt.Sprintf(`{"pub":%d}`, p.pid)) {
					missing++
				}
			}
			if missing == 0 {
				break
			}
			if time.Since(start) > waitLong {
				t.Fatalf("round %d: the leader's real client has publications %s", round, got)
			}
		}
		if round == 2 {
			break
		}
		procs[lead].m.kill()
		procs[lead].m = nil
	}
}

// rawFollower is a follower written by hand: it sends packets as given
// and reads what the leader writes back.
type rawFollower struct {
	t  *testing.T
	nc net.Conn
	br *bufio.Reader
}

func dialRawFollower(t *testing.T, port int) *rawFollower {
	nc, err := net.Dial("tcp", loopback(port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return &rawFollower{t: t, nc: nc, br: bufio.NewReader(nc)}
}

func (r *rawFollower) send(response bool, id uint64, conn connObject, app []byte) {
	r.t.Helper()
	writeRaw(r.t, r.nc, response, id, 3000, conn, app)
}

func (r *rawFollower) read() rawPacket {
	r.t.Helper()
	r.nc.SetReadDeadline(time.Now().Add(waitLong))
	rp, err := readRaw(r.br)
	if err != nil {
		r.t.Fatalf("reading from the leader: %v", err)
	}
	return rp
}

func invokeArgs(args ...string) []byte {
	raw := make([][]byte, len(args))
	for i, a := range args {
		raw[i] = []byte(a)
	}
	return appendArgs(nil, raw)
}

// TestInteropLeaderBytes: what a Node.js leader writes back for register,
// invoke (result and error), heartbeat and a push, byte for byte against
// what a Go leader writes for the same packets. The leader's own request
// ids (pushes) are left out; the error's stack, which only the Node.js
// leader sends, is compared apart.
func TestInteropLeaderBytes(t *testing.T) {
	needNode(t)
	reg := `{"dataId":"d1","group":"g"}`
	script := func(r *rawFollower) []rawPacket {
		var out []rawPacket
		r.send(false, 1, registerChannel{ChannelName: interopChannel}, nil)
		out = append(out, r.read())
		// The Go test client decodes echo's argument into a map, which
		// encoding/json writes with sorted keys and U+2028 escaped: the
		// argument is one that both write alike.
		r.send(false, 2, invoke{Method: "echo", ArgLength: 1}, invokeArgs(`{"a":1,"l":[1.5,null],"s":"<é & \"q\">"}`))
		out = append(out, r.read())
		r.send(false, 3, invoke{Method: "fail", ArgLength: 1}, invokeArgs(`"E_CODE"`))
		out = append(out, r.read())
		r.send(false, 4, heartbeat{}, nil)
		out = append(out, r.read())
		r.send(false, 5, subscribe{Key: subscriptionKey([]byte(reg)), Reg: json.RawMessage(reg)}, nil)
		r.send(false, 6, invoke{Method: "push", ArgLength: 2}, invokeArgs(reg, `{"v":1}`))
		a, b := r.read(), r.read()
		if a.typ != "subscribe_result" {
			a, b = b, a
		}
		out = append(out, a, b)
		r.send(true, a.p.ID, subscribeResultRes{}, nil)
		// A oneway call gets no answer: the next packet answers the
		// heartbeat after it.
		r.send(false, 7, invoke{Method: "echo", ArgLength: 1, Oneway: true}, invokeArgs(`1`))
		r.send(false, 8, heartbeat{}, nil)
		out = append(out, r.read())
		return out
	}

	// The Go leader.
	port := freePort(t)
	cfg := testConfig(t, port)
	cfg.Role = RoleLeader
	c := newClient(t, interopChannel, cfg, newTestReal())
	mustReady(t, c)
	r := dialRawFollower(t, port)
	goPackets := script(r)
	r.nc.Close()

	// The Node.js leader.
	port = freePort(t)
	node := startNode(t, childSpec{Port: port, Role: RoleLeader, Name: interopChannel, ResponseMS: 3000})
	if !node.ready(waitLong) {
		t.Fatal("node member does not lead")
	}
	nodePackets := script(dialRawFollower(t, port))

	stack := regexp.MustCompile(`^\{"stack":"(?:[^"\\]|\\.)*",`)
	for i := range goPackets {
		g, n := goPackets[i], nodePackets[i]
		gb, nb := slices.Clone(g.raw), slices.Clone(n.raw)
		if g.typ == "subscribe_result" {
			clear(gb[4:12])
			clear(nb[4:12])
		}
		if g.typ == "invoke_result" && bytes.Contains(n.raw, []byte(`"stack":`)) {
			// {"stack":...,"name":...} from Node.js, {"name":...} from Go;
			// the app length differs by as much.
			app := n.raw[HeaderSize+len(n.p.Conn):]
			if !stack.Match(app) {
				t.Errorf("Node.js error object has no stack first: %s", app)
			}
			trimmed := append([]byte("{"), stack.ReplaceAll(app, nil)...)
			nb = append(nb[:HeaderSize+len(n.p.Conn)], trimmed...)
			binary.BigEndian.PutUint32(nb[20:], uint32(len(trimmed)))
		}
		if !bytes.Equal(gb, nb) {
			t.Errorf("%s packets differ:\n Go      % x\n         %s\n Node.js % x\n         %s",
				g.typ, g.raw[:HeaderSize], g.raw[HeaderSize:], n.raw[:HeaderSize], n.raw[HeaderSize:])
		} else {
			t.Logf("%-20s %d bytes alike: %s", g.typ, len(gb), gb[HeaderSize:])
		}
	}
	node.event("nodeerror", waitLong) // the Node.js leader reports fail's error on its side
	noNodeErrors(t, node)
}

// FuzzStringifyJSON: for any input, marshalReg returns an error or
// valid JSON that encodes to itself again, without panicking.
func FuzzStringifyJSON(f *testing.F) {
	for _, s := range []string{`{"b":1,"2":[1.0,"\u2028"],"b":2}`, `[1e400,-0,1e-7]`, `"\ud800"`, `{"a":{"b":{"c":[]}}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		out, err := marshalReg(json.RawMessage(in))
		if err != nil {
			return
		}
		if !json.Valid(out) {
			t.Fatalf("%q gave invalid JSON %q", in, out)
		}
		again, err := marshalReg(out)
		if err != nil || !bytes.Equal(again, out) {
			t.Fatalf("%q gave %q, which gives %q, %v", in, out, again, err)
		}
	})
}

// TestInteropRegisterRefused: a register that the leader refuses, in both
// directions: a real client that failed to start, and on a Go leader a
// Secret, which a Node.js follower cannot present.
func TestInteropRegisterRefused(t *testing.T) {
	t.Run("Node.js leader, start error", func(t *testing.T) {
		port := freePort(t)
		node := startNode(t, childSpec{Port: port, Role: RoleLeader, Name: interopChannel, NoWaitForReady: true},
			"INTEROP_READY_ERROR=E_START")
		cfg := testConfig(t, port)
		cfg.Role = RoleFollower
		c, err := New(interopChannel, cfg, buildTestReal(newTestReal()))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), waitLong)
		defer cancel()
		err = c.Ready(ctx)
		var re *RemoteError
		if !errors.As(err, &re) || re.Name != "StartError" || re.Code != "E_START" ||
			re.Message != "real client failed to start" || !strings.Contains(re.Stack, "member.js") {
			t.Fatalf("Ready = %#v", err)
		}
		_ = node
	})
	t.Run("Go leader, build error", func(t *testing.T) {
		port := freePort(t)
		cfg := testConfig(t, port)
		cfg.Role = RoleLeader
		c, err := New(interopChannel, cfg, func(context.Context) (RealClient, error) {
			return nil, &codedError{code: "E_BUILD", msg: "cannot build"}
		})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		node := startNode(t, childSpec{Port: port, Role: RoleFollower, Name: interopChannel})
		m := node.event("error", waitLong)
		if m["name"] != "Error" || m["code"] != "E_BUILD" || m["err"] != "cannot build" {
			t.Errorf("Node.js follower: %v", m)
		}
	})
	t.Run("Go leader, secret", func(t *testing.T) {
		port := freePort(t)
		cfg := testConfig(t, port)
		cfg.Role = RoleLeader
		cfg.Secret = "s3cret"
		c, err := New(interopChannel, cfg, buildTestReal(newTestReal()))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		node := startNode(t, childSpec{Port: port, Role: RoleFollower, Name: interopChannel})
		m := node.event("error", waitLong)
		if m["name"] != "ClusterAuthError" || m["code"] != "ERR_CLUSTER_AUTH" {
			t.Errorf("Node.js follower: %v", m)
		}
	})
}
