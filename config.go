package clusterclient

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"time"
)

// Environment variables read by DefaultConfig. They are the reference's
// names, so one setting serves Node.js and Go processes alike.

// EnvPort overrides the default port (7777).
const EnvPort = "NODE_CLUSTER_CLIENT_PORT"

// EnvSingleMode set to "1" turns single mode on.
const EnvSingleMode = "NODE_CLUSTER_CLIENT_SINGLE_MODE"

// Role says how a client takes part in the election.
type Role int

// RoleAuto competes for the port: the winner leads, the others follow.
const RoleAuto Role = 0

// RoleLeader must lead: New fails at once if the port is taken.
const RoleLeader Role = 1

// RoleFollower never listens: it dials until a leader answers or
// Config.MaxWaitTime runs out.
const RoleFollower Role = 2

// Config tunes a Client. A zero field means its default, as in
// http.Server, so &Config{Port: 7800} is a complete configuration; New
// refuses values out of range. The defaults are DefaultConfig's, except
// that a zero Config ignores NODE_CLUSTER_CLIENT_SINGLE_MODE: start from
// DefaultConfig to take single mode from the environment.
type Config struct {
	// Port is the TCP port on 127.0.0.1 that processes compete for. One
	// port carries any number of channels. Default 7777, or the value of
	// NODE_CLUSTER_CLIENT_PORT (0 means that default). Range 1 to 65535.
	Port int

	// Role is RoleAuto (default), RoleLeader or RoleFollower.
	Role Role

	// MaxWaitTime bounds how long a client looks for a leader before
	// Ready and waiting calls fail with ErrNoLeader. The client keeps
	// looking afterwards. Default 30 s.
	MaxWaitTime time.Duration

	// ResponseTimeout bounds each call that waits for the leader's
	// answer, and is the timeout carried in its packet: the leader runs
	// the real client's method with that deadline. A shorter deadline on
	// the caller's context wins. Default 3 s.
	ResponseTimeout time.Duration

	// MaxInvokeTime bounds how long the leader lets an invoke from a
	// follower run, whatever timeout its packet asks for (a packet may
	// ask for up to 2^31-1 ms); past it the method's context ends and
	// the caller gets the method's error. Default 2 × ResponseTimeout.
	MaxInvokeTime time.Duration

	// HeartbeatInterval is how often a follower that has heard nothing
	// from its leader sends a heartbeat. A follower that then hears
	// nothing for another interval drops the connection and elects
	// again; a leader drops a connection silent for three intervals.
	// Default 20 s.
	HeartbeatInterval time.Duration

	// DisableHeartbeatCheck keeps heartbeats flowing but never drops a
	// silent peer: for a process stopped in a debugger. Default false.
	DisableHeartbeatCheck bool

	// DisableBroadcast makes the leader push each subscribed value to one
	// subscriber picked at random instead of to every subscriber, and not
	// replay the latest value to late subscribers. Default false: every
	// subscriber gets every value.
	DisableBroadcast bool

	// SubscribeTimeout, when positive, logs a warning if a key's first
	// value has not arrived that long after the key's first listener
	// subscribed. Default 0: off.
	SubscribeTimeout time.Duration

	// SingleMode skips the cluster: every process builds its own real
	// client and no port is used. False in a zero Config; DefaultConfig
	// sets it when NODE_CLUSTER_CLIENT_SINGLE_MODE is "1".
	SingleMode bool

	// Codec encodes app objects: invoke arguments and results, pushed
	// values. Default JSONCodec, which is what a Node.js peer with a JSON
	// transcode reads and writes. Every process on a port must use the
	// same codec.
	Codec Codec

	// Logger receives warnings: dropped connections and why, real client
	// errors that no caller sees. Default slog.Default().
	Logger *slog.Logger

	// MaxPacketSize bounds conn length plus app length of a packet read
	// from a peer; a larger one closes the connection. Default
	// DefaultMaxPacketSize (16 MiB). Range 1 KiB to 1 GiB.
	MaxPacketSize int

	// MaxQueuedBytes bounds the bytes waiting to be written to one
	// connection. A peer that stops reading its socket is dropped when
	// its queue passes the bound, or when a write to it makes no progress
	// for between half of ResponseTimeout and all of it, so it cannot
	// hold memory or block other peers; it reconnects by itself. On the
	// leader it also bounds what the invokes that one connection has
	// running hold (as does a limit of 1024 such invokes): their
	// arguments' bytes plus 64 bytes per argument, decoded. Past it the
	// leader reads nothing more from that connection until one ends; an
	// invoke that alone would hold more is refused with Code
	// "ERR_CLUSTER_TOO_LARGE" and the connection stays. Default 2 ×
	// MaxPacketSize; at least MaxPacketSize + HeaderSize.
	MaxQueuedBytes int

	// RegisterTimeout bounds how long a new connection to the leader may
	// take to send its register_channel packet. Default 5 s.
	RegisterTimeout time.Duration

	// MaxUnregistered bounds the connections that a leader holds before
	// they have registered; past it the oldest is closed. Default 128.
	MaxUnregistered int

	// DrainTimeout bounds how long Close on a leader waits for calls in
	// flight to finish and for Go followers to leave before it closes
	// every connection. Default 5 s.
	DrainTimeout time.Duration

	// Secret, when not empty, must be presented by every follower when it
	// registers; the leader compares it in constant time and refuses the
	// connection otherwise. Node.js peers do not send it, so setting it
	// means Go peers only. Default empty: off.
	Secret string

	// MaxConns bounds the follower connections registered on the
	// leader's port, all channels together. Past it a new follower is
	// refused with Code "ERR_CLUSTER_TOO_MANY_CONNECTIONS": its Ready
	// returns that error, and it tries again every second until a
	// connection closes. Default 512: with MaxUnregistered 128 the leader
	// holds at most 640 connections, which leaves its real client
	// descriptors under the usual limit of 1,024 open files. As with
	// MaxUnregistered, the first channel to lead on a port sets it.
	MaxConns int

	// MaxTotalBytes bounds the bytes that a leader holds for all the
	// follower connections of its port together: packets being read,
	// answers and pushed values queued for writing, and the app objects
	// of running invokes. Past it, the connection that holds the most is
	// closed (its follower reconnects by itself), so that many connections
	// each within MaxQueuedBytes cannot add up. A queued byte counts
	// twice, since the buffer that holds it grows by doubling; a result
	// being encoded, before it is queued, is not counted. Unregistered
	// connections are bounded apart (MaxUnregistered, 64 KiB each).
	// Default the larger of 256 MiB and MaxQueuedBytes; at least
	// MaxQueuedBytes.
	MaxTotalBytes int

	// MaxKeysPerConn bounds the distinct subscription keys that one
	// follower connection may listen to on the leader; MaxKeys bounds the
	// keys the leader holds in all, its own Client's among them, and,
	// with a real client that is no Unsubscriber, every key it ever
	// subscribed. Past either, the subscribe is refused with Code
	// "ERR_CLUSTER_TOO_MANY_KEYS" (see Client.Subscribe) and the leader
	// logs it. Defaults 10,000 and 100,000, sized for a host of 2 cores
	// and a few GiB: a key costs the leader about 320 bytes plus twice
	// its registration's length plus its latest value (450 bytes
	// measured with a 62-byte registration and no value), so 100,000
	// keys hold some 45 MiB, and one connection's 10,000 some 4.5 MiB,
	// besides what the real client keeps per subscription. A
	// registration may be as long as MaxPacketSize allows: these bounds
	// count keys, not bytes. Range 1 and up.
	MaxKeysPerConn, MaxKeys int

	// AllowUIDs lists the users, besides the process's own (its
	// effective uid), whose processes may join this leader as
	// followers, or lead the port that this client follows; others are
	// refused with ERR_CLUSTER_PEER_USER. Each end reads the owner of
	// the other's socket from /proc/net/tcp and /proc/net/tcp6, once per
	// connection, never per call: some 15 ms (30 ms for the whole
	// table) with 10,000 sockets on the host. Where that table cannot be read (outside
	// Linux) the check is off and any local user may connect. On a
	// leader, the first client that leads on a port sets it for the
	// port. Default nil: own user only.
	AllowUIDs []int

	// AllowAnyUser turns that check off: any local user may join or
	// lead, for setups that mix users on purpose. Default false.
	AllowAnyUser bool
}

