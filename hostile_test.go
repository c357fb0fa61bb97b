package clusterclient

// Hostile peers on the leader's port, over real sockets. Each test sets up
// a leader and a well-behaved follower in this process, attacks the port
// with raw connections, then checks that the leader closed the bad
// connection and logged why, that the follower kept its connection and its
// service, and that goroutines and heap went back to what they were.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// logCapture is a slog handler that keeps the lines logged, so that a
// test can wait for the line that says why a connection was closed.
type logCapture struct {
	mu    sync.Mutex
	lines []string      // guarded by mu: the latest lines, at most logKeep
	total int           // guarded by mu: lines ever logged
	wake  chan struct{} // guarded by mu: closed and replaced at each line
}

// logKeep bounds the lines a logCapture keeps; older ones are dropped.
const logKeep = 4096

func newLogCapture() *logCapture { return &logCapture{wake: make(chan struct{})} }

func (h *logCapture) Enabled(context.Context, slog.Level) bool { return true }
func (h *logCapture) WithAttrs([]slog.Attr) slog.Handler       { panic("not used by the package") }
func (h *logCapture) WithGroup(string) slog.Handler            { panic("not used by the package") }

func (h *logCapture) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Level.String() + " " + r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.lines) == logKeep {
		h.lines = append(h.lines[:0], h.lines[logKeep/2:]...)
	}
	h.lines = append(h.lines, b.String())
	h.total++
	close(h.wake)
	h.wake = make(chan struct{})
	return nil
}

// find returns the first kept line that holds every part.
func (h *logCapture) find(parts ...string) (string, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
next:
	for _, l := range h.lines {
		for _, p := range parts {
			if !strings.Contains(l, p) {
				continue next
			}
		}
		return l, nil
	}
	return "", h.wake
}

// wait waits up to timeout for a line that holds every part.
func (h *logCapture) wait(t testing.TB, timeout time.Duration, parts ...string) string {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		l, wake := h.find(parts...)
		if wake == nil {
			return l
		}
		select {
		case <-wake:
		case <-deadline.C:
			t.Fatalf("no log line with %q within %v; lines:\n%s", parts, timeout, h.dump())
		}
	}
}

func (h *logCapture) count(parts ...string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
next:
	for _, l := range h.lines {
		for _, p := range parts {
			if !strings.Contains(l, p) {
				continue next
			}
		}
		n++
	}
	return n
}

func (h *logCapture) dump() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	lines := h.lines
	if len(lines) > 50 {
		lines = lines[len(lines)-50:]
	}
	return strings.Join(lines, "\n")
}

// rig is a leader and a well-behaved follower in this process.
type rig struct {
	t    *testing.T
	port int
	cfg  *Config // the leader's
	logs *logCapture
	real *testReal
	lead *Client
	good *Client
	fol  *follower // good's connection, which must outlive every attack
	n    int       // counts serving checks

	mu     sync.Mutex
	latest string        // guarded by mu: the last value good received on goodReg
	got    chan struct{} // guarded by mu: closed and replaced at each value
}

var goodReg = map[string]any{"good": "follower"}

// newRig starts a leader on a free port, with RegisterTimeout 500 ms and
// the changes tune makes, and a follower subscribed to goodReg.
func newRig(t *testing.T, tune func(*Config)) *rig {
	t.Helper()
	r := &rig{t: t, port: freePort(t), logs: newLogCapture(), real: newTestReal(), got: make(chan struct{})}
	r.cfg = testConfig(t, r.port)
	r.cfg.Role = RoleLeader
	r.cfg.Logger = slog.New(r.logs)
	r.cfg.RegisterTimeout = 500 * time.Millisecond
	if tune != nil {
		tune(r.cfg)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("leader log:\n%s", r.logs.dump())
		}
	})
	var err error
	if r.lead, err = New("TestChannel", r.cfg, buildTestReal(r.real)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.lead.Close() })
	r.ready(r.lead)

	gcfg := *r.cfg
	gcfg.Role = RoleFollower
	gcfg.Logger = testConfig(t, r.port).Logger
	if r.good, err = New("TestChannel", &gcfg, buildTestReal(newTestReal())); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.good.Close() })
	r.ready(r.good)
	if _, err := r.good.Subscribe(goodReg, func(v Value) {
		r.mu.Lock()
		r.latest = v.String()
		close(r.got)
		r.got = make(chan struct{})
		r.mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	r.good.mu.Lock()
	r.fol = r.good.fol()
	r.good.mu.Unlock()
	if r.fol == nil {
		t.Fatal("follower has no connection")
	}
	r.serving()
	return r
}

func (r *rig) ready(c *Client) {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Ready(ctx); err != nil {
		r.t.Fatal(err)
	}
}

// serving checks that the follower still has its first connection, that
// its calls reach the real client, and that pushes reach it.
func (r *rig) serving() {
	r.t.Helper()
	r.good.mu.Lock()
	fol := r.good.fol()
	r.good.mu.Unlock()
	if fol != r.fol {
		r.t.Fatalf("the well-behaved follower lost its connection to the leader")
	}
	r.n++
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := Invoke[int](ctx, r.good, "echo", r.n)
	if err != nil || n != r.n {
		r.t.Fatalf("follower echo(%d) = %d, %v", r.n, n, err)
	}
	want := fmt.Sprintf(`"value %d"`, r.n)
	if ok, err := Invoke[bool](ctx, r.lead, "push", goodReg, fmt.Sprintf("value %d", r.n)); err != nil || !ok {
		r.t.Fatalf("push = %v, %v", ok, err)
	}
	r.waitValue(want, 10*time.Second)
}

// waitValue waits for the follower to hold value want on goodReg.
func (r *rig) waitValue(want string, timeout time.Duration) {
	r.t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		latest, got := r.latest, r.got
		r.mu.Unlock()
		if latest == want {
			return
		}
		select {
		case <-got:
		case <-deadline.C:
			r.t.Fatalf("follower holds %.80s, want %.80s", latest, want)
		}
	}
}

