package clusterclient

// Tests of the API a real client's author meets: the zero Config,
// Values nested in results, error names and codes, typed methods.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"reflect"
	"strings"
	"testing"
	"time"
)

// apiPort returns a port on 127.0.0.1 that was free a moment ago.
func apiPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// apiPair starts a leader and then a follower of one channel in this
// process, each with a copy of cfg and the role set, and waits until both
// are ready. They talk over TCP on loopback.
func apiPair(t *testing.T, cfg Config, build BuildFunc) (lead, fol *Client) {
	t.Helper()
	start := func(role Role) *Client {
		c := cfg
		c.Role = role
		cl, err := New("api", &c, build)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := cl.Ready(ctx); err != nil {
			t.Fatal(err)
		}
		return cl
	}
	lead = start(RoleLeader)
	fol = start(RoleFollower)
	if !lead.IsLeader() || fol.IsLeader() || fol.fol() == nil {
		t.Fatalf("leader leads: %v, follower leads: %v", lead.IsLeader(), fol.IsLeader())
	}
	return lead, fol
}

// realFunc is a RealClient made of one function.
type realFunc func(ctx context.Context, method string, args []Value) (any, error)

func (f realFunc) Invoke(ctx context.Context, method string, args []Value) (any, error) {
	return f(ctx, method, args)
}

func buildReal(r RealClient) BuildFunc {
	return func(context.Context) (RealClient, error) { return r, nil }
}

func callCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestConfigZeroWorks: a Config with only Port set serves calls and
// pushes between a leader and a follower, with every other field at its
// default.
func TestConfigZeroWorks(t *testing.T) {
	echo := realFunc(func(_ context.Context, method string, args []Value) (any, error) {
		return []any{method, args[0]}, nil
	})
	port := apiPort(t)
	lead, fol := apiPair(t, Config{Port: port}, buildReal(echo))
	for _, c := range []*Client{lead, fol} {
		v, err := c.Invoke(callCtx(t), "echo", "hi")
		if err != nil || v.String() != `["echo","hi"]` {
			t.Fatalf("invoke: %s, %v", v, err)
		}
	}

	want := *DefaultConfig()
	want.Port, want.Role, want.SingleMode = port, RoleFollower, false
	got := fol.cfg
	if got.Codec != want.Codec || got.Logger != want.Logger {
		t.Fatalf("Codec %v, Logger %v: want the defaults", got.Codec, got.Logger)
	}
	got.Codec, got.Logger, want.Codec, want.Logger = nil, nil, nil, nil
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("zero Config became\n%+v\nwant\n%+v", got, want)
	}
}

// TestConfigDefaults: zero fields take their defaults, Port 0 the
// environment's port; set fields are kept; nil is DefaultConfig.
func TestConfigDefaults(t *testing.T) {
	t.Setenv(EnvPort, "7801")
	t.Setenv(EnvSingleMode, "1")
	d := DefaultConfig()
	if d.Port != 7801 || !d.SingleMode || d.DisableBroadcast || d.MaxWaitTime != 30*time.Second ||
		d.MaxQueuedBytes != 2*DefaultMaxPacketSize || d.Codec != (JSONCodec{}) || d.Logger != slog.Default() {
		t.Fatalf("DefaultConfig: %+v", d)
	}
	z := withDefaults(&Config{})
	if z.Port != 7801 || z.SingleMode || z.DisableBroadcast || z.ResponseTimeout != 3*time.Second ||
		z.HeartbeatInterval != 20*time.Second || z.RegisterTimeout != 5*time.Second || z.DrainTimeout != 5*time.Second ||
		z.MaxPacketSize != DefaultMaxPacketSize || z.MaxUnregistered != 128 || z.SubscribeTimeout != 0 {
		t.Fatalf("zero Config with defaults: %+v", z)
	}
	if n := withDefaults(nil); n.Port != 7801 || n.DisableBroadcast {
		t.Fatalf("nil Config with defaults: %+v", n)
	}
	// A bigger packet bound makes a bigger default queue.
	s := withDefaults(&Config{Port: 9, MaxPacketSize: 64 << 20, MaxWaitTime: time.Second})
	if s.Port != 9 || s.MaxQueuedBytes != 128<<20 || s.MaxWaitTime != time.Second {
		t.Fatalf("set fields: %+v", s)
	}
	if err := VerifyConfig(&Config{MaxPacketSize: 64 << 20}); err != nil {
		t.Fatal(err)
	}
}

