// Command clusterdemo shows clusterclient at work across real processes.
//
// It starts several copies of itself (workers) that compete for one port
// on 127.0.0.1. The winner leads: it builds the real client, a small
// in-memory service registry. The others follow and forward their calls
// to it. The demo then has every worker call the registry, publishes one
// address and shows every listener in every worker receive it, kills the
// leader with SIGKILL, and shows who takes over, how long the gap was,
// and that calls and subscriptions carry on.
//
// Usage:
//
//	go run ./cmd/clusterdemo [-n 4] [-port 0] [-v]
//
// With -port 0 (the default) the demo picks a free port. The parent
// drives its workers over their stdin and stdout, one JSON object per
// line. Workers die with the parent: on Linux through Pdeathsig, and on
// every system because they exit when their stdin closes. Ctrl-C (or
// SIGTERM) kills and reaps every worker before the parent exits.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/clusterclient/clusterclient"
)

// Environment of a worker: its number (1..n), the port and whether to log
// the library's warnings.
const (
	envWorker  = "CLUSTERDEMO_WORKER"
	envPort    = "CLUSTERDEMO_PORT"
	envVerbose = "CLUSTERDEMO_VERBOSE"
)

// channel is the channel name every worker uses.
const channel = "registry"

// listenersPerWorker is the number of listeners each worker adds on the
// one subscription of the demo.
const listenersPerWorker = 2

// stepTimeout bounds every step of the parent: a step that takes longer
// means something is wrong, and the demo stops.
const stepTimeout = 10 * time.Second

func main() {
	if id, err := strconv.Atoi(os.Getenv(envWorker)); err == nil {
		os.Exit(worker(id))
	}
	n := flag.Int("n", 4, "number of processes, 2 to 16")
	port := flag.Int("port", 0, "port on 127.0.0.1 to compete for; 0 picks a free one")
	verbose := flag.Bool("v", false, "show the library's warnings from the workers")
	flag.Parse()
	if *n < 2 || *n > 16 {
		fmt.Fprintln(os.Stderr, "clusterdemo: -n must be 2 to 16")
		os.Exit(2)
	}
	os.Exit(parent(*n, *port, *verbose))
}

// ---------------------------------------------------------------------
// Messages between the parent and its workers.

// command is what the parent sends to a worker.
type command struct {
	Op       string `json:"op"`                 // whoami, listen, publish, probe, close
	Provider string `json:"provider,omitempty"` // publish: the address to publish
}

// event is what a worker reports. At is the worker's clock in Unix
// nanoseconds: every process of the demo reads the same clock.
type event struct {
	Ev       string   `json:"ev"`
	At       int64    `json:"at"`
	Pid      int      `json:"pid,omitempty"`
	Leader   bool     `json:"leader,omitempty"`   // ready
	By       int      `json:"by,omitempty"`       // answer: the worker that answered
	Took     float64  `json:"took,omitempty"`     // answer: milliseconds
	Listener int      `json:"listener,omitempty"` // value
	Value    []string `json:"value,omitempty"`    // value
	Err      string   `json:"err,omitempty"`      // answer, lost, error
	Lost     bool     `json:"lost,omitempty"`     // lost: the error is ErrLeaderLost

	worker int // set by the parent
}

// who is the result of the method whoami.
type who struct {
	Worker int `json:"worker"`
	Pid    int `json:"pid"`
}

// service is the registration of the demo: {"service":"echo"} to
// subscribe, with an address to publish.
type service struct {
	Name string `json:"service"`
	Addr string `json:"addr,omitempty"`
}

var echo = service{Name: "echo"}

// ---------------------------------------------------------------------
// Worker.