// usage is what the process holds: goroutines and live heap.
type usage struct {
	goroutines int
	heap       uint64
}

func measure() usage {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return usage{runtime.NumGoroutine(), ms.HeapAlloc}
}

// noLeak waits until goroutines are back to base and the heap is within
// slack of it, polling with a deadline.
func noLeak(t testing.TB, base usage, slack uint64) usage {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		u := measure()
		if u.goroutines <= base.goroutines && u.heap <= base.heap+slack {
			t.Logf("goroutines %d -> %d, heap %d KiB -> %d KiB", base.goroutines, u.goroutines, base.heap>>10, u.heap>>10)
			return u
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("goroutines %d -> %d, heap %d KiB -> %d KiB (slack %d KiB)\n%s",
				base.goroutines, u.goroutines, base.heap>>10, u.heap>>10, slack>>10, buf)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// heapSlack is the heap growth allowed after an attack: log lines kept by
// the capture and buffers of the runtime, far below what any attack here
// would leave if it leaked (a 2 GiB claim, 10,000 connections, a 256 KiB
// queue).
const heapSlack = 1 << 20

func (r *rig) dial() net.Conn {
	r.t.Helper()
	nc, err := net.Dial("tcp", loopback(r.port))
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { nc.Close() })
	return nc
}

func mustWrite(t testing.TB, nc net.Conn, b []byte) {
	t.Helper()
	nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := nc.Write(b); err != nil {
		t.Fatal(err)
	}
}

func packetBytes(t testing.TB, response bool, id uint64, c connObject, app []byte) []byte {
	t.Helper()
	b, err := appendPacket(nil, response, id, 3000, c, app)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rawHeader is a header claiming conn and app lengths.
func rawHeader(response bool, id uint64, connLen, appLen uint32) []byte {
	b := appendHeader(nil, response, id, 3000, 0, 0)
	binary.BigEndian.PutUint32(b[16:], connLen)
	binary.BigEndian.PutUint32(b[20:], appLen)
	return b
}

// readAnswer reads packets until the response to id, answering nothing.
func readAnswer(t testing.TB, r *Reader, nc net.Conn, id uint64) Packet {
	t.Helper()
	return readUntil(t, r, nc, fmt.Sprintf("the answer to %d", id), func(p *Packet) bool { return p.Response && p.ID == id })
}

// readUntil reads packets from a raw connection, answering nothing, until
// one that match accepts; what names it in a failure.
func readUntil(t testing.TB, r *Reader, nc net.Conn, what string, match func(p *Packet) bool) Packet {
	t.Helper()
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer nc.SetReadDeadline(time.Time{})
	for {
		var p Packet
		if err := r.ReadPacket(&p); err != nil {
			t.Fatalf("reading %s: %v", what, err)
		}
		if match(&p) {
			return p
		}
	}
}

// registerRaw registers a raw connection on channel and returns its
// reader.
func registerRaw(t testing.TB, nc net.Conn, channel, secret string) *Reader {
	t.Helper()
	mustWrite(t, nc, packetBytes(t, false, 1, registerChannel{ChannelName: channel, Secret: secret}, nil))
	r := NewReader(nc, 0)
	p := readAnswer(t, r, nc, 1)
	var res registerResult
	if err := json.Unmarshal(p.App, &res); err != nil || !res.Success {
		t.Fatalf("register: %s, %v", p.App, err)
	}
	return r
}

// closedByPeer waits up to timeout for the peer to close nc, reading and
// dropping what arrives, and returns how long that took.
func closedByPeer(t testing.TB, nc net.Conn, timeout time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	nc.SetReadDeadline(start.Add(timeout))
	buf := make([]byte, 64<<10)
	for {
		_, err := nc.Read(buf)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the leader did not close the connection within %v", timeout)
		}
		if err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("reading: %v", err)
		}
		return time.Since(start)
	}
}

