package clusterclient

import (
	"bytes"
	"encoding"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	mathrand "math/rand"
	"math/rand/v2"
	"os"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
	"testing/quick"
	"unicode/utf8"
)

// *Packet is a binary marshaler and appender.
var (
	_ encoding.BinaryMarshaler = (*Packet)(nil)
	_ encoding.BinaryAppender  = (*Packet)(nil)
)

// goldenVector is one packet written by the reference encoder, with the
// fields it decodes to.
type goldenVector struct {
	Name    string `json:"name"`
	Hex     string `json:"hex"`
	Version int    `json:"version"`
	Type    int    `json:"type"`
	ID      uint64 `json:"id"`
	Timeout int32  `json:"timeout"`
	Conn    string `json:"conn"`
	ConnLen int    `json:"conn_len"`
	DataHex string `json:"data_hex"`
	Note    string `json:"note"`
}

type goldenFile struct {
	Vectors     []goldenVector `json:"vectors"`
	StreamHex   string         `json:"stream_hex"`
	StreamNames []string       `json:"stream_names"`
}

// loadGolden reads testdata/golden_packets.json.
func loadGolden(t testing.TB) goldenFile {
	t.Helper()
	data, err := os.ReadFile("testdata/golden_packets.json")
	if err != nil {
		t.Fatal(err)
	}
	var g goldenFile
	if err := json.Unmarshal(data, &g); err != nil {
		t.Fatal(err)
	}
	if len(g.Vectors) != 22 || len(g.StreamNames) != 3 {
		t.Fatalf("golden file has %d vectors and %d stream names, want 22 and 3", len(g.Vectors), len(g.StreamNames))
	}
	return g
}

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// packet returns the packet that v lists, with App nil when v has no
// app object (as the decoder returns it).
func (v goldenVector) packet(t testing.TB) Packet {
	p := Packet{Response: v.Type == 1, ID: v.ID, Timeout: v.Timeout, Conn: []byte(v.Conn)}
	if v.DataHex != "" {
		p.App = mustHex(t, v.DataHex)
	}
	return p
}

func goldenByName(t testing.TB, g goldenFile, name string) goldenVector {
	t.Helper()
	for _, v := range g.Vectors {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("no golden vector %q", name)
	return goldenVector{}
}

func samePacket(a, b *Packet) bool {
	return a.Response == b.Response && a.ID == b.ID && a.Timeout == b.Timeout &&
		bytes.Equal(a.Conn, b.Conn) && bytes.Equal(a.App, b.App) &&
		(a.App == nil) == (b.App == nil)
}

// errTrailing is decodePacket's error for bytes after the packet.
var errTrailing = errors.New("bytes after the end of the packet")

// decodePacket decodes data, which must hold exactly one whole packet, with
// a Reader and the default bound: bytes after the packet are errTrailing.
// p is left as it was on error.
func decodePacket(data []byte, p *Packet) error {
	r, q := bytes.NewReader(data), Packet{}
	err := NewReader(r, 0).ReadPacket(&q)
	if err == nil && r.Len() > 0 {
		return fmt.Errorf("%w: %d bytes", errTrailing, r.Len())
	}
	if err == nil {
		*p = q
	}
	return err
}

func describe(p *Packet) string {
	return fmt.Sprintf("{Response:%v ID:%d Timeout:%d Conn:%q App:%d bytes (nil %v)}",
		p.Response, p.ID, p.Timeout, p.Conn, len(p.App), p.App == nil)
}

// TestGoldenVectorsSane checks the golden file against its own fields,
// so that a damaged file cannot make the other tests pass vacuously.
func TestGoldenVectorsSane(t *testing.T) {
	for _, v := range loadGolden(t).Vectors {
		raw := mustHex(t, v.Hex)
		if v.Version != 1 || v.Type < 0 || v.Type > 1 || len(v.Conn) != v.ConnLen {
			t.Errorf("%s: version %d type %d conn_len %d, conn %d bytes", v.Name, v.Version, v.Type, v.ConnLen, len(v.Conn))
		}
		if want := HeaderSize + v.ConnLen + len(v.DataHex)/2; len(raw) != want {
			t.Errorf("%s: %d bytes, want %d", v.Name, len(raw), want)
		}
		if !utf8.ValidString(v.Conn) {
			t.Errorf("%s: conn is not UTF-8", v.Name)
		}
	}
}

func TestGoldenDecode(t *testing.T) {
	for _, v := range loadGolden(t).Vectors {
		t.Run(v.Name, func(t *testing.T) {
			raw := mustHex(t, v.Hex)
			want := v.packet(t)
			if raw[0] != ProtocolVersion {
				t.Fatalf("version byte %d", raw[0])
			}

			var p Packet
			if err := decodePacket(raw, &p); err != nil {
				t.Fatalf("decodePacket: %v", err)
			}
			if !samePacket(&p, &want) {
				t.Errorf("decodePacket = %s\nwant %s", describe(&p), describe(&want))
			}

			r := NewReader(bytes.NewReader(raw), 0)
			var q Packet
			if err := r.ReadPacket(&q); err != nil {
				t.Fatalf("ReadPacket: %v", err)
			}
			if !samePacket(&q, &want) {
				t.Errorf("ReadPacket = %s\nwant %s", describe(&q), describe(&want))
			}
			if err := r.ReadPacket(&q); err != io.EOF {
				t.Errorf("second ReadPacket: %v, want io.EOF", err)
			}
		})
	}
}

func TestGoldenEncode(t *testing.T) {
	for _, v := range loadGolden(t).Vectors {
		t.Run(v.Name, func(t *testing.T) {
			raw := mustHex(t, v.Hex)
			p := v.packet(t)
			got, err := p.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, raw) {
				t.Errorf("MarshalBinary =\n%x\nwant\n%x", got, raw)
			}
			prefix := []byte("prefix")
			got, err = p.AppendBinary(prefix)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(got, []byte("prefix")) || !bytes.Equal(got[len(prefix):], raw) {
				t.Errorf("AppendBinary =\n%x\nwant prefix then\n%x", got, raw)
			}
		})
	}
}

// TestGoldenConn checks that parseConn then appendJSON gives back the
// reference's conn bytes, and appendPacket its whole packet.
func TestGoldenConn(t *testing.T) {
	for _, v := range loadGolden(t).Vectors {
		t.Run(v.Name, func(t *testing.T) {
			c, typ, err := parseConn([]byte(v.Conn))
			if err != nil {
				t.Fatal(err)
			}
			var head struct{ Type string }
			if err := json.Unmarshal([]byte(v.Conn), &head); err != nil {
				t.Fatal(err)
			}
			if typ != head.Type || c == nil {
				t.Fatalf("parseConn = %#v, %q; want a %q", c, typ, head.Type)
			}
			if got := c.appendJSON(nil); string(got) != v.Conn {
				t.Errorf("appendJSON =\n%s\nwant\n%s", got, v.Conn)
			}
			p := v.packet(t)
			got, err := appendPacket([]byte("x"), p.Response, p.ID, p.Timeout, c, p.App)
			if err != nil {
				t.Fatal(err)
			}
			if raw := mustHex(t, v.Hex); !bytes.Equal(got[1:], raw) || got[0] != 'x' {
				t.Errorf("appendPacket =\n%x\nwant\n%x", got[1:], raw)
			}
		})
	}
}

