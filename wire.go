package clusterclient

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"unicode/utf8"
)

// The packet header, as the reference writes it. All integers are
// big-endian.
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
const (
	// HeaderSize is the size of a packet header in bytes.
	HeaderSize = 24

	// ProtocolVersion is the only version this package reads or writes.
	ProtocolVersion = 1

	// DefaultMaxPacketSize is the default bound on conn length plus app
	// length of one packet: 16 MiB. See Config.MaxPacketSize.
	DefaultMaxPacketSize = 16 << 20

	typeRequest  = 0
	typeResponse = 1

	// readChunk is the largest body allocated before any of it arrived.
	// Larger bodies grow as their bytes arrive, so a header that lies
	// about its length costs at most this much. 256 KiB lets the common
	// sizes, a 64 KiB app object with its conn object among them, be
	// read with one allocation and no copy.
	readChunk = 256 << 10
)

// Errors of the packet codec. Each kind of protocol fault has its own
// sentinel; the errors returned wrap one of them with details, so test
// them with errors.Is.
var (
	// ErrBadVersion: the version byte is not ProtocolVersion.
	ErrBadVersion = errors.New("clusterclient: unsupported protocol version")
	// ErrBadType: the type byte is neither 0 (request) nor 1 (response).
	ErrBadType = errors.New("clusterclient: bad packet type")
	// ErrNegativeLength: the conn or app length in a header is negative.
	ErrNegativeLength = errors.New("clusterclient: negative length in packet header")
	// ErrPacketTooLarge: conn length plus app length exceed the maximum
	// packet size.
	ErrPacketTooLarge = errors.New("clusterclient: packet exceeds the maximum size")
	// ErrBadConn: the conn object is not a JSON object of a known shape.
	ErrBadConn = errors.New("clusterclient: conn object is not a valid JSON object")
	// ErrTruncated: the input ended inside a header or a body. Errors
	// that wrap it also wrap io.ErrUnexpectedEOF.
	ErrTruncated = errors.New("clusterclient: truncated packet")
	// ErrArgCount: an invoke's argLength disagrees with the arguments that
	// its app object holds.
	ErrArgCount = errors.New("clusterclient: argLength disagrees with the argument frame")
	// ErrArgOverrun: an argument's length runs past the end of the frame.
	ErrArgOverrun = errors.New("clusterclient: argument length runs past the end of the frame")
	// ErrTrailingBytes: UnmarshalBinary was given bytes past the end of
	// the packet.
	ErrTrailingBytes = errors.New("clusterclient: bytes after the end of the packet")
)

// Packet is one protocol packet: a 24-byte header, a conn object that says
// what the packet is for, and an optional app object.
//
// The codec always writes version 1 and refuses any other, so the version
// has no field here. *Packet implements encoding.BinaryMarshaler,
// encoding.BinaryAppender and encoding.BinaryUnmarshaler for one whole
// packet in a byte slice; Reader takes packets off a stream.
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
	if len(p.Conn) > math.MaxInt32 || len(p.App) > math.MaxInt32 {
		return b, fmt.Errorf("%w: conn %d bytes, app %d bytes", ErrPacketTooLarge, len(p.Conn), len(p.App))
	}
	b = appendHeader(b, p.Response, p.ID, p.Timeout, len(p.Conn), len(p.App))
	b = append(b, p.Conn...)
	return append(b, p.App...), nil
}

// MarshalBinary returns the encoded packet.
func (p *Packet) MarshalBinary() ([]byte, error) {
	return p.AppendBinary(make([]byte, 0, HeaderSize+len(p.Conn)+len(p.App)))
}

// UnmarshalBinary decodes exactly one whole packet from data, with the
// same checks as Reader and DefaultMaxPacketSize as the bound. Conn and
// App are copied out of data.
func (p *Packet) UnmarshalBinary(data []byte) error {
	if len(data) < HeaderSize {
		return truncated("header", len(data), HeaderSize)
	}
	var h header
	if err := h.parse(data[:HeaderSize], DefaultMaxPacketSize); err != nil {
		return err
	}
	body := data[HeaderSize:]
	if n := h.bodyLen(); len(body) < n {
		return truncated("body", len(body), n)
	} else if len(body) > n {
		return fmt.Errorf("%w: %d bytes", ErrTrailingBytes, len(body)-n)
	}
	return h.fill(p, bytes.Clone(body))
}

// header is a parsed packet header.
type header struct {
	response bool
	id       uint64
	timeout  int32
	connLen  int
	appLen   int
}

func (h *header) bodyLen() int { return h.connLen + h.appLen }

