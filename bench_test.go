package clusterclient

// Benchmarks of the runtime beside two raw TCP baselines that move the
// same bytes over loopback: the raw echo (one reader and one writer,
// pipelined) and the same-shape floor (a goroutine per call on both
// sides, no protocol). See TestPerfReport for the ratios.
//
//	go test -run '^$' -bench . -count 5
//	CLUSTERCLIENT_PERF=1 CLUSTERCLIENT_PERF_ROUNDS=5 go test -run '^TestPerfReport$' -v -count 1 .
//
// What a call costs, and why the runtime is built as it is.
//
// A call crosses loopback twice, as the raw echo does. On top of that
// the runtime has the shape of net/rpc: on the follower, the caller
// writes its request (or queues it behind a write under way) and waits on
// a channel that the connection's one reader goroutine fills; on the
// leader, the connection's one reader goroutine starts a goroutine per
// invoke, which writes its own answer. Each of those hand-offs wakes a
// goroutine, and on a virtual machine with an idle second core a wake-up
// can cost tens of microseconds: that, not the protocol, is most of the
// difference between the raw echo and the same-shape floor, and the
// floor is what the ratios of TestPerfReport are taken against.
//
// The runtime does not read a caller's answer on the caller's goroutine,
// run quick methods on the reader, or hold pushed values until the next
// call, although each of these made the benchmarks faster: each made
// some caller wait for another (a fast call behind a slow one, a pushed
// value behind a call), and BenchmarkFastBesideSlow and BenchmarkPushDelay
// measure exactly that. Measured in one run with the leader's read
// buffer at 4, 8 and 16 KiB (64 calls in flight, 1 KiB arguments), the
// rate did not change, so a follower connection keeps 4 KiB, which is
// most of what an idle one costs the leader (BenchmarkIdleFollowers).
// Taking the leader's json.Valid check of each argument out did not change
// it either.

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// benchInFlight is the number of requests in flight in the concurrent
// benchmarks.
const benchInFlight = 64

// benchSizes are the encoded sizes of the invoke argument.
var benchSizes = []int{32, 1024}

func sizeName(n int) string {
	if n >= 1024 {
		return strconv.Itoa(n/1024) + "KiB"
	}
	return strconv.Itoa(n) + "B"
}

// benchArg returns a JSON string that encodes to exactly n bytes, so that
// the echo's result is byte for byte the argument.
func benchArg(n int) json.RawMessage {
	return json.RawMessage(`"` + strings.Repeat("x", n-2) + `"`)
}

// rawRequest returns the invoke packet that Client.Invoke(ctx, "echo",
// arg) sends, built with the real encoder, for the raw baselines.
func rawRequest(arg []byte, timeout time.Duration) []byte {
	b, err := appendInvoke(nil, 1, int32(timeout/time.Millisecond), "echo", false, [][]byte{arg}, DefaultMaxPacketSize)
	if err != nil {
		panic(err)
	}
	return b
}

// readFrame reads one length-prefixed frame (a packet header and its
// body) into buf, with no checks beyond the lengths.
func readFrame(r *bufio.Reader, buf []byte) ([]byte, error) {
	if cap(buf) < HeaderSize {
		buf = make([]byte, 0, 4096)
	}
	buf = buf[:HeaderSize]
	if _, err := io.ReadFull(r, buf); err != nil {
		return buf, err
	}
	n := HeaderSize + int(binary.BigEndian.Uint32(buf[16:])) + int(binary.BigEndian.Uint32(buf[20:]))
	if n > 64<<20 {
		return buf, fmt.Errorf("frame of %d bytes", n)
	}
	buf = slices.Grow(buf, n-HeaderSize)[:n]
	_, err := io.ReadFull(r, buf[HeaderSize:])
	return buf, err
}

// frameBuffered reports whether a whole frame is waiting in r.
func frameBuffered(r *bufio.Reader) bool {
	if r.Buffered() < HeaderSize {
		return false // Peek would wait for more
	}
	h, _ := r.Peek(HeaderSize)
	n := HeaderSize + int(binary.BigEndian.Uint32(h[16:])) + int(binary.BigEndian.Uint32(h[20:]))
	return r.Buffered() >= n
}

// echoAnswer appends to out the invoke_result that the leader sends for
// the echo of the single argument of the invoke frame in, built with the
// real encoder.
func echoAnswer(out, in []byte) []byte {
	arg := in[HeaderSize+int(binary.BigEndian.Uint32(in[16:])):]
	if len(arg) >= 4 {
		arg = arg[4:] // one framed argument
	}
	out, _ = appendPacket(out, true, binary.BigEndian.Uint64(in[4:]), int32(binary.BigEndian.Uint32(in[12:])), invokeResult{Success: true}, arg)
	return out
}