// emitter writes events to stdout, one JSON object per line.
type emitter struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (e *emitter) emit(ev event) {
	if ev.At == 0 {
		ev.At = time.Now().UnixNano()
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.enc.Encode(ev)
}

// registry is the real client of the demo: an in-memory service registry
// that stands in for a client of a remote server. Only the leader builds
// one. It reports what it does to the parent.
type registry struct {
	id  int
	out *emitter

	mu    sync.Mutex
	addrs map[string][]string  // guarded by mu: service -> addresses
	push  map[string]func(any) // guarded by mu: service -> the leader's push
}

func (r *registry) Invoke(ctx context.Context, method string, args []clusterclient.Value) (any, error) {
	switch method {
	case "whoami":
		return who{Worker: r.id, Pid: os.Getpid()}, nil
	case "slow":
		// A call that is still running when the leader is killed.
		r.out.emit(event{Ev: "slow"})
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return nil, fmt.Errorf("registry: no method %q", method)
}

func (r *registry) Subscribe(reg json.RawMessage, push func(any)) error {
	var s service
	if err := json.Unmarshal(reg, &s); err != nil {
		return err
	}
	r.out.emit(event{Ev: "subscribe"})
	r.mu.Lock()
	defer r.mu.Unlock()
	r.push[s.Name] = push
	if addrs := r.addrs[s.Name]; len(addrs) > 0 {
		push(slices.Clone(addrs))
	}
	return nil
}

func (r *registry) Publish(_ context.Context, reg json.RawMessage) error {
	var s service
	if err := json.Unmarshal(reg, &s); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !slices.Contains(r.addrs[s.Name], s.Addr) {
		r.addrs[s.Name] = append(r.addrs[s.Name], s.Addr)
	}
	if push := r.push[s.Name]; push != nil {
		push(slices.Clone(r.addrs[s.Name]))
	}
	return nil
}

// worker is one process of the cluster. It returns the exit code.
func worker(id int) int {
	signal.Ignore(os.Interrupt, syscall.SIGHUP) // the parent decides when workers stop
	out := &emitter{enc: json.NewEncoder(os.Stdout)}
	fail := func(err error) int {
		out.emit(event{Ev: "error", Err: err.Error()})
		return 1
	}
	port, err := strconv.Atoi(os.Getenv(envPort))
	if err != nil {
		return fail(fmt.Errorf("bad %s: %v", envPort, err))
	}

	cfg := clusterclient.DefaultConfig()
	cfg.Port = port
	// Short intervals, so that the demo's failover shows in moments.
	cfg.MaxWaitTime = 5 * time.Second
	cfg.ResponseTimeout = 2 * time.Second
	cfg.HeartbeatInterval = time.Second
	cfg.DrainTimeout = time.Second
	level := slog.LevelError
	if os.Getenv(envVerbose) == "1" {
		level = slog.LevelWarn
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).
		With("worker", id)

	build := func(context.Context) (clusterclient.RealClient, error) {
		out.emit(event{Ev: "built"})
		return &registry{id: id, out: out, addrs: map[string][]string{}, push: map[string]func(any){}}, nil
	}
	c, err := clusterclient.New(channel, cfg, build)
	if err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), stepTimeout)
	err = c.Ready(ctx)
	cancel()
	if err != nil {
		return fail(err)
	}
	out.emit(event{Ev: "ready", Pid: os.Getpid(), Leader: c.IsLeader()})

	var wg sync.WaitGroup
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var cmd command
		if err := json.Unmarshal(in.Bytes(), &cmd); err != nil {
			return fail(err)
		}
		if cmd.Op == "close" {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			run(c, cmd, out)
		}()
	}
	// "close", or stdin ended because the parent is gone.
	done := make(chan struct{})
	go func() {
		c.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		return fail(errors.New("Close did not return within 3s"))
	}
	wg.Wait()
	out.emit(event{Ev: "closed"})
	return 0
}

// run carries out one command of the parent.
func run(c *clusterclient.Client, cmd command, out *emitter) {
	ctx, cancel := context.WithTimeout(context.Background(), stepTimeout)
	defer cancel()
	switch cmd.Op {
	case "whoami":
		ev, _ := answer(ctx, c)
		out.emit(ev)
	case "listen":
		for i := 1; i <= listenersPerWorker; i++ {
			_, err := c.Subscribe(echo, func(v clusterclient.Value) {
				var addrs []string
				if err := v.Decode(&addrs); err != nil {
					out.emit(event{Ev: "error", Err: err.Error()})
					return
				}
				out.emit(event{Ev: "value", Listener: i, Value: addrs})
			})
			if err != nil {
				out.emit(event{Ev: "error", Err: err.Error()})
				return
			}
		}
		out.emit(event{Ev: "listening"})
	case "publish":
		if err := c.Publish(ctx, service{Name: echo.Name, Addr: cmd.Provider}); err != nil {
			out.emit(event{Ev: "error", Err: err.Error()})
			return
		}
		out.emit(event{Ev: "published"})
	case "probe":
		// A call that is in flight when the leader dies, then one that
		// waits for the next leader.
		_, err := c.Invoke(ctx, "slow")
		out.emit(event{Ev: "lost", Err: errText(err), Lost: errors.Is(err, clusterclient.ErrLeaderLost)})
		ev, _ := answer(ctx, c)
		out.emit(ev)
	default:
		out.emit(event{Ev: "error", Err: "unknown command " + cmd.Op})
	}
}

