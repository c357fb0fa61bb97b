package clusterclient

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
)

// HeaderSize is the size of a packet header in bytes. The header, as the
// reference writes it; all integers are big-endian:
//
//	offset size field
//	0      1    version (always 1)
//	1      1    type (0 request, 1 response)
//	2      2    reserved (0 0)
//	4      8    id
//	12     4    timeout in milliseconds, signed
//	16     4    conn object length, signed
//	20     4    app object length, signed, 0 = none
//	24     ...  conn object (JSON), then app object (opaque bytes)
const HeaderSize = 24

// ProtocolVersion is the only version this package reads or writes.
const ProtocolVersion = 1

// DefaultMaxPacketSize is the default bound on conn length plus app
// length of one packet: 16 MiB. See Config.MaxPacketSize.
const DefaultMaxPacketSize = 16 << 20

// The packet types: the type byte of a request and of a response.
const typeRequest, typeResponse = 0, 1

// readChunk is the largest body allocated before any of it arrived.
// Larger bodies grow as their bytes arrive, so a header that lies
// about its length costs at most this much. 256 KiB lets the common
// sizes, a 64 KiB app object with its conn object among them, be
// read with one allocation and no copy.
const readChunk = 256 << 10

// Errors of the packet codec. Each kind of protocol fault has its own
// sentinel; the errors returned wrap one of them with details, so test
// them with errors.Is.

// ErrBadVersion: the version byte is not ProtocolVersion.
var ErrBadVersion = errors.New("clusterclient: unsupported protocol version")

// ErrBadType: the type byte is neither 0 (request) nor 1 (response).
var ErrBadType = errors.New("clusterclient: bad packet type")

// ErrNegativeLength: the conn or app length in a header is negative.
var ErrNegativeLength = errors.New("clusterclient: negative length in packet header")

// ErrPacketTooLarge: conn length plus app length exceed the maximum
// packet size.
var ErrPacketTooLarge = errors.New("clusterclient: packet exceeds the maximum size")

// ErrBadConn: the conn object is not a JSON object of a known shape.
var ErrBadConn = errors.New("clusterclient: conn object is not a valid JSON object")

// ErrTruncated: the input ended inside a header or a body. Errors
// that wrap it also wrap io.ErrUnexpectedEOF.
var ErrTruncated = errors.New("clusterclient: truncated packet")

// ErrArgCount: an invoke's argLength disagrees with the arguments that
// its app object holds.
var ErrArgCount = errors.New("clusterclient: argLength disagrees with the argument frame")

// ErrArgOverrun: an argument's length runs past the end of the frame.
var ErrArgOverrun = errors.New("clusterclient: argument length runs past the end of the frame")

// Packet is one protocol packet: a 24-byte header, a conn object that says
// what the packet is for, and an optional app object.
//
// The codec always writes version 1 and refuses any other, so the version
// has no field here. *Packet implements encoding.BinaryMarshaler and
// encoding.BinaryAppender; Reader takes packets off a stream.
type Packet struct {
	// Response is true for a response (type 1), false for a request.
	Response bool
	// ID is the request id; a response carries its request's id.
	ID uint64
	// Timeout is the request's timeout in milliseconds; a response
	// repeats its request's.
	Timeout int32
	// Conn is the conn object: UTF-8 JSON, as JSON.stringify writes it.
	Conn []byte
	// App is the app object, opaque to the codec; nil or empty for none.
	App []byte
}

// AppendBinary appends the encoded packet to b.
func (p *Packet) AppendBinary(b []byte) ([]byte, error) {
	head := append(appendHeader(b, p.Response, p.ID, p.Timeout, 0, 0), p.Conn...)
	return finishPacket(append(head, p.App...), len(b), len(head), math.MaxInt32)
}

// MarshalBinary returns the encoded packet.
func (p *Packet) MarshalBinary() ([]byte, error) { return p.AppendBinary(nil) }

// appendHeader appends a header; appendPacket and appendInvoke write zero
// lengths that finishPacket sets. They call the packet up to the end of
// its conn object head, and leave b itself as it was, so len(b) is where
// the header starts.
func appendHeader(b []byte, response bool, id uint64, timeout int32, connLen, appLen int) []byte {
	t := byte(typeRequest)
	if response {
		t = typeResponse
	}
	b = binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(append(b, ProtocolVersion, t, 0, 0), id), uint32(timeout))
	return binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(b, uint32(connLen)), uint32(appLen))
}