// serveRawEcho answers each frame read from nc with its echoAnswer, on
// the goroutine that reads. Writes are flushed when no whole frame is
// waiting, so pipelined requests are answered in batches.
func serveRawEcho(nc net.Conn) {
	defer nc.Close()
	br := bufio.NewReaderSize(nc, 64<<10)
	bw := bufio.NewWriterSize(nc, 64<<10)
	var in, out []byte
	var err error
	for {
		if bw.Buffered() > 0 && !frameBuffered(br) && bw.Flush() != nil {
			return
		}
		if in, err = readFrame(br, in); err != nil {
			return
		}
		out = echoAnswer(out[:0], in)
		bw.Write(out)
	}
}

// serveShape is the server of the same-shape floor: each frame read from
// nc is answered by a goroutine of its own, which writes its echoAnswer
// under a lock.
func serveShape(nc net.Conn) {
	defer nc.Close()
	br := bufio.NewReaderSize(nc, 64<<10)
	var mu sync.Mutex
	var buf []byte
	for {
		var err error
		if buf, err = readFrame(br, buf); err != nil {
			return
		}
		in := slices.Clone(buf)
		go func() {
			out := echoAnswer(nil, in)
			mu.Lock()
			defer mu.Unlock()
			nc.Write(out)
		}()
	}
}

// rawEchoServer is a raw echo listener and a same-shape one, in this
// process or a child.
type rawEchoServer struct {
	addr, shape string
}

// startRawEcho starts the raw servers in this process.
func startRawEcho(tb testing.TB) *rawEchoServer {
	var addrs [2]string
	for i, serve := range []func(net.Conn){serveRawEcho, serveShape} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		serveEach(tb, ln, serve)
		addrs[i] = ln.Addr().String()
	}
	return &rawEchoServer{addr: addrs[0], shape: addrs[1]}
}

// startRawEchoChild starts the raw servers in a child process.
func startRawEchoChild(tb testing.TB) *rawEchoServer {
	k := startChild(tb, childSpec{Mode: "echo"})
	m := k.event(func(m msg) bool { return m["event"] == "ready" || m["event"] == "error" }, 10*time.Second)
	if m["event"] != "ready" {
		tb.Fatalf("echo child: %v", m["err"])
	}
	return &rawEchoServer{addr: loopback(int(m["port"].(float64))), shape: loopback(int(m["shapePort"].(float64)))}
}

// rawClient is one connection to a raw echo server.
type rawClient struct {
	nc  net.Conn
	br  *bufio.Reader
	req []byte
	buf []byte
	id  uint64
}

func dialRaw(tb testing.TB, s *rawEchoServer, arg []byte) *rawClient {
	nc, err := net.Dial("tcp", s.addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { nc.Close() })
	return &rawClient{nc: nc, br: bufio.NewReaderSize(nc, 64<<10), req: rawRequest(arg, 3*time.Second)}
}

// roundTrip sends one request and reads its answer.
func (c *rawClient) roundTrip() error {
	c.id++
	binary.BigEndian.PutUint64(c.req[4:], c.id)
	if _, err := c.nc.Write(c.req); err != nil {
		return err
	}
	var err error
	c.buf, err = readFrame(c.br, c.buf)
	return err
}

// pipeline sends n requests keeping up to window in flight, one writer
// and one reader goroutine, writes batched while the window is open.
func (c *rawClient) pipeline(n, window int) error {
	slots := make(chan struct{}, window)
	errc := make(chan error, 1)
	go func() {
		var err error
		for range n {
			if c.buf, err = readFrame(c.br, c.buf); err != nil {
				break
			}
			<-slots
		}
		errc <- err
	}()
	bw := bufio.NewWriterSize(c.nc, 64<<10)
	for range n {
		select {
		case slots <- struct{}{}:
		default:
			if err := bw.Flush(); err != nil {
				return err
			}
			slots <- struct{}{}
		}
		c.id++
		binary.BigEndian.PutUint64(c.req[4:], c.id)
		bw.Write(c.req)
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	return <-errc
}

// shapeClient is the client of the same-shape floor: each call writes its
// request under a lock and waits on a channel of its own, which one
// reader goroutine fills. It is what any client that gives each call a
// goroutine of its own pays, with no protocol at all.
type shapeClient struct {
	nc  net.Conn
	req []byte // the request frame; each call copies it and sets its id

	wmu sync.Mutex // held while a request is written

	mu      sync.Mutex
	lastID  uint64                 // guarded by mu
	pending map[uint64]chan []byte // guarded by mu
	err     error                  // guarded by mu: why the reader stopped
}

func dialShape(tb testing.TB, s *rawEchoServer, arg []byte) *shapeClient {
	nc, err := net.Dial("tcp", s.shape)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { nc.Close() })
	c := &shapeClient{nc: nc, req: rawRequest(arg, 3*time.Second), pending: map[uint64]chan []byte{}}
	go c.readLoop(bufio.NewReaderSize(nc, 64<<10))
	return c
}

