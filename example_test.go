package clusterclient_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/clusterclient/clusterclient"
)

// registry is the real client of the examples: an in-memory service
// registry that stands in for a client of a remote server. Only the
// client that leads builds one; the calls of every client end up here.
type registry struct {
	clusterclient.Methods // lookup, and its Invoke serves them

	mu    sync.Mutex
	addrs map[string][]string  // service name -> addresses
	push  map[string]func(any) // service name -> the leader's push
}

// service is a registration: {"service":"orders"} to subscribe,
// {"service":"orders","addr":"orders-a:9090"} to publish.
type service struct {
	Name string `json:"service"`
	Addr string `json:"addr,omitempty"`
}

// newRegistry is the BuildFunc of the examples.
func newRegistry(context.Context) (clusterclient.RealClient, error) {
	r := &registry{
		Methods: clusterclient.Methods{},
		addrs:   map[string][]string{"users": {"users-a:8080", "users-b:8080"}},
		push:    map[string]func(any){},
	}
	clusterclient.Method(r.Methods, "lookup", r.lookup)
	return r, nil
}

// lookup returns a service's addresses.
func (r *registry) lookup(_ context.Context, name string) ([]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	addrs, ok := r.addrs[name]
	if !ok {
		return nil, notFoundError(name)
	}
	return addrs, nil
}

// Subscribe pushes a service's addresses now, if it has any, and after
// every change. It pushes under the lock so that values leave in order.
func (r *registry) Subscribe(reg json.RawMessage, push func(any)) error {
	var s service
	if err := json.Unmarshal(reg, &s); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.push[s.Name] = push
	if addrs := r.addrs[s.Name]; len(addrs) > 0 {
		push(slices.Clone(addrs))
	}
	return nil
}

// Publish adds an address to a service.
func (r *registry) Publish(_ context.Context, reg json.RawMessage) error {
	var s service
	if err := json.Unmarshal(reg, &s); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.addrs[s.Name] = append(r.addrs[s.Name], s.Addr)
	if push := r.push[s.Name]; push != nil {
		push(slices.Clone(r.addrs[s.Name]))
	}
	return nil
}

// notFoundError has a name and a code: its ErrorName and ErrorCode
// methods give the Name and Code of the *RemoteError that callers see.
type notFoundError string

func (e notFoundError) Error() string     { return fmt.Sprintf("service %q is not registered", string(e)) }
func (e notFoundError) ErrorName() string { return "NotFoundError" }
func (e notFoundError) ErrorCode() string { return "ENOTFOUND" }

// freePort returns a port on 127.0.0.1 that was free a moment ago, so
// that each example has a port of its own. Real processes share one
// agreed port (Config.Port, 7777 by default).
func freePort() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// Three clients of one channel on one port, as three processes would
// create them: the first takes the port and builds the real client, the
// others forward their calls to it over loopback. Subscriptions,
// publications and calls work the same from each of them.
func Example() {
	ctx := context.Background()
	cfg := clusterclient.DefaultConfig()
	cfg.Port = freePort()

	var clients []*clusterclient.Client
	for i := range 3 {
		c, err := clusterclient.New("registry", cfg, newRegistry)
		if err != nil {
			log.Fatal(err)
		}
		defer c.Close()
		if err := c.Ready(ctx); err != nil {
			log.Fatal(err)
		}
		fmt.Printf("client %d leads: %v\n", i+1, c.IsLeader())
		clients = append(clients, c)
	}

	// Every client listens to "orders"; client 2 publishes an address.
	got := make(chan string, len(clients))
	for i, c := range clients {
		_, err := c.Subscribe(service{Name: "orders"}, func(v clusterclient.Value) {
			got <- fmt.Sprintf("client %d got %s", i+1, v)
		})
		if err != nil {
			log.Fatal(err)
		}
	}
	if err := clients[1].Publish(ctx, service{Name: "orders", Addr: "orders-a:9090"}); err != nil {
		log.Fatal(err)
	}
	lines := []string{<-got, <-got, <-got}
	slices.Sort(lines)
	for _, l := range lines {
		fmt.Println(l)
	}

	// Client 3 calls the real client, which lives in client 1.
	addrs, err := clusterclient.Invoke[[]string](ctx, clients[2], "lookup", "users")
	fmt.Println(addrs, err)
	// Output:
	// client 1 leads: true
	// client 2 leads: false
	// client 3 leads: false
	// client 1 got ["orders-a:9090"]
	// client 2 got ["orders-a:9090"]
	// client 3 got ["orders-a:9090"]
	// [users-a:8080 users-b:8080] <nil>
}