// TestHostileRandomBytes: connections that send random bytes, before and
// after registering, are closed with a log line naming the fault.
func TestHostileRandomBytes(t *testing.T) {
	r := newRig(t, nil)
	base := measure()
	rnd := rand.New(rand.NewPCG(1, 2))
	// Fewer than warnPerSecond, so that every line is logged.
	for i := range warnPerSecond - 2 {
		nc := r.dial()
		b := make([]byte, 1+rnd.IntN(8<<10))
		for j := range b {
			b[j] = byte(rnd.Uint32())
		}
		if i%2 == 0 {
			b[0] = ProtocolVersion + 1 + byte(rnd.IntN(200)) // never a valid version
		}
		nc.Write(b) // the leader may close before all of it is written
		closedByPeer(t, nc, 5*time.Second)
		line := r.logs.wait(t, 5*time.Second, "did not register", "remote="+nc.LocalAddr().String())
		if i%2 == 0 && !strings.Contains(line, "unsupported protocol version") {
			t.Errorf("log line does not say why: %s", line)
		}
		nc.Close()
	}
	// After a valid register.
	nc := r.dial()
	registerRaw(t, nc, "TestChannel", "")
	mustWrite(t, nc, []byte("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
	closedByPeer(t, nc, 5*time.Second)
	r.logs.wait(t, 5*time.Second, "closing follower connection", "remote="+nc.LocalAddr().String(), "unsupported protocol version")
	nc.Close()
	r.serving()
	noLeak(t, base, heapSlack)
	r.serving()
}

// TestHostileHugeHeader: a header that claims a 2 GiB body, then nothing,
// is refused at once, before and after registering, without allocating
// for the claim.
func TestHostileHugeHeader(t *testing.T) {
	r := newRig(t, nil)
	base := measure()
	for _, registered := range []bool{false, true} {
		nc := r.dial()
		if registered {
			registerRaw(t, nc, "TestChannel", "")
		}
		mustWrite(t, nc, rawHeader(false, 7, 1<<30, 1<<30))
		if d := closedByPeer(t, nc, 5*time.Second); d > 2*time.Second {
			t.Errorf("closed after %v, want at once", d)
		}
		what := "did not register"
		if registered {
			what = "closing follower connection"
		}
		r.logs.wait(t, 5*time.Second, what, "remote="+nc.LocalAddr().String(), "exceeds the maximum size")
		nc.Close()
	}
	// Just under the register bound: the leader waits for the body,
	// holding no more than the bytes that arrived, until
	// RegisterTimeout.
	nc := r.dial()
	mustWrite(t, nc, rawHeader(false, 7, registerMaxPacket-1, 0))
	closedByPeer(t, nc, 5*time.Second)
	r.logs.wait(t, 5*time.Second, "did not register", "remote="+nc.LocalAddr().String(), "RegisterTimeout")
	nc.Close()
	r.serving()
	noLeak(t, base, heapSlack)
}

// TestHostileSlowloris: a connection that sends part of a register packet
// and stalls, or trickles a byte at a time, is closed when
// Config.RegisterTimeout runs out, counted from the accept.
func TestHostileSlowloris(t *testing.T) {
	r := newRig(t, nil)
	base := measure()
	reg := packetBytes(t, false, 1, registerChannel{ChannelName: "TestChannel"}, nil)

	stall := r.dial()
	mustWrite(t, stall, reg[:HeaderSize+3])
	d := closedByPeer(t, stall, 5*time.Second)
	r.logs.wait(t, 5*time.Second, "did not register", "remote="+stall.LocalAddr().String(), "RegisterTimeout 500ms")
	if d < 400*time.Millisecond {
		t.Errorf("closed after %v, before RegisterTimeout", d)
	}

	// One byte every 50 ms: the deadline does not move with each byte.
	trickle := r.dial()
	start := time.Now()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < len(reg)-1; i++ {
			if _, err := trickle.Write(reg[i : i+1]); err != nil {
				return
			}
			time.Sleep(50 * time.Millisecond) // the pace of the attack
		}
	}()
	closedByPeer(t, trickle, 5*time.Second)
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("trickling connection closed after %v, RegisterTimeout is 500ms", d)
	}
	trickle.Close()
	<-done
	r.logs.wait(t, 5*time.Second, "did not register", "remote="+trickle.LocalAddr().String(), "RegisterTimeout")
	r.serving()
	noLeak(t, base, heapSlack)
}

// TestHostileStallAfterRegister: a registered connection that stops in
// the middle of a packet is dropped by the heartbeat check (three
// intervals without a whole packet), while the follower that heartbeats
// stays.
func TestHostileStallAfterRegister(t *testing.T) {
	r := newRig(t, func(c *Config) { c.HeartbeatInterval = 400 * time.Millisecond })
	base := measure()
	nc := r.dial()
	registerRaw(t, nc, "TestChannel", "")
	mustWrite(t, nc, rawHeader(false, 9, 100, 0))
	d := closedByPeer(t, nc, 10*time.Second)
	r.logs.wait(t, 5*time.Second, "closing follower connection", "remote="+nc.LocalAddr().String(), "three heartbeat intervals")
	if d < time.Second {
		t.Errorf("dropped after %v, before three heartbeat intervals", d)
	}
	nc.Close()
	r.serving()
	noLeak(t, base, heapSlack)
}