// answer calls whoami and reports who answered.
func answer(ctx context.Context, c *clusterclient.Client) (event, error) {
	start := time.Now()
	w, err := clusterclient.Invoke[who](ctx, c, "whoami")
	return event{Ev: "answer", By: w.Worker, Took: ms(time.Since(start)), Err: errText(err)}, err
}

// times spells a count of times.
func times(n int) string {
	if n == 1 {
		return "once"
	}
	return strconv.Itoa(n) + " times"
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// ---------------------------------------------------------------------
// Parent.

// proc is one worker process as the parent sees it.
type proc struct {
	id     int
	cmd    *exec.Cmd
	pid    int
	stdin  io.WriteCloser
	exited chan struct{} // closed once the process is reaped
	alive  bool          // not killed nor closed by the demo
	leader bool
}

// demo is the parent's state.
type demo struct {
	n, port int
	start   time.Time
	procs   []*proc
	events  chan event
	signals chan os.Signal

	// Kept up to date by next, whatever step is waiting:
	values     map[[2]int][]string // latest value by worker and listener
	subscribes map[int]int         // real Subscribe calls by leading worker
}

var errInterrupted = errors.New("interrupted")

func parent(n, port int, verbose bool) int {
	d := &demo{
		n: n, port: port, start: time.Now(),
		events:     make(chan event, 256),
		signals:    make(chan os.Signal, 1),
		values:     map[[2]int][]string{},
		subscribes: map[int]int{},
	}
	signal.Notify(d.signals, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	if d.port == 0 {
		p, err := freePort()
		if err != nil {
			fmt.Fprintln(os.Stderr, "clusterdemo:", err)
			return 1
		}
		d.port = p
	}
	err := d.run(verbose)
	d.stop(errors.Is(err, errInterrupted))
	switch {
	case errors.Is(err, errInterrupted):
		fmt.Printf("%s interrupted: every worker killed and reaped\n", d.stamp())
		return 130
	case err != nil:
		fmt.Printf("%s clusterdemo: %v\n", d.stamp(), err)
		return 1
	}
	fmt.Printf("%s done: every worker exited\n", d.stamp())
	return 0
}

// freePort returns a port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// stamp is the time since the demo started, for the start of a line.
func (d *demo) stamp() string {
	return fmt.Sprintf("[%7.1fms]", ms(time.Since(d.start)))
}

func (d *demo) say(format string, args ...any) {
	fmt.Printf("%s %s\n", d.stamp(), fmt.Sprintf(format, args...))
}

func heading(s string) { fmt.Printf("\n== %s\n", s) }

// spawn starts worker id, a copy of this program.
func (d *demo) spawn(id int, verbose bool) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(),
		envWorker+"="+strconv.Itoa(id),
		envPort+"="+strconv.Itoa(d.port),
		envVerbose+"="+map[bool]string{true: "1", false: "0"}[verbose])
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	setIfPresent(cmd.SysProcAttr, "Setpgid", true)
	setIfPresent(cmd.SysProcAttr, "Pdeathsig", syscall.SIGKILL)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	p := &proc{id: id, cmd: cmd, pid: cmd.Process.Pid, stdin: stdin, exited: make(chan struct{}), alive: true}
	d.procs = append(d.procs, p)
	go func() {
		// Read events until the worker's stdout closes, then reap it.
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var ev event
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				ev = event{Ev: "error", Err: "bad line from worker: " + sc.Text()}
			}
			ev.worker = id
			d.events <- ev
		}
		cmd.Wait()
		d.events <- event{Ev: "exited", worker: id}
		close(p.exited)
	}()
	return nil
}

