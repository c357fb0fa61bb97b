package clusterclient

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestInvokeWithoutTimeoutIsBounded: a request whose packet carries no
// timeout (0) still runs with the leader's ResponseTimeout as deadline, so
// no peer can hold the real client forever. The method honours its
// context, and the caller gets the error as an answer.
func TestInvokeWithoutTimeoutIsBounded(t *testing.T) {
	r := newRig(t, func(c *Config) { c.ResponseTimeout = 200 * time.Millisecond })
	nc := r.dial()
	rd := registerRaw(t, nc, "TestChannel", "")
	args := appendArgs(nil, [][]byte{[]byte("60000")})
	b, err := appendPacket(nil, false, 2, 0, invoke{Method: "sleep", ArgLength: 1}, args)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	mustWrite(t, nc, b)
	p := readAnswer(t, rd, nc, 2)
	took := time.Since(start)
	conn, _, err := parseConn(p.Conn)
	if res, ok := conn.(invokeResult); err != nil || !ok || res.Success {
		t.Fatalf("answer %s %s, %v", p.Conn, p.App, err)
	}
	if took > 10*time.Second {
		t.Fatalf("the answer took %v", took)
	}
	t.Logf("answered after %v: %s", took, p.App)
	r.serving()
}

// holdReal is a real client whose every method sends the live heap, taken
// after a collection while the call's arguments are held, on started,
// then waits for its context to end.
type holdReal struct{ started chan uint64 }

func (r *holdReal) Invoke(ctx context.Context, _ string, args []Value) (any, error) {
	r.started <- measure().heap
	<-ctx.Done()
	runtime.KeepAlive(args)
	return nil, ctx.Err()
}