// raiseFDLimit raises the soft limit on open files to want, or as near as
// the hard limit allows, and returns the soft limit then in force.
func raiseFDLimit(t testing.TB, want uint64) uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur < want {
		old := lim.Cur
		lim.Cur = min(want, lim.Max)
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Logf("raising the open file limit from %d: %v", old, err)
			syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
		} else {
			t.Cleanup(func() {
				syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: old, Max: lim.Max})
			})
		}
	}
	return lim.Cur
}

// TestHostileUnregisteredFlood: 10,000 connections that never register.
// At most Config.MaxUnregistered are held; the oldest are closed, the
// log says why (at most warnPerSecond lines a second), the registered
// follower keeps its service all along, and a new follower can join.
//
// Each connection costs this process two descriptors (both ends) while
// the leader holds it and one after, so the test needs some 10,000 plus
// MaxUnregistered; it raises the soft limit up to the hard one, and
// scales the count down if that is still short.
func TestHostileUnregisteredFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("10,000 connections")
	}
	const maxUnreg = 64
	n := 10000
	if lim := raiseFDLimit(t, uint64(n+maxUnreg+1000)); lim < uint64(n+maxUnreg+1000) {
		n = int(lim) - maxUnreg - 1000
		t.Logf("open file limit %d: %d connections", lim, n)
	}
	r := newRig(t, func(c *Config) {
		c.MaxUnregistered = maxUnreg
		c.RegisterTimeout = time.Minute // only the limit closes them here
	})
	base := measure()
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, nc := range conns {
			nc.Close()
		}
	}()
	start := time.Now()
	for i := range n {
		nc, err := net.Dial("tcp", loopback(r.port))
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		conns = append(conns, nc)
		if i%2000 == 1999 {
			r.serving()
		}
	}
	t.Logf("%d connections in %v", n, time.Since(start))
	r.logs.wait(t, 5*time.Second, "too many connections have not registered", "limit=64")

	// The leader holds only the newest maxUnreg; every older one has
	// been closed by it.
	deadline := time.Now().Add(20 * time.Second)
	open := 0
	for i, nc := range conns {
		nc.SetReadDeadline(deadline)
		if i >= n-maxUnreg {
			nc.SetReadDeadline(time.Now().Add(time.Millisecond))
		}
		_, err := nc.Read(make([]byte, 1))
		var ne net.Error
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			if i < n-maxUnreg {
				t.Fatalf("connection %d of %d still open after %v", i, n, time.Since(start))
			}
			open++
		case err == io.EOF || errors.Is(err, syscall.ECONNRESET):
		default:
			t.Fatalf("connection %d: %v", i, err)
		}
	}
	if open != maxUnreg {
		t.Errorf("%d of the newest %d connections open, want all", open, maxUnreg)
	}
	if lines := r.logs.count("too many connections"); lines > warnPerSecond*int(time.Since(start)/time.Second+2) {
		t.Errorf("%d log lines about evictions in %v", lines, time.Since(start))
	} else {
		t.Logf("%d log lines about %d evictions in %v", lines, n-maxUnreg, time.Since(start))
	}

	// A newcomer registers while the flood's newest connections are held.
	nc := r.dial()
	registerRaw(t, nc, "TestChannel", "")
	nc.Close()
	r.serving()
	for _, nc := range conns {
		nc.Close()
	}
	conns = nil
	noLeak(t, base, heapSlack)
	r.serving()
}

// TestHostileUnknownChannel: a register for a channel that the leader
// does not host gets success:false with a clear error, and the connection
// is closed.
func TestHostileUnknownChannel(t *testing.T) {
	r := newRig(t, nil)
	base := measure()
	nc := r.dial()
	mustWrite(t, nc, packetBytes(t, false, 5, registerChannel{ChannelName: "NoSuchChannel"}, nil))
	p := readAnswer(t, NewReader(nc, 0), nc, 5)
	c, _, err := parseConn(p.Conn)
	if _, ok := c.(registerChannelRes); !ok || err != nil {
		t.Fatalf("answer %s, %v", p.Conn, err)
	}
	var res registerResult
	if err := json.Unmarshal(p.App, &res); err != nil {
		t.Fatal(err)
	}
	if res.Success || res.Error == nil || string(res.Error.Code) != codeChannelNotHosted ||
		!strings.Contains(res.Error.Message, `"NoSuchChannel"`) || !strings.Contains(res.Error.Message, "does not host") {
		t.Fatalf("answer %s", p.App)
	}
	closedByPeer(t, nc, 5*time.Second)
	r.logs.wait(t, 5*time.Second, "does not host", "channel=NoSuchChannel", "remote="+nc.LocalAddr().String())
	nc.Close()

	// A Go client of that channel keeps trying, then gives up with
	// ErrNoLeader and the leader's reason.
	cfg := testConfig(t, r.port)
	cfg.Role = RoleFollower
	cfg.MaxWaitTime = 300 * time.Millisecond
	other, err := New("NoSuchChannel", cfg, buildTestReal(newTestReal()))
	if err != nil {
		t.Fatal(err)
	}
	err = other.Ready(context.Background())
	other.Close()
	var re *RemoteError
	if !errors.Is(err, ErrNoLeader) || !errors.As(err, &re) || re.Code != codeChannelNotHosted {
		t.Fatalf("Ready: %v", err)
	}
	r.serving()
	noLeak(t, base, heapSlack)
}