// setIfPresent sets a field of attr that only some systems have, so that
// this one file builds everywhere:
//   - Setpgid (Unix) puts a worker in a process group of its own, so that
//     Ctrl-C in a terminal reaches the parent alone, which then kills and
//     reaps its workers;
//   - Pdeathsig (Linux) has the kernel kill a worker when the parent dies,
//     even by SIGKILL. Elsewhere a worker exits when its stdin closes.
func setIfPresent(attr *syscall.SysProcAttr, field string, value any) {
	f := reflect.ValueOf(attr).Elem().FieldByName(field)
	if v := reflect.ValueOf(value); f.IsValid() && f.CanSet() && v.Type().ConvertibleTo(f.Type()) {
		f.Set(v.Convert(f.Type()))
	}
}

func (d *demo) send(p *proc, cmd command) error {
	b, _ := json.Marshal(cmd)
	_, err := p.stdin.Write(append(b, '\n'))
	return err
}

// next returns the next event of a worker, or an error when the step
// takes too long, a signal arrives or a worker fails. It keeps track of
// listeners' values, real subscriptions and who leads.
func (d *demo) next(deadline time.Time) (event, error) {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case ev := <-d.events:
		p := d.procs[ev.worker-1]
		switch ev.Ev {
		case "error":
			return ev, fmt.Errorf("worker %d: %s", ev.worker, ev.Err)
		case "exited":
			if !p.alive {
				break
			}
			// Ctrl-C may reach a worker that is just starting (still in
			// the parent's process group) before it reaches the parent.
			select {
			case <-d.signals:
				return ev, errInterrupted
			case <-time.After(200 * time.Millisecond):
			}
			return ev, fmt.Errorf("worker %d (pid %d) exited unexpectedly", ev.worker, p.pid)
		case "value":
			d.values[[2]int{ev.worker, ev.Listener}] = ev.Value
		case "subscribe":
			d.subscribes[ev.worker]++
		case "built":
			for _, q := range d.procs {
				q.leader = q == p
			}
		}
		return ev, nil
	case <-d.signals:
		return event{}, errInterrupted
	case <-t.C:
		return event{}, errors.New("a step took longer than " + stepTimeout.String())
	}
}

// live returns the workers still running.
func (d *demo) live() []*proc {
	var ps []*proc
	for _, p := range d.procs {
		if p.alive {
			ps = append(ps, p)
		}
	}
	return ps
}

// stop ends every worker and reaps it. Interrupted, it kills them all at
// once. Otherwise it closes the followers, then the leader (so that no
// follower takes over), and kills any worker that has not exited within
// a few seconds.
func (d *demo) stop(interrupted bool) {
	kill := func() {
		for _, p := range d.procs {
			p.alive = false
			p.cmd.Process.Kill() // an error means it has exited already
		}
	}
	if interrupted {
		kill()
	}
	grace := time.NewTimer(4 * time.Second)
	defer grace.Stop()
	for _, leaders := range []bool{false, true} {
		var group []*proc
		for _, p := range d.procs {
			if p.leader == leaders {
				group = append(group, p)
			}
		}
		for _, p := range group {
			if p.alive {
				p.alive = false
				d.send(p, command{Op: "close"})
				p.stdin.Close()
			}
		}
		for _, p := range group {
		wait:
			for {
				select {
				case <-p.exited:
					break wait
				case <-d.events: // keep the readers moving
				case <-d.signals:
					kill()
				case <-grace.C:
					fmt.Fprintln(os.Stderr, "clusterdemo: killing workers that did not exit")
					kill()
				}
			}
		}
	}
}

// summary is what the run found, for the last lines.
type summary struct {
	first, second   *proc
	built           time.Duration // kill -> the new leader built its real client
	gapFirst        time.Duration // kill -> first answer by the new leader
	gapLast         time.Duration // kill -> last survivor's first answer
	lost, otherErrs int
	calls           int
	listeners       int
}

