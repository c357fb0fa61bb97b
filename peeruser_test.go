package clusterclient

// Same-user access: the owner of a loopback socket, read from
// /proc/net/tcp, decides who may join a leader and whom a follower
// follows.

import (
	"net"
	"os"
	"syscall"
	"testing"
)

// BenchmarkSocketOwner measures one lookup of a socket's owner with
// 10,000 more sockets open on the host: 5,000 loopback connection pairs.
// "found" looks up one of them, "missing" a socket that does not exist,
// which reads the whole table.
func BenchmarkSocketOwner(b *testing.B) {
	if _, err := os.Stat("/proc/net/tcp"); err != nil {
		b.Skip("no /proc/net/tcp")
	}
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	if lim.Cur < 12000 {
		lim.Cur = max(lim.Max, 12000)
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			b.Skip("cannot raise the file limit:", err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 5000 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c, s)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	mid := conns[5000].LocalAddr().(*net.TCPAddr).Port
	b.Run("found", func(b *testing.B) {
		for b.Loop() {
			if uid, err := socketOwner(mid, port); err != nil || uid != os.Getuid() {
				b.Fatal(uid, err)
			}
		}
	})
	b.Run("missing", func(b *testing.B) {
		for b.Loop() {
			if uid, err := socketOwner(port, 1); err != nil || uid != -1 {
				b.Fatal(uid, err)
			}
		}
	})
}