// invokeRaw sends an invoke with the given conn fields and app object and
// returns the answer.
func invokeRaw(t testing.TB, nc net.Conn, r *Reader, id uint64, c invoke, app []byte) (bool, invokeErrorObject) {
	t.Helper()
	mustWrite(t, nc, packetBytes(t, false, id, c, app))
	p := readAnswer(t, r, nc, id)
	conn, _, err := parseConn(p.Conn)
	res, ok := conn.(invokeResult)
	if err != nil || !ok {
		t.Fatalf("answer %s, %v", p.Conn, err)
	}
	var e invokeErrorObject
	if !res.Success {
		if err := json.Unmarshal(p.App, &e); err != nil {
			t.Fatalf("error object %q: %v", p.App, err)
		}
	}
	return res.Success, e
}

// heartbeatRaw checks that nc is still served.
func heartbeatRaw(t testing.TB, nc net.Conn, r *Reader, id uint64) {
	t.Helper()
	mustWrite(t, nc, packetBytes(t, false, id, heartbeat{}, nil))
	readAnswer(t, r, nc, id)
}

// TestHostileUnknownMethod: an invoke of a method the real client does
// not have gets a clear remote error, and the connection stays.
func TestHostileUnknownMethod(t *testing.T) {
	r := newRig(t, nil)
	nc := r.dial()
	rd := registerRaw(t, nc, "TestChannel", "")
	ok, e := invokeRaw(t, nc, rd, 2, invoke{Method: "noSuchMethod"}, nil)
	if ok || !strings.Contains(e.Message, `"noSuchMethod"`) || !strings.Contains(e.Message, "not implemented") {
		t.Fatalf("answer %v %+v", ok, e)
	}
	heartbeatRaw(t, nc, rd, 3)

	// The same through a Go follower: a *RemoteError, same connection.
	_, err := r.good.Invoke(context.Background(), "noSuchMethod")
	var re *RemoteError
	if !errors.As(err, &re) || !strings.Contains(re.Message, "noSuchMethod") {
		t.Fatalf("Invoke: %v", err)
	}
	r.serving()
}

// TestHostileInvalidJSONArgs: arguments that are not valid JSON, with
// JSONCodec, are refused before the real client sees them. The leader
// answers with a SyntaxError (code ERR_CLUSTER_BAD_ARGUMENT) and keeps the
// connection: the packet was well framed, only its content is wrong, so
// the caller learns why and its other calls go on.
func TestHostileInvalidJSONArgs(t *testing.T) {
	r := newRig(t, nil)
	nc := r.dial()
	rd := registerRaw(t, nc, "TestChannel", "")
	for i, bad := range [][]byte{[]byte(`{"a":`), {0xff, 0xfe}, {}, []byte(`1 2`), []byte(`"\ud800`)} {
		ok, e := invokeRaw(t, nc, rd, uint64(10+i), invoke{Method: "echo", ArgLength: 2},
			appendArgs(nil, [][]byte{[]byte(`1`), bad}))
		if ok || e.Name != "SyntaxError" || string(e.Code) != codeBadArgument ||
			!strings.Contains(e.Message, `argument 1 of "echo" is not valid JSON`) {
			t.Fatalf("argument %q: answer %v %+v", bad, ok, e)
		}
	}
	// A oneway invoke has no answer; the leader logs why.
	mustWrite(t, nc, packetBytes(t, false, 20, invoke{Method: "echo", ArgLength: 1, Oneway: true}, appendArgs(nil, [][]byte{[]byte("{")})))
	r.logs.wait(t, 5*time.Second, "oneway invoke failed", "not valid JSON")
	heartbeatRaw(t, nc, rd, 21)
	if ok, e := invokeRaw(t, nc, rd, 22, invoke{Method: "echo", ArgLength: 1}, appendArgs(nil, [][]byte{[]byte(`[1]`)})); !ok {
		t.Fatalf("valid call after invalid ones: %+v", e)
	}
	r.serving()
}