func (c *shapeClient) readLoop(br *bufio.Reader) {
	var buf []byte
	for {
		var err error
		buf, err = readFrame(br, buf)
		c.mu.Lock()
		if err != nil {
			c.err = err
			for id, ch := range c.pending {
				delete(c.pending, id)
				close(ch)
			}
			c.mu.Unlock()
			return
		}
		id := binary.BigEndian.Uint64(buf[4:])
		ch := c.pending[id]
		delete(c.pending, id)
		c.mu.Unlock()
		if ch != nil {
			ch <- slices.Clone(buf)
		}
	}
}

// call sends one request and waits for its answer.
func (c *shapeClient) call() error {
	ch := make(chan []byte, 1)
	req := slices.Clone(c.req)
	c.mu.Lock()
	if c.err != nil {
		defer c.mu.Unlock()
		return c.err
	}
	c.lastID++
	binary.BigEndian.PutUint64(req[4:], c.lastID)
	c.pending[c.lastID] = ch
	c.mu.Unlock()
	c.wmu.Lock()
	_, err := c.nc.Write(req)
	c.wmu.Unlock()
	if err != nil {
		return err
	}
	if _, ok := <-ch; !ok {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.err
	}
	return nil
}

// benchChildMain runs the benchmark child modes of childSpec.Mode:
//
//	"echo":   the raw echo and the same-shape servers on free loopback
//	          ports; prints {"event":"ready","port":p,"shapePort":q}
//	"idlers": spec.Count raw connections to spec.Port that register
//	          spec.Name and then stay silent; prints {"event":"ready"}
//
// Both run until stdin closes.
func benchChildMain(spec childSpec) int {
	enc := json.NewEncoder(os.Stdout)
	switch spec.Mode {
	case "echo":
		ready := msg{"event": "ready"}
		for _, s := range []struct {
			key   string
			serve func(net.Conn)
		}{{"port", serveRawEcho}, {"shapePort", serveShape}} {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				enc.Encode(msg{"event": "error", "err": err.Error()})
				return 1
			}
			go func() {
				for {
					nc, err := ln.Accept()
					if err != nil {
						return
					}
					go s.serve(nc)
				}
			}()
			ready[s.key] = ln.Addr().(*net.TCPAddr).Port
		}
		enc.Encode(ready)
	case "idlers":
		raiseFileLimit(spec.Count + 64)
		conns, err := dialIdlers(spec.Port, spec.Name, spec.Count)
		if err != nil {
			enc.Encode(msg{"event": "error", "err": err.Error()})
			return 1
		}
		defer func() {
			for _, nc := range conns {
				nc.Close()
			}
		}()
		enc.Encode(msg{"event": "ready", "count": len(conns)})
	default:
		enc.Encode(msg{"event": "error", "err": "unknown mode " + spec.Mode})
		return 2
	}
	io.Copy(io.Discard, os.Stdin)
	return 0
}

// dialIdlers opens n connections to the leader on port, one after the
// other, and registers name on each, waiting for every answer.
func dialIdlers(port int, name string, n int) ([]net.Conn, error) {
	var conns []net.Conn
	for i := range n {
		nc, err := net.Dial("tcp", loopback(port))
		if err != nil {
			return conns, fmt.Errorf("connection %d: %w", i, err)
		}
		conns = append(conns, nc)
		b, _ := appendPacket(nil, false, uint64(i+1), 3000, registerChannel{ChannelName: name}, nil)
		if _, err := nc.Write(b); err != nil {
			return conns, err
		}
		var p Packet
		if err := NewReader(nc, 1<<20).ReadPacket(&p); err != nil {
			return conns, fmt.Errorf("connection %d: %w", i, err)
		}
		if !strings.Contains(string(p.App), `"success":true`) {
			return conns, fmt.Errorf("connection %d: register refused: %s", i, p.App)
		}
	}
	return conns, nil
}

// raiseFileLimit raises the soft limit on open files to at least n if
// the hard limit allows.
func raiseFileLimit(n int) {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) != nil || l.Cur >= uint64(n) {
		return
	}
	l.Cur = min(uint64(n), l.Max)
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
}

// benchCluster is a follower Client whose leader is in this process or
// in a child process.
type benchCluster struct {
	fol  *Client
	lead *child // the leader's process, when it is a child
}

// Where the leader of a benchmark runs, and with which real client.
const (
	kindProc        = "proc"         // a child process; the test real client
	kindProcValue   = "proc-value"   // a child process; valueEcho
	kindInproc      = "inproc"       // this process; the test real client
	kindInprocValue = "inproc-value" // this process; valueEcho
)

// benchKinds are the leader placements of BenchmarkInvoke.
var benchKinds = []string{kindProcValue, kindProc, kindInprocValue, kindInproc}

// valueEcho is a real client whose every method returns its first
// argument as it came, without decoding it: the leader's part of an
// invoke without the test real client's JSON work ("echo" decodes its
// argument and encodes it again).
type valueEcho struct{}

