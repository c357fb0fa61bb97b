package clusterclient

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// stubLeader is a leader written by hand on a loopback listener: it
// answers register_channel and heartbeats by itself, and hands every other
// packet a follower sends to the test, which decides when answers and
// pushes go out.
type stubLeader struct {
	t     *testing.T
	ln    net.Listener
	conns chan *stubConn
	done  chan struct{} // closed when the test ends

	mu  sync.Mutex
	ncs []net.Conn // guarded by mu: accepted connections, closed when the test ends
}

// stubConn is one follower connection to a stubLeader.
type stubConn struct {
	t    *testing.T
	nc   net.Conn
	wmu  sync.Mutex
	pkts chan Packet   // what the follower sent, heartbeats left out
	eof  chan struct{} // closed when reading the connection ends
}

func newFakeLeader(t *testing.T) *stubLeader {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := &stubLeader{t: t, ln: ln, conns: make(chan *stubConn, 8), done: make(chan struct{})}
	t.Cleanup(func() {
		close(fl.done)
		ln.Close()
		fl.mu.Lock()
		for _, nc := range fl.ncs {
			nc.Close()
		}
		fl.mu.Unlock()
	})
	go fl.accept()
	return fl
}

func (fl *stubLeader) port() int { return fl.ln.Addr().(*net.TCPAddr).Port }

func (fl *stubLeader) accept() {
	for {
		nc, err := fl.ln.Accept()
		if err != nil {
			return
		}
		fl.mu.Lock()
		fl.ncs = append(fl.ncs, nc)
		fl.mu.Unlock()
		fc := &stubConn{t: fl.t, nc: nc, pkts: make(chan Packet, 64), eof: make(chan struct{})}
		go fc.serve(fl.conns, fl.done)
	}
}

// serve answers the register, then reads packets until the connection
// ends.
func (fc *stubConn) serve(conns chan<- *stubConn, done <-chan struct{}) {
	defer close(fc.eof)
	r := NewReader(fc.nc, 0)
	var p Packet
	if err := r.ReadPacket(&p); err != nil {
		return
	}
	ok, _ := json.Marshal(registerResult{Success: true})
	if fc.write(true, p.ID, registerChannelRes{}, ok) != nil {
		return
	}
	select {
	case conns <- fc:
	case <-done:
		return
	}
	for {
		var p Packet
		if err := r.ReadPacket(&p); err != nil {
			return
		}
		if c, _, _ := parseConn(p.Conn); c == (heartbeat{}) {
			fc.write(true, p.ID, heartbeatRes{}, nil)
			continue
		}
		select {
		case fc.pkts <- p:
		case <-done:
			return
		}
	}
}

func (fc *stubConn) write(response bool, id uint64, c connObject, app []byte) error {
	b, err := appendPacket(nil, response, id, 3000, c, app)
	if err != nil {
		return err
	}
	fc.wmu.Lock()
	defer fc.wmu.Unlock()
	fc.nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err = fc.nc.Write(b)
	return err
}

func (fc *stubConn) mustWrite(response bool, id uint64, c connObject, app []byte) {
	fc.t.Helper()
	if err := fc.write(response, id, c, app); err != nil {
		fc.t.Fatal(err)
	}
}

// next waits for the next packet the follower sends, of type typ.
func (fc *stubConn) next(typ string) Packet {
	fc.t.Helper()
	select {
	case p := <-fc.pkts:
		_, got, err := parseConn(p.Conn)
		if err != nil || got != typ {
			fc.t.Fatalf("the follower sent %q (%v), want %q", got, err, typ)
		}
		return p
	case <-fc.eof:
		fc.t.Fatalf("the connection ended while waiting for %q", typ)
	case <-time.After(10 * time.Second):
		fc.t.Fatalf("no %q from the follower", typ)
	}
	panic("unreachable")
}

// answer sends the invoke_result for req with app as its value.
func (fc *stubConn) answer(req Packet, app string) {
	fc.t.Helper()
	fc.mustWrite(true, req.ID, invokeResult{Success: true}, []byte(app))
}

// followerRig is a client in the follower role connected to a fake
// leader, subscribed to one registration.
type followerRig struct {
	t    *testing.T
	fl   *stubLeader
	c    *Client
	fc   *stubConn
	f    *follower
	key  string
	vals chan string // values the subscription received
}

var followerReg = map[string]any{"follower": "test"}