// TestGoldenConnValues pins down the typed values of a few vectors.
func TestGoldenConnValues(t *testing.T) {
	g := loadGolden(t)
	reg := json.RawMessage(`{"dataId":"com.example.svc","group":"G1"}`)
	key := `$$inner$$__{"dataId":"com.example.svc","group":"G1"}`
	for name, want := range map[string]connObject{
		"register_channel":        registerChannel{ChannelName: "DataClient"},
		"unicode_channel":         registerChannel{ChannelName: "Klient-é-日本-😀"},
		"html_chars_not_escaped":  invoke{Method: "a<b>&c"},
		"invoke_two_args":         invoke{Method: "getData", ArgLength: 2},
		"invoke_oneway_publish":   invoke{Method: "publish", ArgLength: 1, Oneway: true},
		"invoke_result_error":     invokeResult{},
		"invoke_result_ok":        invokeResult{Success: true},
		"subscribe":               subscribe{Key: key, Reg: reg},
		"unSubscribe":             unSubscribe{Key: key, Reg: reg},
		"subscribe_result":        subscribeResult{Key: key},
		"subscribe_result_res":    subscribeResultRes{},
		"register_channel_res_ok": registerChannelRes{},
		"heartbeat":               heartbeat{},
		"heartbeat_res":           heartbeatRes{},
	} {
		got, _, err := parseConn([]byte(goldenByName(t, g, name).Conn))
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("%s: parseConn = %#v, %v; want %#v", name, got, err, want)
		}
	}
}

func TestGoldenInvoke(t *testing.T) {
	g := loadGolden(t)
	seen := map[string]bool{}
	for _, v := range g.Vectors {
		c, _, err := parseConn([]byte(v.Conn))
		inv, ok := c.(invoke)
		if err != nil || !ok {
			continue
		}
		seen[v.Name] = true
		p := v.packet(t)
		args, err := splitArgs(p.App, inv.ArgLength)
		if err != nil {
			t.Errorf("%s: splitArgs: %v", v.Name, err)
			continue
		}
		if len(args) != inv.ArgLength {
			t.Errorf("%s: %d args, want %d", v.Name, len(args), inv.ArgLength)
		}
		if got := appendArgs(nil, args); !bytes.Equal(got, p.App) {
			t.Errorf("%s: appendArgs = %x, want %x", v.Name, got, p.App)
		}
		got, err := appendInvoke([]byte("x"), p.ID, p.Timeout, inv.Method, inv.Oneway, args, math.MaxInt32)
		if err != nil {
			t.Fatal(err)
		}
		if raw := mustHex(t, v.Hex); got[0] != 'x' || !bytes.Equal(got[1:], raw) {
			t.Errorf("%s: appendInvoke =\n%x\nwant\n%x", v.Name, got[1:], raw)
		}
	}
	for _, name := range []string{"invoke_two_args", "invoke_no_args", "invoke_oneway_publish", "html_chars_not_escaped"} {
		if !seen[name] {
			t.Errorf("invoke vector %s not checked", name)
		}
	}

	two := goldenByName(t, g, "invoke_two_args").packet(t)
	args, err := splitArgs(two.App, 2)
	if err != nil || string(args[0]) != `"some thing"` || string(args[1]) != `{"n":42,"ok":true}` {
		t.Errorf("invoke_two_args: args %q, %v", args, err)
	}
	if cap(args[0]) != len(args[0]) {
		t.Errorf("argument capacity %d runs past its length %d", cap(args[0]), len(args[0]))
	}
}

func TestGoldenSubscriptionKey(t *testing.T) {
	g := loadGolden(t)
	want := goldenByName(t, g, "subscribe_result")
	res, _, err := parseConn([]byte(want.Conn))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"subscribe", "unSubscribe"} {
		c, _, err := parseConn([]byte(goldenByName(t, g, name).Conn))
		if err != nil {
			t.Fatal(err)
		}
		var key string
		var reg json.RawMessage
		switch c := c.(type) {
		case subscribe:
			key, reg = c.Key, c.Reg
		case unSubscribe:
			key, reg = c.Key, c.Reg
		default:
			t.Fatalf("%s: parsed as %T", name, c)
		}
		if got := subscriptionKey(reg); got != key || got != res.(subscribeResult).Key {
			t.Errorf("%s: subscriptionKey = %q, want %q", name, got, key)
		}
	}
}

// chunkReader hands out data in chunks of the sizes in turn (cycling),
// then io.EOF.
type chunkReader struct {
	data  []byte
	sizes []int
	next  int
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := max(1, r.sizes[r.next%len(r.sizes)])
	r.next++
	n = min(n, len(p), len(r.data))
	copy(p, r.data[:n])
	r.data = r.data[n:]
	return n, nil
}

// randomSizes returns count chunk sizes, mostly small, some large.
func randomSizes(rng *rand.Rand, count int) []int {
	sizes := make([]int, count)
	for i := range sizes {
		sizes[i] = 1 + rng.IntN(1<<rng.IntN(18))
	}
	return sizes
}

// readAll reads packets until an error and returns them with the error.
func readAll(r io.Reader) ([]Packet, error) {
	pr := NewReader(r, 0)
	var out []Packet
	for {
		var p Packet
		if err := pr.ReadPacket(&p); err != nil {
			return out, err
		}
		out = append(out, p)
	}
}

func TestStream(t *testing.T) {
	g := loadGolden(t)
	stream := mustHex(t, g.StreamHex)
	var want []Packet
	for _, name := range g.StreamNames {
		want = append(want, goldenByName(t, g, name).packet(t))
	}
	readers := map[string]func() io.Reader{
		"whole":      func() io.Reader { return bytes.NewReader(stream) },
		"one byte":   func() io.Reader { return iotest.OneByteReader(bytes.NewReader(stream)) },
		"half":       func() io.Reader { return iotest.HalfReader(bytes.NewReader(stream)) },
		"data + EOF": func() io.Reader { return iotest.DataErrReader(bytes.NewReader(stream)) },
	}
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 1))
		readers[fmt.Sprintf("random chunks %d", seed)] = func() io.Reader {
			return &chunkReader{data: stream, sizes: randomSizes(rng, 64)}
		}
	}
	for name, open := range readers {
		got, err := readAll(open())
		if err != io.EOF {
			t.Errorf("%s: ended with %v, want io.EOF", name, err)
		}
		if len(got) != len(want) {
			t.Errorf("%s: %d packets, want %d", name, len(got), len(want))
			continue
		}
		for i := range want {
			if !samePacket(&got[i], &want[i]) {
				t.Errorf("%s: packet %d = %s, want %s", name, i, describe(&got[i]), describe(&want[i]))
			}
		}
	}
}