// TestConfigVerify: VerifyConfig accepts the zero Config and refuses
// each value out of range, naming the field.
func TestConfigVerify(t *testing.T) {
	t.Setenv(EnvPort, "")
	for _, c := range []*Config{nil, {}, DefaultConfig(), {Port: 65535, MaxPacketSize: 1 << 10, MaxQueuedBytes: 1<<10 + HeaderSize}} {
		if err := VerifyConfig(c); err != nil {
			t.Errorf("VerifyConfig(%+v): %v", c, err)
		}
	}
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Port: -1}, "Port"},
		{Config{Port: 65536}, "Port"},
		{Config{Role: RoleFollower + 1}, "Role"},
		{Config{MaxWaitTime: -1}, "MaxWaitTime -1ns"},
		{Config{ResponseTimeout: -time.Second}, "ResponseTimeout -1s"},
		{Config{ResponseTimeout: 25 * 24 * time.Hour}, "ResponseTimeout"},
		{Config{HeartbeatInterval: -1}, "negative"},
		{Config{SubscribeTimeout: -1}, "SubscribeTimeout -1ns"},
		{Config{RegisterTimeout: -1}, "RegisterTimeout -1ns"},
		{Config{DrainTimeout: -1}, "DrainTimeout -1ns"},
		{Config{MaxPacketSize: 1023}, "MaxPacketSize"},
		{Config{MaxPacketSize: 1<<30 + 1}, "MaxPacketSize"},
		{Config{MaxPacketSize: -1}, "MaxPacketSize"},
		{Config{MaxQueuedBytes: DefaultMaxPacketSize}, "MaxQueuedBytes"},
		{Config{MaxQueuedBytes: -1}, "MaxQueuedBytes"},
		{Config{MaxUnregistered: -1}, "MaxUnregistered"},
	} {
		err := VerifyConfig(&tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("VerifyConfig(%+v) = %v, want an error naming %s", tc.cfg, err, tc.want)
		}
		if _, err := New("api", &tc.cfg, buildReal(Methods{})); err == nil {
			t.Errorf("New accepted %+v", tc.cfg)
		}
	}
	t.Setenv(EnvPort, "70000")
	if err := VerifyConfig(&Config{}); err == nil || !strings.Contains(err.Error(), "70000") {
		t.Errorf("port 70000 from the environment: %v", err)
	}
}

// TestValueNestedResults: Values that a real client puts inside its
// result, in a slice, a map or a struct field, reach the caller as they
// came, on the leader and through a follower.
func TestValueNestedResults(t *testing.T) {
	type pair struct {
		First Value            `json:"first"`
		Rest  []Value          `json:"rest"`
		ByKey map[string]Value `json:"byKey"`
		None  Value            `json:"none"`
		Ptr   *Value           `json:"ptr"`
	}
	real := realFunc(func(_ context.Context, method string, args []Value) (any, error) {
		switch method {
		case "slice":
			return []any{args[0], args[1]}, nil
		case "struct":
			return pair{First: args[0], Rest: args[1:], ByKey: map[string]Value{"b": args[1]}, Ptr: &args[0]}, nil
		case "itself":
			return args[1], nil
		}
		return Value{}, nil
	})
	lead, fol := apiPair(t, Config{Port: apiPort(t)}, buildReal(real))
	a := map[string]any{"k": []int{1, 2}, "s": "<&>"}
	b := json.RawMessage(`[true,null,"x"]`)
	for _, c := range []*Client{lead, fol} {
		for method, want := range map[string]string{
			"slice":  `[{"k":[1,2],"s":"<&>"},[true,null,"x"]]`,
			"struct": `{"first":{"k":[1,2],"s":"<&>"},"rest":[[true,null,"x"]],"byKey":{"b":[true,null,"x"]},"none":null,"ptr":{"k":[1,2],"s":"<&>"}}`,
			"itself": `[true,null,"x"]`,
			"empty":  `null`,
		} {
			v, err := c.Invoke(callCtx(t), method, a, b)
			if err != nil || v.String() != want {
				t.Errorf("%s (leads: %v): %s, %v\nwant %s", method, c.IsLeader(), v, err, want)
			}
		}
	}
	// The Value marshals the same way alone, with encoding/json and the
	// codec, and as an argument.
	v := Value{data: []byte(`{"a":1}`)}
	for _, x := range []any{v, &v, []Value{v}} {
		j, err := json.Marshal(x)
		c, cerr := JSONCodec{}.Marshal(x)
		if err != nil || cerr != nil || string(j) != string(c) || !strings.Contains(string(j), `{"a":1}`) {
			t.Errorf("%T: json %s %v, codec %s %v", x, j, err, c, cerr)
		}
	}
	if b, err := (JSONCodec{}).Marshal(Value{}); err != nil || string(b) != "null" {
		t.Errorf("zero Value: %s, %v", b, err)
	}
	if b, err := (JSONCodec{}).Marshal([]byte("ab")); err != nil || string(b) != `"YWI="` {
		t.Errorf("[]byte: %s, %v", b, err)
	}
}