// holdLeader starts a leader of holdReal on a free port, with the changes
// tune makes, and registers a raw connection to it.
func holdLeader(t *testing.T, tune func(*Config)) (*Client, *holdReal, net.Conn, *Reader) {
	real := &holdReal{started: make(chan uint64, 16)}
	cfg := testConfig(t, freePort(t))
	cfg.Role = RoleLeader
	tune(cfg)
	c, err := New("TestChannel", cfg, func(context.Context) (RealClient, error) { return real, nil })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Ready(context.Background()); err != nil {
		t.Fatal(err)
	}
	nc, err := net.Dial("tcp", loopback(cfg.Port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return c, real, nc, registerRaw(t, nc, "TestChannel", "")
}

// tinyArgs is an invoke of n arguments of one byte each, with the given
// packet timeout in ms.
func tinyArgs(t testing.TB, id uint64, n int, timeout int32) []byte {
	args := make([][]byte, n)
	for i := range args {
		args[i] = []byte("1")
	}
	b, err := appendPacket(nil, false, id, timeout, invoke{Method: "hold", ArgLength: n}, appendArgs(nil, args))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func waitStarted(t testing.TB, real *holdReal) uint64 {
	t.Helper()
	select {
	case heap := <-real.started:
		return heap
	case <-time.After(10 * time.Second):
		t.Fatal("no invoke started within 10 s")
		return 0
	}
}

// TestInvokeArgCost: what a running invoke holds, measured in the real
// client's method while it runs, is within what the leader counts
// against Config.MaxQueuedBytes for it, and not far below: many tiny
// arguments cost far more than their bytes on the wire. (The leader
// counts argCost per argument, the peak while call builds the []Value;
// in the method the [][]byte it was built from is gone.)
func TestInvokeArgCost(t *testing.T) {
	const n = 200_000
	c, real, nc, _ := holdLeader(t, func(*Config) {})
	b := tinyArgs(t, 2, n, 3000)
	base := measure().heap
	mustWrite(t, nc, b)
	got := waitStarted(t, real)
	runtime.KeepAlive(b)
	var counted int
	c.lead().mu.Lock()
	for sc := range c.lead().conns {
		sc.gate.Lock()
		counted += sc.held
		sc.gate.Unlock()
	}
	c.lead().mu.Unlock()
	held := int64(got) - int64(base)
	t.Logf("%d one-byte arguments: %d bytes held in the method, %.1f per argument beyond its 5 bytes of frame; %d counted",
		n, held, float64(held-5*n)/n, counted)
	if held > int64(counted)+64<<10 || held < int64(counted)/2 {
		t.Fatalf("an invoke of %d tiny arguments holds %d bytes, the leader counts %d", n, held, counted)
	}
}

// TestInvokeTinyArgFlood: a follower floods invokes of as many one-byte
// arguments as a packet fits, each of which would hold several times
// Config.MaxQueuedBytes once decoded, then two that fit together, against
// a method that runs until its context ends. The large ones are refused
// with a clear error before their arguments are decoded, the two others
// run, the connection stays, and the leader's heap stays within the
// bound for one connection: MaxQueuedBytes of running invokes, as much of
// queued writes, and the packet read last.
func TestInvokeTinyArgFlood(t *testing.T) {
	const packet, huge, fits = 1 << 20, 8, 2
	_, real, nc, rd := holdLeader(t, func(c *Config) {
		c.MaxPacketSize, c.MaxQueuedBytes, c.MaxInvokeTime = packet, 2*packet, time.Minute
	})
	var flood []byte
	for i := range huge {
		flood = append(flood, tinyArgs(t, uint64(10+i), (packet-256)/5, 60000)...)
	}
	for i := range fits { // each holds just under half of MaxQueuedBytes
		flood = append(flood, tinyArgs(t, uint64(20+i), packet/(argCost+5)/2-256, 60000)...)
	}
	base := measure()
	wrote := make(chan error, 1)
	go func() { _, err := nc.Write(flood); wrote <- err }()
	for range fits {
		waitStarted(t, real)
	}
	u := measure()
	runtime.KeepAlive(flood)
	bound := uint64(2*2*packet + packet)
	t.Logf("heap %d KiB -> %d KiB, bound %d KiB", base.heap>>10, u.heap>>10, bound>>10)
	if u.heap > base.heap+bound+heapSlack {
		t.Fatalf("heap grew by %d KiB with invokes of tiny arguments, bound %d KiB", (u.heap-base.heap)>>10, bound>>10)
	}
	for i := range huge {
		p := readAnswer(t, rd, nc, uint64(10+i))
		var e invokeErrorObject
		json.Unmarshal(p.App, &e)
		if c, _, _ := parseConn(p.Conn); c != (invokeResult{}) || e.Code != codeTooLarge || !strings.Contains(e.Message, "Config.MaxQueuedBytes") {
			t.Fatalf("answer %s %s", p.Conn, p.App)
		}
		if i == 0 {
			t.Logf("refused: %s", e.Message)
		}
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	heartbeatRaw(t, nc, rd, 30)
}

// waitFollowing waits until c follows a leader.
func waitFollowing(t testing.TB, c *Client, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		c.mu.Lock()
		fol, ready := c.fol(), c.ready
		c.mu.Unlock()
		if fol != nil {
			return
		}
		select {
		case <-ready:
		case <-deadline:
			t.Fatalf("not following within %v", timeout)
		}
	}
}

// openFiles counts the descriptors of this process, or -1 without
// /proc/self/fd.
func openFiles() int {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(fds)
}

// TestMaxConns: with Config.MaxConns 3 and a follower in one slot, an
// attacker that registers 20 connections gets two slots and refusals
// with a code naming the limit, the leader holds no descriptor for the
// others beyond MaxUnregistered, a new Go follower's Ready says why it
// cannot join, and it joins as soon as a slot frees.
func TestMaxConns(t *testing.T) {
	const maxConns, maxUnreg, attack = 3, 4, 20
	if err := VerifyConfig(&Config{MaxConns: -1}); err == nil || !strings.Contains(err.Error(), "MaxConns") {
		t.Fatalf("VerifyConfig with MaxConns -1: %v", err)
	}
	if d := withDefaults(&Config{}); d.MaxConns != 512 {
		t.Fatalf("default MaxConns %d", d.MaxConns)
	}
	r := newRig(t, func(c *Config) { c.MaxConns, c.MaxUnregistered = maxConns, maxUnreg })
	files := openFiles()
	var holders []net.Conn
	for range attack {
		nc := r.dial()
		mustWrite(t, nc, packetBytes(t, false, 1, registerChannel{ChannelName: "TestChannel"}, nil))
		p := readAnswer(t, NewReader(nc, 0), nc, 1)
		var res registerResult
		if err := json.Unmarshal(p.App, &res); err != nil {
			t.Fatal(err)
		}
		if res.Success {
			holders = append(holders, nc)
		} else if res.Error == nil || res.Error.Code != codeTooManyConns || !strings.Contains(res.Error.Message, "Config.MaxConns") {
			t.Fatalf("refusal %s", p.App)
		}
	}
	if len(holders) != maxConns-1 {
		t.Fatalf("%d of %d connections registered beside the follower, limit %d", len(holders), attack, maxConns)
	}
	r.logs.wait(t, 5*time.Second, "too many connections")
	// This process holds both ends: the attacker's, and the leader's of
	// the registered and the unregistered connections.
	n := openFiles()
	t.Logf("descriptors: %d before %d connections, %d after", files, attack, n)
	if files >= 0 && n > files+attack+maxConns-1+maxUnreg+2 {
		t.Fatalf("%d descriptors open, %d before %d connections", n, files, attack)
	}
	r.serving()

	cfg := *r.cfg
	cfg.Role, cfg.Logger = RoleFollower, testConfig(t, r.port).Logger
	c, err := New("TestChannel", &cfg, buildTestReal(newTestReal()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var re *RemoteError
	if err := c.Ready(ctx); !errors.As(err, &re) || re.Code != codeTooManyConns {
		t.Fatalf("Ready with every slot taken: %v", err)
	}
	t.Logf("Ready with every slot taken: %v", re)
	holders[0].Close()
	waitFollowing(t, c, 5*time.Second)
	if n, err := Invoke[int](context.Background(), c, "echo", 7); err != nil || n != 7 {
		t.Fatalf("echo = %d, %v", n, err)
	}
	r.serving()
}

// TestFaultWaitingInvokesEndWithConns: connections that fill their
// invoke slots with calls that wait, asking for the longest timeout a
// packet can carry, then close, leave nothing behind: three rounds of
// ten such connections, and the leader's goroutines and heap are back to
// their baseline once they are gone. Before invokes ended with their
// connection, each round left 10,240 goroutines waiting for a minute.
func TestFaultWaitingInvokesEndWithConns(t *testing.T) {
	r := newRig(t, func(c *Config) { c.MaxInvokeTime = time.Minute })
	base := measure()
	arg := appendArgs(nil, [][]byte{[]byte("60000")})
	one, err := appendPacket(nil, false, 0, math.MaxInt32, invoke{Method: "sleep", ArgLength: 1}, arg)
	if err != nil {
		t.Fatal(err)
	}
	sleeping := func() int {
		r.real.mu.Lock()
		defer r.real.mu.Unlock()
		return r.real.sleeping
	}
	for round := range 3 {
		var ncs []net.Conn
		for range 10 {
			nc := r.dial()
			registerRaw(t, nc, "TestChannel", "")
			mustWrite(t, nc, bytes.Repeat(one, maxConnInvokes))
			ncs = append(ncs, nc)
		}
		waitUntil(t, 30*time.Second, "every invoke running", func() bool { return sleeping() == 10*maxConnInvokes })
		for _, nc := range ncs {
			nc.Close()
		}
		waitUntil(t, 30*time.Second, "every invoke ended", func() bool { return sleeping() == 0 })
		t.Logf("round %d: %d invokes ran and ended with their connections", round, 10*maxConnInvokes)
	}
	r.serving()
	noLeak(t, base, heapSlack+10*maxConnInvokes<<9)
}
