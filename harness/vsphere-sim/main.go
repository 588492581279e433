// Command gve-vsphere-sim is the vSphere Web Services API simulator the vmware-esx driver is
// tested against: govmomi's simulator (vCenter or ESXi inventory) with a fixed login and
// in-memory guest operations (a file system and a small shell per VM) instead of docker.
package main

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	maxProcs    = 256              // process table size per VM (oldest finished ones go first)
	transferTTL = 10 * time.Minute // lifetime of an unused file transfer URL
)

// process is one guest program: what ListProcessesInGuest reports, and how to stop it.
type process struct {
	info    types.GuestProcessInfo
	kill    chan struct{}
	yielded chan struct{} // closed when the program first sleeps or ends
	once    sync.Once
}

// yield tells StartProgramInGuest that the program has done its instant part.
func (p *process) yield() { p.once.Do(func() { close(p.yielded) }) }

// sleep waits d with the guest lock released; false when the process was terminated.
func (p *process) sleep(d time.Duration) bool {
	p.yield()
	state.mu.Unlock()
	defer state.mu.Lock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-p.kill:
		return false
	}
}

// finish records a process's end, once.
func (p *process) finish(code int) {
	if p.info.EndTime == nil {
		now := time.Now()
		p.info.EndTime, p.info.ExitCode = &now, int32(code)
		close(p.kill)
	}
}

// guestVM is the guest side of one VM: its file system and processes.
type guestVM struct {
	fs      *guestFS
	procs   []*process
	nextPid int64
	boot    time.Time
}

// transfer is a pending InitiateFileTransfer{To,From}Guest URL.
type transfer struct {
	vm        types.ManagedObjectReference
	path      string
	upload    bool
	size      int64
	attrs     types.BaseGuestFileAttributes
	overwrite bool
	expires   time.Time
}

// guestState holds all guest data; mu guards every field and everything reachable from it.
type guestState struct {
	mu        sync.Mutex
	vms       map[string]*guestVM
	transfers map[string]*transfer
	user      string
	password  string
	baseURL   string // scheme://host:port of the server
}

var state = &guestState{vms: map[string]*guestVM{}, transfers: map[string]*transfer{}}

// config is the parsed command line.
type config struct {
	listen, user, password, cert, key, delays, taskDelays, template string
	esx, tls, trace                                                 bool
	model                                                           *simulator.Model
}

// parseFlags reads the command line; sizes default to the simulator's vCenter model.
func parseFlags() *config {
	c := &config{model: simulator.VPX()}
	m := c.model
	flag.StringVar(&c.listen, "l", "127.0.0.1:0", "listen address (loopback only)")
	flag.BoolVar(&c.esx, "esx", false, "simulate a single ESXi host instead of vCenter")
	flag.IntVar(&m.Datacenter, "dc", m.Datacenter, "number of datacenters")
	flag.IntVar(&m.Cluster, "cluster", m.Cluster, "number of clusters per datacenter")
	flag.IntVar(&m.ClusterHost, "host", m.ClusterHost, "number of hosts per cluster")
	flag.IntVar(&m.Host, "standalone-host", m.Host, "number of standalone hosts per datacenter")
	flag.IntVar(&m.Machine, "vm", m.Machine, "number of VMs per resource pool (and per standalone host)")
	flag.IntVar(&m.Datastore, "ds", m.Datastore, "number of local datastores")
	flag.StringVar(&c.user, "username", "gve", "the only accepted login user")
	flag.StringVar(&c.password, "password", "gve-secret", "the only accepted login password")
	flag.StringVar(&state.user, "guest-username", "root", "user guest operations require")
	flag.StringVar(&state.password, "guest-password", "guest-secret", "password guest operations require")
	flag.BoolVar(&c.tls, "tls", true, "serve HTTPS (false: plain HTTP)")
	flag.StringVar(&c.cert, "cert", "", "PEM certificate file (default: the simulator's self-signed one)")
	flag.StringVar(&c.key, "key", "", "PEM private key file for -cert")
	flag.StringVar(&c.delays, "method-delay", "", "NAME=MS,... delay of the named SOAP methods")
	flag.StringVar(&c.taskDelays, "task-delay", "", "NAME=MS,... tasks of the named ..._Task methods run this long after the method answered")
	flag.BoolVar(&c.trace, "trace", false, "write SOAP traffic to stderr")
	flag.StringVar(&c.template, "template", "", "make a template of this name (a snapshotted copy of the first VM)")
	flag.DurationVar(&simulator.SessionIdleTimeout, "session-idle", 0, "end sessions idle this long (0: never), e.g. 2s")
	flag.Parse()
	if flag.NArg() > 0 {
		fail(2, "unexpected argument %q", flag.Arg(0))
	}
	if c.esx {
		e := simulator.ESX()
		e.Datastore, e.Machine = m.Datastore, m.Machine
		c.model = e
	}
	return c
}