func (valueEcho) Invoke(_ context.Context, _ string, args []Value) (any, error) {
	if len(args) == 0 {
		return nil, nil
	}
	return args[0], nil
}

// startBenchCluster starts a leader of the given kind and a follower
// client in this process.
func startBenchCluster(tb testing.TB, kind string) *benchCluster {
	port := freePort(tb)
	c := &benchCluster{}
	if kind == kindProc || kind == kindProcValue {
		c.lead = startChild(tb, childSpec{Port: port, Role: RoleLeader, ValueEcho: kind == kindProcValue})
		if !c.lead.ready(10 * time.Second) {
			tb.Fatal("child does not lead")
		}
	} else {
		cfg := testConfig(tb, port)
		cfg.Role = RoleLeader
		build := buildTestReal(newTestReal())
		if kind == kindInprocValue {
			build = func(context.Context) (RealClient, error) { return valueEcho{}, nil }
		}
		l, err := New("TestChannel", cfg, build)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { l.Close() })
		if err := l.Ready(context.Background()); err != nil {
			tb.Fatal(err)
		}
	}
	cfg := testConfig(tb, port)
	cfg.Role = RoleFollower
	f, err := New("TestChannel", cfg, buildTestReal(newTestReal()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	if err := f.Ready(context.Background()); err != nil {
		tb.Fatal(err)
	}
	c.fol = f
	return c
}

// invokeEcho calls echo and checks that the argument came back.
func (c *benchCluster) invokeEcho(ctx context.Context, arg json.RawMessage) error {
	v, err := c.fol.Invoke(ctx, "echo", arg)
	if err != nil {
		return err
	}
	if len(v.Bytes()) != len(arg) {
		return fmt.Errorf("echo returned %d bytes, sent %d", len(v.Bytes()), len(arg))
	}
	return nil
}

// latencies collects round-trip times.
type latencies []time.Duration

func (l latencies) quantile(q float64) time.Duration {
	if len(l) == 0 {
		return 0
	}
	s := slices.Clone(l)
	slices.Sort(s)
	return s[min(int(q*float64(len(s))), len(s)-1)]
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// runSeq runs n round trips of rt one after the other and returns each
// one's time.
func runSeq(n int, rt func() error) (latencies, error) {
	lat := make(latencies, 0, n)
	for range n {
		t0 := time.Now()
		if err := rt(); err != nil {
			return lat, err
		}
		lat = append(lat, time.Since(t0))
	}
	return lat, nil
}

// runConcurrent runs n calls of rt from callers goroutines and returns
// calls per second.
func runConcurrent(n, callers int, rt func() error) (float64, error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	var first atomic.Value
	t0 := time.Now()
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				if err := rt(); err != nil {
					first.CompareAndSwap(nil, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0)
	if err, _ := first.Load().(error); err != nil {
		return 0, err
	}
	return float64(n) / elapsed.Seconds(), nil
}

// runPipeline runs n raw requests with window in flight and returns
// frames per second.
func runPipeline(c *rawClient, n, window int) (float64, error) {
	t0 := time.Now()
	if err := c.pipeline(n, window); err != nil {
		return 0, err
	}
	return float64(n) / time.Since(t0).Seconds(), nil
}

func reportSeq(b *testing.B, lat latencies) {
	b.ReportMetric(micros(lat.quantile(0.5)), "p50-µs")
	b.ReportMetric(micros(lat.quantile(0.99)), "p99-µs")
}

func procName(proc bool) string {
	if proc {
		return "proc"
	}
	return "inproc"
}

// BenchmarkRawEcho runs the baselines: the bytes of an invoke and its
// answer over loopback, echoed by a server that only reads lengths; seq
// and inflight64 by one connection pipelining, shape-* by the same-shape
// floor (shapeClient and serveShape).
func BenchmarkRawEcho(b *testing.B) {
	for _, proc := range []bool{true, false} {
		b.Run(procName(proc), func(b *testing.B) {
			var s *rawEchoServer
			if proc {
				s = startRawEchoChild(b)
			} else {
				s = startRawEcho(b)
			}
			for _, size := range benchSizes {
				arg := benchArg(size)
				b.Run("seq-"+sizeName(size), func(b *testing.B) {
					c := dialRaw(b, s, arg)
					c.roundTrip()
					b.ResetTimer()
					lat, err := runSeq(b.N, c.roundTrip)
					if err != nil {
						b.Fatal(err)
					}
					reportSeq(b, lat)
				})
				b.Run("inflight64-"+sizeName(size), func(b *testing.B) {
					c := dialRaw(b, s, arg)
					c.roundTrip()
					b.ResetTimer()
					rate, err := runPipeline(c, b.N, benchInFlight)
					if err != nil {
						b.Fatal(err)
					}
					b.ReportMetric(rate, "ops/s")
				})
				b.Run("shape-seq-"+sizeName(size), func(b *testing.B) {
					c := dialShape(b, s, arg)
					c.call()
					b.ResetTimer()
					lat, err := runSeq(b.N, c.call)
					if err != nil {
						b.Fatal(err)
					}
					reportSeq(b, lat)
				})
				b.Run("shape-inflight64-"+sizeName(size), func(b *testing.B) {
					c := dialShape(b, s, arg)
					c.call()
					b.ResetTimer()
					rate, err := runConcurrent(b.N, benchInFlight, c.call)
					if err != nil {
						b.Fatal(err)
					}
					b.ReportMetric(rate, "ops/s")
				})
			}
		})
	}
}

// BenchmarkInvoke invokes "echo" from a follower client, the leader in a
// child process (proc) or in this process (inproc), or the leader in
// this process with valueEcho as its real client (inproc-value).
func BenchmarkInvoke(b *testing.B) {
	ctx := context.Background()
	for _, kind := range benchKinds {
		b.Run(kind, func(b *testing.B) {
			c := startBenchCluster(b, kind)
			for _, size := range benchSizes {
				arg := benchArg(size)
				rt := func() error { return c.invokeEcho(ctx, arg) }
				b.Run("seq-"+sizeName(size), func(b *testing.B) {
					rt()
					b.ReportAllocs()
					b.ResetTimer()
					lat, err := runSeq(b.N, rt)
					if err != nil {
						b.Fatal(err)
					}
					reportSeq(b, lat)
				})
				b.Run("inflight64-"+sizeName(size), func(b *testing.B) {
					rt()
					b.ReportAllocs()
					b.ResetTimer()
					rate, err := runConcurrent(b.N, benchInFlight, rt)
					if err != nil {
						b.Fatal(err)
					}
					b.ReportMetric(rate, "ops/s")
				})
			}
		})
	}
}

// fanout is a leader in this process with followers in this process,
// all subscribed to one key, each connected over loopback.
type fanout struct {
	push      func(any)
	want      atomic.Int64 // the value being waited for
	remaining atomic.Int64 // followers that have not seen it yet
	done      chan time.Time
	n         int
}

func startFanout(tb testing.TB, followers int) *fanout {
	port := freePort(tb)
	cfg := testConfig(tb, port)
	cfg.Role = RoleLeader
	real := newTestReal()
	lc, err := New("TestChannel", cfg, buildTestReal(real))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { lc.Close() })
	if err := lc.Ready(context.Background()); err != nil {
		tb.Fatal(err)
	}
	reg := json.RawMessage(`{"dataId":"bench"}`)
	// A local listener subscribes the real client at once; the value 0
	// then reaches each follower as it subscribes, which proves the
	// leader counts it among the subscribers.
	local, err := lc.Subscribe(reg, func(Value) {})
	if err != nil {
		tb.Fatal(err)
	}
	real.mu.Lock()
	push := real.push[string(reg)]
	real.mu.Unlock()
	if push == nil {
		tb.Fatal("the real client was not subscribed")
	}
	push(0)
	fo := &fanout{push: push, done: make(chan time.Time, 1), n: followers}
	seen := make(chan struct{}, followers)
	for range followers {
		fcfg := testConfig(tb, port)
		fcfg.Role = RoleFollower
		fc, err := New("TestChannel", fcfg, buildTestReal(newTestReal()))
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { fc.Close() })
		var first sync.Once
		_, err = fc.Subscribe(reg, func(v Value) {
			n, _ := strconv.Atoi(v.String())
			if n == 0 {
				first.Do(func() { seen <- struct{}{} })
				return
			}
			if int64(n) == fo.want.Load() && fo.remaining.Add(-1) == 0 {
				fo.done <- time.Now()
			}
		})
		if err != nil {
			tb.Fatal(err)
		}
	}
	timeout := time.After(30 * time.Second)
	for range followers {
		select {
		case <-seen:
		case <-timeout:
			tb.Fatal("followers did not all subscribe within 30s")
		}
	}
	local.Unsubscribe()
	return fo
}

// round pushes the value v (> 0) and returns the time until the last
// follower had it.
func (fo *fanout) round(v int) (time.Duration, error) {
	fo.want.Store(int64(v))
	fo.remaining.Store(int64(fo.n))
	t0 := time.Now()
	fo.push(v)
	select {
	case t := <-fo.done:
		return t.Sub(t0), nil
	case <-time.After(10 * time.Second):
		return 0, fmt.Errorf("value %d reached %d of %d followers in 10s", v, fo.n-int(fo.remaining.Load()), fo.n)
	}
}

// BenchmarkFanout100 measures the time from the real client pushing a
// value to the last of 100 followers receiving it.
func BenchmarkFanout100(b *testing.B) {
	fo := startFanout(b, 100)
	v := 0
	b.Run("inproc", func(b *testing.B) {
		lat := make(latencies, 0, b.N)
		for range b.N {
			v++
			d, err := fo.round(v)
			if err != nil {
				b.Fatal(err)
			}
			lat = append(lat, d)
		}
		b.ReportMetric(float64(lat.quantile(0.5))/1e6, "p50-ms-to-last")
		b.ReportMetric(float64(lat.quantile(0.99))/1e6, "p99-ms-to-last")
	})
}

// idleCost is the leader's memory per idle follower connection.
type idleCost struct {
	heapInuse, heapAlloc, stack, total float64 // bytes per follower
	goroutines                         float64 // per follower
}

// measureIdleFollowers starts a leader in this process, connects n raw
// followers from a child process that register and stay silent, and
// measures what this process holds for them.
func measureIdleFollowers(tb testing.TB, n int) idleCost {
	raiseFileLimit(n + 256)
	port := freePort(tb)
	cfg := testConfig(tb, port)
	cfg.Role = RoleLeader
	cfg.MaxUnregistered = n + 1
	cfg.MaxConns = n + 1
	cfg.HeartbeatInterval = time.Hour
	lc, err := New("TestChannel", cfg, buildTestReal(newTestReal()))
	if err != nil {
		tb.Fatal(err)
	}
	defer lc.Close()
	if err := lc.Ready(context.Background()); err != nil {
		tb.Fatal(err)
	}
	before, g0 := memNow()
	k := startChild(tb, childSpec{Mode: "idlers", Port: port, Name: "TestChannel", Count: n})
	m := k.event(func(m msg) bool { return m["event"] == "ready" || m["event"] == "error" }, 60*time.Second)
	if m["event"] != "ready" {
		tb.Fatalf("idlers: %v", m["err"])
	}
	after, g1 := memNow()
	defer k.kill()
	per := func(a, b uint64) float64 { return (float64(b) - float64(a)) / float64(n) }
	c := idleCost{
		heapInuse:  per(before.HeapInuse, after.HeapInuse),
		heapAlloc:  per(before.HeapAlloc, after.HeapAlloc),
		stack:      per(before.StackInuse, after.StackInuse),
		goroutines: float64(g1-g0) / float64(n),
	}
	c.total = c.heapInuse + c.stack
	return c
}

// memNow collects garbage and returns the memory statistics and the
// number of goroutines.
func memNow() (runtime.MemStats, int) {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms, runtime.NumGoroutine()
}

// BenchmarkIdleFollowers reports the leader's memory per idle follower
// connection with 1,000 followers connected.
func BenchmarkIdleFollowers(b *testing.B) {
	for range b.N {
		c := measureIdleFollowers(b, 1000)
		b.ReportMetric(c.heapInuse, "heap-B/follower")
		b.ReportMetric(c.stack, "stack-B/follower")
		b.ReportMetric(c.total, "B/follower")
		b.ReportMetric(c.goroutines, "goroutines/follower")
	}
}

// fastBesideSlow makes n calls of maybeSlow from 4 goroutines of the
// follower, every 100th of which blocks 200 ms in the leader's real
// client, and returns the times of the others, the fast calls.
func (c *benchCluster) fastBesideSlow(n int) (latencies, error) {
	var i atomic.Int64
	var mu sync.Mutex
	lat := make(latencies, 0, n)
	_, err := runConcurrent(n, 4, func() error {
		ms := 0
		if i.Add(1)%100 == 0 {
			ms = 200
		}
		t0 := time.Now()
		_, err := c.fol.Invoke(context.Background(), "maybeSlow", ms)
		if ms == 0 {
			mu.Lock()
			lat = append(lat, time.Since(t0))
			mu.Unlock()
		}
		return err
	})
	return lat, err
}

// BenchmarkFastBesideSlow: the leader in a child process has a method
// that is fast 99 times and blocks 200 ms once in 100 calls; the
// follower calls it from 4 goroutines. It reports the fast calls' p50
// and p99. An op is 100 calls.
//
//	go test -run '^$' -bench FastBesideSlow -benchtime 20x
func BenchmarkFastBesideSlow(b *testing.B) {
	c := startBenchCluster(b, kindProc)
	c.fastBesideSlow(100)
	b.ResetTimer()
	lat, err := c.fastBesideSlow(100 * b.N)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(lat.quantile(0.5))/1e6, "p50-ms")
	b.ReportMetric(float64(lat.quantile(0.99))/1e6, "p99-ms")
}

