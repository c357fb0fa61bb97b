package clusterclient

// Test infrastructure: a real client for tests, and child processes that
// re-run this test binary as cluster members, driven over stdin/stdout
// with one JSON object per line.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// childEnv, when set, makes the test binary run as a cluster member.
const childEnv = "CLUSTERCLIENT_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(childMain())
	}
	os.Exit(m.Run())
}

// testReal is the real client of the tests. Methods:
//
//	echo(x) x                 pid() the leader's pid
//	fail(code) RemoteError    sleep(ms) sleeps, honouring ctx
//	push(reg, value)          pushes value to reg's subscription
//	published() []reg         subscribes(reg) real Subscribe calls
//	active(reg) bool          whether reg is subscribed now
//	throw(name, msg, code, stack) a RemoteError with those fields
//	sleeping() n              sleeps in progress
//	note(x)                   records x; notes() []x returns them
//	whoami() name             the name given to this real client
//	calls() n                 Invoke calls so far
//	maybeSlow(ms) ms          returns at once if ms is 0, else sleeps ms
//	panic(x)                  panics with a string that holds x
type testReal struct {
	name      string
	unsubHook func() // when set, runs first in each Unsubscribe

	mu           sync.Mutex
	push         map[string]func(any) // by reg JSON
	subscribes   map[string]int       // Subscribe calls by reg JSON
	published    []json.RawMessage
	notes        []any
	sleeping     int
	calls        int // Invoke calls
	unsubscribes int // Unsubscribe calls
	closed       bool
}

func newTestReal() *testReal {
	return &testReal{push: map[string]func(any){}, subscribes: map[string]int{}}
}

func buildTestReal(r *testReal) BuildFunc {
	return func(context.Context) (RealClient, error) { return r, nil }
}

type codedError struct{ code, msg string }

func (e *codedError) Error() string     { return e.msg }
func (e *codedError) ErrorCode() string { return e.code }

func (r *testReal) Invoke(ctx context.Context, method string, args []Value) (any, error) {
	arg := func(i int, v any) error {
		if i >= len(args) {
			return fmt.Errorf("missing argument %d", i)
		}
		return args[i].Decode(v)
	}
	r.mu.Lock()
	r.calls++
	r.mu.Unlock()
	switch method {
	case "calls":
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.calls, nil
	case "args":
		// Every argument as it came.
		out := make([]json.RawMessage, len(args))
		for i, a := range args {
			out[i] = a.Bytes()
		}
		return out, nil
	case "echo":
		var v any
		if err := arg(0, &v); err != nil {
			return nil, err
		}
		return v, nil
	case "pid":
		return os.Getpid(), nil
	case "fail":
		var code string
		arg(0, &code)
		return nil, &codedError{code: code, msg: "failed on purpose"}
	case "throw":
		var f [4]string
		for i := range f {
			arg(i, &f[i])
		}
		return nil, &RemoteError{Name: f[0], Message: f[1], Code: f[2], Stack: f[3]}
	case "whoami":
		return r.name, nil
	case "note":
		var v any
		if err := arg(0, &v); err != nil {
			return nil, err
		}
		r.mu.Lock()
		r.notes = append(r.notes, v)
		r.mu.Unlock()
		return nil, nil
	case "notes":
		r.mu.Lock()
		defer r.mu.Unlock()
		return append([]any{}, r.notes...), nil
	case "sleeping":
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.sleeping, nil
	case "panic":
		var v any
		arg(0, &v)
		panic(fmt.Sprintf("testReal.panic called with %v", v))
	case "maybeSlow":
		var ms int
		if err := arg(0, &ms); err != nil || ms == 0 {
			return ms, err
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
			return ms, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	case "sleep":
		var ms int
		if err := arg(0, &ms); err != nil {
			return nil, err
		}
		r.mu.Lock()
		r.sleeping++
		r.mu.Unlock()
		defer func() {
			r.mu.Lock()
			r.sleeping--
			r.mu.Unlock()
		}()
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
			return ms, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	case "push":
		var reg json.RawMessage
		var v any
		if err := arg(0, &reg); err != nil {
			return nil, err
		}
		if err := arg(1, &v); err != nil {
			return nil, err
		}
		key, err := marshalReg(reg)
		if err != nil {
			return nil, err
		}
		r.mu.Lock()
		push := r.push[string(key)]
		r.mu.Unlock()
		if push == nil {
			return false, nil
		}
		push(v)
		return true, nil
	case "published":
		r.mu.Lock()
		defer r.mu.Unlock()
		return append([]json.RawMessage{}, r.published...), nil
	case "subscribes", "active":
		var reg json.RawMessage
		if err := arg(0, &reg); err != nil {
			return nil, err
		}
		key, err := marshalReg(reg)
		if err != nil {
			return nil, err
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		if method == "active" {
			return r.push[string(key)] != nil, nil
		}
		return r.subscribes[string(key)], nil
	}
	return nil, fmt.Errorf("method %q not implemented", method)
}

func (r *testReal) Subscribe(reg json.RawMessage, push func(any)) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.subscribes[string(reg)]++
	r.push[string(reg)] = push
	return nil
}

func (r *testReal) Unsubscribe(reg json.RawMessage) error {
	if r.unsubHook != nil {
		r.unsubHook()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.push, string(reg))
	r.unsubscribes++
	return nil
}

func (r *testReal) Publish(ctx context.Context, reg json.RawMessage) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.published = append(r.published, reg)
	return nil
}