// Reader takes one packet at a time off a stream. It is not safe for
// concurrent use.
type Reader struct {
	r      io.Reader
	max    int
	hdr    [HeaderSize]byte
	charge func(n int) // told of each body buffer allocated (n > 0) and let go (n < 0)
}

// NewReader returns a Reader of r that refuses packets whose conn length
// plus app length exceed maxPacketSize (DefaultMaxPacketSize when
// maxPacketSize <= 0). Wrap a network connection in a bufio.Reader first
// to save system calls.
func NewReader(r io.Reader, maxPacketSize int) *Reader {
	return &Reader{r: r, max: cmp.Or(max(maxPacketSize, 0), DefaultMaxPacketSize), charge: func(int) {}} // 0 or less: the default
}

// ReadPacket reads the next packet into p. Conn and App share one newly
// allocated slice that the caller may keep; nothing is reused from one
// packet to the next. At a clean end of stream, before any byte of a
// header, it returns io.EOF; an end inside a packet is ErrTruncated.
// The length in the header is checked against the maximum before any
// memory is allocated, and the memory held for a body grows with the
// bytes that actually arrive, whatever the header claims.
//
// On error p is left as it was. After ErrBadConn the whole packet has
// been consumed and the next one can be read; after any other error the
// stream is no longer at a packet boundary and should be dropped.
func (r *Reader) ReadPacket(p *Packet) error {
	h := r.hdr[:]
	if n, err := io.ReadFull(r.r, h); err == io.ErrUnexpectedEOF {
		return fmt.Errorf("%w: header has %d of %d bytes: %w", ErrTruncated, n, HeaderSize, io.ErrUnexpectedEOF)
	} else if err != nil {
		return err // io.EOF at a clean end
	}
	body, connLen, err := r.readBody(h)
	if err != nil {
		return err
	}
	conn := body[:connLen:connLen]
	if !json.Valid(conn) || bytes.TrimLeft(conn, " \t\r\n")[0] != '{' {
		return fmt.Errorf("%w: %.64q", ErrBadConn, conn)
	}
	*p = Packet{Response: h[1] == typeResponse, ID: binary.BigEndian.Uint64(h[4:12]), Timeout: int32(binary.BigEndian.Uint32(h[12:16])), Conn: conn}
	if len(body) > connLen {
		p.App = body[connLen:]
	}
	return nil
}

// readBody checks the header h, whose conn length plus app length may not
// exceed r.max, and reads the body that it announces into a new slice; it
// returns the body and the conn length.
//
// Up to readChunk it allocates the body at once; past that it starts with
// readChunk and doubles the buffer (capped at the body's length) only once
// the bytes already asked for have arrived. So a body that arrives whole
// costs less than 3n bytes of allocation, and one cut short after m bytes
// costs at most max(readChunk, 4m).
func (r *Reader) readBody(h []byte) (body []byte, connLen int, err error) {
	c, a := int32(binary.BigEndian.Uint32(h[16:20])), int32(binary.BigEndian.Uint32(h[20:24]))
	switch {
	case h[0] != ProtocolVersion:
		return nil, 0, fmt.Errorf("%w: %d", ErrBadVersion, h[0])
	case h[1] > typeResponse: // typeRequest is 0
		return nil, 0, fmt.Errorf("%w: %d", ErrBadType, h[1])
	case min(c, a) < 0:
		return nil, 0, fmt.Errorf("%w: conn %d, app %d", ErrNegativeLength, c, a)
	case int64(c)+int64(a) > int64(r.max):
		return nil, 0, fmt.Errorf("%w: conn %d + app %d bytes, maximum %d", ErrPacketTooLarge, c, a, r.max)
	}
	n := int(c) + int(a)
	var b []byte
	defer func() { r.charge(-cap(b)) }()
	for len(b) < n {
		// Ask for readChunk, then, each time all that was asked for has
		// arrived, for twice as much: a new buffer, with b copied in.
		r.charge(min(n, max(readChunk, 2*cap(b))) - cap(b))
		b = append(make([]byte, 0, min(n, max(readChunk, 2*cap(b)))), b...)
		if m, err := io.ReadFull(r.r, b[len(b):cap(b)]); err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil, 0, fmt.Errorf("%w: body has %d of %d bytes: %w", ErrTruncated, len(b)+m, n, io.ErrUnexpectedEOF)
		} else if err != nil {
			return nil, 0, err
		}
		b = b[:cap(b)]
	}
	return b, int(c), nil
}