func newFollowerRig(t *testing.T, tune func(*Config)) *followerRig {
	t.Helper()
	fl := newFakeLeader(t)
	cfg := testConfig(t, fl.port())
	cfg.Role = RoleFollower
	cfg.HeartbeatInterval = time.Minute // no heartbeats in these tests
	if tune != nil {
		tune(cfg)
	}
	c, err := New("TestChannel", cfg, buildTestReal(newTestReal()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Ready(ctx); err != nil {
		t.Fatal(err)
	}
	r := &followerRig{t: t, fl: fl, c: c, vals: make(chan string, 16)}
	select {
	case r.fc = <-fl.conns:
	case <-time.After(10 * time.Second):
		t.Fatal("the follower did not connect")
	}
	c.mu.Lock()
	r.f = c.fol()
	c.mu.Unlock()
	if r.f == nil {
		t.Fatal("the client has no follower connection")
	}
	if _, err := c.Subscribe(followerReg, func(v Value) { r.vals <- v.String() }); err != nil {
		t.Fatal(err)
	}
	sub := r.fc.next("subscribe")
	c2, _, _ := parseConn(sub.Conn)
	r.key = c2.(subscribe).Key
	return r
}

// invoke starts a call of echo and returns where its outcome arrives, and
// the invoke packet as the fake leader received it.
func (r *followerRig) invoke(ctx context.Context) (<-chan callOutcome, Packet) {
	r.t.Helper()
	out := make(chan callOutcome, 1)
	go func() {
		start := time.Now()
		v, err := r.c.Invoke(ctx, "echo", 1)
		out <- callOutcome{v.String(), err, time.Since(start)}
	}()
	return out, r.fc.next("invoke")
}

type callOutcome struct {
	val string
	err error
	d   time.Duration
}

func wait(t *testing.T, out <-chan callOutcome) callOutcome {
	t.Helper()
	select {
	case o := <-out:
		return o
	case <-time.After(20 * time.Second):
		t.Fatal("the call did not return")
	}
	panic("unreachable")
}

// push sends a subscribe_result for the rig's key and checks that the
// subscriber gets it and the follower acknowledges it.
func (r *followerRig) push(id uint64, val string) {
	r.t.Helper()
	r.fc.mustWrite(false, id, subscribeResult{Key: r.key}, []byte(val))
	select {
	case got := <-r.vals:
		if got != val {
			r.t.Fatalf("subscriber got %s, want %s", got, val)
		}
	case <-time.After(10 * time.Second):
		r.t.Fatalf("the subscriber did not get %s", val)
	}
	ack := r.fc.next("subscribe_result_res")
	if !ack.Response || ack.ID != id {
		r.t.Fatalf("ack: response %v id %d, want a response to %d", ack.Response, ack.ID, id)
	}
}

// works checks that a call from start to end is answered.
func (r *followerRig) works(ctx context.Context, val string) {
	r.t.Helper()
	out, req := r.invoke(ctx)
	r.fc.answer(req, val)
	if o := wait(r.t, out); o.err != nil || o.val != val {
		r.t.Fatalf("call = %s, %v; want %s", o.val, o.err, val)
	}
}

// TestFollowerCancel: a call whose ctx ends while it waits for its answer
// returns at once; a push with no call in flight reaches the subscriber,
// the late answer is dropped, and the next call works.
func TestFollowerCancel(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = 30 * time.Second })
	ctx, cancel := context.WithCancel(context.Background())
	out, req := r.invoke(ctx)
	cancel()
	o := wait(t, out)
	if !errors.Is(o.err, context.Canceled) {
		t.Fatalf("call = %s, %v; want context.Canceled", o.val, o.err)
	}
	if o.d > 10*time.Second {
		t.Fatalf("the cancelled call took %v", o.d)
	}
	r.push(1001, `"after cancel"`)
	r.fc.answer(req, `"late"`)
	r.works(context.Background(), `"next"`)
	r.push(1002, `"still"`)
}

// TestFollowerTimeout: a call whose ResponseTimeout passes fails with
// ErrTimeout naming the call; its late answer is dropped and the
// connection serves on.
func TestFollowerTimeout(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = 200 * time.Millisecond })
	out, req := r.invoke(context.Background())
	o := wait(t, out)
	if !errors.Is(o.err, ErrTimeout) || !strings.Contains(o.err.Error(), "echo") || !strings.Contains(o.err.Error(), "200ms") {
		t.Fatalf("call = %s, %v; want ErrTimeout naming echo and 200ms", o.val, o.err)
	}
	if o.d < 200*time.Millisecond {
		t.Fatalf("the call timed out after %v, before its timeout", o.d)
	}
	r.fc.answer(req, `"late"`)
	r.push(1001, `"after timeout"`)
	r.works(context.Background(), `"next"`)
	r.c.mu.Lock()
	same := r.c.fol() == r.f
	r.c.mu.Unlock()
	if !same {
		t.Fatal("the follower lost its connection")
	}
}

