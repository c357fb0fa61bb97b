package clusterclient

// Same-user access: the owner of a loopback socket, read from
// /proc/net/tcp, decides who may join a leader and whom a follower
// follows.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// nobody is the uid and gid that the tests run a child of another user
// as.
const nobody = 65534

// needProcNet skips the test unless the socket table can be read.
func needProcNet(tb testing.TB) {
	if _, err := os.Stat("/proc/net/tcp"); runtime.GOOS != "linux" || err != nil {
		tb.Skip("no /proc/net/tcp: the check of the peer's user is off")
	}
}

// asNobody returns an option of startChild that runs the child as user
// nobody, from a copy of the test binary that nobody may run: the one in
// the build directory is not readable by other users.
func asNobody(t *testing.T) func(*exec.Cmd) {
	t.Helper()
	needProcNet(t)
	if os.Geteuid() != 0 {
		t.Skip("running a child as another user needs root")
	}
	dir, err := os.MkdirTemp("", "peeruser")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin := filepath.Join(dir, filepath.Base(os.Args[0]))
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	if err == nil {
		_, err = io.Copy(dst, src)
		err = errors.Join(err, dst.Close(), os.Chmod(dir, 0o755), os.Chmod(bin, 0o755))
	}
	if err != nil {
		t.Fatal(err)
	}
	return func(cmd *exec.Cmd) {
		cmd.Path, cmd.Args[0], cmd.Dir = bin, bin, dir
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	}
}

// TestSocketOwner: the owner of each end of a loopback connection is
// this process's user; a socket that does not exist, or one in
// TIME_WAIT, whose line in the table reads uid 0 whoever owned it, has
// no owner.
func TestSocketOwner(t *testing.T) {
	needProcNet(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, s := acceptedPair(t, ln)
	lp, cp := ln.Addr().(*net.TCPAddr).Port, c.LocalAddr().(*net.TCPAddr).Port
	for _, ports := range [][2]int{{cp, lp}, {lp, cp}} {
		if uid, err := socketOwner(lo(ports[0]), lo(ports[1])); err != nil || uid != os.Geteuid() {
			t.Fatalf("socket from port %d to %d: uid %d, %v; want %d", ports[0], ports[1], uid, err, os.Geteuid())
		}
	}
	if uid, err := socketOwner(lo(lp), lo(1)); err != nil || uid != -1 {
		t.Fatalf("no socket: uid %d, %v; want -1", uid, err)
	}
	// The same ports from another loopback address are another socket: a
	// process of another user could bind 127.0.0.2 and the port of a
	// follower of ours.
	if uid, err := socketOwner(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 2), Port: cp}, lo(lp)); err != nil || uid != -1 {
		t.Fatalf("socket from 127.0.0.2: uid %d, %v; want -1", uid, err)
	}
	// The end that closes first ends in TIME_WAIT once the other has
	// closed too.
	c.Close()
	if _, err := s.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read after the peer closed: %v", err)
	}
	s.Close()
	if !timeWait(cp, lp) {
		t.Fatal("the closed connection never showed in TIME_WAIT")
	}
	if uid, err := socketOwner(lo(cp), lo(lp)); err != nil || uid != -1 {
		t.Fatalf("socket in TIME_WAIT: uid %d, %v; want -1", uid, err)
	}
}

// timeWait waits until the socket from port local to port remote is in
// TIME_WAIT (state 06), and reports whether it got there within a
// second.
func timeWait(local, remote int) bool {
	lp, rp := fmt.Sprintf(":%04X", local), fmt.Sprintf(":%04X", remote)
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		b, _ := os.ReadFile("/proc/net/tcp")
		for line := range strings.Lines(string(b)) {
			if fs := strings.Fields(line); len(fs) > 3 && strings.HasSuffix(fs[1], lp) && strings.HasSuffix(fs[2], rp) && fs[3] == "06" {
				return true
			}
		}
	}
	return false
}

// TestPeerUserFollowerRefused: a follower of another user is refused by
// the leader with ERR_CLUSTER_PEER_USER, which its Ready reports, and
// the leader logs the refused uid. The follower allows the leader's
// user, or it would not register at all.
func TestPeerUserFollowerRefused(t *testing.T) {
	opt := asNobody(t)
	_, _, logs, port := faultLeader(t, nil)
	fol := startChild(t, childSpec{Port: port, Role: RoleFollower, ResponseMS: 500, AllowUIDs: []int{0}}, opt)
	m := fol.event(func(m msg) bool { return m["event"] == "ready" || m["event"] == "error" }, 10*time.Second)
	if e, _ := m["err"].(string); !strings.Contains(e, "ERR_CLUSTER_PEER_USER") || !strings.Contains(e, "65534") {
		t.Fatalf("follower of uid %d: %v; want a refusal with ERR_CLUSTER_PEER_USER naming the uid", nobody, m)
	}
	line := logs.wait(t, 5*time.Second, "refusing follower of another user", "uid=65534", "port="+strconv.Itoa(port))
	t.Logf("follower: %s\nleader: %s", m["err"], line)
}

