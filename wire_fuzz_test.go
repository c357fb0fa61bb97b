package clusterclient

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math"
	"math/rand/v2"
	"reflect"
	"testing"
	"testing/iotest"
	"unicode/utf8"
)

// Native fuzz targets of the codec. Seeds come from the golden vectors
// and the table tests; inputs the fuzzer found are kept in
// testdata/fuzz/<target>/ and run as plain tests by go test.

// isCodecError reports whether err is one of the codec's sentinels.
func isCodecError(err error) bool {
	for _, e := range codecErrors {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// addGoldenPackets seeds f with every golden packet, the stream, and
// some damaged packets.
func addGoldenPackets(f *testing.F) {
	g := loadGolden(f)
	for _, v := range g.Vectors {
		raw := mustHex(f, v.Hex)
		f.Add(raw)
		f.Add(raw[:len(raw)/2])
	}
	f.Add(mustHex(f, g.StreamHex))
	f.Add([]byte{})
	bad, _ := (&Packet{Conn: []byte(`[]`), App: []byte{1}}).MarshalBinary()
	f.Add(append(bad, mustHex(f, g.Vectors[0].Hex)...))
}

// checkDecoded checks a packet that decoded from raw: it re-encodes to
// raw (with the reserved bytes zeroed), and the re-encoding decodes to
// the same packet. Its conn object, if of a known type, must survive
// appendPacket (and an invoke's arguments appendInvoke).
func checkDecoded(t *testing.T, raw []byte, p *Packet) {
	t.Helper()
	want := bytes.Clone(raw)
	want[2], want[3] = 0, 0
	enc, err := p.MarshalBinary()
	if err != nil || !bytes.Equal(enc, want) {
		t.Fatalf("%s re-encodes to %x, %v; want %x", describe(p), enc, err, want)
	}
	var q Packet
	if err := decodePacket(enc, &q); err != nil || !samePacket(&q, p) {
		t.Fatalf("re-encoding decodes to %s, %v; want %s", describe(&q), err, describe(p))
	}

	c, typ, err := parseConn(p.Conn)
	if err != nil {
		if !errors.Is(err, ErrBadConn) && !errors.Is(err, ErrArgCount) {
			t.Fatalf("parseConn(%q): %v", p.Conn, err)
		}
		return
	}
	if c == nil {
		return
	}
	enc, err = appendPacket(nil, p.Response, p.ID, p.Timeout, c, p.App)
	if err != nil || decodePacket(enc, &q) != nil || !bytes.Equal(q.App, p.App) {
		t.Fatalf("appendPacket of %#v: %x, %v", c, enc, err)
	}
	if c2, typ2, err := parseConn(q.Conn); err != nil || typ2 != typ || !reflect.DeepEqual(c2, c) {
		t.Fatalf("conn %q re-encoded as %q parses to %#v, %v; want %#v", p.Conn, q.Conn, c2, err, c)
	}
	inv, ok := c.(invoke)
	if !ok {
		return
	}
	args, err := splitArgs(p.App, inv.ArgLength)
	if err != nil {
		if !errors.Is(err, ErrArgCount) && !errors.Is(err, ErrArgOverrun) {
			t.Fatalf("splitArgs: %v", err)
		}
		return
	}
	enc, err = appendInvoke(nil, p.ID, p.Timeout, inv.Method, inv.Oneway, args, math.MaxInt32)
	if err != nil || decodePacket(enc, &q) != nil || !bytes.Equal(q.App, p.App) || q.ID != p.ID || q.Timeout != p.Timeout || q.Response {
		t.Fatalf("appendInvoke of %#v, %q: %x, %v", inv, args, enc, err)
	}
}

// FuzzReadPacket reads packets off arbitrary bytes until an error. Every
// packet must round-trip (checkDecoded); the stream must end in io.EOF
// exactly at its end or in a codec error; after ErrBadConn reading goes
// on at the next packet, as ReadPacket promises.
func FuzzReadPacket(f *testing.F) {
	addGoldenPackets(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(iotest.HalfReader(bytes.NewReader(data)), 0)
		off := 0
		for {
			var p Packet
			err := r.ReadPacket(&p)
			switch {
			case err == nil:
				n := HeaderSize + len(p.Conn) + len(p.App)
				checkDecoded(t, data[off:off+n], &p)
				off += n
			case err == io.EOF:
				if off != len(data) {
					t.Fatalf("io.EOF at %d of %d bytes", off, len(data))
				}
				return
			case errors.Is(err, ErrBadConn):
				// The whole packet was read: skip it as its header says.
				h := data[off : off+HeaderSize]
				off += HeaderSize + int(binary.BigEndian.Uint32(h[16:])) + int(binary.BigEndian.Uint32(h[20:]))
			case isCodecError(err):
				return
			default:
				t.Fatalf("error %v is none of the codec's", err)
			}
		}
	})
}

// FuzzSplitArgs splits arbitrary bytes as an invoke's arguments: no
// panic; what splits re-frames to the same bytes; what does not fails
// with ErrArgCount or ErrArgOverrun, as a plain count of the frame says.
func FuzzSplitArgs(f *testing.F) {
	for _, v := range loadGolden(f).Vectors {
		c, _, err := parseConn([]byte(v.Conn))
		if inv, ok := c.(invoke); ok && err == nil {
			app := mustHex(f, v.DataHex)
			f.Add(app, inv.ArgLength)
			f.Add(app, inv.ArgLength+1)
			f.Add(app[:len(app)/2], inv.ArgLength)
		}
	}
	f.Add([]byte{}, 0)
	f.Add([]byte{0, 0, 0, 0}, 1)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff}, 1)
	f.Add([]byte{0, 0, 0, 1, 'x', 0, 0}, 1)
	f.Add([]byte{0, 0, 0, 0}, -1)
	f.Fuzz(func(t *testing.T, app []byte, argLength int) {
		args, err := splitArgs(app, argLength)
		// The frame, counted plainly: how many whole arguments it holds
		// and whether it ends cleanly.
		count, rest, overrun := 0, app, false
		for len(rest) >= 4 {
			n := binary.BigEndian.Uint32(rest)
			if uint64(n) > uint64(len(rest)-4) {
				overrun = true
				break
			}
			rest = rest[4+n:]
			count++
		}
		clean := !overrun && len(rest) == 0
		if err == nil {
			if !clean || count != argLength || len(args) != argLength {
				t.Fatalf("split %x into %d args, want failure (count %d, clean %v)", app, len(args), count, clean)
			}
			if got := appendArgs(nil, args); !bytes.Equal(got, app) {
				t.Fatalf("re-framed %x to %x", app, got)
			}
			for i, a := range args {
				if cap(a) != len(a) {
					t.Fatalf("argument %d: capacity %d past length %d", i, cap(a), len(a))
				}
			}
			return
		}
		if args != nil {
			t.Fatalf("args %q with error %v", args, err)
		}
		if !errors.Is(err, ErrArgCount) && !errors.Is(err, ErrArgOverrun) {
			t.Fatalf("error %v", err)
		}
		if clean && count == argLength {
			t.Fatalf("%x with argLength %d refused: %v", app, argLength, err)
		}
	})
}

