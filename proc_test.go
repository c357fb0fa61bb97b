package clusterclient

// Test infrastructure: a real client for tests, and child processes that
// re-run this test binary as cluster members, driven over stdin/stdout
// with one JSON object per line.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
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
type testReal struct {
	mu         sync.Mutex
	push       map[string]func(any) // by reg JSON
	subscribes map[string]int       // Subscribe calls by reg JSON
	published  []json.RawMessage
	closed     bool
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
	switch method {
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
	case "sleep":
		var ms int
		if err := arg(0, &ms); err != nil {
			return nil, err
		}
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
	return nil, fmt.Errorf("%w: method %q", ErrNotImplemented, method)
}

func (r *testReal) Subscribe(reg json.RawMessage, push func(any)) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.subscribes[string(reg)]++
	r.push[string(reg)] = push
	return nil
}

func (r *testReal) Unsubscribe(reg json.RawMessage) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.push, string(reg))
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
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// testConfig returns a config for port with short intervals, logging to
// the test.
func testConfig(t testing.TB, port int) *Config {
	cfg := DefaultConfig()
	cfg.Port = port
	cfg.MaxWaitTime = 10 * time.Second
	cfg.ResponseTimeout = 3 * time.Second
	cfg.DrainTimeout = 2 * time.Second
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	return cfg
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
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
}

// msg is one line between parent and child.
type msg = map[string]any

// childMain runs a cluster member. Commands on stdin, each with an "id"
// echoed in its reply:
//
//	{"op":"invoke","method":m,"args":[...]}  reply {"result":r} or {"err":e,"code":c,"name":n}
//	{"op":"oneway","method":m,"args":[...]}
//	{"op":"subscribe","reg":r}                values arrive as {"event":"value","key":k,"value":v}
//	{"op":"unsubscribe","reg":r}
//	{"op":"publish","reg":r}
//	{"op":"status"}                           reply {"leader":b,"pid":p}
//	{"op":"close"}                            closes the client, replies, exits
//
// It prints {"event":"ready","leader":b,"pid":p} once ready, or
// {"event":"error","err":e} if Ready fails.
func childMain() int {
	var spec childSpec
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "bad child spec:", err)
		return 2
	}
	cfg := DefaultConfig()
	cfg.Port = spec.Port
	cfg.Role = spec.Role
	cfg.SingleMode = spec.SingleMode
	cfg.Secret = spec.Secret
	cfg.Broadcast = !spec.NoBroadcast
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
	c, err := New(name, cfg, buildTestReal(newTestReal()))
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
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	for in.Scan() {
		var cmd struct {
			ID     int               `json:"id"`
			Op     string            `json:"op"`
			Method string            `json:"method"`
			Args   []json.RawMessage `json:"args"`
			Reg    json.RawMessage   `json:"reg"`
		}
		if err := json.Unmarshal(in.Bytes(), &cmd); err != nil {
			out(msg{"event": "error", "err": err.Error()})
			continue
		}
		args := make([]any, len(cmd.Args))
		for i, a := range cmd.Args {
			args[i] = a
		}
		reply := func(m msg) {
			m["id"] = cmd.ID
			out(m)
		}
		switch cmd.Op {
		case "invoke":
			go func() {
				v, err := c.Invoke(context.Background(), cmd.Method, args...)
				if err != nil {
					m := msg{"err": err.Error(), "lost": errors.Is(err, ErrLeaderLost), "timeout": errors.Is(err, ErrTimeout)}
					var re *RemoteError
					if errors.As(err, &re) {
						m["name"], m["code"], m["message"], m["stack"] = re.Name, re.Code, re.Message, re.Stack
					}
					reply(m)
					return
				}
				reply(msg{"result": json.RawMessage(v.Bytes())})
			}()
		case "oneway":
			err := c.InvokeOneway(context.Background(), cmd.Method, args...)
			reply(msg{"err": errString(err)})
		case "subscribe":
			key := string(cmd.Reg)
			s, err := c.Subscribe(cmd.Reg, func(v Value) {
				out(msg{"event": "value", "reg": json.RawMessage(key), "value": json.RawMessage(v.Bytes())})
			})
			if err == nil {
				subs[key] = s
			}
			reply(msg{"err": errString(err)})
		case "unsubscribe":
			if s := subs[string(cmd.Reg)]; s != nil {
				s.Unsubscribe()
				delete(subs, string(cmd.Reg))
			}
			reply(msg{})
		case "publish":
			err := c.Publish(context.Background(), cmd.Reg)
			reply(msg{"err": errString(err)})
		case "status":
			reply(msg{"leader": c.IsLeader(), "pid": os.Getpid()})
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

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// child is a cluster member process seen from the test.
type child struct {
	t      testing.TB
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	pid    int
	exited chan struct{}

	mu      sync.Mutex
	nextID  int
	replies map[int]chan msg
	events  chan msg // every line without an id
}

// startChild starts a cluster member with spec. It is killed when the
// test ends.
func startChild(t testing.TB, spec childSpec) *child {
	t.Helper()
	b, _ := json.Marshal(spec)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(b))
	cmd.Stderr = testWriter{t}
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
	c := &child{t: t, cmd: cmd, stdin: stdin, pid: cmd.Process.Pid, exited: make(chan struct{}),
		replies: map[int]chan msg{}, events: make(chan msg, 1024)}
	go c.readLoop(stdout)
	t.Cleanup(func() {
		c.cmd.Process.Signal(syscall.SIGCONT)
		c.cmd.Process.Kill()
		<-c.exited
	})
	return c
}

func (c *child) readLoop(r io.Reader) {
	defer func() {
		c.cmd.Wait()
		close(c.exited)
	}()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m msg
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			continue
		}
		if id, ok := m["id"].(float64); ok {
			c.mu.Lock()
			ch := c.replies[int(id)]
			delete(c.replies, int(id))
			c.mu.Unlock()
			if ch != nil {
				ch <- m
			}
			continue
		}
		select {
		case c.events <- m:
		default:
		}
	}
}

// send sends a command and returns the channel of its reply.
func (c *child) send(cmd msg) <-chan msg {
	c.mu.Lock()
	c.nextID++
	id := c.nextID
	ch := make(chan msg, 1)
	c.replies[id] = ch
	c.mu.Unlock()
	cmd["id"] = id
	b, _ := json.Marshal(cmd)
	c.stdin.Write(append(b, '\n'))
	return ch
}

// do sends a command and waits for its reply.
func (c *child) do(cmd msg, timeout time.Duration) msg {
	c.t.Helper()
	select {
	case m := <-c.send(cmd):
		return m
	case <-time.After(timeout):
		c.t.Fatalf("child %d: no reply to %v within %v", c.pid, cmd, timeout)
	case <-c.exited:
		c.t.Fatalf("child %d exited before replying to %v", c.pid, cmd)
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

// kill sends SIGKILL and waits until the process is gone.
func (c *child) kill() {
	c.signal(syscall.SIGKILL)
	<-c.exited
}

func (c *child) String() string { return "child " + strconv.Itoa(c.pid) }
