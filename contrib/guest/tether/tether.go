package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Container states reported by hello.
const (
	stateWaiting = "waiting"
	stateRunning = "running"
	stateExited  = "exited"
	// stateHeld: run with hold: the disks are mounted for archive ops, no
	// process runs (a stopped container's files, docs/tether.md).
	stateHeld = "held"
)

type tether struct {
	r portReader
	w *portWriter

	mu       sync.Mutex // guards state, exitCode, procs, byPid and starts (see reaper)
	state    string
	exitCode *int
	procs    map[uint32]*proc // by channel
	byPid    map[int]*proc
	archives map[uint32]*archiveStream // archive_put streams by channel
	cfg      *runConfig
	// How long each step of the start took, reported in the run reply.
	timings map[string]int64
}

func newTether(port *os.File) *tether {
	return &tether{
		r:     portReader{f: port},
		w:     &portWriter{f: port},
		state: stateWaiting,
		procs: map[uint32]*proc{},
		byPid: map[int]*proc{},

		archives: map[uint32]*archiveStream{},
	}
}

// hostLog sends a diagnostic to the daemon as a `log` event (and the console).
// It runs on its own goroutine so a diagnostic never blocks the caller
// behind a disconnected port.
func (t *tether) hostLog(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	logf("%s", msg)
	go t.w.ctrl(map[string]any{"op": "log", "msg": msg})
}

func (t *tether) serve() {
	go t.reaper()
	for {
		f := t.r.next()
		switch f.typ {
		case frameCtrl:
			t.handleCtrl(f.payload)
		case frameStdin, frameStdinClose:
			if t.archiveFrame(f) {
				continue
			}
			t.mu.Lock()
			p := t.procs[f.ch]
			t.mu.Unlock()
			if p == nil || p.stdin == nil {
				continue // no stdin wanted, or the process is gone: drop
			}
			if f.typ == frameStdin {
				p.stdin.push(f.payload)
			} else {
				p.stdin.close()
			}
		default:
			t.hostLog("ignoring frame type %d on channel %d", f.typ, f.ch)
		}
	}
}

func (t *tether) handleCtrl(payload []byte) {
	var req request
	if err := json.Unmarshal(payload, &req); err != nil {
		// Answer a malformed request if its req number can be salvaged.
		var partial struct {
			Req json.RawMessage `json:"req"`
		}
		var n int64
		if json.Unmarshal(payload, &partial) == nil && json.Unmarshal(partial.Req, &n) == nil {
			t.reply(n, fmt.Errorf("bad request: %v", err), nil)
		} else {
			t.hostLog("bad control message: %v", err)
		}
		return
	}
	if req.Op == "poweroff" {
		t.poweroff()
		return
	}
	if req.Req == nil {
		t.hostLog("request %q without req ignored", req.Op)
		return
	}
	var (
		res  map[string]any
		err  error
		post func() // runs after the reply went out (archive streams)
	)
	// Handlers must not panic the init process: a panic here would kill
	// the VM (PID 1 exiting panics the kernel).
	func() {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("internal error: %v", r)
			}
		}()
		switch req.Op {
		case "hello":
			res, err = t.hello(&req)
		case "run":
			res, err = t.run(&req)
		case "exec":
			res, err = t.exec(&req)
		case "signal":
			res, err = t.signal(&req)
		case "resize":
			res, err = t.resize(&req)
		case "ps":
			res, err = psList()
		case "stats":
			res, err = stats()
		case "stat":
			res, err = t.statPath(&req)
		case "archive_get":
			res, post, err = t.archiveGet(&req)
		case "archive_put":
			res, post, err = t.archivePut(&req)
		case "freeze":
			res, err = freeze(req.Frozen)
		case "net":
			res, err = reconfigureNetwork(req.Interfaces)
		case "cpu_max":
			res, err = t.cpuMaxReq(&req)
		default:
			err = fmt.Errorf("unknown op %q", req.Op)
		}
	}()
	t.reply(*req.Req, err, res)
	if post != nil && err == nil {
		go post()
	}
}