func (d *demo) run(verbose bool) error {
	fmt.Printf("clusterdemo: %d processes compete for 127.0.0.1:%d, channel %q\n", d.n, d.port, channel)
	var s summary
	deadline := func() time.Time { return time.Now().Add(stepTimeout) }

	heading("election")
	for id := 1; id <= d.n; id++ {
		if err := d.spawn(id, verbose); err != nil {
			return err
		}
	}
	pids := make([]string, len(d.procs))
	for i, p := range d.procs {
		pids[i] = strconv.Itoa(p.pid)
	}
	d.say("started workers 1-%d, pids %s", d.n, strings.Join(pids, " "))
	dl := deadline()
	for ready := 0; ready < d.n; {
		ev, err := d.next(dl)
		if err != nil {
			return err
		}
		p := d.procs[ev.worker-1]
		switch ev.Ev {
		case "built":
			d.say("worker %d won the port: it leads and builds the real client", p.id)
		case "ready":
			ready++
			p.leader = ev.Leader
			if ev.Leader {
				s.first = p
				d.say("worker %d ready: leader", p.id)
			} else {
				d.say("worker %d ready: follower, forwards to the leader over loopback", p.id)
			}
		}
	}
	if s.first == nil {
		return errors.New("no worker leads")
	}

	heading("calls: every worker invokes whoami on the shared real client")
	if err := d.whoami(&s, d.live(), s.first); err != nil {
		return err
	}

	heading("subscribe and publish")
	for _, p := range d.procs {
		d.send(p, command{Op: "listen"})
	}
	publisher := d.procs[0]
	if publisher == s.first {
		publisher = d.procs[1]
	}
	want := []string{fmt.Sprintf("worker-%d:9000", publisher.id)}
	dl = deadline()
	for listening := 0; listening < d.n; {
		ev, err := d.next(dl)
		if err != nil {
			return err
		}
		if ev.Ev == "listening" {
			listening++
		}
	}
	s.listeners = d.n * listenersPerWorker
	d.say("%d listeners in %d processes; the real client subscribed %s", s.listeners, d.n, times(d.subscribes[s.first.id]))
	d.send(publisher, command{Op: "publish", Provider: want[0]})
	d.say("worker %d publishes %s, once", publisher.id, want[0])
	if err := d.waitValues(d.live(), want, ""); err != nil {
		return err
	}

	heading("failover: SIGKILL to the leader")
	survivors := slices.DeleteFunc(slices.Clone(d.live()), func(p *proc) bool { return p == s.first })
	for _, p := range survivors {
		d.send(p, command{Op: "probe"})
	}
	dl = deadline()
	for slow := 0; slow < len(survivors); {
		ev, err := d.next(dl)
		if err != nil {
			return err
		}
		if ev.Ev == "slow" {
			slow++
		}
	}
	d.say("every follower has a call running on the leader; killing worker %d (pid %d)", s.first.id, s.first.pid)
	s.first.alive = false
	clear(d.values) // from now on, values come from the new leader
	killed := time.Now()
	if err := s.first.cmd.Process.Kill(); err != nil {
		return err
	}
	since := func(at int64) time.Duration { return time.Unix(0, at).Sub(killed) }
	// Wait for: the first worker's exit, a new leader, each survivor's
	// lost call and its next answer, and every listener's value again
	// from the new leader (the publication is made again there).
	answered := map[int]bool{}
	gone := false
	dl = deadline()
	for !gone || s.second == nil || len(answered) < len(survivors) {
		ev, err := d.next(dl)
		if err != nil {
			return err
		}
		p := d.procs[ev.worker-1]
		switch ev.Ev {
		case "exited":
			gone = true
			d.say("worker %d is gone (killed)", p.id)
		case "built":
			s.second = p
			s.built = since(ev.At)
			d.say("worker %d took over: it leads and built a new real client, %.1fms after the kill", p.id, ms(s.built))
		case "lost":
			if ev.Lost {
				s.lost++
				d.say("worker %d: the call in flight failed with ErrLeaderLost", p.id)
			} else {
				s.otherErrs++
				d.say("worker %d: the call in flight ended with: %s", p.id, ev.Err)
			}
		case "answer":
			if ev.Err != "" {
				return fmt.Errorf("worker %d: call after the kill failed: %s", p.id, ev.Err)
			}
			s.calls++
			answered[p.id] = true
			gap := since(ev.At)
			if s.gapFirst == 0 || gap < s.gapFirst {
				s.gapFirst = gap
			}
			s.gapLast = max(s.gapLast, gap)
			d.say("worker %d: next call waited for the new leader, answered by worker %d %.1fms after the kill", p.id, ev.By, ms(gap))
		}
	}
	if err := d.waitValues(survivors, want, " again, from the new leader"); err != nil {
		return err
	}

	heading("after failover: calls and subscriptions carry on")
	if err := d.whoami(&s, survivors, s.second); err != nil {
		return err
	}
	late := survivors[len(survivors)-1]
	addr := fmt.Sprintf("worker-%d:9001", late.id)
	want = append(want, addr)
	d.send(late, command{Op: "publish", Provider: addr})
	d.say("worker %d publishes %s", late.id, addr)
	if err := d.waitValues(survivors, want, ""); err != nil {
		return err
	}

	heading("summary")
	live := len(survivors) * listenersPerWorker
	fmt.Printf("  processes      %d on 127.0.0.1:%d\n", d.n, d.port)
	fmt.Printf("  first leader   worker %d (pid %d), killed with SIGKILL\n", s.first.id, s.first.pid)
	fmt.Printf("  new leader     worker %d (pid %d), real client built %.1fms after the kill\n", s.second.id, s.second.pid, ms(s.built))
	fmt.Printf("  gap            first answer from the new leader %.1fms after the kill (last survivor %.1fms)\n", ms(s.gapFirst), ms(s.gapLast))
	fmt.Printf("  failed calls   %d, all ErrLeaderLost: the calls in flight at the kill (%d other errors)\n", s.lost, s.otherErrs)
	fmt.Printf("  calls          %d answered\n", s.calls)
	fmt.Printf("  subscriptions  %d listeners before the kill, %d after; every one got every value;\n", s.listeners, live)
	fmt.Printf("                 real Subscribe calls: %d on the first leader, %d on the new one\n", d.subscribes[s.first.id], d.subscribes[s.second.id])
	fmt.Println()
	if s.lost+s.otherErrs != len(survivors) || s.otherErrs != 0 {
		return fmt.Errorf("%d calls lost and %d other errors, want %d lost", s.lost, s.otherErrs, len(survivors))
	}
	return nil
}