// fail prints a message and exits with code.
func fail(code int, format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "gve-vsphere-sim: "+format+"\n", a...)
	os.Exit(code)
}

// loopback checks the listen address is host:port with a loopback host.
func loopback(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return "", fmt.Errorf("%q is not a loopback address; refusing to listen on it", host)
	}
	return net.JoinHostPort(host, port), nil
}

// parseDelays reads NAME=MS,... (the value of -flag) into delays by name.
func parseDelays(flag, s string) (map[string]int, error) {
	if s == "" {
		return nil, nil
	}
	out := map[string]int{}
	for _, item := range strings.Split(s, ",") {
		kv := strings.SplitN(strings.TrimSpace(item), "=", 2)
		ms, err := strconv.Atoi(strings.TrimSpace(kv[len(kv)-1]))
		if len(kv) != 2 || kv[0] == "" || err != nil || ms < 0 {
			return nil, fmt.Errorf("bad -%s item %q (want NAME=MS)", flag, item)
		}
		out[strings.TrimSpace(kv[0])] = ms
	}
	return out, nil
}

// main builds the inventory, serves it, prints the stdout protocol and waits for the end.
func main() {
	c := parseFlags()
	addr, err := loopback(c.listen)
	if err != nil {
		fail(2, "-l: %v", err)
	}
	delays, err := parseDelays("method-delay", c.delays)
	if err != nil {
		fail(2, "%v", err)
	}
	if taskDelays, err = parseDelays("task-delay", c.taskDelays); err != nil {
		fail(2, "%v", err)
	}
	for name := range taskDelays {
		if !strings.HasSuffix(name, "_Task") {
			fail(2, "-task-delay %s: not a ..._Task method", name)
		}
	}
	if (c.cert == "") != (c.key == "") {
		fail(2, "-cert and -key go together")
	}
	simulator.Trace = c.trace
	m := c.model
	m.DelayConfig.MethodDelay = delays
	if err := m.Create(); err != nil {
		fail(1, "creating the inventory: %v", err)
	}
	defer m.Remove()
	replaceGuestManagers(m)

	m.Service.Listen = &url.URL{Host: addr, User: url.UserPassword(c.user, c.password)}
	if c.tls {
		m.Service.TLS = new(tls.Config)
		if c.cert != "" {
			pair, err := tls.LoadX509KeyPair(c.cert, c.key)
			if err != nil {
				m.Remove()
				fail(2, "loading -cert/-key: %v", err)
			}
			m.Service.TLS.Certificates = []tls.Certificate{pair}
		} else {
			pair, err := selfSigned()
			if err != nil {
				m.Remove()
				fail(1, "making a certificate: %v", err)
			}
			m.Service.TLS.Certificates = []tls.Certificate{pair}
		}
	}
	m.Service.ServeMux = http.NewServeMux()
	m.Service.ServeMux.HandleFunc("/guestFile", serveGuestFile)
	server := start(m)

	scheme, thumb := "http", ""
	if c.tls {
		scheme = "https"
		sum := sha256.Sum256(server.Certificate().Raw)
		thumb = hex.EncodeToString(sum[:])
	}
	host := server.URL.Host
	if c.template != "" {
		if err := makeTemplate(server.URL, c.template); err != nil {
			server.Close()
			m.Remove()
			fail(1, "-template %s: %v", c.template, err)
		}
	}
	if len(taskDelays) > 0 {
		// Routed after the template's clone, which is not delayed. A pattern naming
		// the host comes before the simulator's own "/sdk" (the mux matches the
		// request's host without its port).
		name, _, _ := net.SplitHostPort(host)
		for _, h := range []string{name, "localhost"} {
			m.Service.ServeMux.HandleFunc(h+simulator.Map.Path, serveDelayedTasks(m.Service))
		}
	}
	state.mu.Lock()
	state.baseURL = scheme + "://" + host
	state.mu.Unlock()
	fmt.Printf("GVE_VSPHERE_URL=%s://%s/sdk\nGVE_VSPHERE_AUTHORITY=%s\nGVE_VSPHERE_THUMBPRINT=%s\nGVE_VSPHERE_READY=1\n",
		scheme, host, host, thumb)
	_ = os.Stdout.Sync()

	waitForEnd()
	done := make(chan struct{})
	go func() { server.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		fmt.Fprintln(os.Stderr, "gve-vsphere-sim: requests still running after 5 s; exiting anyway")
	}
}