func (r *testReal) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	return nil
}

// freePort returns a port that was free a moment ago.
//
// It picks from below the kernel's range of ephemeral ports (32768 and
// up on Linux), so that no outgoing connection of a parallel test can
// take the port between this check and the test's own listen, and never
// hands out the same port twice in one test binary.
func freePort(t testing.TB) int {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 1000 {
		// A slice of the range of its own per process, so that test
		// processes run one after another (CI runs two) or side by side
		// seldom meet on a port.
		port := 20000 + os.Getpid()%6*2000 + rand.IntN(2000)
		if portsGiven[port] {
			continue
		}
		ln, err := net.Listen("tcp", loopback(port))
		if err != nil {
			continue
		}
		ln.Close()
		portsGiven[port] = true
		return port
	}
	t.Fatal("no free port below the ephemeral range")
	return 0
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{} // guarded by portsMu
)

// testConfig returns a config for port with short intervals, logging to
// the test.
func testConfig(t testing.TB, port int) *Config {
	cfg := DefaultConfig()
	cfg.Port = port
	cfg.MaxWaitTime = 10 * time.Second
	cfg.ResponseTimeout = 3 * time.Second
	cfg.DrainTimeout = 2 * time.Second
	cfg.Logger = slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelWarn}))
	return cfg
}

// testWriter writes to the test's log until the test's cleanups run:
// a line that comes later (the count of suppressed warnings, up to a
// second after a leader closed) is dropped, since the testing package
// panics on a log after the test.
type testWriter struct {
	t       testing.TB
	mu      sync.Mutex
	stopped bool // guarded by mu
}

func newTestWriter(t testing.TB) *testWriter {
	w := &testWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.stopped = true; w.mu.Unlock() })
	return w
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.stopped {
		w.t.Log(string(p))
	}
	return len(p), nil
}

// childStderr logs a child's stderr to the test, and fails the test if
// the child reports a data race or crashes: the runtime prints "panic: "
// or "fatal error: " at the start of a line, where no log line starts.
type childStderr struct {
	t    testing.TB
	tail []byte // the end of the previous write, for a marker cut in two
}

func (w *childStderr) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	if w.tail == nil {
		w.tail = []byte("\n") // the start of the output is a line's
	}
	text := string(w.tail) + string(p)
	for _, bad := range []string{"WARNING: DATA RACE", "\npanic: ", "\nfatal error: "} {
		if strings.Contains(text, bad) {
			w.t.Errorf("child process printed %q", bad)
		}
	}
	w.tail = append(w.tail[:0], p[max(len(p)-32, 0):]...)
	return len(p), nil
}

