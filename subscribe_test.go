package clusterclient

// Subscriptions that the leader cannot serve, and the bounds on keys:
// the subscribing process learns of a refusal (a log line naming the
// registration, and Subscription.Err), in every role, and the leader
// holds no more keys than its bounds.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// dbReg is a registration as a user writes it.
var dbReg = msg{"key": "db.url"}

// pickyReal is testReal whose Subscribe, while refuse is set, fails as a
// real client fails on a registration it cannot decode.
type pickyReal struct {
	*testReal
	refuse atomic.Bool
}

func newPickyReal() *pickyReal {
	r := &pickyReal{testReal: newTestReal()}
	r.refuse.Store(true)
	return r
}

func (r *pickyReal) Subscribe(reg json.RawMessage, push func(any)) error {
	if r.refuse.Load() {
		var v struct{ Key int }
		return json.Unmarshal(reg, &v) // json: cannot unmarshal string into ... of type int
	}
	return r.testReal.Subscribe(reg, push)
}

// noSubscribeReal is a real client without Subscribe.
var noSubscribeReal = realFunc(func(context.Context, string, []Value) (any, error) { return "ok", nil })

// refusalLeader starts a leader of the channel "refusals" with the real
// client real (see captureLeader).
func refusalLeader(t *testing.T, real RealClient, tune func(*Config)) (*Client, *logCapture) {
	t.Helper()
	return captureLeader(t, "refusals", real, tune)
}

// refusalFollower starts a follower in this process of the leader lead
// over loopback TCP, logging into the capture it returns.
func refusalFollower(t *testing.T, lead *Client) (*Client, *logCapture) {
	t.Helper()
	logs := newLogCapture()
	cfg := testConfig(t, lead.cfg.Port)
	cfg.Role = RoleFollower
	cfg.Logger = slog.New(logs)
	fol := newClient(t, "refusals", cfg, newTestReal())
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("follower log:\n%s", logs.dump())
		}
	})
	mustReady(t, fol)
	if fol.IsLeader() {
		t.Fatal("the follower leads")
	}
	return fol, logs
}

// wantRefusal checks that err is a RemoteError whose message holds want,
// and whose code is code if code is set.
func wantRefusal(t *testing.T, err error, want, code string) {
	t.Helper()
	var re *RemoteError
	if !errors.As(err, &re) || !strings.Contains(re.Message, want) || (code != "" && re.Code != code) {
		t.Fatalf("Err() = %v (%#v), want a RemoteError with %q, code %q", err, re, want, code)
	}
}

// refusedLine waits for the line in logs that names the refusal of reg
// as the user wrote it, with want, and checks that it does not show the
// internal key.
func refusedLine(t *testing.T, logs *logCapture, reg, want string) {
	t.Helper()
	line := logs.wait(t, 10*time.Second, "WARN", "refused a subscription", reg, want)
	if strings.Contains(line, "$$inner$$") {
		t.Errorf("the log line shows the internal key: %s", line)
	}
}

// leaderKeys is the number of keys c's leader holds.
func leaderKeys(c *Client) int {
	l := leadOf(c)
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.topics)
}

// TestSubscribeRefusedOnLeader: on the leader, a subscription that the
// real client cannot serve (no Subscribe method, or Subscribe fails) is
// known at once: Err returns the reason, the client logs it naming the
// registration, and the leader keeps no key for it. Once the real client
// accepts, a later Subscribe of the same registration tries again and
// works, and Err of the first listener clears.
func TestSubscribeRefusedOnLeader(t *testing.T) {
	t.Parallel()
	t.Run("no Subscribe", func(t *testing.T) {
		lead, logs := refusalLeader(t, noSubscribeReal, nil)
		s, err := lead.Subscribe(dbReg, func(Value) {})
		if err != nil {
			t.Fatal(err)
		}
		wantRefusal(t, s.Err(), "no Subscribe method", "ERR_CLUSTER_NO_SUBSCRIBE")
		refusedLine(t, logs, `{"key":"db.url"}`, "no Subscribe method")
		if n := leaderKeys(lead); n != 0 {
			t.Errorf("the leader holds %d keys after the refusal, want 0", n)
		}
	})
	t.Run("Subscribe fails", func(t *testing.T) {
		real := newPickyReal()
		lead, logs := refusalLeader(t, real, nil)
		got := make(chan Value, 4)
		s, err := lead.Subscribe(dbReg, func(v Value) { got <- v })
		if err != nil {
			t.Fatal(err)
		}
		wantRefusal(t, s.Err(), "cannot unmarshal string", "")
		refusedLine(t, logs, `{"key":"db.url"}`, "cannot unmarshal string")
		if n := leaderKeys(lead); n != 0 {
			t.Errorf("the leader holds %d keys after the refusal, want 0", n)
		}

		real.refuse.Store(false)
		s2, err := lead.Subscribe(dbReg, func(Value) {})
		if err != nil {
			t.Fatal(err)
		}
		if s.Err() != nil || s2.Err() != nil {
			t.Fatalf("Err after a subscribe the real client accepted: %v, %v", s.Err(), s2.Err())
		}
		if ok, err := Invoke[bool](callCtx(t), lead, "push", dbReg, "postgres://db"); err != nil || !ok {
			t.Fatalf("push: %v, %v (the real client is not subscribed)", ok, err)
		}
		if v := receive(t, got, "value after the retry"); v.String() != `"postgres://db"` {
			t.Errorf("value %s", v)
		}
	})
}

