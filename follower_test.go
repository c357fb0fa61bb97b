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
	r.f = c.fol
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

// waitReading waits until a call holds the reading of f, or, with held
// false, until none does.
func waitReading(t *testing.T, f *follower, held bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		f.mu.Lock()
		got := f.reader != nil
		f.mu.Unlock()
		if got == held {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("a call holds the reading: %v, want %v", got, held)
		}
		time.Sleep(time.Millisecond)
	}
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

// TestFollowerReaderCancel: a call whose ctx ends while it holds the
// reading returns at once; the background reader reads again, so a push
// with no call in flight reaches the subscriber, the late answer is
// dropped, and the next call works.
func TestFollowerReaderCancel(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = 30 * time.Second })
	ctx, cancel := context.WithCancel(context.Background())
	out, req := r.invoke(ctx)
	waitReading(t, r.f, true)
	cancel()
	o := wait(t, out)
	if !errors.Is(o.err, context.Canceled) {
		t.Fatalf("call = %s, %v; want context.Canceled", o.val, o.err)
	}
	if o.d > 10*time.Second {
		t.Fatalf("the cancelled call took %v", o.d)
	}
	waitReading(t, r.f, false)
	r.push(1001, `"after cancel"`)
	r.fc.answer(req, `"late"`)
	r.works(context.Background(), `"next"`)
	r.push(1002, `"still"`)
}

// TestFollowerReaderTimeout: a call whose ResponseTimeout passes while it
// holds the reading fails with ErrTimeout; its late answer is dropped and
// the connection serves on.
func TestFollowerReaderTimeout(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = time.Second })
	out, req := r.invoke(context.Background())
	waitReading(t, r.f, true)
	o := wait(t, out)
	if !errors.Is(o.err, ErrTimeout) {
		t.Fatalf("call = %s, %v; want ErrTimeout", o.val, o.err)
	}
	waitReading(t, r.f, false)
	r.fc.answer(req, `"late"`)
	r.push(1001, `"after timeout"`)
	r.works(context.Background(), `"next"`)
	r.c.mu.Lock()
	same := r.c.fol == r.f
	r.c.mu.Unlock()
	if !same {
		t.Fatal("the follower lost its connection")
	}
}

// TestFollowerReaderPushAndClosing: a push and a leader_closing notice
// that arrive while a call holds the reading are handled as the
// background reader handles them: the listener gets the value, the push
// is acknowledged, and the drain closes the connection once the call has
// its answer.
func TestFollowerReaderPushAndClosing(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = 30 * time.Second })
	out, req := r.invoke(context.Background())
	waitReading(t, r.f, true)
	r.push(1001, `"while reading"`)
	r.fc.mustWrite(false, 1002, leaderClosing{}, nil)
	// The drain unroutes the connection: wait for that, the call still
	// in flight.
	deadline := time.Now().Add(10 * time.Second)
	for {
		r.f.mu.Lock()
		draining := r.f.draining
		r.f.mu.Unlock()
		if draining {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("leader_closing did not start the drain")
		}
		time.Sleep(time.Millisecond)
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

// TestFollowerReaderLargeAnswer: an answer larger than the read buffer
// that arrives while the call holds the reading reaches the call intact,
// read by the background reader.
func TestFollowerReaderLargeAnswer(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = 30 * time.Second })
	big := `"` + strings.Repeat("abcdefgh", 200<<10/8) + `"`
	if len(big) <= followerReadBuffer {
		t.Fatal("the answer must be larger than the read buffer")
	}
	out, req := r.invoke(context.Background())
	waitReading(t, r.f, true)
	r.fc.answer(req, big)
	o := wait(t, out)
	if o.err != nil || o.val != big {
		t.Fatalf("call = %d bytes, %v; want %d bytes", len(o.val), o.err, len(big))
	}
	waitReading(t, r.f, false)
	r.push(1001, `"after big"`)
	r.works(context.Background(), `"next"`)
}

// TestFollowerReaderLeaderLost: the leader closes the connection while a
// call holds the reading: the call fails with ErrLeaderLost at once, not
// at its timeout.
func TestFollowerReaderLeaderLost(t *testing.T) {
	r := newFollowerRig(t, func(c *Config) { c.ResponseTimeout = 30 * time.Second })
	out, _ := r.invoke(context.Background())
	waitReading(t, r.f, true)
	r.fc.nc.Close()
	o := wait(t, out)
	if !errors.Is(o.err, ErrLeaderLost) {
		t.Fatalf("call = %s, %v; want ErrLeaderLost", o.val, o.err)
	}
	if o.d > 10*time.Second {
		t.Fatalf("the call failed after %v", o.d)
	}
}

// TestFollowerFreeReading: a call that read its own answer leaves the
// reading free, so that the next call takes it with no goroutine woken;
// the background reader takes it back within about resumeAfter, so a
// value pushed and the end of the connection are still seen with no
// call made.
func TestFollowerFreeReading(t *testing.T) {
	r := newFollowerRig(t, nil)
	ctx := context.Background()
	free := func() bool {
		r.f.mu.Lock()
		defer r.f.mu.Unlock()
		return r.f.reader == nil && !r.f.bgReads
	}
	r.works(ctx, `"a"`)
	if !free() {
		t.Fatal("after a call that read its own answer, the reading is not left free")
	}
	r.works(ctx, `"b"`) // takes the free reading
	start := time.Now()
	r.push(7, `"pushed"`)
	if d := time.Since(start); d > 2*resumeAfter+time.Second {
		t.Errorf("a value pushed after a call arrived after %v; resumeAfter is %v", d, resumeAfter)
	} else {
		t.Logf("a value pushed after a call arrived after %v (resumeAfter %v)", d, resumeAfter)
	}
	r.works(ctx, `"c"`)
	if !free() {
		t.Fatal("the reading is not left free")
	}
	start = time.Now()
	r.fc.nc.Close()
	select {
	case <-r.fl.conns:
		t.Logf("the follower saw the end of its connection and reconnected after %v", time.Since(start))
	case <-time.After(2*resumeAfter + 5*time.Second):
		t.Fatal("the follower did not see the end of its connection with the reading free")
	}
}

// TestFollowerFreeReadingLeaderGone: a call made while the reading is
// left free, after the leader has closed the connection, is sent on it
// and fails with ErrLeaderLost, as a call in flight does; the next call
// goes to the next leader.
func TestFollowerFreeReadingLeaderGone(t *testing.T) {
	r := newFollowerRig(t, nil)
	ctx := context.Background()
	r.works(ctx, `"a"`)
	r.fc.nc.Close()
	if _, err := r.c.Invoke(ctx, "echo", 1); !errors.Is(err, ErrLeaderLost) {
		t.Fatalf("call on a connection closed while unread: %v; want ErrLeaderLost", err)
	}
	select {
	case r.fc = <-r.fl.conns:
	case <-time.After(10 * time.Second):
		t.Fatal("the follower did not connect again")
	}
	r.fc.next("subscribe") // its listener subscribes again
	r.works(ctx, `"b"`)
}