// childSpec configures a child process. Durations are in milliseconds;
// zero keeps the test default.
type childSpec struct {
	Port            int    `json:"port"`
	Name            string `json:"name"`
	Role            Role   `json:"role"`
	HeartbeatMS     int    `json:"heartbeatMS"`
	ResponseMS      int    `json:"responseMS"`
	MaxWaitMS       int    `json:"maxWaitMS"`
	NoBroadcast     bool   `json:"noBroadcast"`
	SingleMode      bool   `json:"singleMode"`
	Secret          string `json:"secret"`
	DisableHBCheck  bool   `json:"disableHBCheck"`
	DrainTimeoutMS  int    `json:"drainTimeoutMS"`
	NoWaitForReady  bool   `json:"noWaitForReady"`
	MaxUnregistered int    `json:"maxUnregistered"`
	// ValueEcho makes valueEcho the real client, in place of testReal.
	ValueEcho bool `json:"valueEcho"`
	// LogEvents prints each line the client logs as an event too:
	// {"event":"log","line":text}.
	LogEvents bool `json:"logEvents"`
	// Mode, when set, runs a benchmark helper instead of a cluster
	// member: see benchChildMain. Count is its number of connections.
	Mode  string `json:"mode"`
	Count int    `json:"count"`
	// AllowUIDs is the child's Config.AllowUIDs.
	AllowUIDs []int `json:"allowUIDs"`
}

// msg is one line between parent and child.
type msg = map[string]any