// TestHostileArgFrame: an invoke whose argLength disagrees with its
// frame, or whose argument runs past it, breaks the protocol: the
// connection is closed with a log line that says so.
func TestHostileArgFrame(t *testing.T) {
	r := newRig(t, nil)
	base := measure()
	cases := []struct {
		argLength int
		app       []byte
		why       string
	}{
		{2, appendArgs(nil, [][]byte{[]byte(`1`)}), "argLength disagrees"},
		{0, appendArgs(nil, [][]byte{[]byte(`1`)}), "argLength disagrees"},
		{1, append(appendArgs(nil, [][]byte{[]byte(`1`)}), 0), "argLength disagrees"},
		{1, binary.BigEndian.AppendUint32(nil, 1<<31), "runs past the end"},
		{1 << 30, appendArgs(nil, [][]byte{[]byte(`1`)}), "argLength disagrees"},
	}
	for _, c := range cases {
		nc := r.dial()
		registerRaw(t, nc, "TestChannel", "")
		mustWrite(t, nc, packetBytes(t, false, 2, invoke{Method: "echo", ArgLength: c.argLength}, c.app))
		closedByPeer(t, nc, 5*time.Second)
		r.logs.wait(t, 5*time.Second, "closing follower connection", "remote="+nc.LocalAddr().String(), c.why)
		nc.Close()
	}
	r.serving()
	noLeak(t, base, heapSlack)
}

// TestHostilePacketTooLarge: a packet over Config.MaxPacketSize closes the
// connection as soon as its header arrives; a Go follower refuses to send
// one and keeps its connection.
func TestHostilePacketTooLarge(t *testing.T) {
	const maxPkt = 64 << 10
	r := newRig(t, func(c *Config) {
		c.MaxPacketSize = maxPkt
		c.MaxQueuedBytes = 2 * maxPkt
	})
	base := measure()
	nc := r.dial()
	registerRaw(t, nc, "TestChannel", "")
	arg := bytes.Repeat([]byte("x"), maxPkt)
	arg[0], arg[len(arg)-1] = '"', '"'
	p := packetBytes(t, false, 2, invoke{Method: "echo", ArgLength: 1}, appendArgs(nil, [][]byte{arg}))
	nc.Write(p) // the leader closes before reading it all
	closedByPeer(t, nc, 5*time.Second)
	r.logs.wait(t, 5*time.Second, "closing follower connection", "remote="+nc.LocalAddr().String(), "exceeds the maximum size")
	nc.Close()

	_, err := r.good.Invoke(context.Background(), "echo", json.RawMessage(arg))
	if !errors.Is(err, ErrPacketTooLarge) {
		t.Fatalf("Invoke of %d bytes: %v", len(arg), err)
	}
	r.serving()
	noLeak(t, base, heapSlack)
}

// TestHostileUnknownType: requests of unknown types are ignored and
// logged once per connection, however many arrive.
func TestHostileUnknownType(t *testing.T) {
	r := newRig(t, nil)
	nc := r.dial()
	rd := registerRaw(t, nc, "TestChannel", "")
	var b []byte
	for i := range 1000 {
		b = append(b, rawHeader(false, uint64(100+i), 0, 0)...)
		conn := []byte(`{"type":"bogus` + strings.Repeat("x", 200) + `"}`)
		binary.BigEndian.PutUint32(b[len(b)-8:], uint32(len(conn)))
		b = append(b, conn...)
	}
	mustWrite(t, nc, b)
	heartbeatRaw(t, nc, rd, 2)
	if n := r.logs.count("unknown type", "remote="+nc.LocalAddr().String()); n != 1 {
		t.Fatalf("%d log lines about unknown types, want 1", n)
	}
	if l, _ := r.logs.find("unknown type"); strings.Contains(l, strings.Repeat("x", 64)) {
		t.Fatalf("the type is not cut short in the log: %s", l)
	}
	r.serving()
}

