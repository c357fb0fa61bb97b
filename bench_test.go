package clusterclient

// Benchmarks of the runtime beside a raw TCP baseline that moves the same
// bytes over loopback. See TestPerfReport for the ratios.
//
//	go test -run '^$' -bench . -count 5
//	CLUSTERCLIENT_PERF=1 go test -run '^TestPerfReport$' -v -count 1

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
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
// arg) sends, built with the real encoder, for the raw baseline.
func rawRequest(arg []byte, timeout time.Duration) []byte {
	b, err := appendInvoke(nil, 1, int32(timeout/time.Millisecond), "echo", false, [][]byte{arg})
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

// serveRawEcho answers each frame read from nc with the invoke_result
// that the leader would send for the echo of its single argument, built
// with the real encoder. Writes are flushed when no whole frame is
// waiting, so pipelined requests are answered in batches.
func serveRawEcho(nc net.Conn) {
	defer nc.Close()
	br := bufio.NewReaderSize(nc, 64<<10)
	bw := bufio.NewWriterSize(nc, 64<<10)
	var in, out []byte
	var err error
	first := true
	for {
		if bw.Buffered() > 0 && !frameBuffered(br) {
			if bw.Flush() != nil {
				return
			}
		}
		if in, err = readFrame(br, in); err != nil {
			return
		}
		id := binary.BigEndian.Uint64(in[4:])
		timeout := int32(binary.BigEndian.Uint32(in[12:]))
		connLen := int(binary.BigEndian.Uint32(in[16:]))
		if first {
			first = false
			if bytes.Contains(in[HeaderSize:HeaderSize+connLen], []byte(`"register_channel"`)) {
				// A follower client registers first.
				out, _ = appendPacket(out[:0], true, id, timeout, registerChannelRes{}, []byte(`{"success":true}`))
				bw.Write(out)
				continue
			}
		}
		arg := in[HeaderSize+connLen:]
		if len(arg) >= 4 {
			arg = arg[4:] // one framed argument
		}
		out, _ = appendPacket(out[:0], true, id, timeout, invokeResult{Success: true}, arg)
		bw.Write(out)
	}
}

// rawEchoServer is a raw echo listener, in this process or a child.
type rawEchoServer struct {
	addr string
}

// startRawEcho starts a raw echo server in this process.
func startRawEcho(tb testing.TB) *rawEchoServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	serveEach(tb, ln, serveRawEcho)
	return &rawEchoServer{addr: ln.Addr().String()}
}