// childMain runs a cluster member. Commands on stdin, each with an "id"
// echoed in its reply:
//
//	{"op":"invoke","method":m,"args":[...]}  reply invokeReply: {"result":r} or {"err":e,...}
//	{"op":"oneway","method":m,"args":[...]}
//	{"op":"subscribe","reg":r,"as":l}         values arrive as {"event":"value","reg":r,"as":l,"value":v}
//	{"op":"unsubscribe","as":l}               (or "reg":r when subscribed without "as")
//	{"op":"subErr","as":l}                    reply {"err":e}, e the listener's Err()
//	{"op":"publish","reg":r}
//	{"op":"status"}                           reply {"leader":b,"pid":p}
//	{"op":"failover","old":pid}               see childFailover
//	{"op":"hammer","method":m,"args":[...],"workers":n}  calls until "stop"
//	{"op":"hammered"}                         reply {"ok":n,"failed":n,"errs":[...],"results":{...}} so far
//	{"op":"stop"}                             stops the hammer, replies as "hammered"
//	{"op":"repeat","method":m,"args":[...],"n":n,"workers":w}  see repeatCalls
//	{"op":"pushEvery","reg":r,"everyMS":ms}  see pushEvery; replies at once
//	{"op":"close"}                            closes the client, replies, exits
//
// invoke, oneway, hammer and repeat take "timeoutMS", a deadline on each
// call.
//
// It prints {"event":"ready","leader":b,"pid":p} once ready, or
// {"event":"error","err":e} if Ready fails.
func childMain() int {
	var spec childSpec
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "bad child spec:", err)
		return 2
	}
	if spec.Mode != "" {
		return benchChildMain(spec)
	}
	cfg := DefaultConfig()
	cfg.Port = spec.Port
	cfg.Role = spec.Role
	cfg.SingleMode = spec.SingleMode
	cfg.Secret = spec.Secret
	cfg.AllowUIDs = spec.AllowUIDs
	cfg.DisableBroadcast = spec.NoBroadcast
	cfg.DisableHeartbeatCheck = spec.DisableHBCheck
	cfg.MaxWaitTime = 10 * time.Second
	cfg.DrainTimeout = 2 * time.Second
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ms := func(n int, d *time.Duration) {
		if n > 0 {
			*d = time.Duration(n) * time.Millisecond
		}
	}
	ms(spec.HeartbeatMS, &cfg.HeartbeatInterval)
	ms(spec.ResponseMS, &cfg.ResponseTimeout)
	ms(spec.MaxWaitMS, &cfg.MaxWaitTime)
	ms(spec.DrainTimeoutMS, &cfg.DrainTimeout)
	if spec.MaxUnregistered > 0 {
		cfg.MaxUnregistered = spec.MaxUnregistered
	}
	name := spec.Name
	if name == "" {
		name = "TestChannel"
	}

	var outMu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	out := func(m msg) {
		outMu.Lock()
		defer outMu.Unlock()
		enc.Encode(m)
	}
	if spec.LogEvents {
		cfg.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(os.Stderr, logEvents(out)), &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	real := newTestReal()
	real.name = "pid" + strconv.Itoa(os.Getpid())
	build := buildTestReal(real)
	if spec.ValueEcho {
		build = func(context.Context) (RealClient, error) { return valueEcho{}, nil }
	}
	c, err := New(name, cfg, build)
	if err != nil {
		out(msg{"event": "error", "err": err.Error()})
		return 1
	}
	if !spec.NoWaitForReady {
		if err := c.Ready(context.Background()); err != nil {
			out(msg{"event": "error", "err": err.Error()})
		} else {
			out(msg{"event": "ready", "leader": c.IsLeader(), "pid": os.Getpid()})
		}
	}
	subs := map[string]*Subscription{}
	var ham *hammer
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	for in.Scan() {
		var cmd childCmd
		if err := json.Unmarshal(in.Bytes(), &cmd); err != nil {
			out(msg{"event": "error", "err": err.Error()})
			continue
		}
		reply := func(m msg) {
			m["id"] = cmd.ID
			out(m)
		}
		switch cmd.Op {
		case "invoke":
			go func() {
				ctx, cancel := cmd.ctx()
				defer cancel()
				v, err := c.Invoke(ctx, cmd.Method, cmd.args()...)
				reply(invokeReply(v, err))
			}()
		case "oneway":
			ctx, cancel := cmd.ctx()
			err := c.InvokeOneway(ctx, cmd.Method, cmd.args()...)
			cancel()
			reply(msg{"err": errString(err)})
		case "subscribe":
			reg, as := string(cmd.Reg), cmd.label()
			s, err := c.Subscribe(cmd.Reg, func(v Value) {
				out(msg{"event": "value", "reg": json.RawMessage(reg), "as": as, "value": json.RawMessage(v.Bytes())})
			})
			if err == nil {
				subs[as] = s
			}
			reply(msg{"err": errString(err)})
		case "subErr":
			if s := subs[cmd.label()]; s != nil {
				reply(msg{"err": errString(s.Err())})
			} else {
				reply(msg{"err": "no such listener"})
			}
		case "unsubscribe":
			if s := subs[cmd.label()]; s != nil {
				s.Unsubscribe()
				delete(subs, cmd.label())
			}
			reply(msg{})
		case "publish":
			err := c.Publish(context.Background(), cmd.Reg)
			reply(msg{"err": errString(err)})
		case "status":
			reply(msg{"leader": c.IsLeader(), "pid": os.Getpid()})
		case "failover":
			go func() { reply(childFailover(c, cmd.Old)) }()
		case "hammer":
			if ham != nil {
				reply(msg{"err": "already hammering"})
				continue
			}
			ham = startHammer(c, &cmd)
			reply(msg{})
		case "hammered":
			if ham == nil {
				reply(msg{"err": "not hammering"})
				continue
			}
			reply(ham.stats())
		case "stop":
			if ham == nil {
				reply(msg{"err": "not hammering"})
				continue
			}
			reply(ham.stop())
			ham = nil
		case "repeat":
			go func() { reply(repeatCalls(c, &cmd)) }()
		case "pushEvery":
			go pushEvery(real, cmd.Reg, time.Duration(cmd.EveryMS)*time.Millisecond)
			reply(msg{})
		case "close":
			err := c.Close()
			reply(msg{"err": errString(err)})
			return 0
		default:
			reply(msg{"err": "unknown op " + cmd.Op})
		}
	}
	c.Close()
	return 0
}