// start runs the server, turning the simulator's listen panic into an error exit.
func start(m *simulator.Model) (s *simulator.Server) {
	defer func() {
		if r := recover(); r != nil {
			m.Remove()
			fail(1, "listen: %v", r)
		}
	}()
	return m.Service.NewServer()
}

// waitForEnd blocks until standard input reaches EOF or SIGTERM/SIGINT arrives.
func waitForEnd() {
	end := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		end <- struct{}{}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		end <- struct{}{}
	}()
	<-end
}

// replaceGuestManagers puts the in-memory guest file and process managers in the registry.
func replaceGuestManagers(m *simulator.Model) {
	gom := simulator.Map.Get(*m.ServiceContent.GuestOperationsManager).(*simulator.GuestOperationsManager)
	fm := simulator.Map.Get(*gom.FileManager).(*simulator.GuestFileManager)
	pm := simulator.Map.Get(*gom.ProcessManager).(*simulator.GuestProcessManager)
	simulator.Map.Put(&fileManager{fm})
	simulator.Map.Put(&processManager{pm})
}

// guestOp runs the checks every guest call makes, then f with the VM's guest under the lock.
func guestOp(ctx *simulator.Context, ref types.ManagedObjectReference, auth types.BaseGuestAuthentication,
	f func(g *guestVM) *soap.Fault) *soap.Fault {
	vm, ok := ctx.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return simulator.Fault("managed object not found: "+ref.String(), &types.ManagedObjectNotFound{Obj: ref})
	}
	var name string
	var power types.VirtualMachinePowerState
	var boot time.Time
	ctx.WithLock(vm, func() {
		name, power = vm.Name, vm.Runtime.PowerState
		if vm.Summary.Runtime.BootTime != nil {
			boot = *vm.Summary.Runtime.BootTime
		}
	})
	if power != types.VirtualMachinePowerStatePoweredOn {
		return simulator.Fault("The attempted operation cannot be performed in the current state ("+string(power)+").",
			&types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOn, ExistingState: power})
	}
	state.mu.Lock()
	defer state.mu.Unlock()
	if creds, ok := auth.(*types.NamePasswordAuthentication); !ok || creds.Username != state.user || creds.Password != state.password {
		return simulator.Fault("Failed to authenticate with the guest operating system using the supplied credentials.",
			&types.InvalidGuestLogin{})
	}
	g := state.vms[ref.Value]
	if g == nil {
		g = &guestVM{fs: newGuestFS(name), nextPid: 1000, boot: boot}
		state.vms[ref.Value] = g
	} else if !boot.Equal(g.boot) {
		for _, p := range g.procs { // a power cycle ends every process
			p.finish(143)
		}
		g.procs, g.boot = nil, boot
	}
	return f(g)
}

// guestEnv is the environment a guest user's program starts with.
func guestEnv(user string) []string {
	home := "/root"
	if user != "root" {
		home = "/home/" + user
	}
	return []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + home,
		"USER=" + user, "LOGNAME=" + user, "SHELL=/bin/sh"}
}