// parse checks and reads a header. max bounds conn length plus app length.
func (h *header) parse(b []byte, max int) error {
	if b[0] != ProtocolVersion {
		return fmt.Errorf("%w: %d", ErrBadVersion, b[0])
	}
	switch b[1] {
	case typeRequest, typeResponse:
	default:
		return fmt.Errorf("%w: %d", ErrBadType, b[1])
	}
	h.response = b[1] == typeResponse
	h.id = binary.BigEndian.Uint64(b[4:12])
	h.timeout = int32(binary.BigEndian.Uint32(b[12:16]))
	c := int32(binary.BigEndian.Uint32(b[16:20]))
	a := int32(binary.BigEndian.Uint32(b[20:24]))
	if c < 0 || a < 0 {
		return fmt.Errorf("%w: conn %d, app %d", ErrNegativeLength, c, a)
	}
	if int64(c)+int64(a) > int64(max) {
		return fmt.Errorf("%w: conn %d + app %d bytes, maximum %d", ErrPacketTooLarge, c, a, max)
	}
	h.connLen, h.appLen = int(c), int(a)
	return nil
}

// fill sets p from h and its body, checking that the conn object is a
// JSON object.
func (h *header) fill(p *Packet, body []byte) error {
	conn := body[:h.connLen:h.connLen]
	if !knownConn(conn) && !isJSONObject(conn) {
		return fmt.Errorf("%w: %.64q", ErrBadConn, conn)
	}
	p.Response, p.ID, p.Timeout, p.Conn, p.App = h.response, h.id, h.timeout, conn, nil
	if h.appLen > 0 {
		p.App = body[h.connLen:]
	}
	return nil
}

// knownConn reports whether conn is one of the conn objects that are read
// without the general parser: a successful invoke_result and an invoke as
// followers write them. Each is a JSON object.
func knownConn(conn []byte) bool {
	if string(conn) == successConn {
		return true
	}
	_, _, _, ok := invokeShape(conn)
	return ok
}

// isJSONObject reports whether b is one JSON object, with optional JSON
// whitespace around it, as JSON.parse accepts it (see walkObject).
func isJSONObject(b []byte) bool {
	return walkObject(b, nil) == nil
}

// validJSON reports whether b is one JSON value with optional JSON
// whitespace around it: what json.Valid reports (FuzzParseConn checks
// the two against each other), in one pass with no allocation.
func validJSON(b []byte) bool {
	end, err := jsonValue(b, skipSpace(b, 0), 0)
	return err == nil && skipSpace(b, end) == len(b)
}

func truncated(where string, got, want int) error {
	return fmt.Errorf("%w: %s has %d of %d bytes: %w", ErrTruncated, where, got, want, io.ErrUnexpectedEOF)
}

func appendHeader(b []byte, response bool, id uint64, timeout int32, connLen, appLen int) []byte {
	t := byte(typeRequest)
	if response {
		t = typeResponse
	}
	b = append(b, ProtocolVersion, t, 0, 0)
	b = binary.BigEndian.AppendUint64(b, id)
	b = binary.BigEndian.AppendUint32(b, uint32(timeout))
	b = binary.BigEndian.AppendUint32(b, uint32(connLen))
	return binary.BigEndian.AppendUint32(b, uint32(appLen))
}

// Reader takes one packet at a time off a stream. It is not safe for
// concurrent use.
type Reader struct {
	r   io.Reader
	max int
	hdr [HeaderSize]byte
}

// NewReader returns a Reader of r that refuses packets whose conn length
// plus app length exceed maxPacketSize (DefaultMaxPacketSize when
// maxPacketSize <= 0). Wrap a network connection in a bufio.Reader first
// to save system calls.
func NewReader(r io.Reader, maxPacketSize int) *Reader {
	if maxPacketSize <= 0 {
		maxPacketSize = DefaultMaxPacketSize
	}
	return &Reader{r: r, max: maxPacketSize}
}

// ReadPacket reads the next packet into p. Conn and App share one newly
// allocated slice that the caller may keep; nothing is reused from one
// packet to the next. At a clean end of stream, before any byte of a
// header, it returns io.EOF; an end inside a packet is ErrTruncated.
// Memory held for a body grows with the bytes that actually arrive,
// whatever the header claims (see readBody).
//
// On error p is left as it was. After ErrBadConn the whole packet has
// been consumed and the next one can be read; after any other error the
// stream is no longer at a packet boundary and should be dropped.
func (r *Reader) ReadPacket(p *Packet) error {
	if n, err := io.ReadFull(r.r, r.hdr[:]); err != nil {
		if err == io.EOF {
			return io.EOF
		}
		if err == io.ErrUnexpectedEOF {
			return truncated("header", n, HeaderSize)
		}
		return err
	}
	var h header
	if err := h.parse(r.hdr[:], r.max); err != nil {
		return err
	}
	body, err := readBody(r.r, h.bodyLen())
	if err != nil {
		return err
	}
	return h.fill(p, body)
}