// logEvents writes each line that a child logs as an event.
type logEvents func(m msg)

func (f logEvents) Write(p []byte) (int, error) {
	f(msg{"event": "log", "line": string(p)})
	return len(p), nil
}

// childCmd is one command to a child.
type childCmd struct {
	ID        int               `json:"id"`
	Op        string            `json:"op"`
	Method    string            `json:"method"`
	Args      []json.RawMessage `json:"args"`
	Reg       json.RawMessage   `json:"reg"`
	As        string            `json:"as"`        // a listener's label; default the reg's JSON
	TimeoutMS int               `json:"timeoutMS"` // a deadline on the call's context
	Workers   int               `json:"workers"`   // hammer: concurrent callers
	Old       float64           `json:"old"`       // failover: the pid of the leader to be killed
	N         int               `json:"n"`         // repeat: the number of calls
	EveryMS   int               `json:"everyMS"`   // pushEvery: the mean time between pushes
}

func (cmd *childCmd) args() []any {
	args := make([]any, len(cmd.Args))
	for i, a := range cmd.Args {
		args[i] = a
	}
	return args
}

func (cmd *childCmd) label() string {
	if cmd.As != "" {
		return cmd.As
	}
	return string(cmd.Reg)
}

func (cmd *childCmd) ctx() (context.Context, context.CancelFunc) {
	if cmd.TimeoutMS > 0 {
		return context.WithTimeout(context.Background(), time.Duration(cmd.TimeoutMS)*time.Millisecond)
	}
	return context.WithCancel(context.Background())
}

// invokeReply describes the outcome of an invoke: {"result":r}, or the
// error with what errors.Is and errors.As find in it.
func invokeReply(v Value, err error) msg {
	if err == nil {
		return msg{"result": json.RawMessage(v.Bytes())}
	}
	m := msg{"err": err.Error(), "lost": errors.Is(err, ErrLeaderLost), "timeout": errors.Is(err, ErrTimeout),
		"noLeader": errors.Is(err, ErrNoLeader), "closed": errors.Is(err, ErrClosed),
		"deadline": errors.Is(err, context.DeadlineExceeded)}
	var re *RemoteError
	if errors.As(err, &re) {
		m["name"], m["code"], m["message"], m["stack"] = re.Name, re.Code, re.Message, re.Stack
	}
	return m
}

// childFailover measures a failover from a follower's side: a call to
// the leader stays in flight (sleep) until the leader is killed, then
// "pid" is called until it succeeds on another leader than old. The
// reply has the failed calls, the first error, and the wall-clock times
// (unix ns) of that error (lostAt) and of the first success (at).
func childFailover(c *Client, old float64) msg {
	v, err := c.Invoke(context.Background(), "sleep", 60000)
	if err == nil {
		return msg{"err": "sleep returned " + v.String()}
	}
	lostAt := time.Now().UnixNano()
	failed, firstErr := 1, invokeReply(v, err)
	errs := map[string]int{} // later errors, a few kinds
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		v, err := c.Invoke(ctx, "pid")
		cancel()
		now := time.Now().UnixNano()
		if err != nil {
			failed++
			if _, ok := errs[err.Error()]; ok || len(errs) < 5 {
				errs[err.Error()]++
			}
			continue
		}
		var pid float64
		if v.Decode(&pid) == nil && pid != old {
			return msg{"failed": failed, "first": firstErr, "errs": errs, "lostAt": lostAt, "at": now, "pid": pid}
		}
	}
	return msg{"err": "no call succeeded on a new leader within 10s", "failed": failed, "first": firstErr, "errs": errs}
}