func TestReadPacketEOF(t *testing.T) {
	var p Packet
	if err := NewReader(bytes.NewReader(nil), 0).ReadPacket(&p); err != io.EOF {
		t.Errorf("empty stream: %v, want io.EOF", err)
	}
	errRead := errors.New("read failed")
	if err := NewReader(iotest.ErrReader(errRead), 0).ReadPacket(&p); !errors.Is(err, errRead) || errors.Is(err, ErrTruncated) {
		t.Errorf("failing reader: %v, want %v", err, errRead)
	}
	raw := mustHex(t, goldenByName(t, loadGolden(t), "heartbeat").Hex)
	r := NewReader(io.MultiReader(bytes.NewReader(raw[:30]), iotest.ErrReader(errRead)), 0)
	if err := r.ReadPacket(&p); !errors.Is(err, errRead) || errors.Is(err, ErrTruncated) {
		t.Errorf("reader failing in a body: %v, want %v", err, errRead)
	}
}

// codecErrors lists every sentinel of the codec.
var codecErrors = []error{
	ErrBadVersion, ErrBadType, ErrNegativeLength, ErrPacketTooLarge, ErrBadConn,
	ErrTruncated, ErrArgCount, ErrArgOverrun,
}

// checkErr fails unless err is want and no other codec sentinel.
func checkErr(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Errorf("%s: error %v, want %v", what, err, want)
		return
	}
	for _, other := range codecErrors {
		if other != want && errors.Is(err, other) {
			t.Errorf("%s: error %v is also %v", what, err, other)
		}
	}
	if got := errors.Is(err, io.ErrUnexpectedEOF); got != (want == ErrTruncated) {
		t.Errorf("%s: errors.Is(%v, io.ErrUnexpectedEOF) = %v", what, err, got)
	}
}

// withHeader returns a copy of raw with the header field at off set.
func withHeader(raw []byte, off int, field ...byte) []byte {
	b := bytes.Clone(raw)
	copy(b[off:], field)
	return b
}

func TestBadPackets(t *testing.T) {
	raw := mustHex(t, goldenByName(t, loadGolden(t), "heartbeat").Hex)
	withConn := func(conn string) []byte {
		b, err := (&Packet{ID: 1, Conn: []byte(conn)}).MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name string
		data []byte
		want error
		// readerWant, if set, is what Reader gives instead of want.
		readerWant error
	}{
		{"version 0", withHeader(raw, 0, 0), ErrBadVersion, nil},
		{"version 2", withHeader(raw, 0, 2), ErrBadVersion, nil},
		{"version 255", withHeader(raw, 0, 255), ErrBadVersion, nil},
		{"type 2", withHeader(raw, 1, 2), ErrBadType, nil},
		{"type 255", withHeader(raw, 1, 255), ErrBadType, nil},
		{"negative conn length", withHeader(raw, 16, 0xff, 0xff, 0xff, 0xff), ErrNegativeLength, nil},
		{"negative app length", withHeader(raw, 20, 0x80, 0, 0, 0), ErrNegativeLength, nil},
		{"over the maximum", withHeader(raw, 20, 0x01, 0, 0, 0), ErrPacketTooLarge, nil},
		{"both lengths max int32", withHeader(raw, 16, 0x7f, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff), ErrPacketTooLarge, nil},
		{"conn is an array", withConn(`[{"type":"heartbeat"}]`), ErrBadConn, nil},
		{"conn is a string", withConn(`"heartbeat"`), ErrBadConn, nil},
		{"conn is null", withConn(`null`), ErrBadConn, nil},
		{"conn is empty", withConn(``), ErrBadConn, nil},
		{"conn is cut short", withConn(`{"type":"heartbeat"`), ErrBadConn, nil},
		{"conn has trailing text", withConn(`{"type":"heartbeat"}x`), ErrBadConn, nil},
		{"conn is two objects", withConn(`{}{}`), ErrBadConn, nil},
		{"conn has single quotes", withConn(`{'type':'heartbeat'}`), ErrBadConn, nil},
		{"conn has a BOM", withConn("\ufeff{}"), ErrBadConn, nil},
		{"header cut at 1", raw[:1], ErrTruncated, nil},
		{"header cut at 23", raw[:23], ErrTruncated, nil},
		{"body missing", raw[:HeaderSize], ErrTruncated, nil},
		{"body cut short", raw[:len(raw)-1], ErrTruncated, nil},
		{"trailing byte", append(bytes.Clone(raw), 1), errTrailing, ErrTruncated},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var p Packet
			checkErr(t, "decodePacket", decodePacket(tc.data, &p), tc.want)
			if p.Conn != nil {
				t.Errorf("decodePacket changed the packet on error")
			}
			want := tc.want
			if tc.readerWant != nil {
				want = tc.readerWant
			}
			_, err := readAll(iotest.OneByteReader(bytes.NewReader(tc.data)))
			checkErr(t, "Reader", err, want)
		})
	}
}

// TestBadConnKeepsStream: after ErrBadConn the next packet is readable.
func TestBadConnKeepsStream(t *testing.T) {
	g := loadGolden(t)
	bad, _ := (&Packet{Conn: []byte(`[]`), App: []byte("app")}).MarshalBinary()
	good := mustHex(t, goldenByName(t, g, "heartbeat").Hex)
	r := NewReader(bytes.NewReader(append(bad, good...)), 0)
	var p Packet
	if err := r.ReadPacket(&p); !errors.Is(err, ErrBadConn) {
		t.Fatalf("first packet: %v, want ErrBadConn", err)
	}
	if err := r.ReadPacket(&p); err != nil || string(p.Conn) != `{"type":"heartbeat"}` {
		t.Fatalf("second packet: %s, %v", describe(&p), err)
	}
}

func TestMaxPacketSize(t *testing.T) {
	p := Packet{Conn: []byte(`{"type":"heartbeat"}`), App: make([]byte, 100)}
	raw, _ := p.MarshalBinary()
	var q Packet
	if err := NewReader(bytes.NewReader(raw), 120).ReadPacket(&q); err != nil {
		t.Errorf("packet of exactly the maximum: %v", err)
	}
	err := NewReader(bytes.NewReader(raw), 119).ReadPacket(&q)
	checkErr(t, "one byte over the maximum", err, ErrPacketTooLarge)
}