// namedError has a name and a code, as a JavaScript error can.
type namedError struct{}

func (namedError) Error() string     { return "the key is locked" }
func (namedError) ErrorName() string { return "LockError" }
func (namedError) ErrorCode() string { return "ELOCKED" }

// TestRemoteErrorName: an error's ErrorName and ErrorCode, anywhere in
// its chain, give the caller's *RemoteError its Name and Code, on the
// leader and through a follower; without them the name is "Error".
func TestRemoteErrorName(t *testing.T) {
	real := realFunc(func(_ context.Context, method string, _ []Value) (any, error) {
		if method == "plain" {
			return nil, errors.New("plain failure")
		}
		return nil, fmt.Errorf("set: %w", namedError{})
	})
	lead, fol := apiPair(t, Config{Port: apiPort(t)}, buildReal(real))
	for _, c := range []*Client{lead, fol} {
		_, err := c.Invoke(callCtx(t), "set", "k")
		var re *RemoteError
		if !errors.As(err, &re) || re.Name != "LockError" || re.Code != "ELOCKED" || re.Message != "set: the key is locked" {
			t.Errorf("leads %v: %#v", c.IsLeader(), err)
		}
		if err.Error() != "clusterclient: remote LockError: set: the key is locked (ELOCKED)" {
			t.Errorf("leads %v: %q", c.IsLeader(), err)
		}
		if _, err = c.Invoke(callCtx(t), "plain"); !errors.As(err, &re) || re.Name != "Error" || re.Code != "" {
			t.Errorf("leads %v: plain error %#v", c.IsLeader(), err)
		}
	}
}

// TestMethodTyped: Methods built with Method decode the argument into the
// function's type and encode its result; a bad argument, a wrong number
// of arguments and an unknown method each get a *RemoteError with a
// code, on the leader and through a follower, and the leader keeps
// serving.
func TestMethodTyped(t *testing.T) {
	type query struct {
		Name  string `json:"name"`
		Limit int    `json:"limit"`
	}
	m := Methods{}
	Method(m, "lookup", func(_ context.Context, q query) ([]string, error) {
		if q.Name == "" {
			return nil, namedError{}
		}
		return []string{q.Name + "-a", q.Name + "-b"}[:q.Limit], nil
	})
	Method(m, "double", func(ctx context.Context, n int) (int, error) { return 2 * n, ctx.Err() })
	lead, fol := apiPair(t, Config{Port: apiPort(t)}, buildReal(m))
	for _, c := range []*Client{lead, fol} {
		ctx := callCtx(t)
		addrs, err := Invoke[[]string](ctx, c, "lookup", query{Name: "users", Limit: 2})
		if err != nil || len(addrs) != 2 || addrs[1] != "users-b" {
			t.Fatalf("lookup: %v, %v", addrs, err)
		}
		if n, err := Invoke[int](ctx, c, "double", 21); n != 42 || err != nil {
			t.Fatalf("double: %v, %v", n, err)
		}
		for _, tc := range []struct {
			method, code, msg string
			args              []any
		}{
			{"double", "ERR_CLUSTER_BAD_ARGUMENT", "double: bad argument: json: cannot unmarshal string", []any{"21"}},
			{"lookup", "ERR_CLUSTER_BAD_ARGUMENT", "lookup: bad argument: json: cannot unmarshal array", []any{[]int{1}}},
			{"lookup", "ERR_CLUSTER_BAD_ARGUMENT", "lookup: bad argument: 2 arguments, want 1", []any{query{}, query{}}},
			{"double", "ERR_CLUSTER_BAD_ARGUMENT", "double: bad argument: 0 arguments, want 1", nil},
			{"triple", "ERR_CLUSTER_NO_METHOD", `no method "triple"`, []any{1}},
			{"lookup", "ELOCKED", "the key is locked", []any{query{}}},
		} {
			_, err := c.Invoke(ctx, tc.method, tc.args...)
			var re *RemoteError
			if !errors.As(err, &re) || re.Code != tc.code || !strings.HasPrefix(re.Message, tc.msg) {
				t.Errorf("leads %v: %s%v: %v, want code %s and %q", c.IsLeader(), tc.method, tc.args, err, tc.code, tc.msg)
			}
		}
	}
}