// repeatCalls makes cmd.N calls of cmd.Method from cmd.Workers
// goroutines and replies {"outcomes":{o:n},"messages":{o:text}}, where an
// outcome o is "ok", "code C" for a *RemoteError with the code C, or else
// the error's text; messages holds one error message of each outcome.
func repeatCalls(c *Client, cmd *childCmd) msg {
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	outcomes, messages := map[string]int{}, map[string]string{}
	for range max(cmd.Workers, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(cmd.N) {
				ctx, cancel := cmd.ctx()
				_, err := c.Invoke(ctx, cmd.Method, cmd.args()...)
				cancel()
				o, text := "ok", ""
				var re *RemoteError
				if errors.As(err, &re) {
					o, text = "code "+re.Code, re.Message
				} else if err != nil {
					o, text = err.Error(), err.Error()
				}
				mu.Lock()
				outcomes[o]++
				messages[o] = text
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return msg{"outcomes": outcomes, "messages": messages}
}

// pushEvery sets reg's subscription of r to the wall-clock time (unix
// ns) at random moments, on average every mean apart, while something
// is subscribed to it, until the process ends.
func pushEvery(r *testReal, reg json.RawMessage, mean time.Duration) {
	key, err := marshalReg(reg)
	if err != nil || mean <= 0 {
		return
	}
	for {
		time.Sleep(rand.N(2 * mean))
		r.mu.Lock()
		push := r.push[string(key)]
		r.mu.Unlock()
		if push != nil {
			push(time.Now().UnixNano())
		}
	}
}

// hammer calls a method without pause from several goroutines until
// stopped, counting successes and failures.
type hammer struct {
	stopped chan struct{}
	wg      sync.WaitGroup

	mu       sync.Mutex
	ok, fail int
	errs     []string // the first few errors
	results  map[string]int
}

func startHammer(c *Client, cmd *childCmd) *hammer {
	h := &hammer{stopped: make(chan struct{}), results: map[string]int{}}
	for range max(cmd.Workers, 1) {
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			for {
				select {
				case <-h.stopped:
					return
				default:
				}
				ctx, cancel := cmd.ctx()
				v, err := c.Invoke(ctx, cmd.Method, cmd.args()...)
				cancel()
				h.mu.Lock()
				if err != nil {
					h.fail++
					if len(h.errs) < 5 {
						h.errs = append(h.errs, err.Error())
					}
				} else {
					h.ok++
					if len(h.results) < 10 {
						h.results[v.String()]++
					}
				}
				h.mu.Unlock()
			}
		}()
	}
	return h
}

// stop ends the hammer and reports its stats.
func (h *hammer) stop() msg {
	close(h.stopped)
	h.wg.Wait()
	return h.stats()
}

// stats reports {"ok":n,"failed":n,"errs":[...],"results":{r:n}}.
func (h *hammer) stats() msg {
	h.mu.Lock()
	defer h.mu.Unlock()
	return msg{"ok": h.ok, "failed": h.fail, "errs": slices.Clone(h.errs), "results": maps.Clone(h.results)}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// child is a cluster member process seen from the test.
type child struct {
	lines
	cmd *exec.Cmd

	mu     sync.Mutex
	events chan msg      // every line without an id
	log    []msg         // guarded by mu: every line without an id
	logged chan struct{} // guarded by mu: closed and replaced when log grows
}

// startChild starts a cluster member with spec, its command changed by
// each of opts. It is killed when the test ends.
func startChild(t testing.TB, spec childSpec, opts ...func(*exec.Cmd)) *child {
	t.Helper()
	b, _ := json.Marshal(spec)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(b))
	cmd.Stderr = &childStderr{t: t}
	for _, opt := range opts {
		opt(cmd)
	}
	stdin, stdout := startPiped(t, cmd)
	c := &child{lines: newLines(t, "child", stdin, cmd.Process.Pid), cmd: cmd,
		events: make(chan msg, 1024), logged: make(chan struct{})}
	go c.readLoop(stdout)
	t.Cleanup(func() {
		c.cmd.Process.Signal(syscall.SIGCONT)
		c.cmd.Process.Kill()
		<-c.exited
	})
	return c
}

// serveEach accepts connections on ln and runs handle on each, in a
// goroutine of its own, until the test ends; then it closes ln and every
// connection, and waits for those goroutines.
func serveEach(tb testing.TB, ln net.Listener, handle func(net.Conn)) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn // guarded by mu
	closed := false      // guarded by mu
	tb.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for _, nc := range conns {
			nc.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				nc.Close()
				return
			}
			conns = append(conns, nc)
			wg.Add(1)
			mu.Unlock()
			go func() { defer wg.Done(); handle(nc) }()
		}
	}()
}