// DefaultConfig returns the default configuration, with the port and
// single mode taken from the environment where set.
func DefaultConfig() *Config { return withDefaults(nil) }

// withDefaults returns a copy of c whose zero fields hold their defaults;
// a nil c is DefaultConfig's, which reads single mode from the
// environment.
func withDefaults(c *Config) *Config {
	d := *cmp.Or(c, &Config{SingleMode: os.Getenv(EnvSingleMode) == "1"})
	envPort, _ := strconv.Atoi(os.Getenv(EnvPort))
	d.Port = cmp.Or(d.Port, envPort, 7777)
	d.MaxWaitTime = cmp.Or(d.MaxWaitTime, 30*time.Second)
	d.ResponseTimeout = cmp.Or(d.ResponseTimeout, 3*time.Second)
	d.HeartbeatInterval = cmp.Or(d.HeartbeatInterval, 20*time.Second)
	d.MaxInvokeTime = cmp.Or(d.MaxInvokeTime, 2*d.ResponseTimeout)
	d.Codec = cmp.Or[Codec](d.Codec, JSONCodec{})
	d.Logger = cmp.Or(d.Logger, slog.Default())
	d.MaxPacketSize = cmp.Or(d.MaxPacketSize, DefaultMaxPacketSize)
	d.MaxQueuedBytes = cmp.Or(d.MaxQueuedBytes, 2*d.MaxPacketSize)
	d.RegisterTimeout = cmp.Or(d.RegisterTimeout, 5*time.Second)
	d.MaxUnregistered = cmp.Or(d.MaxUnregistered, 128)
	d.DrainTimeout = cmp.Or(d.DrainTimeout, 5*time.Second)
	d.MaxConns = cmp.Or(d.MaxConns, 512)
	d.MaxTotalBytes = cmp.Or(d.MaxTotalBytes, max(256<<20, d.MaxQueuedBytes))
	d.MaxKeysPerConn, d.MaxKeys = cmp.Or(d.MaxKeysPerConn, 10_000), cmp.Or(d.MaxKeys, 100_000)
	return &d
}