// connObject is one of the typed conn objects below. appendJSON writes it
// as JSON.stringify writes the reference's object: keys in the
// reference's order, no spaces, no trailing newline.
type connObject interface{ appendJSON(b []byte) []byte }

// registerChannel is the first packet a follower sends on a connection.
// Secret is this package's addition, sent only when Config.Secret is set.
type registerChannel struct{ ChannelName, Secret string }

// registerChannelRes answers registerChannel; its app object says
// whether the leader's real client is ready.
type registerChannelRes struct{}

// subscribe asks the leader to push the values of Key.
type subscribe struct {
	Key string
	Reg json.RawMessage
}

// unSubscribe tells the leader the follower no longer wants Key.
type unSubscribe subscribe

// subscribeResult pushes a value of Key (the app object) to a follower.
type subscribeResult struct{ Key string }

// subscribeResultRes acknowledges a subscribeResult.
type subscribeResultRes struct{}

// invoke runs Method on the leader's real client with ArgLength
// arguments framed in the app object.
type invoke struct {
	Method    string
	ArgLength int
	Oneway    bool
}

// invokeResult answers invoke: the result, or an error object.
type invokeResult struct{ Success bool }

// heartbeat asks the leader for a sign of life.
type heartbeat struct{}

// heartbeatRes answers heartbeat.
type heartbeatRes struct{}

// leaderClosing announces a planned leader close. It is this package's
// own addition: a Go follower finishes what it has in flight, then leaves
// and elects again; the reference follower ignores requests of types it
// does not know.
type leaderClosing struct{}

// subscribeFailed tells a follower that the leader refused to subscribe
// Key: its real client has no Subscribe method, or Subscribe failed, or a
// bound on keys was reached. The app object is the error object, as
// invoke_result carries it. It is this package's own addition, as
// leaderClosing is: a Node.js follower acts on subscribe_result alone
// among the requests it gets, and ignores this one.
type subscribeFailed struct{ Key string }

func (c registerChannel) appendJSON(b []byte) []byte {
	b = appendJSONString(append(b, `{"type":"register_channel","channelName":`...), c.ChannelName)
	if c.Secret != "" {
		b = appendJSONString(append(b, `,"secret":`...), c.Secret)
	}
	return append(b, '}')
}

func (registerChannelRes) appendJSON(b []byte) []byte { return typeOnly(b, "register_channel_res") }

func (c subscribe) appendJSON(b []byte) []byte { return keyReg(b, "subscribe", c.Key, c.Reg...) }

func (c unSubscribe) appendJSON(b []byte) []byte { return keyReg(b, "unSubscribe", c.Key, c.Reg...) }

func (c subscribeResult) appendJSON(b []byte) []byte { return keyReg(b, "subscribe_result", c.Key) }

// keyReg writes a conn object of type typ with a key and maybe a reg.
// An empty reg is left out, as JSON.stringify leaves out a key whose
// value is undefined, so that parseConn gives back a nil Reg; reg is
// written as it is and must be valid JSON.
func keyReg(b []byte, typ, key string, reg ...byte) []byte {
	b = appendJSONString(append(append(append(b, `{"type":"`...), typ...), `","key":`...), key)
	if len(reg) > 0 {
		b = append(append(b, `,"reg":`...), reg...)
	}
	return append(b, '}')
}

func (subscribeResultRes) appendJSON(b []byte) []byte { return typeOnly(b, "subscribe_result_res") }

func (c invoke) appendJSON(b []byte) []byte {
	b = appendJSONString(append(b, `{"type":"invoke","method":`...), c.Method)
	return fmt.Appendf(b, `,"argLength":%d,"oneway":%t}`, c.ArgLength, c.Oneway)
}

func (c invokeResult) appendJSON(b []byte) []byte {
	return append(strconv.AppendBool(append(b, `{"type":"invoke_result","success":`...), c.Success), '}')
}

func (heartbeat) appendJSON(b []byte) []byte { return typeOnly(b, "heartbeat") }