func TestSplitArgsErrors(t *testing.T) {
	frame := func(args ...string) []byte {
		var b []byte
		for _, a := range args {
			b = appendArgs(b, [][]byte{[]byte(a)})
		}
		return b
	}
	for _, tc := range []struct {
		name      string
		app       []byte
		argLength int
		want      error
	}{
		{"fewer args than argLength", frame("a"), 2, ErrArgCount},
		{"more args than argLength", frame("a", "b"), 1, ErrArgCount},
		{"argLength 0 with an app object", frame("a"), 0, ErrArgCount},
		{"negative argLength", frame("a"), -1, ErrArgCount},
		{"huge argLength", frame("a"), math.MaxInt, ErrArgCount},
		{"bytes after the last argument", append(frame("a"), 1, 2, 3), 1, ErrArgCount},
		{"length cut short", append(frame("a"), 0, 0, 0), 2, ErrArgCount},
		{"length past the end", []byte{0, 0, 0, 5, 'a', 'b'}, 1, ErrArgOverrun},
		{"second length past the end", append(frame("a"), 0, 0, 0, 1), 2, ErrArgOverrun},
		{"length 2^32-1", []byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, 2, ErrArgOverrun},
	} {
		args, err := splitArgs(tc.app, tc.argLength)
		if args != nil {
			t.Errorf("%s: args %q with error", tc.name, args)
		}
		checkErr(t, tc.name, err, tc.want)
	}
	if args, err := splitArgs(nil, 0); args != nil || err != nil {
		t.Errorf("no args: %q, %v", args, err)
	}
	if args, err := splitArgs(frame("", ""), 2); err != nil || len(args) != 2 || len(args[0]) != 0 {
		t.Errorf("two empty args: %q, %v", args, err)
	}
}