// startPiped starts cmd with a pipe to its stdin and one from its
// stdout.
func startPiped(t testing.TB, cmd *exec.Cmd) (io.WriteCloser, io.ReadCloser) {
	t.Helper()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return stdin, stdout
}

// readMessages calls keep with every JSON line that r carries and that
// is not the reply to a command, until r ends; bad gets the other lines.
// Then it waits for cmd and closes l.exited.
func (l *lines) readMessages(r io.Reader, cmd *exec.Cmd, bad func(line []byte), keep func(m msg)) {
	defer func() {
		cmd.Wait()
		close(l.exited)
	}()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m msg
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			bad(sc.Bytes())
			continue
		}
		if !l.route(m) {
			keep(m)
		}
	}
}

func (c *child) readLoop(r io.Reader) {
	c.readMessages(r, c.cmd, func([]byte) {}, func(m msg) {
		c.mu.Lock()
		c.log = append(c.log, m)
		close(c.logged)
		c.logged = make(chan struct{})
		c.mu.Unlock()
		select {
		case c.events <- m:
		default:
		}
	})
}

// waitLog waits until the child has printed an event that match accepts,
// at any time since it started, and returns it.
func (c *child) waitLog(match func(msg) bool, timeout time.Duration) msg {
	c.t.Helper()
	deadline := time.After(timeout)
	seen := 0
	for {
		c.mu.Lock()
		log, logged := c.log, c.logged
		c.mu.Unlock()
		for _, m := range log[seen:] {
			if match(m) {
				return m
			}
		}
		seen = len(log)
		select {
		case <-logged:
		case <-deadline:
			c.t.Fatalf("child %d: no matching event within %v", c.pid, timeout)
			return nil
		}
	}
}

// countLog counts the events printed so far that match accepts.
func (c *child) countLog(match func(msg) bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, m := range c.log {
		if match(m) {
			n++
		}
	}
	return n
}

// isValue matches a subscription value event of listener as with value
// v (compared as JSON text).
func isValue(as string, v any) func(msg) bool {
	want, _ := json.Marshal(v)
	return func(m msg) bool {
		if m["event"] != "value" || m["as"] != as {
			return false
		}
		got, _ := json.Marshal(m["value"])
		return string(got) == string(want)
	}
}

// call invokes method on the child and returns its result; an error
// fails the test.
func (c *child) call(method string, args ...any) any {
	c.t.Helper()
	m := c.do(msg{"op": "invoke", "method": method, "args": args}, 10*time.Second)
	if e, ok := m["err"]; ok {
		c.t.Fatalf("child %d: %s: %v", c.pid, method, e)
	}
	return m["result"]
}

// ok runs a command that replies {"err":""} and fails the test on an
// error.
func (c *child) ok(cmd msg) {
	c.t.Helper()
	m := c.do(cmd, 10*time.Second)
	if e, _ := m["err"].(string); e != "" {
		c.t.Fatalf("child %d: %v: %s", c.pid, cmd, e)
	}
}