// VerifyConfig reports a field of c that is out of range once its zero
// fields hold their defaults; nil means DefaultConfig.
func VerifyConfig(c *Config) error {
	d := withDefaults(c)
	switch {
	case min(d.MaxWaitTime, d.ResponseTimeout, d.HeartbeatInterval, d.SubscribeTimeout, d.RegisterTimeout, d.DrainTimeout, d.MaxInvokeTime) < 0:
		return fmt.Errorf("clusterclient: a Config duration is negative: MaxWaitTime %v, ResponseTimeout %v, HeartbeatInterval %v, "+
			"SubscribeTimeout %v, RegisterTimeout %v, DrainTimeout %v, MaxInvokeTime %v", d.MaxWaitTime, d.ResponseTimeout,
			d.HeartbeatInterval, d.SubscribeTimeout, d.RegisterTimeout, d.DrainTimeout, d.MaxInvokeTime)
	case d.Port < 1 || d.Port > 65535:
		return fmt.Errorf("clusterclient: Config.Port (or NODE_CLUSTER_CLIENT_PORT) %d out of range 1..65535", d.Port)
	case uint(d.Role) > uint(RoleFollower):
		return fmt.Errorf("clusterclient: Config.Role %d unknown", d.Role)
	case d.ResponseTimeout > time.Duration(1<<31-1)*time.Millisecond:
		return fmt.Errorf("clusterclient: Config.ResponseTimeout %v does not fit in 2^31-1 ms", d.ResponseTimeout)
	case d.MaxPacketSize < 1<<10 || d.MaxPacketSize > 1<<30:
		return fmt.Errorf("clusterclient: Config.MaxPacketSize %d out of range 1 KiB..1 GiB", d.MaxPacketSize)
	case d.MaxQueuedBytes < d.MaxPacketSize+HeaderSize:
		return fmt.Errorf("clusterclient: Config.MaxQueuedBytes %d is less than MaxPacketSize + HeaderSize (%d)", d.MaxQueuedBytes, d.MaxPacketSize+HeaderSize)
	case min(d.MaxUnregistered, d.MaxConns, d.MaxKeysPerConn, d.MaxKeys) < 1:
		return fmt.Errorf("clusterclient: a Config count is below 1: MaxUnregistered %d, MaxConns %d, MaxKeysPerConn %d, MaxKeys %d",
			d.MaxUnregistered, d.MaxConns, d.MaxKeysPerConn, d.MaxKeys)
	case d.MaxTotalBytes < d.MaxQueuedBytes:
		return fmt.Errorf("clusterclient: Config.MaxTotalBytes %d is less than MaxQueuedBytes %d", d.MaxTotalBytes, d.MaxQueuedBytes)
	}
	return nil
}

// Errors of the cluster runtime. Errors returned by calls wrap these with
// details; test them with errors.Is.

// ErrClosed: the client was closed.
var ErrClosed = errors.New("clusterclient: client closed")

// ErrTimeout: the leader did not answer within the call's timeout.
var ErrTimeout = errors.New("clusterclient: the leader did not answer in time")

// ErrLeaderLost: the connection to the leader broke while the call
// was in flight. The call may or may not have run on the leader.
var ErrLeaderLost = errors.New("clusterclient: connection to the leader lost")

// ErrNoLeader: no leader could be found or elected within
// Config.MaxWaitTime.
var ErrNoLeader = errors.New("clusterclient: no leader")

// RemoteError is an error raised by the leader's real client. It keeps the
// four fields the protocol carries: Name, the error's name, such as "Error"
// or "TypeError"; Message, the error's message; Code, the error's code, if
// it had one; Stack, the stack trace on the leader, if it sent one. In the
// leader's own process it also wraps the original error.
type RemoteError struct {
	Name, Message, Code, Stack string

	err error // the original error, in the leader's own process only
}

// Error describes the remote error with its name, message and code.
func (e *RemoteError) Error() string {
	if e.Code != "" {
		return "clusterclient: remote " + e.Name + ": " + e.Message + " (" + e.Code + ")"
	}
	return "clusterclient: remote " + e.Name + ": " + e.Message
}

// Unwrap returns the original error in the leader's own process, nil
// elsewhere.
func (e *RemoteError) Unwrap() error { return e.err }

// toRemote turns an error of the real client into a *RemoteError, as
// RealClient's doc says.
func toRemote(err error) *RemoteError {
	re := &RemoteError{Name: "Error", Message: err.Error(), err: err}
	if errors.As(err, &re) { // re is left as it was unless err holds a *RemoteError
		return re
	}
	var namer interface{ ErrorName() string }
	if errors.As(err, &namer) && namer.ErrorName() != "" {
		re.Name = namer.ErrorName()
	}
	var coder interface{ ErrorCode() string }
	if errors.As(err, &coder) {
		re.Code = coder.ErrorCode()
	}
	return re
}

// invokeErrorObject is an error as invoke_result carries it, in the
// reference's key order.
type invokeErrorObject struct {
	Stack   string    `json:"stack,omitempty"`
	Name    string    `json:"name"`
	Message string    `json:"message"`
	Code    errorCode `json:"code,omitempty"`
}

// registerErrorObject is an error as register_channel_res carries it, in
// the reference's key order.
type registerErrorObject struct {
	Message string    `json:"message"`
	Stack   string    `json:"stack,omitempty"`
	Name    string    `json:"name"`
	Code    errorCode `json:"code,omitempty"`
}

type registerResult struct {
	Success bool                 `json:"success"`
	Error   *registerErrorObject `json:"error,omitempty"`
}

// errorCode is an error's code. It is written as a string; a Node.js peer
// may send a number, or any JSON value, which is kept as its JSON text.
type errorCode string

func (c *errorCode) UnmarshalJSON(b []byte) error {
	if json.Unmarshal(b, (*string)(c)) != nil {
		*c = errorCode(b)
	}
	return nil
}

// Codec encodes and decodes app objects. It must be safe for concurrent
// use.
type Codec interface {
	Marshal(v any) ([]byte, error)
	Unmarshal(data []byte, v any) error
}

// JSONCodec is the default Codec: encoding/json, writing as JSON.stringify
// does (no HTML escaping, no trailing newline). A json.RawMessage or a
// Value, alone or nested, is written as it is; a []byte is written as
// encoding/json writes it, as a base64 string.
type JSONCodec struct{}

// Marshal encodes v as JSON.
func (JSONCodec) Marshal(v any) ([]byte, error) {
	switch v.(type) {
	case json.RawMessage, Value: // written as they are; a nil one as null
		return v.(json.Marshaler).MarshalJSON()
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	err := enc.Encode(v) // writes nothing on error, so the result is nil then
	return bytes.TrimSuffix(buf.Bytes(), []byte{'\n'}), err
}

// Unmarshal decodes JSON data into v.
func (JSONCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }

// Value is one app object as it crosses the wire: an invoke argument, an
// invoke result or a subscribed value, still in the Codec's form.
type Value struct {
	data  []byte
	codec Codec
}

// Decode decodes the value into dst with the client's Codec.
func (v Value) Decode(dst any) error {
	return cmp.Or[Codec](v.codec, JSONCodec{}).Unmarshal(v.data, dst)
}

// Bytes returns the encoded value. The caller must not change it.
func (v Value) Bytes() []byte { return v.data }

// String returns the encoded value as text.
func (v Value) String() string { return string(v.data) }

// MarshalJSON returns the encoded value, or null for the zero Value, so
// that a Value inside a result (a slice, a map, a struct field) is sent
// as it came. With a Codec other than JSON, the bytes must be JSON.
func (v Value) MarshalJSON() ([]byte, error) {
	if len(v.data) == 0 {
		return []byte("null"), nil
	}
	return v.data, nil
}

// RealClient is the client that talks to the remote servers. Only the
// leading process builds one; every call of every process on the channel
// ends up here. Methods (a map of typed functions) is one.
//
// Its methods must be safe for concurrent use: each invoke runs on a
// goroutine of its own, so a method that blocks holds up no other call,
// and should return when ctx ends. A panic in a method is recovered and
// reaches the caller as a *RemoteError with Code "ERR_CLUSTER_PANIC".
//
// An error reaches the caller as a *RemoteError. One that is or wraps a
// *RemoteError is sent as it is. Otherwise Message is its Error(), Name
// is "Error", or what its ErrorName() string method returns, and Code is
// what its ErrorCode() string method returns, if it has one (errors.As
// finds either method anywhere in the error's chain).
//
// A real client may also be a Subscriber, an Unsubscriber, a Publisher
// and an io.Closer. One that subscribes but cannot unsubscribe keeps
// every key for the leader's life, bounded by Config.MaxKeys (see
// Unsubscriber).
type RealClient interface {
	// Invoke runs the named method with the given arguments and returns
	// its result, which the Codec encodes. ctx carries the caller's
	// timeout.
	Invoke(ctx context.Context, method string, args []Value) (any, error)
}

// Methods is a RealClient made of functions, one per method name: make
// it with Methods{} and add typed functions of one argument with Method.
// It is a plain map, so a method of another shape is an entry written by
// hand: m["now"] = func(ctx, args) (any, error) { ... }. An unknown
// method gets a *RemoteError with Code "ERR_CLUSTER_NO_METHOD". Embed
// Methods in a struct to add Subscribe and the other optional methods.
type Methods map[string]func(ctx context.Context, args []Value) (any, error)

// Invoke runs the function added under the name method.
func (m Methods) Invoke(ctx context.Context, method string, args []Value) (any, error) {
	if f := m[method]; f != nil {
		return f(ctx, args)
	}
	return nil, &RemoteError{Name: "TypeError", Message: "no method " + strconv.Quote(method), Code: "ERR_CLUSTER_NO_METHOD"}
}

// Method adds fn to m as the method name, taking one argument: the
// call's argument decoded into an A, whose result is encoded for the
// caller. A call with another number of arguments, or one that does not
// decode into an A, gets a *RemoteError with Code
// "ERR_CLUSTER_BAD_ARGUMENT". Method is not safe to call while m serves
// calls: add every method before the BuildFunc returns m.
func Method[A, R any](m Methods, name string, fn func(ctx context.Context, arg A) (R, error)) {
	m[name] = func(ctx context.Context, args []Value) (any, error) {
		var a A
		err := fmt.Errorf("%d arguments, want 1", len(args))
		if len(args) == 1 {
			err = args[0].Decode(&a)
		}
		if err != nil {
			return nil, &RemoteError{Name: "TypeError", Message: name + ": bad argument: " + err.Error(), Code: codeBadArgument, err: err}
		}
		return fn(ctx, a)
	}
}

// Subscriber is implemented by a real client that can subscribe. The
// leader calls Subscribe once per key, however many listeners there are;
// the real client then calls push with each value, from any goroutine,
// until Unsubscribe or Close. An error or a panic in Subscribe, or a real
// client without it, refuses the subscription: the listener's process
// is told (see Client.Subscribe), and the next subscribe of the key calls
// Subscribe again.
type Subscriber interface {
	Subscribe(reg json.RawMessage, push func(value any)) error
}

// Unsubscriber is implemented by a real client that can release a
// subscription. The leader calls it when the last listener of a key, in
// every process, has left.
//
// Without it, the leader keeps every key it ever subscribed, with its
// latest value, for its whole life: about 450 bytes a key with a 62-byte
// registration (measured over 200,000 subscribe and unsubscribe of
// distinct keys), besides what the real client keeps. Config.MaxKeys
// bounds them: once the leader holds that many keys, a subscribe of a
// new one is refused.
type Unsubscriber interface {
	Unsubscribe(reg json.RawMessage) error
}

// Publisher is implemented by a real client that can publish. Without
// it, a publish reaches Invoke as the method "publish".
type Publisher interface {
	Publish(ctx context.Context, reg json.RawMessage) error
}

// BuildFunc builds the real client. It runs only in the process that
// leads, and should return once the client is ready; its error reaches
// every follower's Ready as a *RemoteError.
type BuildFunc func(ctx context.Context) (RealClient, error)