// readBody reads n bytes into a new slice. Up to readChunk it allocates
// n at once; past that it starts with readChunk and doubles the buffer
// (capped at n) only once the bytes already asked for have arrived. So
// a body that arrives whole costs less than 3n bytes of allocation, and
// one cut short after m bytes costs at most max(readChunk, 4m).
func readBody(r io.Reader, n int) ([]byte, error) {
	size := min(n, readChunk)
	b := make([]byte, 0, size)
	for {
		m, err := io.ReadFull(r, b[len(b):cap(b)])
		b = b[:len(b)+m]
		if err != nil {
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				return nil, truncated("body", len(b), n)
			}
			return nil, err
		}
		if len(b) == n {
			return b, nil
		}
		grown := make([]byte, len(b), min(n, 2*cap(b)))
		copy(grown, b)
		b = grown
	}
}

// Conn object types, as the "type" key spells them.
const (
	typeRegisterChannel    = "register_channel"
	typeRegisterChannelRes = "register_channel_res"
	typeSubscribe          = "subscribe"
	typeUnSubscribe        = "unSubscribe"
	typeSubscribeResult    = "subscribe_result"
	typeSubscribeResultRes = "subscribe_result_res"
	typeInvoke             = "invoke"
	typeInvokeResult       = "invoke_result"
	typeHeartbeat          = "heartbeat"
	typeHeartbeatRes       = "heartbeat_res"
	// typeLeaderClosing is this package's own addition: a request from a
	// leader that is closing on purpose. A Go follower finishes what it
	// has in flight, then leaves and elects again; the reference follower
	// ignores requests of types it does not know.
	typeLeaderClosing = "leader_closing"
)

// connObject is one of the typed conn objects below. appendJSON writes it
// as JSON.stringify writes the reference's object: keys in the
// reference's order, no spaces, no trailing newline.
type connObject interface {
	appendJSON(b []byte) []byte
}

// registerChannel is the first packet a follower sends on a connection.
type registerChannel struct {
	ChannelName string
	// Secret is this package's addition, sent only when Config.Secret is
	// set.
	Secret string
}

// registerChannelRes answers registerChannel; its app object says
// whether the leader's real client is ready.
type registerChannelRes struct{}

// subscribe asks the leader to push the values of Key.
type subscribe struct {
	Key string
	Reg json.RawMessage
}

// unSubscribe tells the leader the follower no longer wants Key.
type unSubscribe struct {
	Key string
	Reg json.RawMessage
}

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

// leaderClosing announces a planned leader close.
type leaderClosing struct{}

func (c registerChannel) appendJSON(b []byte) []byte {
	b = append(b, `{"type":"register_channel","channelName":`...)
	b = appendJSONString(b, c.ChannelName)
	if c.Secret != "" {
		b = append(b, `,"secret":`...)
		b = appendJSONString(b, c.Secret)
	}
	return append(b, '}')
}

func (registerChannelRes) appendJSON(b []byte) []byte {
	return append(b, `{"type":"register_channel_res"}`...)
}

func (c subscribe) appendJSON(b []byte) []byte {
	return appendKeyReg(b, `{"type":"subscribe","key":`, c.Key, c.Reg)
}

func (c unSubscribe) appendJSON(b []byte) []byte {
	return appendKeyReg(b, `{"type":"unSubscribe","key":`, c.Key, c.Reg)
}

// appendKeyReg writes a subscribe or unSubscribe conn object. An empty
// reg is left out, as JSON.stringify leaves out a key whose value is
// undefined, so that parseConn gives back a nil Reg; reg is written as
// it is and must be valid JSON.
func appendKeyReg(b []byte, prefix, key string, reg json.RawMessage) []byte {
	b = append(b, prefix...)
	b = appendJSONString(b, key)
	if len(reg) > 0 {
		b = append(b, `,"reg":`...)
		b = append(b, reg...)
	}
	return append(b, '}')
}

func (c subscribeResult) appendJSON(b []byte) []byte {
	b = append(b, `{"type":"subscribe_result","key":`...)
	b = appendJSONString(b, c.Key)
	return append(b, '}')
}

func (subscribeResultRes) appendJSON(b []byte) []byte {
	return append(b, `{"type":"subscribe_result_res"}`...)
}

func (c invoke) appendJSON(b []byte) []byte {
	b = append(b, `{"type":"invoke","method":`...)
	b = appendJSONString(b, c.Method)
	b = append(b, `,"argLength":`...)
	b = strconv.AppendInt(b, int64(c.ArgLength), 10)
	b = append(b, `,"oneway":`...)
	b = strconv.AppendBool(b, c.Oneway)
	return append(b, '}')
}