// processManager replaces the simulator's GuestProcessManager with in-memory programs.
type processManager struct {
	*simulator.GuestProcessManager
}

// StartProgramInGuest starts a program; it returns once the program ended or first sleeps.
func (m *processManager) StartProgramInGuest(ctx *simulator.Context, req *types.StartProgramInGuest) soap.HasFault {
	body := new(methods.StartProgramInGuestBody)
	spec := req.Spec.GetGuestProgramSpec()
	var started *process
	body.Fault_ = guestOp(ctx, req.Vm, req.Auth, func(g *guestVM) *soap.Fault {
		user := req.Auth.(*types.NamePasswordAuthentication).Username
		env := append(guestEnv(user), spec.EnvVariables...)
		cwd := spec.WorkingDirectory
		if cwd == "" {
			cwd = strings.TrimPrefix(env[1], "HOME=")
		}
		if n, err := g.fs.lookup(cwd); err != nil || !n.dir {
			return simulator.Fault(cwd+": not a directory", &types.NotADirectory{FileFault: types.FileFault{File: cwd}})
		}
		base := path.Base(spec.ProgramPath)
		script := shQuote(base) + " " + spec.Arguments
		if _, ok := builtins[base]; !ok {
			n, err := g.fs.lookup(spec.ProgramPath)
			if err != nil || n.dir || !path.IsAbs(spec.ProgramPath) {
				return simulator.Fault(spec.ProgramPath+": program not found",
					&types.FileNotFound{FileFault: types.FileFault{File: spec.ProgramPath}})
			}
			script = "sh " + shQuote(spec.ProgramPath) + " " + spec.Arguments
		}
		p := &process{kill: make(chan struct{}), yielded: make(chan struct{}), info: types.GuestProcessInfo{
			Name: base, Pid: g.nextPid, Owner: user, StartTime: time.Now(),
			CmdLine: strings.TrimSpace(`"` + spec.ProgramPath + `" ` + spec.Arguments)}}
		g.nextPid++
		g.addProcess(p)
		sh := newShell(g, p, append(env, "PWD="+cwd), cwd, []string{"sh"})
		go runProcess(sh, p, script)
		started = p
		body.Res = &types.StartProgramInGuestResponse{Returnval: p.info.Pid}
		return nil
	})
	if started != nil {
		<-started.yielded
	}
	return body
}

// runProcess interprets a program's script under the guest lock and records its exit code.
func runProcess(sh *shell, p *process, script string) {
	state.mu.Lock()
	defer state.mu.Unlock()
	defer p.yield()
	defer func() { // a bug in the interpreter ends the process, not the server
		if r := recover(); r != nil {
			log.Printf("guest process %d (%s): internal error: %v", p.info.Pid, script, r)
			p.finish(134)
		}
	}()
	code := sh.run(script, nil, &sink{discard: true}, &sink{discard: true})
	p.finish(code)
}

// addProcess appends to the process table, dropping the oldest (finished first) beyond maxProcs.
func (g *guestVM) addProcess(p *process) {
	g.procs = append(g.procs, p)
	if len(g.procs) <= maxProcs {
		return
	}
	drop := 0
	for i, q := range g.procs {
		if q.info.EndTime != nil {
			drop = i
			break
		}
	}
	g.procs = append(g.procs[:drop], g.procs[drop+1:]...)
}

// shQuote quotes a word for the shell.
func shQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// ListProcessesInGuest reports all processes, or those asked for by pid.
func (m *processManager) ListProcessesInGuest(ctx *simulator.Context, req *types.ListProcessesInGuest) soap.HasFault {
	body := new(methods.ListProcessesInGuestBody)
	body.Fault_ = guestOp(ctx, req.Vm, req.Auth, func(g *guestVM) *soap.Fault {
		res := new(types.ListProcessesInGuestResponse)
		for _, p := range g.procs {
			want := len(req.Pids) == 0
			for _, pid := range req.Pids {
				want = want || pid == p.info.Pid
			}
			if want {
				res.Returnval = append(res.Returnval, p.info)
			}
		}
		body.Res = res
		return nil
	})
	return body
}