// parseConnCases are conn objects with what parseConn must make of them.
// A nil want with a nil err means an unknown type.
var parseConnCases = []struct {
	conn string
	want connObject
	typ  string
	err  error
}{
	{`{"type":"heartbeat"}`, heartbeat{}, "heartbeat", nil},
	{" \t\r\n{ \"type\" : \"heartbeat\" } \n", heartbeat{}, "heartbeat", nil},
	{`{"type":"leader_closing"}`, leaderClosing{}, "leader_closing", nil},
	{`{"type":"subscribe_failed","key":"k"}`, subscribeFailed{Key: "k"}, "subscribe_failed", nil},
	{`{"type":"invoke","method":"m","argLength":3,"oneway":true}`, invoke{Method: "m", ArgLength: 3, Oneway: true}, "invoke", nil},
	{`{"oneway":true,"argLength":3,"method":"m","type":"invoke"}`, invoke{Method: "m", ArgLength: 3, Oneway: true}, "invoke", nil},
	{`{"type":"invoke","method":"m","argLength":-0}`, invoke{Method: "m"}, "invoke", nil},
	{`{"type":"invoke","method":"m","argLength":-1}`, nil, "", ErrArgCount},
	{`{"type":"invoke","method":"m","argLength":2.0}`, nil, "", ErrBadConn},
	{`{"type":"invoke","method":"m","argLength":1e1}`, nil, "", ErrBadConn},
	{`{"type":"invoke","method":"m","argLength":99999999999999999999}`, nil, "", ErrBadConn},
	{`{"type":"invoke","method":"m","argLength":"2"}`, nil, "", ErrBadConn},
	{`{"type":"invoke","method":7}`, nil, "", ErrBadConn},
	{`{"type":"invoke","method":"m","oneway":1}`, nil, "", ErrBadConn},
	{`{"type":"invoke","method":null,"argLength":null,"oneway":null}`, invoke{}, "invoke", nil},
	// A repeated key counts by its last value, as in JSON.parse.
	{`{"type":"invoke","method":"a","method":"b"}`, invoke{Method: "b"}, "invoke", nil},
	{`{"type":"invoke","method":"a","method":null}`, invoke{}, "invoke", nil},
	{`{"type":"heartbeat","argLength":"x","argLength":1}`, heartbeat{}, "heartbeat", nil},
	{`{"type":"heartbeat","argLength":1,"argLength":"x"}`, nil, "", ErrBadConn},
	{`{"type":"invoke_result","success":true}`, invokeResult{Success: true}, "invoke_result", nil},
	{`{"type":"invoke_result","success":true,"success":false}`, invokeResult{}, "invoke_result", nil},
	{`{"type":"invoke_result","success":"true"}`, nil, "", ErrBadConn},
	// Keys are case-sensitive, as in JSON.parse (encoding/json is not).
	{`{"Type":"heartbeat"}`, nil, "", nil},
	{`{"TYPE":"heartbeat","type":"heartbeat_res"}`, heartbeatRes{}, "heartbeat_res", nil},
	{`{"type":"invoke","Method":"m","ARGLENGTH":"x"}`, invoke{}, "invoke", nil},
	{`{"type":"HEARTBEAT"}`, nil, "HEARTBEAT", nil},
	// Every known key is type-checked, whatever the type.
	{`{"type":"heartbeat","argLength":"x"}`, nil, "", ErrBadConn},
	{`{"type":"heartbeat","channelName":{}}`, nil, "", ErrBadConn},
	{`{"type":1}`, nil, "", ErrBadConn},
	{`{"type":["heartbeat"]}`, nil, "", ErrBadConn},
	// Escapes, in values and keys.
	{`{"type":"register_channel","channelName":"a\"b\\c\/\u00e9\ud83d\ude00\n"}`, registerChannel{ChannelName: "a\"b\\c/é😀\n"}, "register_channel", nil},
	{`{"typ\u0065":"heart\u0062eat"}`, heartbeat{}, "heartbeat", nil},
	{`{"type":"register_channel","channelName":"\ud800"}`, registerChannel{ChannelName: "\ufffd"}, "register_channel", nil},
	{"{\"type\":\"register_channel\",\"channelName\":\"a\xffb\"}", registerChannel{ChannelName: "a\ufffdb"}, "register_channel", nil},
	{`{"type":"register_channel","channelName":"n","secret":"s"}`, registerChannel{ChannelName: "n", Secret: "s"}, "register_channel", nil},
	// Unknown keys and nested values are skipped, whatever they hold.
	{`{"x":{"type":"invoke","y":[1,{"}":"]"}]},"type":"heartbeat","z":"}{"}`, heartbeat{}, "heartbeat", nil},
	{`{"x":[],"y":{},"z":[[[]]],"w":-1.5e-3,"v":true,"u":null}`, nil, "", nil},
	{`{}`, nil, "", nil},
	{`{"type":"nope"}`, nil, "nope", nil},
	{`{"type":null}`, nil, "", nil},
	// reg is kept as raw JSON; absent stays nil.
	{`{"type":"subscribe","key":"k","reg":{"a" : [1, 2]} }`, subscribe{Key: "k", Reg: json.RawMessage(`{"a" : [1, 2]}`)}, "subscribe", nil},
	{`{"type":"subscribe","key":"k","reg":null}`, subscribe{Key: "k", Reg: json.RawMessage(`null`)}, "subscribe", nil},
	{`{"type":"unSubscribe","key":"k","reg":"s"}`, unSubscribe{Key: "k", Reg: json.RawMessage(`"s"`)}, "unSubscribe", nil},
	{`{"type":"subscribe","key":"k"}`, subscribe{Key: "k"}, "subscribe", nil},
	{`{"type":"subscribe_result","key":"k","reg":1}`, subscribeResult{Key: "k"}, "subscribe_result", nil},
	// Not a JSON object.
	{``, nil, "", ErrBadConn},
	{` `, nil, "", ErrBadConn},
	{`[]`, nil, "", ErrBadConn},
	{`null`, nil, "", ErrBadConn},
	{`"{}"`, nil, "", ErrBadConn},
	{`{`, nil, "", ErrBadConn},
	{`{"type":"heartbeat",}`, nil, "", ErrBadConn},
	{`{"type":"heartbeat"}}`, nil, "", ErrBadConn},
	{`{"type":"heartbeat"} {}`, nil, "", ErrBadConn},
	{`{"type" "heartbeat"}`, nil, "", ErrBadConn},
	{`{type:"heartbeat"}`, nil, "", ErrBadConn},
	{"{\"type\":\"heart\tbeat\"}", nil, "", ErrBadConn},
	{`{"type":"heartbeat","x":01}`, nil, "", ErrBadConn},
	{`{"type":"heartbeat","x":tru}`, nil, "", ErrBadConn},
	{`{"type":"heartbeat","x":"\x"}`, nil, "", ErrBadConn},
	{"\ufeff{}", nil, "", ErrBadConn},
	{"{\"type\":\"heart\x1fbeat\"}", nil, "", ErrBadConn},
	{"{\"type\":\"heartbeat\"\x00}", nil, "", ErrBadConn},
	{`{"type":"\u00e"}`, nil, "", ErrBadConn},
	{`{"type":"\u00eg"}`, nil, "", ErrBadConn},
	{`{"type":"\`, nil, "", ErrBadConn},
	{`{"x":-}`, nil, "", ErrBadConn},
	{`{"x":1.}`, nil, "", ErrBadConn},
	{`{"x":1e}`, nil, "", ErrBadConn},
	{`{"x":1e+}`, nil, "", ErrBadConn},
	{`{"x":.5}`, nil, "", ErrBadConn},
	{`{"x":-01}`, nil, "", ErrBadConn},
	{`{"x":+1}`, nil, "", ErrBadConn},
	{`{"x":[1,]}`, nil, "", ErrBadConn},
	{`{"x":[,1]}`, nil, "", ErrBadConn},
	{`{"x":[1 2]}`, nil, "", ErrBadConn},
	{`{"x":nul}`, nil, "", ErrBadConn},
	{`{"x":nullx}`, nil, "", ErrBadConn},
	{`{"x":1 2}`, nil, "", ErrBadConn},
	{`{"x":{"a"}}`, nil, "", ErrBadConn},
	{`{"x":{1:2}}`, nil, "", ErrBadConn},
	{`{,}`, nil, "", ErrBadConn},
	{`{"x":-0.5E+10,"y":[1, "a" ,{} ,[]],"z":"\u00E9\/\b","w":0,"v":1e-7}`, nil, "", nil},
	{strings.Repeat(`{"a":`, 10001) + `1` + strings.Repeat(`}`, 10001), nil, "", ErrBadConn},
	{strings.Repeat(`{"a":`, 10000) + `1` + strings.Repeat(`}`, 10000), nil, "", nil},
	{`{"a":` + strings.Repeat(`[`, 9999) + strings.Repeat(`]`, 9999) + `}`, nil, "", nil},
	{`{"a":` + strings.Repeat(`[`, 10000) + strings.Repeat(`]`, 10000) + `}`, nil, "", ErrBadConn},
}

func TestParseConn(t *testing.T) {
	for _, tc := range parseConnCases {
		c, typ, err := parseConn([]byte(tc.conn))
		name := tc.conn
		if len(name) > 80 {
			name = name[:80] + "..."
		}
		if tc.err != nil {
			checkErr(t, name, err, tc.err)
			if c != nil {
				t.Errorf("%s: %#v with error", name, c)
			}
		} else if err != nil || !reflect.DeepEqual(c, tc.want) || typ != tc.typ {
			t.Errorf("%s: parseConn = %#v, %q, %v; want %#v, %q", name, c, typ, err, tc.want, tc.typ)
		}
		checkConnOracle(t, []byte(tc.conn))
	}
}

func TestParseConnRegIsCopied(t *testing.T) {
	b := []byte(`{"type":"subscribe","key":"k","reg":{"a":1}}`)
	c, _, err := parseConn(b)
	if err != nil {
		t.Fatal(err)
	}
	clear(b)
	if got := string(c.(subscribe).Reg); got != `{"a":1}` {
		t.Errorf("Reg changed with its input: %q", got)
	}
}

// parseConnOracle is parseConn written another way with encoding/json:
// json.Valid decides validity, json.Decoder walks the members in order
// (keys compared exactly, the last value of a repeated key kept), and
// each known key's value is decoded by json.Unmarshal into the Go type
// of its field.
func parseConnOracle(b []byte) (connObject, string, error) {
	if !json.Valid(b) || !bytes.HasPrefix(bytes.TrimLeft(b, " \t\r\n"), []byte("{")) {
		return nil, "", ErrBadConn
	}
	var f struct {
		Type, ChannelName, Secret, Key, Method string
		Reg                                    json.RawMessage
		ArgLength                              int
		Oneway, Success                        bool
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	if _, err := dec.Token(); err != nil {
		return nil, "", ErrBadConn
	}
	var keys []string
	last := map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, "", ErrBadConn
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, "", ErrBadConn
		}
		keys = append(keys, tok.(string))
		last[tok.(string)] = raw
	}
	for _, key := range keys {
		raw := last[key]
		var dst any
		switch key {
		case "type":
			dst = &f.Type
		case "channelName":
			dst = &f.ChannelName
		case "secret":
			dst = &f.Secret
		case "key":
			dst = &f.Key
		case "method":
			dst = &f.Method
		case "argLength":
			dst = &f.ArgLength
		case "oneway":
			dst = &f.Oneway
		case "success":
			dst = &f.Success
		case "reg":
			f.Reg = raw
			continue
		default:
			continue
		}
		if err := json.Unmarshal(raw, dst); err != nil {
			return nil, "", ErrBadConn
		}
	}
	switch f.Type {
	case "register_channel":
		return registerChannel{ChannelName: f.ChannelName, Secret: f.Secret}, f.Type, nil
	case "register_channel_res":
		return registerChannelRes{}, f.Type, nil
	case "subscribe":
		return subscribe{Key: f.Key, Reg: f.Reg}, f.Type, nil
	case "unSubscribe":
		return unSubscribe{Key: f.Key, Reg: f.Reg}, f.Type, nil
	case "subscribe_result":
		return subscribeResult{Key: f.Key}, f.Type, nil
	case "subscribe_result_res":
		return subscribeResultRes{}, f.Type, nil
	case "invoke":
		if f.ArgLength < 0 {
			return nil, "", ErrArgCount
		}
		return invoke{Method: f.Method, ArgLength: f.ArgLength, Oneway: f.Oneway}, f.Type, nil
	case "invoke_result":
		return invokeResult{Success: f.Success}, f.Type, nil
	case "heartbeat":
		return heartbeat{}, f.Type, nil
	case "heartbeat_res":
		return heartbeatRes{}, f.Type, nil
	case "leader_closing":
		return leaderClosing{}, f.Type, nil
	case "subscribe_failed":
		return subscribeFailed{Key: f.Key}, f.Type, nil
	}
	return nil, f.Type, nil
}

// connKeys names the keys that parseConn reads.
var connKeys = []string{"type", "channelName", "secret", "key", "method", "reg", "argLength", "oneway", "success"}

// checkConnOracle compares parseConn with parseConnOracle on b and,
// unless structDiffers(b), with a plain json.Unmarshal into a struct.
// Then it checks that appendJSON of what parsed is valid JSON that parses
// back to the same value.
func checkConnOracle(t *testing.T, b []byte) {
	t.Helper()
	c, typ, err := parseConn(b)
	oc, otyp, oerr := parseConnOracle(b)
	if (err == nil) != (oerr == nil) || (err != nil && !errors.Is(err, oerr)) {
		t.Fatalf("%q: parseConn error %v, oracle %v", b, err, oerr)
	}
	if err != nil {
		return
	}
	if typ != otyp || !reflect.DeepEqual(c, oc) {
		t.Fatalf("%q: parseConn = %#v, %q; oracle %#v, %q", b, c, typ, oc, otyp)
	}
	if !structDiffers(b) {
		var f struct {
			Type        string          `json:"type"`
			ChannelName string          `json:"channelName"`
			Secret      string          `json:"secret"`
			Key         string          `json:"key"`
			Reg         json.RawMessage `json:"reg"`
			Method      string          `json:"method"`
			ArgLength   int             `json:"argLength"`
			Oneway      bool            `json:"oneway"`
			Success     bool            `json:"success"`
		}
		if err := json.Unmarshal(b, &f); err != nil || f.Type != typ {
			t.Fatalf("%q: json.Unmarshal: %+v, %v; parseConn type %q", b, f, err, typ)
		}
		switch c := c.(type) {
		case registerChannel:
			if c.ChannelName != f.ChannelName || c.Secret != f.Secret {
				t.Fatalf("%q: %#v, json.Unmarshal %+v", b, c, f)
			}
		case invoke:
			if c.Method != f.Method || c.ArgLength != f.ArgLength || c.Oneway != f.Oneway {
				t.Fatalf("%q: %#v, json.Unmarshal %+v", b, c, f)
			}
		case subscribe:
			if c.Key != f.Key || !bytes.Equal(c.Reg, f.Reg) {
				t.Fatalf("%q: %#v, json.Unmarshal %+v", b, c, f)
			}
		case invokeResult:
			if c.Success != f.Success {
				t.Fatalf("%q: %#v, json.Unmarshal %+v", b, c, f)
			}
		}
	}
	if c == nil {
		return
	}
	out := c.appendJSON(nil)
	if !json.Valid(out) {
		t.Fatalf("%q: appendJSON wrote invalid JSON %q", b, out)
	}
	c2, typ2, err := parseConn(out)
	if err != nil || typ2 != typ || !reflect.DeepEqual(c2, c) {
		t.Fatalf("%q: appendJSON wrote %q, which parses to %#v, %q, %v; want %#v", b, out, c2, typ2, err, c)
	}
}

// structDiffers reports whether json.Unmarshal into a struct may read
// the object b (valid JSON) otherwise than JSON.parse: a key is repeated
// (encoding/json type-checks every value and skips a later null), or
// differs from a key that parseConn reads only by case, or is not ASCII
// (encoding/json folds some non-ASCII letters to ASCII ones).
func structDiffers(b []byte) bool {
	dec := json.NewDecoder(bytes.NewReader(b))
	if _, err := dec.Token(); err != nil {
		return true
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil || seen[tok.(string)] {
			return true
		}
		key := tok.(string)
		seen[key] = true
		for i := 0; i < len(key); i++ {
			if key[i] >= utf8.RuneSelf {
				return true
			}
		}
		for _, k := range connKeys {
			if strings.EqualFold(key, k) && key != k {
				return true
			}
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return true
		}
	}
	return false
}

// stringifyOracle writes s (valid UTF-8) as JSON.stringify would, from
// encoding/json's output for each rune: HTML escaping off, and U+2028
// and U+2029 left as they are.
func stringifyOracle(s string) []byte {
	out := []byte{'"'}
	for _, r := range s {
		if r == '\u2028' || r == '\u2029' {
			out = utf8.AppendRune(out, r)
			continue
		}
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(string(r)); err != nil {
			panic(err)
		}
		q := bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
		out = append(out, q[1:len(q)-1]...)
	}
	return append(out, '"')
}

// checkJSONString checks appendJSONString(s): valid JSON that decodes to
// s (invalid bytes as U+FFFD), and for valid UTF-8 the bytes that
// JSON.stringify writes.
func checkJSONString(t *testing.T, s string) {
	t.Helper()
	out := appendJSONString([]byte("x"), s)
	if out[0] != 'x' {
		t.Fatalf("%q: prefix lost", s)
	}
	out = out[1:]
	var back string
	if err := json.Unmarshal(out, &back); err != nil {
		t.Fatalf("%q: wrote %q: %v", s, out, err)
	}
	if want := string([]rune(s)); back != want {
		t.Fatalf("%q: wrote %q, decodes to %q, want %q", s, out, back, want)
	}
	if utf8.ValidString(s) {
		if want := stringifyOracle(s); !bytes.Equal(out, want) {
			t.Fatalf("%q: wrote %q, want %q", s, out, want)
		}
	}
}

func TestAppendJSONString(t *testing.T) {
	for s, want := range map[string]string{
		"":                 `""`,
		"plain":            `"plain"`,
		`a"b\c/`:           `"a\"b\\c/"`,
		"\b\f\n\r\t":       `"\b\f\n\r\t"`,
		"\x00\x01\x1f\x7f": `"\u0000\u0001\u001f` + "\x7f\"",
		"<b>&amp;</b>":     `"<b>&amp;</b>"`,
		"\u2028\u2029":     "\"\u2028\u2029\"",
		"é日本😀\u0080\u009f": "\"é日本😀\u0080\u009f\"",
		"a\xffb":           "\"a\ufffdb\"",
		"\xe6\x97":         "\"\ufffd\ufffd\"",
		"\xed\xa0\x80":     "\"\ufffd\ufffd\ufffd\"",
	} {
		if got := string(appendJSONString(nil, s)); got != want {
			t.Errorf("appendJSONString(%q) = %q, want %q", s, got, want)
		}
		checkJSONString(t, s)
	}
}