// lines is the command side of a member process, Go or Node.js: commands
// go to its stdin with an id, and each reply is matched to its command by
// that id.
type lines struct {
	t      testing.TB
	name   string // "child" or "node", for messages
	stdin  io.WriteCloser
	pid    int
	exited chan struct{} // closed when the process has exited

	rmu     sync.Mutex
	nextID  int              // guarded by rmu
	replies map[int]chan msg // guarded by rmu
}

func newLines(t testing.TB, name string, stdin io.WriteCloser, pid int) lines {
	return lines{t: t, name: name, stdin: stdin, pid: pid, exited: make(chan struct{}), replies: map[int]chan msg{}}
}

// route hands a reply to the command it answers. It reports false for a
// line without an id, an event.
func (l *lines) route(m msg) bool {
	id, ok := m["id"].(float64)
	if !ok {
		return false
	}
	l.rmu.Lock()
	ch := l.replies[int(id)]
	delete(l.replies, int(id))
	l.rmu.Unlock()
	if ch != nil {
		ch <- m
	}
	return true
}

// send sends a command and returns the channel of its reply.
func (l *lines) send(cmd msg) <-chan msg {
	l.rmu.Lock()
	l.nextID++
	id := l.nextID
	ch := make(chan msg, 1)
	l.replies[id] = ch
	l.rmu.Unlock()
	cmd["id"] = id
	b, _ := json.Marshal(cmd)
	l.stdin.Write(append(b, '\n'))
	return ch
}

// do sends a command and waits for its reply.
func (l *lines) do(cmd msg, timeout time.Duration) msg {
	l.t.Helper()
	select {
	case m := <-l.send(cmd):
		return m
	case <-time.After(timeout):
		l.t.Fatalf("%s %d: no reply to %v within %v", l.name, l.pid, cmd, timeout)
	case <-l.exited:
		l.t.Fatalf("%s %d exited before replying to %v", l.name, l.pid, cmd)
	}
	return nil
}

// event waits for the next event that match accepts.
func (c *child) event(match func(msg) bool, timeout time.Duration) msg {
	c.t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case m := <-c.events:
			if match(m) {
				return m
			}
		case <-deadline:
			c.t.Fatalf("child %d: no matching event within %v", c.pid, timeout)
			return nil
		}
	}
}

// ready waits for the child's ready event and says whether it leads.
func (c *child) ready(timeout time.Duration) bool {
	c.t.Helper()
	m := c.event(func(m msg) bool { return m["event"] == "ready" || m["event"] == "error" }, timeout)
	if m["event"] == "error" {
		c.t.Fatalf("child %d: %v", c.pid, m["err"])
	}
	return m["leader"] == true
}

func (c *child) signal(sig syscall.Signal) {
	c.t.Helper()
	if err := c.cmd.Process.Signal(sig); err != nil {
		c.t.Fatalf("signal %v to %d: %v", sig, c.pid, err)
	}
}

// stop sends SIGSTOP and waits until every thread of the process is
// stopped: a thread running on another core stops a moment after the
// signal is sent, and may answer a request meanwhile.
func (c *child) stop() {
	c.t.Helper()
	c.signal(syscall.SIGSTOP)
	deadline := time.Now().Add(10 * time.Second)
	for !allStopped(c.pid) {
		if time.Now().After(deadline) {
			c.t.Fatalf("child %d not stopped 10s after SIGSTOP", c.pid)
		}
		time.Sleep(time.Millisecond)
	}
}

// allStopped reports whether every thread of process pid is stopped.
func allStopped(pid int) bool {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil || len(tasks) == 0 {
		return false
	}
	for _, task := range tasks {
		b, err := os.ReadFile(dir + "/" + task.Name() + "/stat")
		if err != nil {
			return false
		}
		// pid (comm) state ...: comm may hold spaces, the state follows
		// the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
			return false
		}
	}
	return true
}

// kill sends SIGKILL and waits until the process is gone.
func (c *child) kill() {
	c.signal(syscall.SIGKILL)
	<-c.exited
}

func (c *child) String() string { return "child " + strconv.Itoa(c.pid) }