// startPushes subscribes the follower to a key whose value the leader's
// real client, in a child process, sets to the wall-clock time at random
// moments, on average every 1.5 periods (so that few values are merged on
// the way) and not aligned with any call; it returns the channel of each
// value's delay from the push to the follower's listener.
func (c *benchCluster) startPushes(tb testing.TB, period time.Duration) chan time.Duration {
	delays := make(chan time.Duration, 4096)
	reg := json.RawMessage(fmt.Sprintf(`{"dataId":"pushDelay","period":%d}`, period/time.Millisecond))
	_, err := c.fol.Subscribe(reg, func(v Value) {
		var ns int64
		if v.Decode(&ns) == nil && ns > 0 {
			select {
			case delays <- time.Since(time.Unix(0, ns)):
			default:
			}
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
	c.lead.ok(msg{"op": "pushEvery", "reg": reg, "everyMS": 3 * period / 2 / time.Millisecond})
	return delays
}

// pushDelays calls echo every period until n pushed values have reached
// the follower, and returns their delays.
func (c *benchCluster) pushDelays(delays chan time.Duration, period time.Duration, n int) (latencies, error) {
	for len(delays) > 0 {
		<-delays // arrived while the follower made no calls
	}
	tick := time.NewTicker(period)
	defer tick.Stop()
	timeout := time.After(10*time.Second + time.Duration(n)*3*period)
	lat := make(latencies, 0, n)
	for len(lat) < n {
		select {
		case d := <-delays:
			lat = append(lat, d)
		case <-tick.C:
			if _, err := c.fol.Invoke(context.Background(), "echo", 1); err != nil {
				return lat, err
			}
		case <-timeout:
			return lat, fmt.Errorf("%d of %d pushed values arrived", len(lat), n)
		}
	}
	return lat, nil
}

// pushPeriods are the follower's call cadences in BenchmarkPushDelay.
var pushPeriods = []time.Duration{20 * time.Millisecond, 100 * time.Millisecond}

// BenchmarkPushDelay: a follower that calls every 20 or 100 ms receives
// values that the leader's real client, in a child process, pushes at
// random moments; it reports the delay from the push to the listener,
// p50 and max. An op is one value received.
//
//	go test -run '^$' -bench PushDelay -benchtime 100x
func BenchmarkPushDelay(b *testing.B) {
	c := startBenchCluster(b, kindProc)
	for _, period := range pushPeriods {
		delays := c.startPushes(b, period)
		b.Run(fmt.Sprintf("every%dms", period/time.Millisecond), func(b *testing.B) {
			lat, err := c.pushDelays(delays, period, b.N)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(lat.quantile(0.5))/1e6, "p50-ms")
			b.ReportMetric(float64(lat.quantile(1))/1e6, "max-ms")
		})
	}
}

// perfTable collects one figure per round for each row, rows in the
// order first added; a target reads "<= x" or ">= x".
type perfTable struct {
	names   []string
	targets map[string]string
	vals    map[string][]float64
}

func (p *perfTable) add(name, target string, v float64) {
	if _, ok := p.vals[name]; !ok {
		p.names = append(p.names, name)
		p.targets[name] = target
	}
	p.vals[name] = append(p.vals[name], v)
}

func (p *perfTable) String() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-44s %10s  %-8s %-5s %s\n", "figure", "median", "target", "met", "rounds")
	for _, name := range p.names {
		m, target, met := median(p.vals[name]), p.targets[name], ""
		if op, s, ok := strings.Cut(target, " "); ok {
			x, _ := strconv.ParseFloat(s, 64)
			met = strconv.FormatBool(op == "<=" && m <= x || op == ">=" && m >= x)
		}
		fmt.Fprintf(&sb, "%-44s %10.2f  %-8s %-5s %.2f\n", name, m, target, met, p.vals[name])
	}
	return sb.String()
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// TestPerfReport measures, in rounds, the raw echo, the same-shape floor,
// this package (the leader in a child process, valueEcho as its real
// client) and, with node and testdata/node/node_modules installed, the
// reference Node.js package, and the fast calls beside a slow one and
// the push delay; it logs each figure's median and per-round values, and
// the ratios of each round. It runs only with CLUSTERCLIENT_PERF=1
// (CLUSTERCLIENT_PERF_ROUNDS sets the number of rounds, default 5); it
// asserts nothing.
func TestPerfReport(t *testing.T) {
	if os.Getenv("CLUSTERCLIENT_PERF") != "1" {
		t.Skip("set CLUSTERCLIENT_PERF=1 to run")
	}
	rounds := 5
	if n, err := strconv.Atoi(os.Getenv("CLUSTERCLIENT_PERF_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	const seqN, seqChunks, pipeN, concN, refSeqN, refConcN, slowN, pushN = 10000, 10, 100000, 30000, 2000, 20000, 2000, 50
	check := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	s := startRawEchoChild(t)
	ours := startBenchCluster(t, kindProcValue)
	slow := startBenchCluster(t, kindProc)
	delays := map[time.Duration]chan time.Duration{}
	for _, period := range pushPeriods {
		delays[period] = slow.startPushes(t, period)
	}
	var ref *nodeMember
	if haveNode() {
		ref = startReference(t)
	}
	type sized struct {
		name string
		arg  json.RawMessage
		rc   *rawClient
		sc   *shapeClient
		rt   func() error
	}
	var sizes []sized
	for _, size := range benchSizes {
		arg := benchArg(size)
		z := sized{name: sizeName(size), arg: arg, rc: dialRaw(t, s, arg), sc: dialShape(t, s, arg),
			rt: func() error { return ours.invokeEcho(context.Background(), arg) }}
		// Warm up: the first calls on a new connection are not measured.
		_, err := runSeq(seqN/10, z.rc.roundTrip)
		check(err)
		for _, rt := range []func() error{z.sc.call, z.rt} {
			_, err := runConcurrent(concN/10, benchInFlight, rt)
			check(err)
		}
		sizes = append(sizes, z)
	}
	p := &perfTable{targets: map[string]string{}, vals: map[string][]float64{}}
	for range rounds {
		for _, z := range sizes {
			// Alternate in short runs, so that each sees the same
			// moments of a shared machine.
			var rl, fl, ol latencies
			for range seqChunks {
				for _, r := range []struct {
					l  *latencies
					rt func() error
				}{{&rl, z.rc.roundTrip}, {&fl, z.sc.call}, {&ol, z.rt}} {
					l, err := runSeq(seqN/seqChunks, r.rt)
					check(err)
					*r.l = append(*r.l, l...)
				}
			}
			raw, floor, our := micros(rl.quantile(0.5)), micros(fl.quantile(0.5)), micros(ol.quantile(0.5))
			rr, err := runPipeline(z.rc, pipeN, benchInFlight)
			check(err)
			fr, err := runConcurrent(concN, benchInFlight, z.sc.call)
			check(err)
			or, err := runConcurrent(concN, benchInFlight, z.rt)
			check(err)
			p.add("seq p50 µs, raw echo "+z.name, "", raw)
			p.add("seq p50 µs, same-shape floor "+z.name, "", floor)
			p.add("seq p50 µs, ours "+z.name, "", our)
			p.add("64 in flight k/s, raw echo "+z.name, "", rr/1e3)
			p.add("64 in flight k/s, same-shape floor "+z.name, "", fr/1e3)
			p.add("64 in flight k/s, ours "+z.name, "", or/1e3)
			p.add("ours/floor seq p50 "+z.name, "<= 1.3", our/floor)
			p.add("ours/floor 64 in flight rate "+z.name, ">= 0.8", or/fr)
			if ref != nil {
				_, refP50 := referenceBench(t, ref, z.arg, refSeqN, 1)
				refRate, _ := referenceBench(t, ref, z.arg, refConcN, benchInFlight)
				p.add("seq p50 µs, reference "+z.name, "", refP50)
				p.add("64 in flight k/s, reference "+z.name, "", refRate/1e3)
				p.add("ours/reference seq p50 "+z.name, "<= 0.5", our/refP50)
				p.add("ours/reference 64 in flight rate "+z.name, ">= 2.5", or/refRate)
			}
		}
		lat, err := slow.fastBesideSlow(slowN)
		check(err)
		p.add("fast calls beside a slow one, p99 ms", "<= 2", float64(lat.quantile(0.99))/1e6)
		for _, period := range pushPeriods {
			lat, err := slow.pushDelays(delays[period], period, pushN)
			check(err)
			name := fmt.Sprintf("push delay, calls every %d ms, ", period/time.Millisecond)
			p.add(name+"p50 ms", "<= 1", float64(lat.quantile(0.5))/1e6)
			p.add(name+"max ms", "<= 10", float64(lat.quantile(1))/1e6)
		}
	}
	t.Logf("%d rounds; ratios are the median of each round's ratio%s", rounds, p)
}

// haveNode reports whether node and the reference package are installed.
func haveNode() bool {
	_, err := exec.LookPath("node")
	if err != nil {
		return false
	}
	_, err = os.Stat(nodeDir + "/node_modules/cluster-client/package.json")
	return err == nil
}

// startReference starts a leader and a follower of the reference Node.js
// package, on the JSON transcode, and returns the follower.
func startReference(t *testing.T) *nodeMember {
	port := freePort(t)
	lead := startNode(t, childSpec{Port: port, Role: RoleLeader})
	if !lead.ready(waitLong) {
		t.Fatal("Node.js leader not ready")
	}
	fol := startNode(t, childSpec{Port: port, Role: RoleFollower})
	if fol.ready(waitLong) {
		t.Fatal("the Node.js follower leads")
	}
	referenceBench(t, fol, benchArg(32), 2000, benchInFlight) // warm up
	return fol
}

// referenceBench makes n calls of echo(arg) from the reference follower,
// inflight at a time, and returns calls per second and the p50 in µs.
func referenceBench(t *testing.T, fol *nodeMember, arg json.RawMessage, n, inflight int) (rate, p50 float64) {
	t.Helper()
	m := fol.do(msg{"op": "bench", "method": "echo", "args": []json.RawMessage{arg}, "n": n, "inflight": inflight}, 5*time.Minute)
	if e, _ := m["err"].(string); e != "" {
		t.Fatalf("Node.js follower: %s", e)
	}
	rate, _ = m["rate"].(float64)
	p50, _ = m["p50us"].(float64)
	return rate, p50
}