// TestSubscribeRefusedOnFollower: a follower in this process, over TCP,
// learns that the leader refused its subscription: Err returns the
// leader's reason, and the follower's own log names the registration.
// The leader's log names it too. Once the real client accepts, a later
// Subscribe tries again on the leader and values flow.
func TestSubscribeRefusedOnFollower(t *testing.T) {
	t.Parallel()
	t.Run("no Subscribe", func(t *testing.T) {
		lead, _ := refusalLeader(t, noSubscribeReal, nil)
		fol, flogs := refusalFollower(t, lead)
		s, err := fol.Subscribe(dbReg, func(Value) {})
		if err != nil {
			t.Fatal(err)
		}
		refusedLine(t, flogs, `{"key":"db.url"}`, "no Subscribe method")
		wantRefusal(t, s.Err(), "no Subscribe method", "ERR_CLUSTER_NO_SUBSCRIBE")
	})
	t.Run("Subscribe fails", func(t *testing.T) {
		real := newPickyReal()
		lead, llogs := refusalLeader(t, real, nil)
		fol, flogs := refusalFollower(t, lead)
		got := make(chan Value, 4)
		s, err := fol.Subscribe(dbReg, func(v Value) { got <- v })
		if err != nil {
			t.Fatal(err)
		}
		refusedLine(t, flogs, `{"key":"db.url"}`, "cannot unmarshal string")
		wantRefusal(t, s.Err(), "cannot unmarshal string", "")
		llogs.wait(t, 5*time.Second, "WARN", "subscription refused", `{"key":"db.url"}`, "cannot unmarshal")
		if n := leaderKeys(lead); n != 0 {
			t.Errorf("the leader holds %d keys after the refusal, want 0", n)
		}

		real.refuse.Store(false)
		if _, err := fol.Subscribe(dbReg, func(Value) {}); err != nil {
			t.Fatal(err)
		}
		if err := s.Err(); err != nil {
			t.Errorf("Err once sent again: %v", err)
		}
		// The subscribe goes out before this invoke on the same
		// connection, and the leader handles them in order.
		if ok, err := Invoke[bool](callCtx(t), fol, "push", dbReg, "postgres://db"); err != nil || !ok {
			t.Fatalf("push: %v, %v (the real client is not subscribed)", ok, err)
		}
		if v := receive(t, got, "value after the retry"); v.String() != `"postgres://db"` {
			t.Errorf("value %s", v)
		}
		if err := s.Err(); err != nil {
			t.Errorf("Err after the retry: %v", err)
		}
	})
}

// TestSubscribeRefusedChildFollower: a follower process learns of the
// refusal in its own log and through Err.
func TestSubscribeRefusedChildFollower(t *testing.T) {
	t.Parallel()
	lead, _ := refusalLeader(t, newPickyReal(), nil)
	kid := startChild(t, childSpec{Port: lead.cfg.Port, Name: "refusals", Role: RoleFollower, LogEvents: true})
	if kid.ready(10 * time.Second) {
		t.Fatal("the child leads")
	}
	kid.ok(msg{"op": "subscribe", "reg": dbReg, "as": "db"})
	m := kid.waitLog(func(m msg) bool {
		line, _ := m["line"].(string)
		return m["event"] == "log" && strings.Contains(line, "refused a subscription")
	}, 10*time.Second)
	line := m["line"].(string)
	if !strings.Contains(line, `{\"key\":\"db.url\"}`) || !strings.Contains(line, "cannot unmarshal string") ||
		strings.Contains(line, "$$inner$$") {
		t.Errorf("the child's log line does not name the registration and the reason: %s", line)
	}
	if e, _ := kid.do(msg{"op": "subErr", "as": "db"}, 10*time.Second)["err"].(string); !strings.Contains(e, "cannot unmarshal string") {
		t.Errorf("the child's Err() = %q", e)
	}
}