func (c invokeResult) appendJSON(b []byte) []byte {
	if c.Success {
		return append(b, `{"type":"invoke_result","success":true}`...)
	}
	return append(b, `{"type":"invoke_result","success":false}`...)
}

func (heartbeat) appendJSON(b []byte) []byte { return append(b, `{"type":"heartbeat"}`...) }

func (heartbeatRes) appendJSON(b []byte) []byte { return append(b, `{"type":"heartbeat_res"}`...) }

func (leaderClosing) appendJSON(b []byte) []byte {
	return append(b, `{"type":"leader_closing"}`...)
}

// appendJSONString writes s as JSON.stringify writes a string: only '"',
// '\\' and control characters are escaped; '<', '>', '&', U+2028, U+2029
// and all other text stay as UTF-8. Invalid UTF-8 is written as U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRuneInString(s[i:])
			if r == utf8.RuneError && size == 1 {
				b = append(b, s[start:i]...)
				b = append(b, "\ufffd"...)
				i += size
				start = i
				continue
			}
			i += size
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\b':
			b = append(b, '\\', 'b')
		case '\f':
			b = append(b, '\\', 'f')
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		}
		i++
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// parseConn decodes a conn object into its typed value. An unknown type
// is not an error here: it returns nil and the type's name, and the
// caller decides (the reference ignores such packets).
//
// It reads b as JSON.parse would, not as encoding/json would:
//   - b must be one valid JSON object, with optional JSON whitespace
//     around it (walkObject checks it as json.Valid would);
//   - keys match case-sensitively, so {"Type":"heartbeat"} has no type;
//   - a repeated key counts by its last value, but every value of a
//     known key must have that key's JSON type (null is allowed and
//     leaves the field as it was) or the object is ErrBadConn;
//   - strings are decoded as encoding/json decodes them (escapes, and
//     invalid UTF-8 or lone surrogates as U+FFFD).
//
// An invoke with a negative argLength is ErrArgCount. Reg, when present,
// is a copy of the raw JSON value and never aliases b.
func parseConn(b []byte) (connObject, string, error) {
	if c, ok := parseInvokeFast(b); ok {
		return c, typeInvoke, nil
	}
	return parseConnFull(b)
}

// successConn is the conn object of a successful invoke_result as Go
// and Node.js leaders write it, read without parsing.
const successConn = `{"type":"invoke_result","success":true}`

// invokePrefix, invokeArgLength and the two endings are the conn object
// of an invoke as Go and Node.js followers write it.
const (
	invokePrefix    = `{"type":"invoke","method":"`
	invokeArgLength = `","argLength":`
	invokeOneway    = `,"oneway":true}`
	invokeTwoway    = `,"oneway":false}`
)

// parseInvokeFast reads the conn object of an invoke written exactly as
// Go and Node.js followers write it, with a short plain ASCII method
// name; it reports false for anything else, which parseConnFull reads.
// It returns what parseConnFull returns for the same bytes
// (FuzzParseConn checks).
func parseInvokeFast(b []byte) (invoke, bool) {
	lit, n, oneway, ok := invokeShape(b)
	if !ok {
		return invoke{}, false
	}
	method, err := methodName(lit)
	if err != nil {
		return invoke{}, false
	}
	return invoke{Method: method, ArgLength: n, Oneway: oneway}, true
}

// invokeShape matches what parseInvokeFast reads: lit is the method's
// string literal. What it matches is a JSON object.
func invokeShape(b []byte) (lit []byte, n int, oneway, ok bool) {
	if len(b) < len(invokePrefix) || string(b[:len(invokePrefix)]) != invokePrefix {
		return nil, 0, false, false
	}
	rest := b[len(invokePrefix):]
	q := bytes.IndexByte(rest, '"')
	if q < 0 || q > maxMethodNameLen {
		return nil, 0, false, false
	}
	for _, c := range rest[:q] {
		if c < 0x20 || c == '\\' || c >= utf8.RuneSelf {
			return nil, 0, false, false
		}
	}
	lit = b[len(invokePrefix)-1 : len(invokePrefix)+q+1]
	rest = rest[q:]
	if len(rest) < len(invokeArgLength) || string(rest[:len(invokeArgLength)]) != invokeArgLength {
		return nil, 0, false, false
	}
	rest = rest[len(invokeArgLength):]
	i := 0
	for ; i < len(rest) && i < 6 && '0' <= rest[i] && rest[i] <= '9'; i++ {
		n = n*10 + int(rest[i]-'0')
	}
	if i == 0 || i > 1 && rest[0] == '0' {
		return nil, 0, false, false
	}
	switch string(rest[i:]) {
	case invokeOneway:
		oneway = true
	case invokeTwoway:
	default:
		return nil, 0, false, false
	}
	return lit, n, oneway, true
}