// quickConn is a random typed conn object, for testing/quick.
type quickConn struct{ c connObject }

func randomString(r *mathrand.Rand) string {
	if r.Intn(2) == 0 {
		v, _ := quick.Value(reflect.TypeFor[string](), r)
		return v.String()
	}
	const alphabet = "ab\"\\/<>&\x00\x01\x1f\x7f\b\f\n\r\t \u2028\u2029é😀{}[]:,"
	runes := []rune(alphabet)
	out := make([]rune, r.Intn(20))
	for i := range out {
		out[i] = runes[r.Intn(len(runes))]
	}
	return string(out)
}

func randomReg(r *mathrand.Rand) json.RawMessage {
	if r.Intn(5) == 0 {
		return nil
	}
	m := map[string]any{}
	for range r.Intn(4) {
		switch r.Intn(4) {
		case 0:
			m[randomString(r)] = randomString(r)
		case 1:
			m[randomString(r)] = r.NormFloat64()
		case 2:
			m[randomString(r)] = []any{true, nil, randomString(r)}
		case 3:
			m[randomString(r)] = map[string]any{randomString(r): false}
		}
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(m); err != nil {
		panic(err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

func (quickConn) Generate(r *mathrand.Rand, size int) reflect.Value {
	var c connObject
	switch r.Intn(11) {
	case 0:
		c = registerChannel{ChannelName: randomString(r), Secret: randomString(r)}
	case 1:
		c = registerChannelRes{}
	case 2:
		c = subscribe{Key: randomString(r), Reg: randomReg(r)}
	case 3:
		c = unSubscribe{Key: randomString(r), Reg: randomReg(r)}
	case 4:
		c = subscribeResult{Key: randomString(r)}
	case 5:
		c = subscribeResultRes{}
	case 6:
		c = invoke{Method: randomString(r), ArgLength: r.Intn(1 << r.Intn(31)), Oneway: r.Intn(2) == 0}
	case 7:
		c = invokeResult{Success: r.Intn(2) == 0}
	case 8:
		c = heartbeat{}
	case 9:
		c = heartbeatRes{}
	case 10:
		c = leaderClosing{}
	}
	return reflect.ValueOf(quickConn{c})
}

// quickPacket is a random packet whose conn object is a valid JSON
// object, for testing/quick.
type quickPacket struct{ p Packet }

func (quickPacket) Generate(r *mathrand.Rand, size int) reflect.Value {
	p := Packet{Response: r.Intn(2) == 0, ID: r.Uint64(), Timeout: int32(r.Uint32())}
	if r.Intn(2) == 0 {
		p.Conn = quickConn{}.Generate(r, size).Interface().(quickConn).c.appendJSON(nil)
	} else {
		p.Conn = randomReg(r)
		if p.Conn == nil {
			p.Conn = []byte("{}")
		}
	}
	if n := r.Intn(size + 1); n > 0 {
		p.App = make([]byte, n)
		r.Read(p.App)
	}
	return reflect.ValueOf(quickPacket{p})
}

func TestQuickPacketRoundTrip(t *testing.T) {
	f := func(q quickPacket) bool {
		raw, err := q.p.MarshalBinary()
		if err != nil {
			t.Log(err)
			return false
		}
		var p Packet
		if err := decodePacket(raw, &p); err != nil || !samePacket(&p, &q.p) {
			t.Logf("decodePacket: %s, %v", describe(&p), err)
			return false
		}
		got, err := readAll(iotest.HalfReader(bytes.NewReader(raw)))
		if err != io.EOF || len(got) != 1 || !samePacket(&got[0], &q.p) {
			t.Logf("Reader: %d packets, %v", len(got), err)
			return false
		}
		return true
	}
	if err := quick.Check(f, &quick.Config{MaxCount: 2000}); err != nil {
		t.Error(err)
	}
}

func TestQuickConnRoundTrip(t *testing.T) {
	f := func(q quickConn) bool {
		b := q.c.appendJSON(nil)
		c, _, err := parseConn(b)
		if err != nil || !reflect.DeepEqual(c, q.c) {
			t.Logf("%q: parsed to %#v, %v; want %#v", b, c, err, q.c)
			return false
		}
		checkConnOracle(t, b)
		return true
	}
	if err := quick.Check(f, &quick.Config{MaxCount: 5000}); err != nil {
		t.Error(err)
	}
}

func TestQuickJSONString(t *testing.T) {
	f := func(s string) bool {
		checkJSONString(t, s)
		return true
	}
	if err := quick.Check(f, &quick.Config{MaxCount: 5000}); err != nil {
		t.Error(err)
	}
	g := func(b []byte) bool { // arbitrary bytes, often invalid UTF-8
		checkJSONString(t, string(b))
		return true
	}
	if err := quick.Check(g, &quick.Config{MaxCount: 5000}); err != nil {
		t.Error(err)
	}
	h := func(seed int64) bool { // escapes and HTML characters, mostly
		checkJSONString(t, randomString(mathrand.New(mathrand.NewSource(seed))))
		return true
	}
	if err := quick.Check(h, &quick.Config{MaxCount: 2000}); err != nil {
		t.Error(err)
	}
}

// allocBytes returns the bytes that f allocates, the least of a few
// runs (other goroutines can only add to the count). A run past 64 MiB
// is no noise and is not repeated.
func allocBytes(f func()) uint64 {
	best := uint64(math.MaxUint64)
	for range 3 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		f()
		runtime.ReadMemStats(&after)
		best = min(best, after.TotalAlloc-before.TotalAlloc)
		if best > 64<<20 {
			break
		}
	}
	return best
}

// TestLyingHeaderBounded: a header that claims a body of almost 2 GiB,
// followed by nothing or a little, must cost little memory.
func TestLyingHeaderBounded(t *testing.T) {
	const connLen = 20
	hdr := appendHeader(nil, false, 1, 0, connLen, math.MaxInt32-connLen)
	for _, tc := range []struct {
		sent  int
		limit uint64
	}{
		{0, 1 << 20},
		{4 << 10, 1 << 20},
		{1 << 20, 5 << 20}, // readBody: at most max(readChunk, 4m), and a little
	} {
		data := append(bytes.Clone(hdr), make([]byte, tc.sent)...)
		var err error
		got := allocBytes(func() {
			var p Packet
			err = NewReader(bytes.NewReader(data), math.MaxInt32).ReadPacket(&p)
		})
		if !errors.Is(err, ErrTruncated) {
			t.Errorf("%d bytes sent: %v, want ErrTruncated", tc.sent, err)
		}
		if got > tc.limit {
			t.Errorf("%d bytes sent: allocated %d bytes, limit %d", tc.sent, got, tc.limit)
		}
		t.Logf("2 GiB claimed, %d bytes sent: %d bytes allocated", tc.sent, got)
	}
}

// TestLargeBodyAllocation: a body that really arrives costs O(its size).
func TestLargeBodyAllocation(t *testing.T) {
	for _, size := range []int{1 << 20, 3<<20 + 5} {
		raw, err := (&Packet{Conn: []byte(`{"type":"invoke_result","success":true}`), App: make([]byte, size)}).MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var p Packet
		got := allocBytes(func() {
			err = NewReader(iotest.HalfReader(bytes.NewReader(raw)), 0).ReadPacket(&p)
		})
		if err != nil || len(p.App) != size {
			t.Fatalf("%d bytes: %v", size, err)
		}
		if got < uint64(size) || got > 4*uint64(size) {
			t.Errorf("%d-byte body: allocated %d bytes, want between 1x and 4x", size, got)
		}
		t.Logf("%d-byte body: %d bytes allocated (%.2fx)", size, got, float64(got)/float64(size))
	}
}

// TestBodyIsFresh: every packet gets its own body; a kept packet is not
// overwritten by the next, and appending to Conn cannot reach App.
func TestBodyIsFresh(t *testing.T) {
	g := loadGolden(t)
	stream := mustHex(t, g.StreamHex)
	got, err := readAll(bytes.NewReader(stream))
	if err != io.EOF || len(got) != 3 {
		t.Fatalf("%d packets, %v", len(got), err)
	}
	want := goldenByName(t, g, g.StreamNames[1]).packet(t)
	if !samePacket(&got[1], &want) {
		t.Errorf("kept packet changed: %s", describe(&got[1]))
	}
	if cap(got[1].Conn) != len(got[1].Conn) {
		t.Errorf("Conn capacity %d reaches past its length %d", cap(got[1].Conn), len(got[1].Conn))
	}
	clear(stream)
	if !samePacket(&got[1], &want) {
		t.Errorf("packet aliases the input")
	}
}

// TestEncodeTooLarge: an invoke whose conn length plus app length exceed
// the bound is refused, and what it appended is undone; one exactly at
// the bound is written.
func TestEncodeTooLarge(t *testing.T) {
	args := [][]byte{bytes.Repeat([]byte("a"), 1000)}
	b, err := appendInvoke([]byte("x"), 1, 0, "m", false, args, math.MaxInt32)
	if err != nil {
		t.Fatal(err)
	}
	size := len(b) - 1 - HeaderSize
	if b, err := appendInvoke([]byte("x"), 1, 0, "m", false, args, size); err != nil || len(b) != 1+HeaderSize+size {
		t.Errorf("at the bound: %d bytes, %v", len(b), err)
	}
	b, err = appendInvoke([]byte("x"), 1, 0, "m", false, args, size-1)
	if !errors.Is(err, ErrPacketTooLarge) || string(b) != "x" {
		t.Errorf("over the bound: %q, %v", b, err)
	}
}

// repeatReader hands out data again and again, never ending.
type repeatReader struct {
	data []byte
	off  int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	n := copy(p, r.data[r.off:])
	r.off = (r.off + n) % len(r.data)
	return n, nil
}

func benchArgs(size int) [][]byte {
	arg := bytes.Repeat([]byte("x"), size)
	arg[0], arg[size-1] = '"', '"'
	return [][]byte{arg}
}

func BenchmarkEncodeInvoke(b *testing.B) {
	for _, size := range []int{32, 4 << 10} {
		b.Run(fmt.Sprintf("arg=%dB", size), func(b *testing.B) {
			args := benchArgs(size)
			buf, _ := appendInvoke(nil, 1, 3000, "getData", false, args, math.MaxInt32)
			b.SetBytes(int64(len(buf)))
			b.ReportAllocs()
			for b.Loop() {
				buf, _ = appendInvoke(buf[:0], 1, 3000, "getData", false, args, math.MaxInt32)
			}
		})
	}
}

func BenchmarkEncodeApp64KiB(b *testing.B) {
	app := bytes.Repeat([]byte("y"), 64<<10)
	buf, _ := appendPacket(nil, true, 1, 3000, invokeResult{Success: true}, app)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		buf, _ = appendPacket(buf[:0], true, 1, 3000, invokeResult{Success: true}, app)
	}
}

func BenchmarkDecodeInvoke(b *testing.B) {
	for _, size := range []int{32, 4 << 10} {
		b.Run(fmt.Sprintf("arg=%dB", size), func(b *testing.B) {
			raw, _ := appendInvoke(nil, 1, 3000, "getData", false, benchArgs(size), math.MaxInt32)
			r := NewReader(&repeatReader{data: raw}, 0)
			var p Packet
			b.SetBytes(int64(len(raw)))
			b.ReportAllocs()
			for b.Loop() {
				if err := r.ReadPacket(&p); err != nil {
					b.Fatal(err)
				}
				c, _, err := parseConn(p.Conn)
				if err != nil {
					b.Fatal(err)
				}
				args, err := splitArgs(p.App, c.(invoke).ArgLength)
				if err != nil || len(args[0]) != size {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkDecodeApp64KiB(b *testing.B) {
	raw, _ := appendPacket(nil, true, 1, 3000, invokeResult{Success: true}, bytes.Repeat([]byte("y"), 64<<10))
	r := NewReader(&repeatReader{data: raw}, 0)
	var p Packet
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if err := r.ReadPacket(&p); err != nil {
			b.Fatal(err)
		}
		if c, _, err := parseConn(p.Conn); err != nil || c != (invokeResult{Success: true}) {
			b.Fatal(c, err)
		}
	}
}

// splitArgs splits an invoke's app object into argLength arguments the
// way the leader walks them (validArgs, then nextArg), for the tests and
// fuzz targets of that framing. The arguments alias app, each capped at
// its own end, so appending to one cannot overwrite the next.
func splitArgs(app []byte, argLength int) ([][]byte, error) {
	if err := validArgs(app, argLength); err != nil {
		return nil, err
	}
	if argLength == 0 {
		return nil, nil
	}
	args := make([][]byte, argLength)
	rest := app
	for i := range args {
		args[i], rest = nextArg(rest)
	}
	return args, nil
}