// readNotice reads packets from a raw follower connection until a
// subscribe_failed, and returns its key and error object.
func readNotice(t *testing.T, r *Reader, nc net.Conn) (string, invokeErrorObject) {
	t.Helper()
	var n subscribeFailed
	p := readUntil(t, r, nc, "a subscribe_failed notice", func(p *Packet) bool {
		c, _, _ := parseConn(p.Conn)
		n, _ = c.(subscribeFailed)
		return !p.Response && c == connObject(n)
	})
	var e invokeErrorObject
	if err := json.Unmarshal(p.App, &e); err != nil {
		t.Fatalf("error object %q: %v", p.App, err)
	}
	return n.Key, e
}

// subscribeRaw sends a subscribe of reg on nc, then a heartbeat, and
// waits for its answer: by then the leader has handled the subscribe.
func subscribeRaw(t *testing.T, nc net.Conn, r *Reader, typ string, reg string, id uint64) {
	t.Helper()
	var c connObject = subscribe{Key: subscriptionKey([]byte(reg)), Reg: json.RawMessage(reg)}
	if typ == "unSubscribe" {
		c = unSubscribe{Key: subscriptionKey([]byte(reg)), Reg: json.RawMessage(reg)}
	}
	mustWrite(t, nc, append(packetBytes(t, false, id, c, nil), packetBytes(t, false, id+1, heartbeat{}, nil)...))
	readAnswer(t, r, nc, id+1)
}

// TestSubscribeKeysBounded: a follower connection may listen to at most
// Config.MaxKeysPerConn distinct keys, and the leader holds at most
// Config.MaxKeys; a subscribe past either gets a subscribe_failed notice
// with code ERR_CLUSTER_TOO_MANY_KEYS, and the leader logs it. A key
// subscribed twice counts once, and a key left makes room.
func TestSubscribeKeysBounded(t *testing.T) {
	t.Parallel()
	r := newRig(t, func(c *Config) { c.MaxKeysPerConn, c.MaxKeys = 3, 6 })
	a := r.dial()
	ra := registerRaw(t, a, "TestChannel", "")
	reg := func(i int) string { return fmt.Sprintf(`{"k":%d}`, i) }
	for i := range 3 {
		subscribeRaw(t, a, ra, "subscribe", reg(i), uint64(10+2*i))
	}
	subscribeRaw(t, a, ra, "subscribe", reg(0), 20) // again: no new key
	mustWrite(t, a, packetBytes(t, false, 22, subscribe{Key: subscriptionKey([]byte(reg(3))), Reg: json.RawMessage(reg(3))}, nil))
	key, e := readNotice(t, ra, a)
	if key != subscriptionKey([]byte(reg(3))) || e.Code != "ERR_CLUSTER_TOO_MANY_KEYS" || !strings.Contains(e.Message, "MaxKeysPerConn") {
		t.Fatalf("notice for %q: %+v", key, e)
	}
	r.logs.wait(t, 5*time.Second, "WARN", "subscription refused", reg(3), "ERR_CLUSTER_TOO_MANY_KEYS")
	subscribeRaw(t, a, ra, "unSubscribe", reg(0), 30)
	subscribeRaw(t, a, ra, "subscribe", reg(3), 32) // room again
	if n := leaderKeys(r.lead); n != 4 {
		t.Fatalf("the leader holds %d keys, want 4: goodReg and three of the connection's", n)
	}

	b := r.dial()
	rb := registerRaw(t, b, "TestChannel", "")
	subscribeRaw(t, b, rb, "subscribe", reg(4), 10)
	subscribeRaw(t, b, rb, "subscribe", reg(5), 12)
	mustWrite(t, b, packetBytes(t, false, 14, subscribe{Key: subscriptionKey([]byte(reg(6))), Reg: json.RawMessage(reg(6))}, nil))
	if key, e := readNotice(t, rb, b); key != subscriptionKey([]byte(reg(6))) || !strings.Contains(e.Message, "MaxKeys (6)") {
		t.Fatalf("notice for %q: %+v", key, e)
	}
	subscribeRaw(t, b, rb, "subscribe", reg(1), 16) // a key the leader has: no new one
	if n := leaderKeys(r.lead); n != 6 {
		t.Errorf("the leader holds %d keys, want Config.MaxKeys 6", n)
	}
	r.serving()
}