func (heartbeatRes) appendJSON(b []byte) []byte { return typeOnly(b, "heartbeat_res") }

func (leaderClosing) appendJSON(b []byte) []byte { return typeOnly(b, "leader_closing") }

func (c subscribeFailed) appendJSON(b []byte) []byte { return keyReg(b, "subscribe_failed", c.Key) }

// typeOnly writes a conn object that has no key but its type.
func typeOnly(b []byte, t string) []byte {
	return append(append(append(b, `{"type":"`...), t...), `"}`...)
}

// appendJSONString writes s as JSON.stringify writes a string: only '"',
// '\\' and control characters are escaped; '<', '>', '&', U+2028, U+2029
// and all other text stay as UTF-8. Invalid UTF-8 is written as U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	for _, r := range s { // an invalid byte comes out as utf8.RuneError, U+FFFD
		if r >= 0x20 && r != '"' && r != '\\' {
			b = append(b, string(r)...)
		} else if i := bytes.IndexRune([]byte("\"\\\b\f\n\r\t"), r); i >= 0 {
			b = append(b, '\\', `"\bfnrt`[i])
		} else {
			b = fmt.Appendf(b, `\u%04x`, r)
		}
	}
	return append(b, '"')
}

// connFields holds the keys that parseConn knows, whatever the conn
// object's type, decoded into the typed objects that use them.
type connFields struct {
	typ string
	rc  registerChannel
	sub subscribe // key and reg, for subscribe_result and unSubscribe too
	inv invoke
	res invokeResult
}

// connTypes makes the typed conn object of each known type.
var connTypes = map[string]func(f *connFields) connObject{
	"register_channel":     func(f *connFields) connObject { return f.rc },
	"register_channel_res": func(*connFields) connObject { return registerChannelRes{} },
	"subscribe":            func(f *connFields) connObject { return f.sub },
	"unSubscribe":          func(f *connFields) connObject { return unSubscribe(f.sub) },
	"subscribe_result":     func(f *connFields) connObject { return subscribeResult{Key: f.sub.Key} },
	"subscribe_result_res": func(*connFields) connObject { return subscribeResultRes{} },
	"invoke":               func(f *connFields) connObject { return f.inv },
	"invoke_result":        func(f *connFields) connObject { return f.res },
	"heartbeat":            func(*connFields) connObject { return heartbeat{} },
	"heartbeat_res":        func(*connFields) connObject { return heartbeatRes{} },
	"leader_closing":       func(*connFields) connObject { return leaderClosing{} },
	"subscribe_failed":     func(f *connFields) connObject { return subscribeFailed{Key: f.sub.Key} },
}

// parseConn decodes a conn object into its typed value. An unknown type
// is not an error here: it returns nil and the type's name, and the
// caller decides (the reference ignores such packets).
//
// It reads b as JSON.parse would, not as encoding/json reads a struct:
// b must be one JSON object (ErrBadConn otherwise); keys match
// case-sensitively, so {"Type":"heartbeat"} has no type; a repeated key
// counts by its last value. The value of a known key must have that
// key's JSON type, whatever the conn object's type, or the object is
// ErrBadConn; null leaves the field empty. Strings are decoded as
// encoding/json decodes them (invalid UTF-8 and lone surrogates become
// U+FFFD).
//
// An invoke with a negative argLength is ErrArgCount. Reg, when present,
// is a copy of the raw JSON value and never aliases b.
func parseConn(b []byte) (connObject, string, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil || m == nil {
		return nil, "", fmt.Errorf("%w: %.64q", ErrBadConn, b)
	}
	var f connFields
	// Each key decodes into the field at the same place in dsts.
	dsts := [...]any{&f.typ, &f.rc.ChannelName, &f.rc.Secret, &f.sub.Key, &f.sub.Reg, &f.inv.Method, &f.inv.ArgLength, &f.inv.Oneway, &f.res.Success}
	for i, key := range [...]string{"type", "channelName", "secret", "key", "reg", "method", "argLength", "oneway", "success"} {
		if raw, ok := m[key]; ok && json.Unmarshal(raw, dsts[i]) != nil {
			return nil, "", fmt.Errorf("%w: key %q has a value of the wrong type: %.64s", ErrBadConn, key, raw)
		}
	}
	if f.typ == "invoke" && f.inv.ArgLength < 0 {
		return nil, f.typ, fmt.Errorf("%w: argLength %d", ErrArgCount, f.inv.ArgLength)
	}
	if build := connTypes[f.typ]; build != nil {
		return build(&f), f.typ, nil
	}
	return nil, f.typ, nil // an unknown type
}