// TestFollowerPushAndClosing: a push and a leader_closing notice that
// arrive while a call waits: the listener gets the value, the push is
// acknowledged, and the drain closes the connection once the call has its
// answer.
func TestFollowerPushAndClosing(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = 30 * time.Second })
	out, req := r.invoke(context.Background())
	r.push(1001, `"while reading"`)
	r.fc.mustWrite(false, 1002, leaderClosing{}, nil)
	// The drain starts, the call still in flight.
	select {
	case <-r.f.closing:
	case <-time.After(10 * time.Second):
		t.Fatal("leader_closing did not start the drain")
	}
	select {
	case o := <-out:
		t.Fatalf("the call returned before its answer: %s, %v", o.val, o.err)
	case <-r.fc.eof:
		t.Fatal("the follower closed the connection with a call in flight")
	default:
	}
	r.fc.answer(req, `"answer"`)
	if o := wait(t, out); o.err != nil || o.val != `"answer"` {
		t.Fatalf("call = %s, %v", o.val, o.err)
	}
	select {
	case <-r.fc.eof:
	case <-time.After(10 * time.Second):
		t.Fatal("the drained connection was not closed")
	}
	// The client connects again.
	select {
	case <-r.fl.conns:
	case <-time.After(10 * time.Second):
		t.Fatal("the client did not connect again")
	}
}

// TestFollowerLargeAnswer: an answer larger than the read buffer reaches
// the call intact.
func TestFollowerLargeAnswer(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = 30 * time.Second })
	big := `"` + strings.Repeat("abcdefgh", 200<<10/8) + `"`
	if len(big) <= followerReadBuffer {
		t.Fatal("the answer must be larger than the read buffer")
	}
	out, req := r.invoke(context.Background())
	r.fc.answer(req, big)
	o := wait(t, out)
	if o.err != nil || o.val != big {
		t.Fatalf("call = %d bytes, %v; want %d bytes", len(o.val), o.err, len(big))
	}
	r.push(1001, `"after big"`)
	r.works(context.Background(), `"next"`)
}

// TestFollowerLeaderLost: the leader closes the connection while a call
// waits: the call fails with ErrLeaderLost at once, not at its timeout.
func TestFollowerLeaderLost(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = 30 * time.Second })
	out, _ := r.invoke(context.Background())
	r.fc.nc.Close()
	o := wait(t, out)
	if !errors.Is(o.err, ErrLeaderLost) {
		t.Fatalf("call = %s, %v; want ErrLeaderLost", o.val, o.err)
	}
	if o.d > 10*time.Second {
		t.Fatalf("the call failed after %v", o.d)
	}
}

// TestFollowerPushAfterCall: a value pushed right after an answered call,
// with no call in flight, reaches the listener at once.
func TestFollowerPushAfterCall(t *testing.T) {
	r := newFollowerRig(t, nil)
	r.works(context.Background(), `"a"`)
	start := time.Now()
	r.fc.mustWrite(false, 7, subscribeResult{Key: r.key}, []byte(`"pushed"`))
	select {
	case got := <-r.vals:
		if d := time.Since(start); got != `"pushed"` || d > 50*time.Millisecond {
			t.Fatalf("listener got %s after %v; want \"pushed\" within 50ms", got, d)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the listener did not get the value pushed after a call")
	}
	if ack := r.fc.next("subscribe_result_res"); !ack.Response || ack.ID != 7 || ack.Timeout != 0 {
		t.Fatalf("ack: response %v id %d timeout %d, want a response to 7 with timeout 0", ack.Response, ack.ID, ack.Timeout)
	}
}

// TestFollowerLeaderLostNextLeader: the end of the connection fails a
// call in flight at once with ErrLeaderLost; a call made after that waits
// for the next leader and is answered there.
func TestFollowerLeaderLostNextLeader(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = 30 * time.Second })
	out, _ := r.invoke(context.Background())
	start := time.Now()
	r.fc.nc.Close()
	if o := wait(t, out); !errors.Is(o.err, ErrLeaderLost) || time.Since(start) > 2*time.Second {
		t.Fatalf("call in flight = %s, %v after %v; want ErrLeaderLost at once", o.val, o.err, time.Since(start))
	}
	later := make(chan callOutcome, 1)
	go func() {
		v, err := r.c.Invoke(context.Background(), "echo", 2)
		later <- callOutcome{v.String(), err, 0}
	}()
	select {
	case r.fc = <-r.fl.conns:
	case <-time.After(10 * time.Second):
		t.Fatal("the follower did not connect again")
	}
	r.fc.next("subscribe") // its listener subscribes again
	r.fc.answer(r.fc.next("invoke"), `"next leader"`)
	if o := wait(t, later); o.err != nil || o.val != `"next leader"` {
		t.Fatalf("later call = %s, %v; want the next leader's answer", o.val, o.err)
	}
}