// parseConnFull is parseConn for any conn object.
func parseConnFull(b []byte) (connObject, string, error) {
	var f connFields
	if err := f.scan(b); err != nil {
		return nil, "", fmt.Errorf("%w: %v: %.64q", ErrBadConn, err, b)
	}
	typ, err := f.typeName()
	if err != nil {
		return nil, "", fmt.Errorf("%w: %v", ErrBadConn, err)
	}
	switch typ {
	case typeRegisterChannel:
		name, err := decodeString(f.channelName)
		if err != nil {
			return nil, "", fmt.Errorf("%w: channelName: %v", ErrBadConn, err)
		}
		secret, err := decodeString(f.secret)
		if err != nil {
			return nil, "", fmt.Errorf("%w: secret: %v", ErrBadConn, err)
		}
		return registerChannel{ChannelName: name, Secret: secret}, typ, nil
	case typeSubscribe, typeUnSubscribe, typeSubscribeResult:
		key, err := decodeString(f.key)
		if err != nil {
			return nil, "", fmt.Errorf("%w: key: %v", ErrBadConn, err)
		}
		if typ == typeSubscribeResult {
			return subscribeResult{Key: key}, typ, nil
		}
		reg := json.RawMessage(bytes.Clone(f.reg)) // nil stays nil
		if typ == typeSubscribe {
			return subscribe{Key: key, Reg: reg}, typ, nil
		}
		return unSubscribe{Key: key, Reg: reg}, typ, nil
	case typeInvoke:
		if f.argLength < 0 {
			return nil, typ, fmt.Errorf("%w: argLength %d", ErrArgCount, f.argLength)
		}
		method, err := methodName(f.method)
		if err != nil {
			return nil, "", fmt.Errorf("%w: method: %v", ErrBadConn, err)
		}
		return invoke{Method: method, ArgLength: f.argLength, Oneway: f.oneway}, typ, nil
	case typeInvokeResult:
		if f.success {
			return invokeResultTrue, typ, nil
		}
		return invokeResultFalse, typ, nil
	case typeRegisterChannelRes:
		return registerChannelRes{}, typ, nil
	case typeSubscribeResultRes:
		return subscribeResultRes{}, typ, nil
	case typeHeartbeat:
		return heartbeat{}, typ, nil
	case typeHeartbeatRes:
		return heartbeatRes{}, typ, nil
	case typeLeaderClosing:
		return leaderClosing{}, typ, nil
	}
	return nil, typ, nil
}

// invokeResult values boxed once, so that decoding one allocates nothing.
var (
	invokeResultTrue  connObject = invokeResult{Success: true}
	invokeResultFalse connObject = invokeResult{Success: false}
)

// connFields holds what parseConn found for every key that a conn object
// of any type may carry. The string fields hold the raw JSON string
// literal (quotes included) of the key's last non-null value, or nil;
// reg holds the raw JSON value, any type, aliasing the scanned bytes.
type connFields struct {
	typ, channelName, secret, key, method []byte
	reg                                   []byte
	argLength                             int
	oneway, success                       bool
}

// scan checks that b is one valid JSON object and records the values of
// the known keys among its members, in one pass.
func (f *connFields) scan(b []byte) error {
	return walkObject(b, f.set)
}

// set records val, the raw JSON value of member key (a raw string
// literal), if key is one that parseConn reads.
func (f *connFields) set(key, val []byte) error {
	name := key[1 : len(key)-1]
	if bytes.IndexByte(name, '\\') >= 0 {
		// A key spelled with escapes: rare, decode it properly.
		s, err := decodeString(key)
		if err != nil {
			return err
		}
		name = []byte(s)
	}
	var err error
	switch string(name) {
	case "type":
		err = setString(&f.typ, val)
	case "channelName":
		err = setString(&f.channelName, val)
	case "secret":
		err = setString(&f.secret, val)
	case "key":
		err = setString(&f.key, val)
	case "method":
		err = setString(&f.method, val)
	case "reg":
		f.reg = val
	case "argLength":
		err = setInt(&f.argLength, val)
	case "oneway":
		err = setBool(&f.oneway, val)
	case "success":
		err = setBool(&f.success, val)
	default:
		return nil
	}
	if err != nil {
		return fmt.Errorf("key %q: %w", name, err)
	}
	return nil
}

// setString keeps val in *dst if it is a string literal; null leaves
// *dst as it was.
func setString(dst *[]byte, val []byte) error {
	switch val[0] {
	case '"':
		*dst = val
	case 'n':
	default:
		return errors.New("want a string")
	}
	return nil
}

// setBool sets *dst from true or false; null leaves it as it was.
func setBool(dst *bool, val []byte) error {
	switch val[0] {
	case 't':
		*dst = true
	case 'f':
		*dst = false
	case 'n':
	default:
		return errors.New("want true or false")
	}
	return nil
}