// TestHostileStuckReader: a follower that subscribes and then stops
// reading its socket. The leader keeps pushing to the others without
// waiting, queues at most Config.MaxQueuedBytes for the stuck one, then
// drops it with a log line; memory goes back to what it was.
func TestHostileStuckReader(t *testing.T) {
	const maxPkt = 64 << 10
	r := newRig(t, func(c *Config) {
		c.MaxPacketSize = maxPkt
		c.MaxQueuedBytes = 4 * maxPkt
		c.ResponseTimeout = 10 * time.Second // bounds a write: only the queue bound may drop it
	})
	base := measure()
	nc := r.dial()
	rd := registerRaw(t, nc, "TestChannel", "")
	reg, _ := marshalReg(goodReg)
	mustWrite(t, nc, packetBytes(t, false, 2, subscribe{Key: subscriptionKey(reg), Reg: reg}, nil))
	// The subscription is in place once a later request is answered.
	heartbeatRaw(t, nc, rd, 3)

	value := strings.Repeat("v", 32<<10)
	var slowest time.Duration
	var pushes int
	deadline := time.Now().Add(30 * time.Second)
	for {
		if l, _ := r.logs.find("closing follower connection", "remote="+nc.LocalAddr().String()); l != "" {
			if !strings.Contains(l, "not reading") {
				t.Fatalf("log line does not say why: %s", l)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stuck follower not dropped after %d pushes of 32 KiB", pushes)
		}
		pushes++
		start := time.Now()
		ok, err := Invoke[bool](context.Background(), r.lead, "push", goodReg, fmt.Sprintf("%d %s", pushes, value))
		if err != nil || !ok {
			t.Fatalf("push %d: %v, %v", pushes, ok, err)
		}
		slowest = max(slowest, time.Since(start))
		// Paced by the follower that reads, so that only the stuck
		// one falls behind.
		r.waitValue(fmt.Sprintf(`"%d %s"`, pushes, value), 10*time.Second)
	}
	t.Logf("dropped after %d pushes of 32 KiB (%d KiB); slowest push %v", pushes, pushes*32, slowest)
	if slowest > 5*time.Second {
		t.Errorf("a push took %v: the stuck follower blocked the leader", slowest)
	}
	r.waitValue(fmt.Sprintf(`"%d %s"`, pushes, value), 10*time.Second)
	closedByPeer(t, nc, 10*time.Second) // after what the kernel had buffered
	nc.Close()
	waitUntil(t, 10*time.Second, "the stuck follower forgotten", func() bool {
		r.lead.lead().mu.Lock()
		defer r.lead.lead().mu.Unlock()
		return len(r.lead.lead().conns) == 1
	})
	r.serving()
	noLeak(t, base, heapSlack)
}

// TestSecret: with Config.Secret set, a follower with the right secret is
// served; a wrong or missing one is refused with a clear error at Ready
// and a log line on the leader.
func TestSecret(t *testing.T) {
	r := newRig(t, func(c *Config) { c.Secret = "correct horse" })
	base := measure()
	for _, secret := range []string{"wrong", "", "correct hors", "correct horse "} {
		cfg := testConfig(t, r.port)
		cfg.Role = RoleFollower
		cfg.Secret = secret
		c, err := New("TestChannel", cfg, buildTestReal(newTestReal()))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err = c.Ready(ctx)
		cancel()
		c.Close()
		var re *RemoteError
		if !errors.As(err, &re) || re.Code != "ERR_CLUSTER_AUTH" || !strings.Contains(err.Error(), "wrong secret") {
			t.Fatalf("secret %q: Ready: %v", secret, err)
		}
		r.logs.wait(t, 5*time.Second, "wrong secret")
	}
	nc := r.dial()
	mustWrite(t, nc, packetBytes(t, false, 1, registerChannel{ChannelName: "TestChannel"}, nil))
	p := readAnswer(t, NewReader(nc, 0), nc, 1)
	if !bytes.Contains(p.App, []byte(`"success":false`)) {
		t.Fatalf("register without secret: %s", p.App)
	}
	closedByPeer(t, nc, 5*time.Second)
	nc.Close()
	r.serving() // the rig's follower has the right secret
	noLeak(t, base, heapSlack)
}

func TestSecretsEqual(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want bool
	}{
		{"s", "s", true},
		{"", "", true},
		{"secret", "secreT", false},
		{"secret", "secret\x00", false},
		{"secret", "", false},
		{strings.Repeat("a", 1000), strings.Repeat("a", 1000), true},
		{strings.Repeat("a", 1000), strings.Repeat("a", 999) + "b", false},
	} {
		if got := secretsEqual(c.a, c.b); got != c.want {
			t.Errorf("secretsEqual(%.10q, %.10q) = %v", c.a, c.b, got)
		}
	}
}

// TestHostileInvokeFlood: a follower sends far more slow invokes than
// the leader runs at once for one connection. The leader runs
// maxConnInvokes of them, stops reading that connection until some end,
// keeps serving the others, and in the end answers every one.
func TestHostileInvokeFlood(t *testing.T) {
	const n = maxConnInvokes + 500
	r := newRig(t, nil)
	base := measure()
	nc := r.dial()
	rd := registerRaw(t, nc, "TestChannel", "")
	arg := appendArgs(nil, [][]byte{[]byte("1500")})
	var b []byte
	for i := range n {
		b = append(b, packetBytes(t, false, uint64(100+i), invoke{Method: "sleep", ArgLength: 1}, arg)...)
	}
	mustWrite(t, nc, b)
	sleeping := func() int {
		r.real.mu.Lock()
		defer r.real.mu.Unlock()
		return r.real.sleeping
	}
	waitUntil(t, 10*time.Second, "the invokes running", func() bool { return sleeping() >= maxConnInvokes })
	if n := sleeping(); n != maxConnInvokes {
		t.Errorf("%d invokes running, want %d", n, maxConnInvokes)
	}
	if g := runtime.NumGoroutine(); g > base.goroutines+maxConnInvokes+20 {
		t.Errorf("%d goroutines with %d invokes sent, base %d", g, n, base.goroutines)
	}
	r.serving()
	seen := map[uint64]bool{}
	nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	for len(seen) < n {
		var p Packet
		if err := rd.ReadPacket(&p); err != nil {
			t.Fatalf("after %d answers: %v", len(seen), err)
		}
		if c, _, _ := parseConn(p.Conn); c != (invokeResult{Success: true}) {
			t.Fatalf("answer %s %s", p.Conn, p.App)
		}
		seen[p.ID] = true
	}
	nc.Close()
	r.serving()
	// The runtime keeps the descriptors of ended goroutines for reuse,
	// some 400 bytes each: 1024 at once leave about 400 KiB.
	noLeak(t, base, heapSlack+maxConnInvokes<<9)
}