// appendPacket appends a whole packet with conn object c and app object
// app (nil for none) to b.
func appendPacket(b []byte, response bool, id uint64, timeout int32, c connObject, app []byte) ([]byte, error) {
	head := c.appendJSON(appendHeader(b, response, id, timeout, 0, 0))
	return finishPacket(append(head, app...), len(b), len(head), math.MaxInt32)
}

// appendInvoke appends an invoke packet whose app object frames args,
// without building the app object separately. A packet whose conn length
// plus app length exceed maxSize is refused.
func appendInvoke(b []byte, id uint64, timeout int32, method string, oneway bool, args [][]byte, maxSize int) ([]byte, error) {
	head := invoke{Method: method, ArgLength: len(args), Oneway: oneway}.appendJSON(appendHeader(b, false, id, timeout, 0, 0))
	return finishPacket(appendArgs(head, args), len(b), len(head), maxSize)
}

// finishPacket writes the conn and app lengths into the header that
// starts at b[start], the conn object ending at b[connEnd] and the app
// object at the end of b. If conn length plus app length exceed maxSize
// (at most math.MaxInt32), it undoes the append.
func finishPacket(b []byte, start, connEnd, maxSize int) ([]byte, error) {
	if size := len(b) - start - HeaderSize; size > maxSize {
		return b[:start], fmt.Errorf("%w: %d bytes, maximum %d", ErrPacketTooLarge, size, maxSize)
	}
	binary.BigEndian.PutUint32(b[start+16:], uint32(connEnd-start-HeaderSize))
	binary.BigEndian.PutUint32(b[start+20:], uint32(len(b)-connEnd))
	return b, nil
}

// appendArgs frames invoke arguments: for each, a 4-byte big-endian
// length, then its bytes.
func appendArgs(b []byte, args [][]byte) []byte {
	for _, a := range args {
		b = append(binary.BigEndian.AppendUint32(b, uint32(len(a))), a...)
	}
	return b
}

// validArgs checks that app frames exactly argLength arguments: fewer,
// or bytes left after the last, is ErrArgCount; a length that runs past
// the end of app is ErrArgOverrun.
func validArgs(app []byte, argLength int) error {
	i, rest := 0, app
	// Every argument takes 4 bytes at least: a larger argLength is
	// refused before any of app is read.
	for ; i < argLength && argLength <= len(app)/4 && len(rest) >= 4; i++ {
		if n := binary.BigEndian.Uint32(rest); uint64(n) > uint64(len(rest)-4) {
			return fmt.Errorf("%w: argument %d claims %d bytes, %d remain", ErrArgOverrun, i, n, len(rest)-4)
		}
		_, rest = nextArg(rest)
	}
	if i != argLength || len(rest) != 0 {
		return fmt.Errorf("%w: argLength %d, %d bytes left after %d arguments", ErrArgCount, argLength, len(rest), i)
	}
	return nil
}

// nextArg returns the first argument framed in rest, capped at its own
// end, and the bytes after it. rest must be part of a frame that passed
// validArgs, and hold at least one more argument.
func nextArg(rest []byte) (arg, after []byte) {
	// validArgs checked that 4+n <= len(rest), so n fits an int.
	n := int(binary.BigEndian.Uint32(rest))
	return rest[4 : 4+n : 4+n], rest[4+n:]
}

// subscriptionKey is the key of a registration: "$$inner$$__" followed
// by the registration's JSON.
func subscriptionKey(reg []byte) string { return "$$inner$$__" + string(reg) }

// maxRegDepth bounds the nesting of arrays and objects in a registration.
// marshalReg's rewrite recurses twice per level, so the bound keeps its
// stack to a few tens of KiB; registrations are small, flat objects.
const maxRegDepth = 100