// setInt sets *dst from a JSON number that is an integer written
// without fraction or exponent and fits an int, as encoding/json
// requires for an int; null leaves *dst as it was.
func setInt(dst *int, val []byte) error {
	c := val[0]
	if c == 'n' {
		return nil
	}
	if c != '-' && (c < '0' || c > '9') {
		return errors.New("want a number")
	}
	n, err := strconv.ParseInt(string(val), 10, 0)
	if err != nil {
		return errors.New("want an integer that fits an int")
	}
	*dst = int(n)
	return nil
}

// typeName returns the conn object's type: one of the type constants
// when it is a known type (no allocation), else a new string.
func (f *connFields) typeName() (string, error) {
	if f.typ == nil {
		return "", nil
	}
	if s := f.typ[1 : len(f.typ)-1]; bytes.IndexByte(s, '\\') < 0 {
		for _, t := range knownTypes {
			if string(s) == t {
				return t, nil
			}
		}
	}
	return decodeString(f.typ)
}

var knownTypes = [...]string{
	typeRegisterChannel, typeRegisterChannelRes, typeSubscribe,
	typeUnSubscribe, typeSubscribeResult, typeSubscribeResultRes,
	typeInvoke, typeInvokeResult, typeHeartbeat, typeHeartbeatRes,
	typeLeaderClosing,
}

// decodeString decodes lit, a JSON string literal that jsonString
// accepted, or nil for an absent value (""). Without escapes and in
// valid UTF-8 it is the bytes between the quotes; otherwise
// encoding/json decodes it.
func decodeString(lit []byte) (string, error) {
	if lit == nil {
		return "", nil
	}
	if len(lit) < 2 || lit[0] != '"' || lit[len(lit)-1] != '"' {
		return "", errJSONSyntax
	}
	s := lit[1 : len(lit)-1]
	if bytes.IndexByte(s, '\\') < 0 && utf8.Valid(s) {
		return string(s), nil
	}
	var out string
	if err := json.Unmarshal(lit, &out); err != nil {
		return "", err
	}
	return out, nil
}

// Method names of invoke conn objects are interned, so that decoding an
// invoke of a method seen before allocates no string. The table holds at
// most maxMethodNames names of at most maxMethodNameLen bytes (some 32
// KiB in all), first come first kept, never removed; once it is full,
// further names are allocated per packet as any string would be.
const (
	maxMethodNames   = 256
	maxMethodNameLen = 64
)

var methodNames struct {
	sync.Mutex                                   // held while m is replaced
	m          atomic.Pointer[map[string]string] // replaced, never changed: read with no lock
}

// methodName decodes lit like decodeString, through the intern table.
func methodName(lit []byte) (string, error) {
	if lit == nil {
		return "", nil
	}
	s := lit[1 : len(lit)-1]
	if len(s) > maxMethodNameLen || bytes.IndexByte(s, '\\') >= 0 || !utf8.Valid(s) {
		return decodeString(lit)
	}
	if m := methodNames.m.Load(); m != nil {
		if name, ok := (*m)[string(s)]; ok {
			return name, nil
		}
	}
	methodNames.Lock()
	defer methodNames.Unlock()
	old := methodNames.m.Load()
	if old != nil {
		if name, ok := (*old)[string(s)]; ok {
			return name, nil
		}
	}
	name := string(s)
	if old == nil || len(*old) < maxMethodNames {
		m := make(map[string]string, maxMethodNames)
		if old != nil {
			maps.Copy(m, *old)
		}
		m[name] = name
		methodNames.m.Store(&m)
	}
	return name, nil
}

// A JSON validator, written out so that decoding a conn object needs
// neither encoding/json nor an allocation. It accepts exactly what
// json.Valid accepts (FuzzParseConn checks the two against each other):
// RFC 8259 grammar, JSON whitespace only, any bytes >= 0x80 inside
// strings (JSON.parse sees the UTF-8 decoding of the buffer, where
// invalid bytes are U+FFFD), and objects and arrays nested at most
// maxJSONDepth deep. Every function checks each index before it reads
// it and returns the index just past what it read.

// maxJSONDepth bounds the nesting of objects and arrays, as
// encoding/json bounds it. The validator recurses once per level, so
// this also bounds the goroutine stack it needs: about 2 MiB for the
// deepest input (measured), given back when the stack next shrinks.
const maxJSONDepth = 10000

var (
	errNotObject  = errors.New("not a JSON object")
	errJSONSyntax = errors.New("JSON syntax error")
	errJSONDepth  = errors.New("JSON nested too deep")
)