// fuzzReal is a real client that answers at once, for FuzzLeaderInput.
type fuzzReal struct{}

func (fuzzReal) Invoke(_ context.Context, method string, args []Value) (any, error) {
	if method == "fail" {
		return nil, errors.New("failed on purpose")
	}
	return len(args), nil
}
func (fuzzReal) Subscribe(_ json.RawMessage, push func(any)) error { push("v"); return nil }
func (fuzzReal) Unsubscribe(json.RawMessage) error                 { return nil }
func (fuzzReal) Publish(context.Context, json.RawMessage) error    { return nil }

// FuzzLeaderInput feeds arbitrary bytes to a leader as one follower
// connection, from the first byte (registered false) or after a valid
// register_channel (registered true). The leader must neither panic nor
// hang: once the peer has sent everything and closed, the leader closes
// its end. The bytes go through a net.Pipe handed to the port's register
// path, so that no loopback port is spent per input.
func FuzzLeaderInput(f *testing.F) {
	cfg := testConfig(f, freePort(f))
	cfg.Role = RoleLeader
	cfg.Logger = slog.New(slog.DiscardHandler)
	cfg.MaxPacketSize = 64 << 10
	cfg.MaxQueuedBytes = 256 << 10
	cfg.RegisterTimeout = 10 * time.Second
	cfg.AllowAnyUser = true // a net.Pipe has no owner in the socket table
	c, err := New("TestChannel", cfg, func(context.Context) (RealClient, error) { return fuzzReal{}, nil })
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { c.Close() })
	if err := c.Ready(context.Background()); err != nil {
		f.Fatal(err)
	}
	h := c.lead().host

	pk := func(c connObject, app []byte) []byte {
		b, _ := appendPacket(nil, false, 7, 1000, c, app)
		return b
	}
	reg := []byte(`{"k":1}`)
	for _, seed := range [][]byte{
		pk(invoke{Method: "echo", ArgLength: 2}, appendArgs(nil, [][]byte{[]byte(`1`), []byte(`"x"`)})),
		pk(invoke{Method: "fail", ArgLength: 1}, appendArgs(nil, [][]byte{[]byte(`{`)})),
		pk(invoke{Method: "publish", ArgLength: 1, Oneway: true}, appendArgs(nil, [][]byte{reg})),
		append(pk(subscribe{Key: subscriptionKey(reg), Reg: reg}, nil), pk(unSubscribe{Key: subscriptionKey(reg), Reg: reg}, nil)...),
		pk(heartbeat{}, nil),
		pk(registerChannel{ChannelName: "TestChannel"}, nil),
		rawHeader(false, 1, 1<<30, 1<<30),
		[]byte("GET / HTTP/1.1\r\n\r\n"),
	} {
		f.Add(seed, true)
		f.Add(append(pk(registerChannel{ChannelName: "TestChannel"}, nil), seed...), false)
	}
	f.Add(pk(registerChannel{ChannelName: "Other"}, nil), false)

	regPacket := pk(registerChannel{ChannelName: "TestChannel"}, nil)
	f.Fuzz(func(t *testing.T, data []byte, registered bool) {
		if registered {
			data = append(slices.Clip(regPacket), data...)
		}
		ours, pipe := net.Pipe()
		theirs := &closeSignal{Conn: pipe, closed: make(chan struct{})}
		h.mu.Lock()
		h.unreg = append(h.unreg, theirs)
		h.wg.Add(1)
		h.mu.Unlock()
		go h.register(theirs)

		drained := make(chan struct{})
		go func() {
			defer close(drained)
			io.Copy(io.Discard, ours)
		}()
		ours.SetWriteDeadline(time.Now().Add(10 * time.Second))
		_, err := ours.Write(data)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the leader stopped reading after %d bytes", len(data))
		}
		ours.Close()
		select {
		case <-theirs.closed:
		case <-time.After(10 * time.Second):
			t.Fatal("the leader did not close the connection after the peer did")
		}
		<-drained
	})
}

// closeSignal is a connection that says when it was closed.
type closeSignal struct {
	net.Conn
	once   sync.Once
	closed chan struct{}
}

func (c *closeSignal) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// RemoteAddr is a loopback address, as a follower's always is: the leader
// takes the port of it to look up the follower's user.
func (c *closeSignal) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }
