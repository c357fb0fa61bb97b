package clusterclient

import (
	"bytes"
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
const (
	// EnvPort overrides the default port (7777).
	EnvPort = "NODE_CLUSTER_CLIENT_PORT"
	// EnvSingleMode set to "1" turns single mode on.
	EnvSingleMode = "NODE_CLUSTER_CLIENT_SINGLE_MODE"
)

// Role says how a client takes part in the election.
type Role int

const (
	// RoleAuto competes for the port: the winner leads, the others follow.
	RoleAuto Role = iota
	// RoleLeader must lead: New fails at once if the port is taken.
	RoleLeader
	// RoleFollower never listens: it dials until a leader answers or
	// Config.MaxWaitTime runs out.
	RoleFollower
)

// String returns the role's name: "auto", "leader" or "follower".
func (r Role) String() string {
	switch r {
	case RoleAuto:
		return "auto"
	case RoleLeader:
		return "leader"
	case RoleFollower:
		return "follower"
	}
	return "Role(" + strconv.Itoa(int(r)) + ")"
}

// Config tunes a Client. Start from DefaultConfig and change what you
// need; New checks the result and refuses values out of range.
type Config struct {
	// Port is the TCP port on 127.0.0.1 that processes compete for. One
	// port carries any number of channels. Default 7777, or the value of
	// NODE_CLUSTER_CLIENT_PORT. Range 1 to 65535.
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

	// HeartbeatInterval is how often a follower that has heard nothing
	// from its leader sends a heartbeat. A follower that then hears
	// nothing for another interval drops the connection and elects
	// again; a leader drops a connection silent for three intervals.
	// Default 20 s.
	HeartbeatInterval time.Duration

	// DisableHeartbeatCheck keeps heartbeats flowing but never drops a
	// silent peer: for a process stopped in a debugger. Default false.
	DisableHeartbeatCheck bool

	// Broadcast makes the leader push each subscribed value to every
	// subscriber; when false it pushes to one subscriber picked at random
	// and does not replay the latest value to late subscribers. Default
	// true.
	Broadcast bool

	// SubscribeTimeout, when positive, logs a warning if a key's first
	// value has not arrived that long after the key's first listener
	// subscribed. Default 0: off.
	SubscribeTimeout time.Duration

	// SingleMode skips the cluster: every process builds its own real
	// client and no port is used. Default false, or true when
	// NODE_CLUSTER_CLIENT_SINGLE_MODE is "1".
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
	// hold memory or block other peers; it reconnects by itself. On the leader it also bounds the
	// arguments of the invokes that one connection has running (as does
	// a limit of 1024 such invokes): past it the leader reads nothing
	// more from that connection until one ends. Default 2 ×
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
}

// DefaultConfig returns the default configuration, with the port and
// single mode taken from the environment where set.
func DefaultConfig() *Config {
	c := &Config{
		Port:              7777,
		Role:              RoleAuto,
		MaxWaitTime:       30 * time.Second,
		ResponseTimeout:   3 * time.Second,
		HeartbeatInterval: 20 * time.Second,
		Broadcast:         true,
		Codec:             JSONCodec{},
		Logger:            slog.Default(),
		MaxPacketSize:     DefaultMaxPacketSize,
		MaxQueuedBytes:    2 * DefaultMaxPacketSize,
		RegisterTimeout:   5 * time.Second,
		MaxUnregistered:   128,
		DrainTimeout:      5 * time.Second,
	}
	if p, err := strconv.Atoi(os.Getenv(EnvPort)); err == nil && p > 0 {
		c.Port = p
	}
	if os.Getenv(EnvSingleMode) == "1" {
		c.SingleMode = true
	}
	return c
}

// VerifyConfig reports the first field of c that is out of range.
func VerifyConfig(c *Config) error {
	switch {
	case c.Port < 1 || c.Port > 65535:
		return fmt.Errorf("clusterclient: Config.Port %d out of range 1..65535", c.Port)
	case c.Role < RoleAuto || c.Role > RoleFollower:
		return fmt.Errorf("clusterclient: Config.Role %d unknown", c.Role)
	case c.MaxWaitTime <= 0:
		return errors.New("clusterclient: Config.MaxWaitTime must be positive")
	case c.ResponseTimeout <= 0 || c.ResponseTimeout > time.Duration(1<<31-1)*time.Millisecond:
		return errors.New("clusterclient: Config.ResponseTimeout must be positive and fit in 2^31-1 ms")
	case c.HeartbeatInterval <= 0:
		return errors.New("clusterclient: Config.HeartbeatInterval must be positive")
	case c.SubscribeTimeout < 0:
		return errors.New("clusterclient: Config.SubscribeTimeout must not be negative")
	case c.Codec == nil:
		return errors.New("clusterclient: Config.Codec is nil")
	case c.Logger == nil:
		return errors.New("clusterclient: Config.Logger is nil")
	case c.MaxPacketSize < 1<<10 || c.MaxPacketSize > 1<<30:
		return fmt.Errorf("clusterclient: Config.MaxPacketSize %d out of range 1 KiB..1 GiB", c.MaxPacketSize)
	case c.MaxQueuedBytes < c.MaxPacketSize+HeaderSize:
		return errors.New("clusterclient: Config.MaxQueuedBytes must be at least MaxPacketSize + HeaderSize")
	case c.RegisterTimeout <= 0:
		return errors.New("clusterclient: Config.RegisterTimeout must be positive")
	case c.MaxUnregistered < 1:
		return errors.New("clusterclient: Config.MaxUnregistered must be at least 1")
	case c.DrainTimeout <= 0:
		return errors.New("clusterclient: Config.DrainTimeout must be positive")
	}
	return nil
}

// Errors of the cluster runtime. Errors returned by calls wrap these with
// details; test them with errors.Is.
var (
	// ErrClosed: the client was closed.
	ErrClosed = errors.New("clusterclient: client closed")
	// ErrTimeout: the leader did not answer within the call's timeout.
	ErrTimeout = errors.New("clusterclient: the leader did not answer in time")
	// ErrLeaderLost: the connection to the leader broke while the call
	// was in flight. The call may or may not have run on the leader.
	ErrLeaderLost = errors.New("clusterclient: connection to the leader lost")
	// ErrNoLeader: no leader could be found or elected within
	// Config.MaxWaitTime.
	ErrNoLeader = errors.New("clusterclient: no leader")
	// ErrNotImplemented: the leader's real client lacks the capability
	// a call needs (subscribe, publish, a method by that name).
	ErrNotImplemented = errors.New("clusterclient: not implemented by the real client")
)

// RemoteError is an error raised by the leader's real client. It keeps the
// four fields the protocol carries. In the leader's own process it also
// wraps the original error.
type RemoteError struct {
	Name    string // the error's name, such as "Error" or "TypeError"
	Message string // the error's message
	Code    string // the error's code, if it had one
	Stack   string // the stack trace on the leader, if it sent one

	err error // the original error, in the leader's own process only
}

// Error describes the remote error with its name, message and code.
func (e *RemoteError) Error() string {
	s := "clusterclient: remote " + e.Name + ": " + e.Message
	if e.Code != "" {
		s += " (" + e.Code + ")"
	}
	return s
}

// Unwrap returns the original error in the leader's own process, nil
// elsewhere.
func (e *RemoteError) Unwrap() error { return e.err }

// toRemote turns an error of the real client into a *RemoteError. An
// error that already is one is kept; one with an ErrorCode() string
// method gives its code.
func toRemote(err error) *RemoteError {
	var re *RemoteError
	if errors.As(err, &re) {
		return re
	}
	re = &RemoteError{Name: "Error", Message: err.Error(), err: err}
	var coder interface{ ErrorCode() string }
	if errors.As(err, &coder) {
		re.Code = coder.ErrorCode()
	}
	return re
}

// invokeErrorObject is an error as invoke_result carries it, in the
// reference's key order.
type invokeErrorObject struct {
	Stack   string          `json:"stack,omitempty"`
	Name    string          `json:"name"`
	Message string          `json:"message"`
	Code    json.RawMessage `json:"code,omitempty"`
}

// registerErrorObject is an error as register_channel_res carries it, in
// the reference's key order.
type registerErrorObject struct {
	Message string          `json:"message"`
	Stack   string          `json:"stack,omitempty"`
	Name    string          `json:"name"`
	Code    json.RawMessage `json:"code,omitempty"`
}

type registerResult struct {
	Success bool                 `json:"success"`
	Error   *registerErrorObject `json:"error,omitempty"`
}

func codeJSON(code string) json.RawMessage {
	if code == "" {
		return nil
	}
	return appendJSONString(nil, code)
}

// codeText reads an error code, which a Node.js peer may send as a string
// or a number.
func codeText(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	if len(raw) == 0 || string(raw) == "null" {
		return ""
	}
	return string(raw)
}

// Codec encodes and decodes app objects. It must be safe for concurrent
// use.
type Codec interface {
	Marshal(v any) ([]byte, error)
	Unmarshal(data []byte, v any) error
}

// JSONCodec is the default Codec: encoding/json, writing as JSON.stringify
// does (no HTML escaping, no trailing newline). A value that already is
// []byte, json.RawMessage or Value is written as it is.
type JSONCodec struct{}

// Marshal encodes v as JSON.
func (JSONCodec) Marshal(v any) ([]byte, error) {
	switch x := v.(type) {
	case json.RawMessage:
		if x == nil {
			return []byte("null"), nil
		}
		return x, nil
	case Value:
		return x.data, nil
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte{'\n'}), nil
}

// Unmarshal decodes JSON data into v.
func (JSONCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }

// Value is one app object as it crosses the wire: an invoke argument, an
// invoke result or a subscribed value, still in the Codec's form.
type Value struct {
	data  []byte
	codec Codec
}

// Decode decodes the value into v with the client's Codec.
func (v Value) Decode(dst any) error {
	if v.codec == nil {
		return JSONCodec{}.Unmarshal(v.data, dst)
	}
	return v.codec.Unmarshal(v.data, dst)
}

// Bytes returns the encoded value. The caller must not change it.
func (v Value) Bytes() []byte { return v.data }

// String returns the encoded value as text.
func (v Value) String() string { return string(v.data) }

// RealClient is the client that talks to the remote servers. Only the
// leading process builds one; every call of every process on the channel
// ends up here. Its methods must be safe for concurrent use.
type RealClient interface {
	// Invoke runs the named method with the given arguments and returns
	// its result, which the Codec encodes. ctx carries the caller's
	// timeout. An error reaches the caller as a *RemoteError.
	//
	// A method whose invokes have returned within 1 ms runs on the
	// goroutine that reads the calling follower's connection; if one
	// then blocks, that follower's next requests wait until it returns,
	// for 1 to 2 s at most, and the method runs on goroutines of its own
	// from then on.
	Invoke(ctx context.Context, method string, args []Value) (any, error)
}

// Subscriber is implemented by a real client that can subscribe. The
// leader calls Subscribe once per key, however many listeners there are;
// the real client then calls push with each value, from any goroutine,
// until Unsubscribe or Close.
type Subscriber interface {
	Subscribe(reg json.RawMessage, push func(value any)) error
}

// Unsubscriber is implemented by a real client that can release a
// subscription. The leader calls it when the last listener of a key, in
// every process, has left.
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