// whoami has every worker of ps call whoami and checks that leader
// answered.
func (d *demo) whoami(s *summary, ps []*proc, leader *proc) error {
	for _, p := range ps {
		d.send(p, command{Op: "whoami"})
	}
	dl := time.Now().Add(stepTimeout)
	for got := 0; got < len(ps); {
		ev, err := d.next(dl)
		if err != nil {
			return err
		}
		switch ev.Ev {
		case "answer":
			if ev.Err != "" {
				return fmt.Errorf("worker %d: whoami: %s", ev.worker, ev.Err)
			}
			if ev.By != leader.id {
				return fmt.Errorf("worker %d: answered by worker %d, not the leader %d", ev.worker, ev.By, leader.id)
			}
			got++
			s.calls++
			where := "over loopback"
			if ev.worker == leader.id {
				where = "in its own process"
			}
			d.say("worker %d: answered by worker %d %s, %.2fms", ev.worker, ev.By, where, ev.Took)
		}
	}
	return nil
}

// waitValues waits until every listener of every worker in ps holds
// want, and says so once per worker.
func (d *demo) waitValues(ps []*proc, want []string, note string) error {
	done := map[int]bool{}
	dl := time.Now().Add(stepTimeout)
	for {
		for _, p := range ps {
			all := true
			for l := 1; l <= listenersPerWorker; l++ {
				all = all && slices.Equal(d.values[[2]int{p.id, l}], want)
			}
			if all && !done[p.id] {
				done[p.id] = true
				d.say("worker %d: its %d listeners got [%s]%s", p.id, listenersPerWorker, strings.Join(want, " "), note)
			}
		}
		if len(done) == len(ps) {
			return nil
		}
		if _, err := d.next(dl); err != nil {
			return err
		}
	}
}