func (t *tether) reply(req int64, err error, res map[string]any) {
	msg := map[string]any{"op": "reply", "req": req, "ok": err == nil}
	for k, v := range res {
		msg[k] = v
	}
	if err != nil {
		msg["error"] = err.Error()
		if re, ok := err.(*reqError); ok && re.code != 0 {
			msg["exit_code"] = re.code
		}
	}
	t.w.ctrl(msg)
}

func (t *tether) hello(req *request) (map[string]any, error) {
	if req.Version != protoVersion {
		return nil, fmt.Errorf("unsupported protocol version %d (tether speaks %d)", req.Version, protoVersion)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var code any
	if t.exitCode != nil {
		code = *t.exitCode
	}
	res := map[string]any{"version": protoVersion, "kernel": kernelRelease(), "state": t.state, "exit_code": code}
	if id := vmID(); id != "" {
		res["id"] = id // vSphere: which container's VM this is (vsphere.go)
	}
	return res, nil
}

func (t *tether) run(req *request) (map[string]any, error) {
	cfg := req.Config
	if cfg == nil {
		return nil, fmt.Errorf("run without config")
	}
	t.mu.Lock()
	if t.state != stateWaiting || t.cfg != nil {
		t.mu.Unlock()
		return nil, fmt.Errorf("already started (state %s)", t.state)
	}
	t.cfg = cfg
	t.mu.Unlock()

	if cfg.Hold {
		return t.hold(cfg)
	}
	t0 := time.Now()
	pid, err := t.startMain(cfg)
	if err != nil {
		code := 1
		if re, ok := err.(*reqError); ok {
			code = re.code
		} else {
			err = &reqError{msg: err.Error(), code: 1}
		}
		t.mu.Lock()
		t.state = stateExited
		t.exitCode = &code
		t.mu.Unlock()
		reportExit(code)
		t.hostLog("run failed: %v", err)
		return nil, err
	}
	reply := map[string]any{"pid": pid, "run_us": time.Since(t0).Microseconds()}
	for k, v := range t.timings {
		reply[k] = v
	}
	return reply, nil
}

// hold mounts the container's disks without starting its process: the
// archive ops then serve a stopped container's files.
func (t *tether) hold(cfg *runConfig) (map[string]any, error) {
	setClockAndSeed(cfg)
	t0 := time.Now()
	err := mountRoot(cfg)
	if err == nil {
		err = mountVolumes(cfg.Mounts)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil {
		t.cfg = nil
		return nil, &reqError{msg: err.Error(), code: 1}
	}
	t.state = stateHeld
	return map[string]any{"pid": 0, "mount_us": time.Since(t0).Microseconds()}, nil
}

func (t *tether) startMain(cfg *runConfig) (int, error) {
	if len(cfg.Args) == 0 {
		return 0, &reqError{msg: "run: empty args", code: 1}
	}
	mark := time.Now()
	lap := func(name string) {
		t.timings[name] = time.Since(mark).Microseconds()
		mark = time.Now()
	}
	t.timings = map[string]int64{}
	setClockAndSeed(cfg)
	lap("seed_us")
	if err := mountRoot(cfg); err != nil {
		return 0, err
	}
	if err := mountVolumes(cfg.Mounts); err != nil {
		return 0, &reqError{msg: err.Error(), code: 1}
	}
	lap("mount_us")
	// (Doing this beside the mounts gains nothing: one vCPU under TCG.)
	if err := setupNetwork(cfg.Network); err != nil {
		return 0, &reqError{msg: "network: " + err.Error(), code: 1}
	}
	lap("net_us")
	mountEtcFiles(cfg)
	lap("etc_us")
	if err := setupCgroup(); err != nil {
		return 0, &reqError{msg: "cgroup: " + err.Error(), code: 1}
	}
	if err := setCPUMax(cfg.CPUMax); err != nil {
		return 0, &reqError{msg: err.Error(), code: 1}
	}
	lap("cgroup_us")
	if cfg.Hostname != "" {
		if err := syscall.Sethostname([]byte(cfg.Hostname)); err != nil {
			logf("sethostname: %v", err)
		}
	}
	return t.start(1, spec{args: cfg.Args, env: cfg.Env, cwd: cfg.Cwd, user: cfg.User,
		tty: cfg.Tty, stdin: cfg.Stdin, rows: cfg.Rows, cols: cfg.Cols})
}

func (t *tether) exec(req *request) (map[string]any, error) {
	t.mu.Lock()
	state := t.state
	_, busy := t.procs[req.Chan]
	t.mu.Unlock()
	switch {
	case state != stateRunning:
		return nil, &reqError{msg: fmt.Sprintf("container is not running (state %s)", state), code: 1}
	case req.Chan < 2:
		return nil, &reqError{msg: fmt.Sprintf("exec channel %d: must be 2 or more", req.Chan), code: 1}
	case busy:
		return nil, &reqError{msg: fmt.Sprintf("exec channel %d is in use", req.Chan), code: 1}
	case len(req.Args) == 0:
		return nil, &reqError{msg: "exec: empty args", code: 1}
	}
	// Like docker exec: the container's env, cwd and user unless the
	// request overrides them.
	t.mu.Lock()
	cfg := t.cfg
	t.mu.Unlock()
	env := mergeEnv(cfg.Env, req.Env)
	cwd, user := req.Cwd, req.User
	if cwd == "" {
		cwd = cfg.Cwd
	}
	if user == "" {
		user = cfg.User
	}
	pid, err := t.start(req.Chan, spec{args: req.Args, env: env, cwd: cwd, user: user,
		tty: req.Tty, stdin: req.Stdin, rows: req.Rows, cols: req.Cols})
	if err != nil {
		return nil, err
	}
	return map[string]any{"pid": pid}, nil
}

func (t *tether) signal(req *request) (map[string]any, error) {
	t.mu.Lock()
	p := t.procs[req.Chan]
	exited := p != nil && p.exited
	t.mu.Unlock()
	if p == nil {
		return nil, fmt.Errorf("no process on channel %d", req.Chan)
	}
	if exited {
		return map[string]any{}, nil
	}
	if req.Signal <= 0 || req.Signal > 64 {
		return nil, fmt.Errorf("invalid signal %d", req.Signal)
	}
	// A process that already exited (its exit event may be in flight) is
	// not an error for the host.
	if err := syscall.Kill(p.pid, syscall.Signal(req.Signal)); err != nil && err != syscall.ESRCH {
		return nil, fmt.Errorf("kill %d: %v", p.pid, err)
	}
	return map[string]any{}, nil
}

func (t *tether) resize(req *request) (map[string]any, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.procs[req.Chan]
	if p == nil {
		return nil, fmt.Errorf("no process on channel %d", req.Chan)
	}
	// A process without a tty ignores resizes, as docker does.
	if p.ptyFd >= 0 {
		if err := setWinsize(p.ptyFd, req.Rows, req.Cols); err != nil {
			return nil, fmt.Errorf("resize: %v", err)
		}
	}
	return map[string]any{}, nil
}

// mergeEnv returns base with the entries of over added, replacing those
// with the same name.
func mergeEnv(base, over []string) []string {
	out := append([]string(nil), base...)
	for _, kv := range over {
		name, _, _ := strings.Cut(kv, "=")
		replaced := false
		for i, b := range out {
			if bn, _, _ := strings.Cut(b, "="); bn == name {
				out[i], replaced = kv, true
				break
			}
		}
		if !replaced {
			out = append(out, kv)
		}
	}
	return out
}