// walkObject checks that b is one JSON object with optional whitespace
// around it. If member is not nil, it is called with the raw key (a
// string literal, quotes included) and raw value of each member of the
// outermost object, in order; an error from it stops the walk.
func walkObject(b []byte, member func(key, val []byte) error) error {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return errNotObject
	}
	end, err := jsonObject(b, i, 1, member)
	if err != nil {
		return err
	}
	if skipSpace(b, end) != len(b) {
		return errJSONSyntax
	}
	return nil
}

// jsonObject checks the object that starts at b[i], depth levels deep.
func jsonObject(b []byte, i, depth int, member func(key, val []byte) error) (int, error) {
	if depth > maxJSONDepth {
		return 0, errJSONDepth
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return i + 1, nil
	}
	for {
		keyEnd, err := jsonString(b, i)
		if err != nil {
			return 0, err
		}
		colon := skipSpace(b, keyEnd)
		if colon >= len(b) || b[colon] != ':' {
			return 0, errJSONSyntax
		}
		start := skipSpace(b, colon+1)
		end, err := jsonValue(b, start, depth)
		if err != nil {
			return 0, err
		}
		if member != nil {
			if err := member(b[i:keyEnd], b[start:end]); err != nil {
				return 0, err
			}
		}
		i = skipSpace(b, end)
		if i >= len(b) {
			return 0, errJSONSyntax
		}
		switch b[i] {
		case '}':
			return i + 1, nil
		case ',':
			i = skipSpace(b, i+1)
		default:
			return 0, errJSONSyntax
		}
	}
}

// jsonArray checks the array that starts at b[i], depth levels deep.
func jsonArray(b []byte, i, depth int) (int, error) {
	if depth > maxJSONDepth {
		return 0, errJSONDepth
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == ']' {
		return i + 1, nil
	}
	for {
		end, err := jsonValue(b, i, depth)
		if err != nil {
			return 0, err
		}
		i = skipSpace(b, end)
		if i >= len(b) {
			return 0, errJSONSyntax
		}
		switch b[i] {
		case ']':
			return i + 1, nil
		case ',':
			i = skipSpace(b, i+1)
		default:
			return 0, errJSONSyntax
		}
	}
}

// jsonValue checks the value that starts at b[i], inside depth levels
// of objects and arrays.
func jsonValue(b []byte, i, depth int) (int, error) {
	if i >= len(b) {
		return 0, errJSONSyntax
	}
	switch c := b[i]; {
	case c == '{':
		return jsonObject(b, i, depth+1, nil)
	case c == '[':
		return jsonArray(b, i, depth+1)
	case c == '"':
		return jsonString(b, i)
	case c == '-' || '0' <= c && c <= '9':
		return jsonNumber(b, i)
	case c == 't':
		return jsonLiteral(b, i, "true")
	case c == 'f':
		return jsonLiteral(b, i, "false")
	case c == 'n':
		return jsonLiteral(b, i, "null")
	}
	return 0, errJSONSyntax
}

// jsonString checks the string literal that starts at b[i]: no raw
// control characters, and only the escapes \" \\ \/ \b \f \n \r \t and
// \u with four hex digits.
func jsonString(b []byte, i int) (int, error) {
	if i >= len(b) || b[i] != '"' {
		return 0, errJSONSyntax
	}
	for i++; i < len(b); i++ {
		for i+8 <= len(b) && !specialInWord(binary.LittleEndian.Uint64(b[i:])) {
			i += 8 // eight plain bytes
		}
		if i >= len(b) {
			break
		}
		switch c := b[i]; {
		case c == '"':
			return i + 1, nil
		case c < 0x20:
			return 0, errJSONSyntax
		case c == '\\':
			i++
			if i >= len(b) {
				return 0, errJSONSyntax
			}
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(b) {
					return 0, errJSONSyntax
				}
				for _, h := range b[i+1 : i+5] {
					if !isHexDigit(h) {
						return 0, errJSONSyntax
					}
				}
				i += 4
			default:
				return 0, errJSONSyntax
			}
		}
	}
	return 0, errJSONSyntax
}

// specialInWord reports whether any of the eight bytes in w is a quote,
// a backslash or a control character: the bytes that end a plain run in
// a JSON string. Each test is exact about whether some byte matches.
func specialInWord(w uint64) bool {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	q, bs := w^('"'*ones), w^('\\'*ones) // zero bytes where w has a quote, a backslash
	return ((w-0x20*ones)&^w|(q-ones)&^q|(bs-ones)&^bs)&highs != 0
}

func isHexDigit(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// jsonNumber checks the number that starts at b[i]:
// -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func jsonNumber(b []byte, i int) (int, error) {
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && '1' <= b[i] && b[i] <= '9':
		i = skipDigits(b, i)
	default:
		return 0, errJSONSyntax
	}
	if i < len(b) && b[i] == '.' {
		j := skipDigits(b, i+1)
		if j == i+1 {
			return 0, errJSONSyntax
		}
		i = j
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		j := skipDigits(b, i)
		if j == i {
			return 0, errJSONSyntax
		}
		i = j
	}
	return i, nil
}