func ExampleNew() {
	cfg := clusterclient.DefaultConfig()
	cfg.Port = freePort() // every process of the cluster uses the same port

	c, err := clusterclient.New("registry", cfg, newRegistry)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.Ready(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("leads:", c.IsLeader())

	v, err := c.Invoke(ctx, "lookup", "users")
	fmt.Println(v, err)
	// Output:
	// leads: true
	// ["users-a:8080","users-b:8080"] <nil>
}

func ExampleInvoke() {
	ctx := context.Background()
	cfg := clusterclient.DefaultConfig()
	cfg.Port = freePort()

	leader, err := clusterclient.New("registry", cfg, newRegistry)
	if err != nil {
		log.Fatal(err)
	}
	defer leader.Close()
	follower, err := clusterclient.New("registry", cfg, newRegistry)
	if err != nil {
		log.Fatal(err)
	}
	defer follower.Close()

	// The result is decoded into the type asked for.
	addrs, err := clusterclient.Invoke[[]string](ctx, follower, "lookup", "users")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(len(addrs), addrs[0])
	// Output: 2 users-a:8080
}

func ExampleClient_Subscribe() {
	ctx := context.Background()
	cfg := clusterclient.DefaultConfig()
	cfg.Port = freePort()

	leader, err := clusterclient.New("registry", cfg, newRegistry)
	if err != nil {
		log.Fatal(err)
	}
	defer leader.Close()
	follower, err := clusterclient.New("registry", cfg, newRegistry)
	if err != nil {
		log.Fatal(err)
	}
	defer follower.Close()
	if err := follower.Ready(ctx); err != nil {
		log.Fatal(err)
	}

	// Both listen; the real client is subscribed once for the two.
	fromLeader, fromFollower := make(chan []string, 1), make(chan []string, 1)
	listen := func(c *clusterclient.Client, ch chan []string) {
		_, err := c.Subscribe(service{Name: "orders"}, func(v clusterclient.Value) {
			var addrs []string
			if err := v.Decode(&addrs); err != nil {
				log.Fatal(err)
			}
			ch <- addrs
		})
		if err != nil {
			log.Fatal(err)
		}
	}
	listen(leader, fromLeader)
	listen(follower, fromFollower)

	// A publication from any client reaches every listener.
	if err := follower.Publish(ctx, service{Name: "orders", Addr: "orders-a:9090"}); err != nil {
		log.Fatal(err)
	}
	fmt.Println("leader's listener:", <-fromLeader)
	fmt.Println("follower's listener:", <-fromFollower)
	// Output:
	// leader's listener: [orders-a:9090]
	// follower's listener: [orders-a:9090]
}

func ExampleRemoteError() {
	ctx := context.Background()
	cfg := clusterclient.DefaultConfig()
	cfg.Port = freePort()

	leader, err := clusterclient.New("registry", cfg, newRegistry)
	if err != nil {
		log.Fatal(err)
	}
	defer leader.Close()
	follower, err := clusterclient.New("registry", cfg, newRegistry)
	if err != nil {
		log.Fatal(err)
	}
	defer follower.Close()

	// The real client's error crosses the wire as a *RemoteError.
	_, err = follower.Invoke(ctx, "lookup", "billing")
	var re *clusterclient.RemoteError
	if errors.As(err, &re) {
		fmt.Println(re.Name, re.Code, re.Message)
	}
	// Output: NotFoundError ENOTFOUND service "billing" is not registered
}

// A real client made of typed functions: each gets its argument decoded
// into its parameter's type, and callers get its result or a
// *RemoteError with a code.
func ExampleMethod() {
	ctx := context.Background()
	build := func(context.Context) (clusterclient.RealClient, error) {
		m := clusterclient.Methods{}
		clusterclient.Method(m, "sum", func(_ context.Context, xs []int) (int, error) {
			total := 0
			for _, x := range xs {
				total += x
			}
			return total, nil
		})
		return m, nil
	}
	cfg := &clusterclient.Config{Port: freePort()} // zero fields: defaults

	leader, err := clusterclient.New("calc", cfg, build)
	if err != nil {
		log.Fatal(err)
	}
	defer leader.Close()
	follower, err := clusterclient.New("calc", cfg, build)
	if err != nil {
		log.Fatal(err)
	}
	defer follower.Close()

	total, err := clusterclient.Invoke[int](ctx, follower, "sum", []int{1, 2, 3})
	fmt.Println(total, err)

	// An argument of the wrong type, and a method that does not exist.
	var re *clusterclient.RemoteError
	_, err = follower.Invoke(ctx, "sum", "1, 2, 3")
	if errors.As(err, &re) {
		fmt.Println(re.Code)
	}
	_, err = follower.Invoke(ctx, "product", []int{1, 2, 3})
	if errors.As(err, &re) {
		fmt.Println(re.Code, re.Message)
	}
	// Output:
	// 6 <nil>
	// ERR_CLUSTER_BAD_ARGUMENT
	// ERR_CLUSTER_NO_METHOD no method "product"
}

// A Value that the real client puts in its result is sent as it came:
// here the method returns its two arguments in a list, and a struct.
func ExampleValue_MarshalJSON() {
	ctx := context.Background()
	build := func(context.Context) (clusterclient.RealClient, error) {
		m := clusterclient.Methods{}
		m["pair"] = func(_ context.Context, args []clusterclient.Value) (any, error) {
			return []any{args[0], args[1]}, nil
		}
		m["wrap"] = func(_ context.Context, args []clusterclient.Value) (any, error) {
			return struct {
				Got clusterclient.Value `json:"got"`
			}{args[0]}, nil
		}
		return m, nil
	}
	cfg := &clusterclient.Config{Port: freePort()}
	leader, err := clusterclient.New("values", cfg, build)
	if err != nil {
		log.Fatal(err)
	}
	defer leader.Close()
	follower, err := clusterclient.New("values", cfg, build)
	if err != nil {
		log.Fatal(err)
	}
	defer follower.Close()

	fmt.Println(follower.Invoke(ctx, "pair", "a", map[string]int{"b": 1}))
	fmt.Println(follower.Invoke(ctx, "wrap", []string{"c"}))
	// Output:
	// ["a",{"b":1}] <nil>
	// {"got":["c"]} <nil>
}

func ExampleClient_Close() {
	ctx := context.Background()
	cfg := clusterclient.DefaultConfig()
	cfg.Port = freePort()

	leader, err := clusterclient.New("registry", cfg, newRegistry)
	if err != nil {
		log.Fatal(err)
	}
	follower, err := clusterclient.New("registry", cfg, newRegistry)
	if err != nil {
		log.Fatal(err)
	}
	defer follower.Close()
	if err := follower.Ready(ctx); err != nil {
		log.Fatal(err)
	}

	// A planned close hands over: the leader tells its followers, lets
	// their calls finish and frees the port; one of them takes over.
	leader.Close()
	addrs, err := clusterclient.Invoke[[]string](ctx, follower, "lookup", "users")
	fmt.Println(addrs, err, follower.IsLeader())
	// Output: [users-a:8080 users-b:8080] <nil> true
}

// Directory is an API client: it holds the business logic and a cache,
// in every process, and reaches the shared data client (the registry)
// through a Client.
type Directory struct {
	c *clusterclient.Client

	mu    sync.Mutex
	cache map[string][]string // guarded by mu
	calls int                 // guarded by mu: lookups sent to the data client
}

// NewDirectory creates the Directory of this process.
func NewDirectory(cfg *clusterclient.Config) (*Directory, error) {
	c, err := clusterclient.New("registry", cfg, newRegistry)
	if err != nil {
		return nil, err
	}
	return &Directory{c: c, cache: map[string][]string{}}, nil
}

// Lookup returns a service's addresses, from the cache when it can.
func (d *Directory) Lookup(ctx context.Context, name string) ([]string, error) {
	d.mu.Lock()
	addrs, ok := d.cache[name]
	d.mu.Unlock()
	if ok {
		return addrs, nil
	}
	addrs, err := clusterclient.Invoke[[]string](ctx, d.c, "lookup", name)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.cache[name] = addrs
	d.calls++
	d.mu.Unlock()
	return addrs, nil
}

// Sent returns how many lookups went to the data client.
func (d *Directory) Sent() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.calls
}

// Close closes the Directory's Client.
func (d *Directory) Close() error { return d.c.Close() }

// The data client (registry) talks to the server and knows nothing of
// processes; the API client (Directory) wraps a Client of it with the
// business logic and a per-process cache.
func Example_apiClient() {
	ctx := context.Background()
	cfg := clusterclient.DefaultConfig()
	cfg.Port = freePort()

	d, err := NewDirectory(cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()

	for range 2 {
		addrs, err := d.Lookup(ctx, "users")
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(addrs, "lookups sent:", d.Sent())
	}
	// Output:
	// [users-a:8080 users-b:8080] lookups sent: 1
	// [users-a:8080 users-b:8080] lookups sent: 1
}