// TerminateProcessInGuest ends a running process with exit code 143 (SIGTERM).
func (m *processManager) TerminateProcessInGuest(ctx *simulator.Context, req *types.TerminateProcessInGuest) soap.HasFault {
	body := new(methods.TerminateProcessInGuestBody)
	body.Fault_ = guestOp(ctx, req.Vm, req.Auth, func(g *guestVM) *soap.Fault {
		for _, p := range g.procs {
			if p.info.Pid == req.Pid && p.info.EndTime == nil {
				p.finish(143)
				body.Res = new(types.TerminateProcessInGuestResponse)
				return nil
			}
		}
		return simulator.Fault(fmt.Sprintf("process %d not found", req.Pid), &types.GuestProcessNotFound{Pid: req.Pid})
	})
	return body
}

// ReadEnvironmentVariableInGuest reports the guest user's environment (all, or the names asked for).
func (m *processManager) ReadEnvironmentVariableInGuest(ctx *simulator.Context, req *types.ReadEnvironmentVariableInGuest) soap.HasFault {
	body := new(methods.ReadEnvironmentVariableInGuestBody)
	body.Fault_ = guestOp(ctx, req.Vm, req.Auth, func(g *guestVM) *soap.Fault {
		res := new(types.ReadEnvironmentVariableInGuestResponse)
		for _, kv := range guestEnv(req.Auth.(*types.NamePasswordAuthentication).Username) {
			want := len(req.Names) == 0
			for _, n := range req.Names {
				want = want || strings.HasPrefix(kv, n+"=")
			}
			if want {
				res.Returnval = append(res.Returnval, kv)
			}
		}
		body.Res = res
		return nil
	})
	return body
}

// newTransfer registers a transfer and returns its URL (state.mu held).
func (s *guestState) newTransfer(t *transfer) string {
	now := time.Now()
	for id, old := range s.transfers {
		if now.After(old.expires) {
			delete(s.transfers, id)
		}
	}
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	t.expires = now.Add(transferTTL)
	s.transfers[id] = t
	return s.baseURL + "/guestFile?id=" + id
}

// takeTransfer removes and returns the live transfer for id when the method fits it.
func (s *guestState) takeTransfer(id, method string) (*transfer, int) {
	t := s.transfers[id]
	if t == nil || time.Now().After(t.expires) {
		delete(s.transfers, id)
		return nil, http.StatusNotFound
	}
	if (t.upload && method != http.MethodPut) || (!t.upload && method != http.MethodGet) {
		return nil, http.StatusMethodNotAllowed
	}
	delete(s.transfers, id)
	return t, 0
}

// serveGuestFile answers the single PUT or GET of a transfer URL.
func serveGuestFile(w http.ResponseWriter, r *http.Request) {
	state.mu.Lock()
	t, status := state.takeTransfer(r.URL.Query().Get("id"), r.Method)
	state.mu.Unlock()
	if t == nil {
		http.Error(w, http.StatusText(status), status)
		return
	}
	if t.upload {
		data, err := io.ReadAll(io.LimitReader(r.Body, t.size+1))
		if err != nil || int64(len(data)) != t.size {
			http.Error(w, fmt.Sprintf("expected exactly %d bytes", t.size), http.StatusBadRequest)
			return
		}
		state.mu.Lock()
		defer state.mu.Unlock()
		g := state.vms[t.vm.Value]
		if err := g.fs.writeFile(t.path, data, 0644, t.overwrite, false); err != nil {
			http.Error(w, t.path+": "+err.Error(), http.StatusConflict)
			return
		}
		n, _ := g.fs.lookup(t.path)
		applyAttributes(n, t.attrs)
		w.WriteHeader(http.StatusOK)
		return
	}
	state.mu.Lock()
	data, err := state.vms[t.vm.Value].fs.readFile(t.path)
	data = append([]byte(nil), data...)
	state.mu.Unlock()
	if err != nil {
		http.Error(w, t.path+": "+err.Error(), http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(len(data)))
	_, _ = w.Write(data)
}