func skipDigits(b []byte, i int) int {
	for i < len(b) && '0' <= b[i] && b[i] <= '9' {
		i++
	}
	return i
}

// jsonLiteral checks that lit (true, false or null) starts at b[i].
func jsonLiteral(b []byte, i int, lit string) (int, error) {
	if !bytes.HasPrefix(b[i:], []byte(lit)) {
		return 0, errJSONSyntax
	}
	return i + len(lit), nil
}

// skipSpace returns the index of the first byte at or after i that is
// not JSON whitespace, or len(b).
func skipSpace(b []byte, i int) int {
	for i < len(b) {
		switch b[i] {
		case ' ', '\t', '\r', '\n':
			i++
		default:
			return i
		}
	}
	return i
}

// appendPacket appends a whole packet with conn object c and app object
// app (nil for none) to b.
func appendPacket(b []byte, response bool, id uint64, timeout int32, c connObject, app []byte) ([]byte, error) {
	start := len(b)
	b = appendHeader(b, response, id, timeout, 0, 0)
	b = c.appendJSON(b)
	connLen := len(b) - start - HeaderSize
	b = append(b, app...)
	return finishPacket(b, start, connLen)
}

// appendInvoke appends an invoke packet whose app object frames args,
// without building the app object separately.
func appendInvoke(b []byte, id uint64, timeout int32, method string, oneway bool, args [][]byte) ([]byte, error) {
	start := len(b)
	b = appendHeader(b, false, id, timeout, 0, 0)
	b = invoke{Method: method, ArgLength: len(args), Oneway: oneway}.appendJSON(b)
	connLen := len(b) - start - HeaderSize
	b = appendArgs(b, args)
	return finishPacket(b, start, connLen)
}

// finishPacket writes the conn and app lengths into the header that
// starts at b[start], undoing the append if the packet is too large.
func finishPacket(b []byte, start, connLen int) ([]byte, error) {
	appLen := len(b) - start - HeaderSize - connLen
	if connLen > math.MaxInt32 || appLen > math.MaxInt32 {
		return b[:start], fmt.Errorf("%w: conn %d bytes, app %d bytes", ErrPacketTooLarge, connLen, appLen)
	}
	binary.BigEndian.PutUint32(b[start+16:], uint32(connLen))
	binary.BigEndian.PutUint32(b[start+20:], uint32(appLen))
	return b, nil
}

// appendArgs frames invoke arguments: for each, a 4-byte big-endian
// length, then its bytes.
func appendArgs(b []byte, args [][]byte) []byte {
	for _, a := range args {
		b = binary.BigEndian.AppendUint32(b, uint32(len(a)))
		b = append(b, a...)
	}
	return b
}

// validArgs checks that app frames exactly argLength arguments: fewer,
// or bytes left after the last, is ErrArgCount; a length that runs past
// the end of app is ErrArgOverrun.
func validArgs(app []byte, argLength int) error {
	if argLength < 0 || argLength > len(app)/4 {
		return fmt.Errorf("%w: argLength %d, app object %d bytes", ErrArgCount, argLength, len(app))
	}
	return checkArgs(app, argLength)
}

// nextArg returns the first argument framed in rest, capped at its own
// end, and the bytes after it. rest must be part of a frame that passed
// validArgs, and hold at least one more argument.
func nextArg(rest []byte) (arg, after []byte) {
	// validArgs proved 4+n <= len(rest), so n fits an int.
	n := int(binary.BigEndian.Uint32(rest))
	return rest[4 : 4+n : 4+n], rest[4+n:]
}

// checkArgs checks that app frames exactly argLength arguments.
func checkArgs(app []byte, argLength int) error {
	rest := app
	for i := 0; i < argLength; i++ {
		if len(rest) < 4 {
			return fmt.Errorf("%w: argLength %d, frame holds %d", ErrArgCount, argLength, i)
		}
		n := binary.BigEndian.Uint32(rest)
		rest = rest[4:]
		if uint64(n) > uint64(len(rest)) {
			return fmt.Errorf("%w: argument %d claims %d bytes, %d remain", ErrArgOverrun, i, n, len(rest))
		}
		rest = rest[n:]
	}
	if len(rest) != 0 {
		return fmt.Errorf("%w: argLength %d, %d bytes left after the last argument", ErrArgCount, argLength, len(rest))
	}
	return nil
}

// subscriptionKey is the key of a registration: "$$inner$$__" followed
// by the registration's JSON.
func subscriptionKey(reg []byte) string {
	return "$$inner$$__" + string(reg)
}