// marshalReg encodes a registration as a Node.js peer's
// JSON.stringify(JSON.parse(text)) writes it, so that equal registrations
// make equal keys in every process, Go or Node.js: a Node.js leader pushes
// under the key it computes from the parsed registration.
//
// It encodes reg with JSONCodec (a json.RawMessage is taken as it is), then
// rewrites that JSON text as JSON.stringify writes what JSON.parse reads
// from it: no spaces; strings as appendJSONString writes them (U+2028 and
// U+2029 unescaped, escapes such as \u0041 decoded); numbers as a
// JavaScript number prints (1.0 is 1, 1e2 is 100, -0 is 0, out of range is
// null); in an object, keys that are array indexes first in ascending
// order, then the others in the order they first appear, a repeated key
// keeping its first place and its last value. Nesting deeper than
// maxRegDepth is an error.
func marshalReg(reg any) (json.RawMessage, error) {
	b, err := JSONCodec{}.Marshal(reg)
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err == nil {
		b, err = appendJSValue(nil, dec, maxRegDepth)
	}
	if _, end := dec.Token(); err == nil && end != io.EOF {
		err = errors.New("trailing data after the JSON value")
	}
	if err != nil {
		return nil, fmt.Errorf("clusterclient: encode registration: %w", err)
	}
	return b, nil
}

// appendJSValue reads the next value from dec and appends it as
// JSON.stringify writes it; depth is how many more levels of arrays and
// objects may open.
func appendJSValue(b []byte, dec *json.Decoder, depth int) ([]byte, error) {
	tok, err := dec.Token()
	switch x := tok.(type) {
	case json.Delim:
		if depth == 0 {
			return nil, fmt.Errorf("nested deeper than %d", maxRegDepth)
		}
		return appendJSContainer(b, dec, depth-1, x)
	case string:
		return appendJSONString(b, x), nil
	case json.Number:
		// As JSON.stringify writes the number that JSON.parse makes of x.
		// encoding/json writes a float64 as JavaScript does (1e+21, 1e-7,
		// 0.000001), but for -0, which JavaScript writes as 0, and ±Inf,
		// which it cannot write and JSON.stringify writes as null, below.
		if f, _ := strconv.ParseFloat(string(x), 64); f == 0 { // x is valid: the only error is range, ±Inf or 0
			return append(b, '0'), nil // -0 too
		} else if n, err := json.Marshal(f); err == nil {
			return append(b, n...), nil
		}
	case bool:
		return strconv.AppendBool(b, x), nil
	}
	return append(b, "null"...), err // tok is nil for null, and after an error; err is nil for Infinity
}

// appendJSContainer appends the rest of the array or object that open,
// which dec has read, began. An object's keys come in the order a
// JavaScript object lists them (see jsKeyRank), a repeated key keeping its
// first place and its last value. An array's elements are keyed by their
// index, so the same order keeps them in place.
func appendJSContainer(b []byte, dec *json.Decoder, depth int, open json.Delim) ([]byte, error) {
	var keys []string
	vals := map[string][]byte{} // an object's values begin with their key and a colon
	for i := 0; dec.More(); i++ {
		k, v := strconv.Itoa(i), []byte(nil)
		if open == '{' {
			tok, err := dec.Token()
			if err != nil {
				return nil, err
			}
			k, _ = tok.(string)
			v = append(appendJSONString(nil, k), ':')
		}
		v, err := appendJSValue(v, dec, depth)
		if err != nil {
			return nil, err
		}
		if _, dup := vals[k]; !dup {
			keys = append(keys, k)
		}
		vals[k] = v
	}
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	// Stable: keys that are not array indexes keep their order.
	slices.SortStableFunc(keys, func(a, b string) int { return cmp.Compare(jsKeyRank(a), jsKeyRank(b)) })
	sorted := make([][]byte, len(keys))
	for i, k := range keys {
		sorted[i] = vals[k]
	}
	b = append(append(b, byte(open)), bytes.Join(sorted, []byte{','})...)
	return append(b, byte(open)+2), nil // in ASCII, ']' is '[' + 2 and '}' is '{' + 2
}

// jsKeyRank ranks an object key as a JavaScript object orders its keys:
// an array index (the canonical decimal form of an integer below
// 2^32-1) by its value, any other key after every index.
func jsKeyRank(k string) uint64 {
	if n, err := strconv.ParseUint(k, 10, 32); err == nil && n < 1<<32-1 && strconv.FormatUint(n, 10) == k {
		return n
	}
	return 1 << 32
}