// FuzzStreamSplit builds a stream of golden packets and one large packet
// (chosen by pick) and hands it out in random chunks (seeded by seed);
// every packet must decode as it was, then io.EOF.
func FuzzStreamSplit(f *testing.F) {
	g := loadGolden(f)
	var packets []Packet
	var raws [][]byte
	for _, v := range g.Vectors {
		packets = append(packets, v.packet(f))
		raws = append(raws, mustHex(f, v.Hex))
	}
	// One packet larger than two read chunks, so that readBody grows
	// its buffer while the chunks arrive.
	big := Packet{Response: true, ID: 99, Conn: []byte(`{"type":"invoke_result","success":true}`), App: make([]byte, 2*readChunk+12345)}
	for i := range big.App {
		big.App[i] = byte(i * 7)
	}
	raw, err := big.MarshalBinary()
	if err != nil {
		f.Fatal(err)
	}
	packets, raws = append(packets, big), append(raws, raw)
	f.Add([]byte{}, uint64(0))
	f.Add([]byte{0, 7, 13}, uint64(1))
	f.Add([]byte{21, 21, 0, 21}, uint64(2))
	f.Add([]byte{22, 3, 22}, uint64(4))
	all := make([]byte, len(raws))
	for i := range all {
		all[i] = byte(i)
	}
	f.Add(all, uint64(3))
	f.Fuzz(func(t *testing.T, pick []byte, seed uint64) {
		if len(pick) > 64 {
			pick = pick[:64]
		}
		var stream []byte
		var want []Packet
		for _, b := range pick {
			i := int(b) % len(raws)
			stream = append(stream, raws[i]...)
			want = append(want, packets[i])
		}
		if len(pick) == 0 {
			stream = mustHex(t, g.StreamHex)
			for _, name := range g.StreamNames {
				want = append(want, goldenByName(t, g, name).packet(t))
			}
		}
		rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
		var r io.Reader = &chunkReader{data: stream, sizes: randomSizes(rng, 1+rng.IntN(64))}
		switch seed % 3 {
		case 1:
			r = iotest.DataErrReader(r)
		case 2:
			r = iotest.HalfReader(r)
		}
		got, err := readAll(r)
		if err != io.EOF {
			t.Fatalf("ended with %v after %d packets", err, len(got))
		}
		if len(got) != len(want) {
			t.Fatalf("%d packets, want %d", len(got), len(want))
		}
		for i := range want {
			if !samePacket(&got[i], &want[i]) {
				t.Fatalf("packet %d: %s, want %s", i, describe(&got[i]), describe(&want[i]))
			}
		}
	})
}