// startRawEchoChild starts a raw echo server in a child process.
func startRawEchoChild(tb testing.TB) *rawEchoServer {
	k := startChild(tb, childSpec{Mode: "echo"})
	m := k.event(func(m msg) bool { return m["event"] == "ready" || m["event"] == "error" }, 10*time.Second)
	if m["event"] != "ready" {
		tb.Fatalf("echo child: %v", m["err"])
	}
	return &rawEchoServer{addr: loopback(int(m["port"].(float64)))}
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

// rawMux is the second baseline: calls from many goroutines multiplexed
// over one raw connection, with no protocol beyond the id. Each call adds
// its frame to a shared buffer and waits on a channel of its own; the
// first caller to find no write under way yields once, so that the
// callers ready to run queue their frames too, and writes them all; one
// reader goroutine reads every frame buffered and then hands each to its
// caller. It is the least a client that gives each call a goroutine of
// its own pays, so the ratio of Client.Invoke to it is the protocol's
// and the leader's cost alone.
type rawMux struct {
	nc  net.Conn
	br  *bufio.Reader
	req []byte // the request frame; its id is set per call
	err atomic.Value

	mu       sync.Mutex
	buf      []byte // guarded by mu: frames not yet written
	spare    []byte // guarded by mu
	flushing bool   // guarded by mu
	lastID   uint64 // guarded by mu

	pmu     sync.Mutex
	pending map[uint64]chan []byte // guarded by pmu
}

func dialRawMux(tb testing.TB, s *rawEchoServer, arg []byte) *rawMux {
	nc, err := net.Dial("tcp", s.addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { nc.Close() })
	m := &rawMux{nc: nc, br: bufio.NewReaderSize(nc, 64<<10), req: rawRequest(arg, 3*time.Second), pending: make(map[uint64]chan []byte)}
	go m.readLoop()
	return m
}

func (m *rawMux) readLoop() {
	type answer struct {
		ch    chan []byte
		frame []byte
	}
	var in []byte
	var batch []answer
	for {
		var err error
		if in, err = readFrame(m.br, in); err != nil {
			m.err.CompareAndSwap(nil, err)
			m.pmu.Lock()
			for id, ch := range m.pending {
				delete(m.pending, id)
				ch <- nil
			}
			m.pmu.Unlock()
			return
		}
		m.pmu.Lock()
		id := binary.BigEndian.Uint64(in[4:])
		ch := m.pending[id]
		delete(m.pending, id)
		m.pmu.Unlock()
		batch = append(batch, answer{ch, slices.Clone(in)})
		if frameBuffered(m.br) && len(batch) < benchInFlight {
			continue
		}
		for i, a := range batch {
			a.ch <- a.frame
			batch[i] = answer{}
		}
		batch = batch[:0]
	}
}

var muxChans = sync.Pool{New: func() any { return make(chan []byte, 1) }}

// call sends one request and waits for its answer.
func (m *rawMux) call() error {
	ch := muxChans.Get().(chan []byte)
	m.mu.Lock()
	m.lastID++
	id := m.lastID
	m.pmu.Lock()
	m.pending[id] = ch
	m.pmu.Unlock()
	n := len(m.buf)
	m.buf = append(m.buf, m.req...)
	binary.BigEndian.PutUint64(m.buf[n+4:], id)
	var err error
	if !m.flushing {
		m.flushing = true
		m.mu.Unlock()
		runtime.Gosched()
		m.mu.Lock()
		for len(m.buf) > 0 && err == nil {
			b := m.buf
			m.buf = m.spare[:0]
			m.mu.Unlock()
			_, err = m.nc.Write(b)
			m.mu.Lock()
			m.spare = b[:0]
		}
		m.flushing = false
	}
	m.mu.Unlock()
	if err != nil {
		return err
	}
	if <-ch == nil {
		return m.err.Load().(error)
	}
	muxChans.Put(ch)
	return nil
}

// benchChildMain runs the benchmark child modes of childSpec.Mode:
//
//	"echo":   a raw echo server on a free loopback port; prints
//	          {"event":"ready","port":p}
//	"idlers": spec.Count raw connections to spec.Port that register
//	          spec.Name and then stay silent; prints {"event":"ready"}
//
// Both run until stdin closes.
func benchChildMain(spec childSpec) int {
	enc := json.NewEncoder(os.Stdout)
	switch spec.Mode {
	case "echo":
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
				go serveRawEcho(nc)
			}
		}()
		enc.Encode(msg{"event": "ready", "port": ln.Addr().(*net.TCPAddr).Port})
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
	fol *Client
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
	if kind == kindProc || kind == kindProcValue {
		k := startChild(tb, childSpec{Port: port, Role: RoleLeader, ValueEcho: kind == kindProcValue})
		if !k.ready(10 * time.Second) {
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
	return &benchCluster{fol: f}
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

// BenchmarkRawEcho is the baseline: the bytes of an invoke and its answer
// over loopback, echoed by a server that only reads lengths.
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
				b.Run("mux64-"+sizeName(size), func(b *testing.B) {
					m := dialRawMux(b, s, arg)
					m.call()
					b.ResetTimer()
					rate, err := runConcurrent(b.N, benchInFlight, m.call)
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

// perfRow is one line of TestPerfReport.
type perfRow struct {
	name, unit string
	ours, base []float64 // one figure per round
	ratio      []float64 // ours/base per round
	mux        []float64 // ours/rawMux per round, for calls from 64 goroutines
	target     string
	met        func(ratio, ours float64) bool
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

// TestPerfReport runs each benchmark beside its raw TCP baseline in
// alternating rounds and logs a table of medians and ratios. It runs
// only with CLUSTERCLIENT_PERF=1 (CLUSTERCLIENT_PERF_ROUNDS sets the
// number of rounds, default 5); it asserts nothing. With node and
// testdata/node/node_modules installed, it also measures the reference
// Node.js package.
func TestPerfReport(t *testing.T) {
	if os.Getenv("CLUSTERCLIENT_PERF") != "1" {
		t.Skip("set CLUSTERCLIENT_PERF=1 to run")
	}
	rounds := 5
	if n, err := strconv.Atoi(os.Getenv("CLUSTERCLIENT_PERF_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	const seqN, seqChunks, pipeN, concN, fanN = 10000, 10, 100000, 30000, 200
	ctx := context.Background()
	var rows []*perfRow
	check := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	servers := map[string]*rawEchoServer{kindProc: startRawEchoChild(t), kindInproc: startRawEcho(t)}
	for _, kind := range benchKinds {
		s := servers[kindInproc]
		if kind == kindProc || kind == kindProcValue {
			s = servers[kindProc]
		}
		c := startBenchCluster(t, kind)
		for _, size := range benchSizes {
			arg := benchArg(size)
			rc := dialRaw(t, s, arg)
			rm := dialRawMux(t, s, arg)
			rt := func() error { return c.invokeEcho(ctx, arg) }
			seq := &perfRow{name: fmt.Sprintf("invoke %s seq %s p50", kind, sizeName(size)), unit: "µs",
				target: "≤ 1.3×", met: func(r, _ float64) bool { return r <= 1.3 }}
			conc := &perfRow{name: fmt.Sprintf("invoke %s 64 in flight %s", kind, sizeName(size)), unit: "ops/s",
				target: "≥ 0.5×", met: func(r, _ float64) bool { return r >= 0.5 }}
			rows = append(rows, seq, conc)
			muxRow := &perfRow{name: fmt.Sprintf("  raw mux, 64 goroutine callers, %s (%s)", sizeName(size), kind), unit: "ops/s",
				target: "-", met: func(float64, float64) bool { return true }}
			rows = append(rows, muxRow)
			// Warm up both paths: the first calls on a new connection,
			// and the leader learning that echo is quick, are not what
			// is measured.
			_, err := runSeq(seqN, rc.roundTrip)
			check(err)
			_, err = runSeq(seqN, rt)
			check(err)
			_, err = runConcurrent(concN, benchInFlight, rm.call)
			check(err)
			for range rounds {
				// Alternate in short runs, so that both see the same
				// moments of a shared machine.
				var rl, ol latencies
				for range seqChunks {
					l, err := runSeq(seqN/seqChunks, rc.roundTrip)
					check(err)
					rl = append(rl, l...)
					l, err = runSeq(seqN/seqChunks, rt)
					check(err)
					ol = append(ol, l...)
				}
				b, o := micros(rl.quantile(0.5)), micros(ol.quantile(0.5))
				seq.base, seq.ours, seq.ratio = append(seq.base, b), append(seq.ours, o), append(seq.ratio, o/b)

				rr, err := runPipeline(rc, pipeN, benchInFlight)
				check(err)
				mr, err := runConcurrent(concN, benchInFlight, rm.call)
				check(err)
				or, err := runConcurrent(concN, benchInFlight, rt)
				check(err)
				conc.base, conc.ours, conc.ratio = append(conc.base, rr), append(conc.ours, or), append(conc.ratio, or/rr)
				conc.mux = append(conc.mux, or/mr)
				muxRow.base, muxRow.ours, muxRow.ratio = append(muxRow.base, rr), append(muxRow.ours, mr), append(muxRow.ratio, mr/rr)
			}
		}
	}

	if haveNode() {
		rows = append(rows, referenceRows(t, servers[kindProc], rounds)...)
	}

	fo := startFanout(t, 100)
	fan := &perfRow{name: "fan-out to 100 followers, p50 to the last", unit: "ms",
		target: "≤ 5 ms", met: func(_, o float64) bool { return o <= 5 }}
	rows = append(rows, fan)
	v := 0
	for range rounds {
		lat := make(latencies, 0, fanN)
		for range fanN {
			v++
			d, err := fo.round(v)
			check(err)
			lat = append(lat, d)
		}
		fan.ours = append(fan.ours, float64(lat.quantile(0.5))/1e6)
	}

	mem := &perfRow{name: "leader memory per idle follower (heap+stack), 1000 followers", unit: "B",
		target: "≤ 16 KiB", met: func(_, o float64) bool { return o <= 16<<10 }}
	rows = append(rows, mem)
	for range min(rounds, 3) {
		c := measureIdleFollowers(t, 1000)
		t.Logf("idle follower: heap %.0f B, stack %.0f B, %.2f goroutines", c.heapInuse, c.stack, c.goroutines)
		mem.ours = append(mem.ours, c.total)
	}

	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%d rounds, medians; ratio = ours / raw TCP baseline, median of the rounds' ratios;\n", rounds)
	fmt.Fprintf(&sb, "ours/mux = ours / the raw multiplexer (rawMux) in the same round\n")
	fmt.Fprintf(&sb, "%-62s %12s %12s %7s %8s  %-8s %s\n", "benchmark", "ours", "raw TCP", "ratio", "ours/mux", "target", "met")
	for _, r := range rows {
		o := median(r.ours)
		base, ratio := "-", "-"
		rm := 0.0
		if len(r.base) > 0 {
			rm = median(r.ratio)
			base = fmt.Sprintf("%.1f %s", median(r.base), r.unit)
			ratio = fmt.Sprintf("%.2f", rm)
		}
		mux := "-"
		if len(r.mux) > 0 {
			mux = fmt.Sprintf("%.2f", median(r.mux))
		}
		fmt.Fprintf(&sb, "%-62s %12s %12s %7s %8s  %-8s %v\n", r.name, fmt.Sprintf("%.1f %s", o, r.unit), base, ratio, mux, r.target, r.met(rm, o))
	}
	fmt.Fprintf(&sb, "\nrounds:\n")
	for _, r := range rows {
		fmt.Fprintf(&sb, "%-62s ours %.1f  raw %.1f\n", r.name, r.ours, r.base)
	}
	t.Log(sb.String())
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

// referenceRows measures the reference Node.js package as TestPerfReport
// measures this one: a leader and a follower process on the JSON
// transcode, the follower invoking echo, beside the raw echo server s in
// alternating rounds.
func referenceRows(t *testing.T, s *rawEchoServer, rounds int) []*perfRow {
	port := freePort(t)
	lead := startNode(t, childSpec{Port: port, Role: RoleLeader})
	if !lead.ready(waitLong) {
		t.Fatal("Node.js leader not ready")
	}
	fol := startNode(t, childSpec{Port: port, Role: RoleFollower})
	if fol.ready(waitLong) {
		t.Fatal("the Node.js follower leads")
	}
	const seqN, pipeN, concN = 2000, 100000, 20000
	var rows []*perfRow
	for _, size := range benchSizes {
		arg := benchArg(size)
		rc := dialRaw(t, s, arg)
		bench := func(n, inflight int) (rate, p50 float64) {
			t.Helper()
			m := fol.do(msg{"op": "bench", "method": "echo", "args": []json.RawMessage{arg}, "n": n, "inflight": inflight}, 5*time.Minute)
			if e, _ := m["err"].(string); e != "" {
				t.Fatalf("Node.js follower: %s", e)
			}
			rate, _ = m["rate"].(float64)
			p50, _ = m["p50us"].(float64)
			return rate, p50
		}
		seq := &perfRow{name: fmt.Sprintf("reference Node.js package, seq %s p50", sizeName(size)), unit: "µs",
			target: "-", met: func(float64, float64) bool { return true }}
		conc := &perfRow{name: fmt.Sprintf("reference Node.js package, 64 in flight %s", sizeName(size)), unit: "ops/s",
			target: "-", met: func(float64, float64) bool { return true }}
		rows = append(rows, seq, conc)
		bench(seqN, 1)
		bench(concN, benchInFlight)
		for range rounds {
			l, err := runSeq(seqN, rc.roundTrip)
			if err != nil {
				t.Fatal(err)
			}
			_, np50 := bench(seqN, 1)
			b := micros(l.quantile(0.5))
			seq.base, seq.ours, seq.ratio = append(seq.base, b), append(seq.ours, np50), append(seq.ratio, np50/b)
			rr, err := runPipeline(rc, pipeN, benchInFlight)
			if err != nil {
				t.Fatal(err)
			}
			nr, _ := bench(concN, benchInFlight)
			conc.base, conc.ours, conc.ratio = append(conc.base, rr), append(conc.ours, nr), append(conc.ratio, nr/rr)
		}
	}
	return rows
}

// TestCallTimeoutsShareTimer: a call with an earlier deadline than the
// calls already waiting still times out on time, and a later one after
// its own deadline.
func TestCallTimeoutsShareTimer(t *testing.T) {
	t.Parallel()
	_, fol := inProcessPair(t, "expiry", func(fcfg *Config) { fcfg.ResponseTimeout = 2 * time.Second })

	long := make(chan error, 1)
	go func() {
		_, err := fol.Invoke(context.Background(), "sleep", 10000)
		long <- err
	}()
	// The short call waits until the long one is pending.
	waitUntil(t, 5*time.Second, "the long call pending", func() bool {
		fol.mu.Lock()
		f := fol.fol
		fol.mu.Unlock()
		f.mu.Lock()
		defer f.mu.Unlock()
		return len(f.pending) == 1
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