// TestPeerUserLeaderRefused: a follower does not register with a leader
// of another user, and its Ready says why within two response timeouts.
func TestPeerUserLeaderRefused(t *testing.T) {
	opt := asNobody(t)
	port := freePort(t)
	if startChild(t, childSpec{Port: port, Role: RoleLeader}, opt).ready(10*time.Second) != true {
		t.Fatal("the child of uid 65534 does not lead")
	}
	cfg := testConfig(t, port)
	cfg.Role, cfg.ResponseTimeout = RoleFollower, 300*time.Millisecond
	c := newClient(t, "TestChannel", cfg, newTestReal())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	err := c.Ready(ctx)
	if took := time.Since(start); err == nil || took > 2*cfg.ResponseTimeout {
		t.Fatalf("Ready after %v: %v; want an error within %v", took, err, 2*cfg.ResponseTimeout)
	}
	t.Logf("Ready after %v: %v", time.Since(start), err)
	for _, part := range []string{"uid 65534", "Config.AllowUIDs", "port " + strconv.Itoa(port)} {
		if !strings.Contains(err.Error(), part) {
			t.Fatalf("Ready: %v; want it to name %q", err, part)
		}
	}
}

// TestPeerUserAllowed: with Config.AllowUIDs listing the other's user on
// both sides, a follower of another user joins, and follows a leader of
// another user.
func TestPeerUserAllowed(t *testing.T) {
	opt := asNobody(t)
	t.Run("FollowerOfAnotherUser", func(t *testing.T) {
		_, _, _, port := faultLeader(t, func(cfg *Config) { cfg.AllowUIDs = []int{nobody} })
		fol := startChild(t, childSpec{Port: port, Role: RoleFollower, AllowUIDs: []int{0}}, opt)
		fol.ready(10 * time.Second)
		if got := fol.call("echo", "hi"); got != "hi" {
			t.Fatalf("echo: %v", got)
		}
	})
	t.Run("LeaderOfAnotherUser", func(t *testing.T) {
		port := freePort(t)
		startChild(t, childSpec{Port: port, Role: RoleLeader, AllowUIDs: []int{0}}, opt).ready(10 * time.Second)
		cfg := testConfig(t, port)
		cfg.Role, cfg.AllowUIDs = RoleFollower, []int{nobody}
		c := newClient(t, "TestChannel", cfg, newTestReal())
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if v, err := c.Invoke(ctx, "echo", "hi"); err != nil || v.String() != `"hi"` {
			t.Fatalf("echo: %s, %v", v, err)
		}
	})
}

// BenchmarkSocketOwner measures one lookup of a socket's owner with
// 10,000 more sockets open on the host: 5,000 loopback connection pairs,
// reset when done so that they leave no TIME_WAIT lines behind. "found"
// looks up one after another, spread over the table, "missing" a socket that does not exist,
// which reads the whole table; "lines" is the table's length.
func BenchmarkSocketOwner(b *testing.B) {
	needProcNet(b)
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
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	}()
	for range 5000 {
		c, s := acceptedPair(b, ln)
		conns = append(conns, c, s)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	b.Run("found", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			c := conns[2*(i*997%5000)].LocalAddr().(*net.TCPAddr).Port // spread over the table
			if uid, err := socketOwner(lo(c), lo(port)); err != nil || uid != os.Geteuid() {
				b.Fatal(uid, err)
			}
		}
		b.ReportMetric(procLines(), "lines")
	})
	b.Run("missing", func(b *testing.B) {
		for b.Loop() {
			if uid, err := socketOwner(lo(port), lo(1)); err != nil || uid != -1 {
				b.Fatal(uid, err)
			}
		}
		b.ReportMetric(procLines(), "lines")
	})
}

// procLines counts the sockets in /proc/net/tcp and /proc/net/tcp6.
func procLines() float64 {
	tcp, _ := os.ReadFile("/proc/net/tcp")
	tcp6, _ := os.ReadFile("/proc/net/tcp6")
	return float64(strings.Count(string(tcp), "\n") + strings.Count(string(tcp6), "\n") - 2)
}

// lo is the address of port on 127.0.0.1.
func lo(port int) *net.TCPAddr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port} }

// acceptedPair dials ln and returns both ends of the connection.
func acceptedPair(t testing.TB, ln net.Listener) (c, s net.Conn) {
	t.Helper()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err == nil {
		s, err = ln.Accept()
	}
	if err != nil {
		t.Fatal(err)
	}
	return c, s
}