// FuzzParseConn checks parseConn on arbitrary bytes: no panic; ErrBadConn
// for anything that is not one JSON object; otherwise what
// parseConnOracle makes of it, and, unless structDiffers, what
// json.Unmarshal into a struct makes of it. A conn object of a known type
// must re-encode to valid JSON that parses back to the same value.
func FuzzParseConn(f *testing.F) {
	for _, v := range loadGolden(f).Vectors {
		f.Add([]byte(v.Conn))
	}
	for _, tc := range parseConnCases {
		if len(tc.conn) < 1000 {
			f.Add([]byte(tc.conn))
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		wantObject := json.Valid(b) && bytes.HasPrefix(bytes.TrimLeft(b, " \t\r\n"), []byte("{"))
		if _, _, err := parseConn(b); !wantObject && !errors.Is(err, ErrBadConn) {
			t.Fatalf("parseConn(%q) = %v for what is not a JSON object", b, err)
		}
		checkConnOracle(t, b)
	})
}

// FuzzAppendJSONString checks appendJSONString on arbitrary strings:
// valid JSON that decodes to the string (invalid UTF-8 as U+FFFD), and
// for valid UTF-8 exactly what JSON.stringify writes.
func FuzzAppendJSONString(f *testing.F) {
	for _, s := range []string{"", "plain", `a"b\c`, "\x00\x1f\x7f", "<>&", "\u2028\u2029", "é日本😀", "\xff", "\xe6\x97", "\xed\xa0\x80"} {
		f.Add(s)
	}
	for _, v := range loadGolden(f).Vectors {
		f.Add(v.Conn)
	}
	f.Fuzz(func(t *testing.T, s string) {
		checkJSONString(t, s)
		if utf8.ValidString(s) {
			// JSON.stringify of a string equals encoding/json's output
			// up to HTML and line-separator escapes; check the decoded
			// form once more through a whole conn object.
			c := registerChannel{ChannelName: s}
			got, _, err := parseConn(c.appendJSON(nil))
			if err != nil || got != connObject(c) {
				t.Fatalf("%q: register_channel parses to %#v, %v", s, got, err)
			}
		}
	})
}