// TestSubscribeKeysBoundedGoFollower: a Go follower past
// Config.MaxKeysPerConn sees the refusal in Err and its log; once it
// leaves a key, subscribing again works.
func TestSubscribeKeysBoundedGoFollower(t *testing.T) {
	t.Parallel()
	real := newPickyReal()
	real.refuse.Store(false)
	lead, _ := refusalLeader(t, real, func(c *Config) { c.MaxKeysPerConn = 2 })
	fol, flogs := refusalFollower(t, lead)
	var subs []*Subscription
	got := make(chan Value, 4)
	for i := range 3 {
		s, err := fol.Subscribe(msg{"n": i}, func(v Value) { got <- v })
		if err != nil {
			t.Fatal(err)
		}
		subs = append(subs, s)
	}
	refusedLine(t, flogs, `{"n":2}`, "ERR_CLUSTER_TOO_MANY_KEYS")
	wantRefusal(t, subs[2].Err(), "MaxKeysPerConn (2)", "ERR_CLUSTER_TOO_MANY_KEYS")
	if subs[0].Err() != nil || subs[1].Err() != nil {
		t.Errorf("Err of the keys within the bound: %v, %v", subs[0].Err(), subs[1].Err())
	}
	subs[0].Unsubscribe()
	if _, err := fol.Subscribe(msg{"n": 2}, func(Value) {}); err != nil {
		t.Fatal(err)
	}
	if ok, err := Invoke[bool](callCtx(t), fol, "push", msg{"n": 2}, 2); err != nil || !ok {
		t.Fatalf("push: %v, %v (the key is not subscribed after the retry)", ok, err)
	}
	if v := receive(t, got, "value of the retried key"); v.String() != "2" {
		t.Errorf("value %s", v)
	}
}

// keepAllReal is a real client that can subscribe but not unsubscribe,
// and keeps nothing itself: what a kept key costs is the leader's.
type keepAllReal struct{}

func (keepAllReal) Invoke(context.Context, string, []Value) (any, error) { return nil, nil }
func (keepAllReal) Subscribe(json.RawMessage, func(any)) error           { return nil }

// TestKeptKeysBounded: with a real client that cannot unsubscribe, the
// leader keeps every key it subscribed, up to Config.MaxKeys; past it a
// subscribe is refused. It logs what a kept key costs the leader.
func TestKeptKeysBounded(t *testing.T) {
	n, bound := 50_000, 20_000
	if testing.Short() {
		n, bound = 5_000, 2_000
	}
	measureKeys := func(maxKeys int) (perKey float64, kept int, refused int) {
		cfg := withDefaultsPtr()
		cfg.MaxKeys, cfg.Logger = maxKeys, slog.New(slog.NewTextHandler(io.Discard, nil))
		l := newLeader("kept", cfg, func(_ string, _ []byte, err error) {
			if err != nil {
				refused++
			}
		})
		l.real = keepAllReal{}
		close(l.ready)
		before := measure()
		for i := range n {
			reg := fmt.Appendf(nil, `{"dataId":"com.example.service.%06d","group":"DEFAULT_GROUP"}`, i)
			key := subscriptionKey(reg)
			l.subscribe(nil, key, reg)
			l.unsubscribe(nil, key)
		}
		after := measure()
		l.mu.Lock()
		kept = len(l.topics)
		l.mu.Unlock()
		runtime.KeepAlive(l)
		return float64(after.heap-before.heap) / float64(max(kept, 1)), kept, refused
	}
	perKey, kept, _ := measureKeys(n)
	t.Logf("%d subscribe/unsubscribe of distinct keys: %d kept, %.0f bytes each on the leader", n, kept, perKey)
	_, kept, refused := measureKeys(bound)
	if kept != bound || refused != n-bound {
		t.Errorf("with Config.MaxKeys %d: %d keys kept, %d refused; want %d and %d", bound, kept, refused, bound, n-bound)
	}
}

// TestInteropNodeFollowerRefused: a Node.js follower whose subscription
// a Go leader refuses gets the Go-only subscribe_failed notice, ignores
// it without an error, and keeps its connection, its calls and its other
// subscription; the leader logs the refusal.
func TestInteropNodeFollowerRefused(t *testing.T) {
	real := newPickyReal()
	real.refuse.Store(false)
	lead, logs := refusalLeader(t, real, func(c *Config) { c.MaxKeysPerConn = 1 })
	node := startNode(t, childSpec{Port: lead.cfg.Port, Role: RoleFollower, Name: "refusals"})
	if node.ready(waitLong) {
		t.Fatal("node member leads, want follower")
	}
	node.do(msg{"op": "subscribe", "reg": msg{"n": 1}}, waitLong)
	node.do(msg{"op": "subscribe", "reg": msg{"n": 2}}, waitLong)
	logs.wait(t, waitLong, "WARN", "subscription refused", `{"n":2}`, "ERR_CLUSTER_TOO_MANY_KEYS")
	m := node.do(msg{"op": "invoke", "method": "push", "args": []any{msg{"n": 1}, "v1"}}, waitLong)
	if m["result"] != true {
		t.Fatalf("push: %v", m)
	}
	if m := node.event("value", waitLong); !sameJSON(t, m["value"], `"v1"`) {
		t.Errorf("value event %v", m)
	}
	l := leadOf(lead)
	l.mu.Lock()
	conns := len(l.conns)
	l.mu.Unlock()
	if conns != 1 {
		t.Errorf("the leader has %d connections, want the Node.js follower's one", conns)
	}
	noNodeErrors(t, node)
}
