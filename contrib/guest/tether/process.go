package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

const (
	// How long to wait for a process's output to reach EOF after it exited
	// before giving up on it (a grandchild may hold the pipes open).
	drainGrace = 200 * time.Millisecond
	// After the remaining processes were killed, their pipes close quickly.
	killGrace = 100 * time.Millisecond
)

// spec is what run and exec have in common.
type spec struct {
	args       []string
	env        []string
	cwd, user  string
	tty, stdin bool
	rows, cols uint16
}

type proc struct {
	ch     uint32
	pid    int
	ptyFd  int      // pty master fd for resize, -1 without a tty (guarded by tether.mu)
	master *os.File // pty master, closed by waitExit
	stdin  *stdinQueue
	status chan syscall.WaitStatus // the reaper delivers the exit status here
	outWG  sync.WaitGroup          // output pumps still running

	outMu  sync.Mutex // orders output frames before the exit event
	closed bool       // exit event sent: late output is dropped
	exited bool
}

// start resolves spec inside the container root and starts it. It holds
// t.mu across fork+register so the reaper cannot reap the child before it
// is in byPid.
func (t *tether) start(ch uint32, s spec) (int, error) {
	u, err := resolveUser(containerRoot, s.user)
	if err != nil {
		return 0, &reqError{msg: err.Error(), code: 1}
	}
	env := append([]string(nil), s.env...)
	if envGet(env, "HOME") == "" {
		env = append(env, "HOME="+u.home)
	}
	if s.tty && envGet(env, "TERM") == "" {
		env = append(env, "TERM=xterm")
	}
	pathVar := envGet(env, "PATH")
	if pathVar == "" {
		pathVar = defaultPath
	}
	argv0, err := lookPath(containerRoot, s.args[0], pathVar)
	if err != nil {
		return 0, err
	}
	cwd := s.cwd
	if cwd == "" {
		cwd = "/"
	}
	// Like runc, create a missing working directory.
	if _, err := statIn(containerRoot, cwd); err != nil {
		if p, err := resolveIn(containerRoot, cwd); err == nil {
			os.MkdirAll(p, 0o755)
			os.Chown(p, int(u.uid), int(u.gid))
		}
	}

	p := &proc{ch: ch, ptyFd: -1, status: make(chan syscall.WaitStatus, 1)}
	var files []uintptr
	var closeAfter []*os.File
	var outputs []*os.File
	sys := &syscall.SysProcAttr{
		Chroot:     containerRoot,
		Credential: &syscall.Credential{Uid: u.uid, Gid: u.gid, Groups: u.groups},
		Setsid:     true,
	}
	if s.tty {
		master, slave, err := openPty(containerRoot + "/dev/pts")
		if err != nil {
			return 0, &reqError{msg: "pty: " + err.Error(), code: 1}
		}
		if s.rows > 0 && s.cols > 0 {
			setWinsize(int(master.Fd()), s.rows, s.cols)
		}
		p.ptyFd = int(master.Fd())
		p.master = master
		files = []uintptr{slave.Fd(), slave.Fd(), slave.Fd()}
		sys.Setctty = true
		sys.Ctty = 0
		closeAfter = append(closeAfter, slave)
		outputs = append(outputs, master)
		if s.stdin {
			p.stdin = newStdinQueue(master, false)
		}
	} else {
		var stdinR *os.File
		if s.stdin {
			r, w, err := os.Pipe()
			if err != nil {
				return 0, &reqError{msg: err.Error(), code: 1}
			}
			stdinR = r
			p.stdin = newStdinQueue(w, true)
		} else {
			stdinR, err = os.Open("/dev/null")
			if err != nil {
				return 0, &reqError{msg: err.Error(), code: 1}
			}
		}
		outR, outW, err := os.Pipe()
		if err != nil {
			return 0, &reqError{msg: err.Error(), code: 1}
		}
		errR, errW, err := os.Pipe()
		if err != nil {
			return 0, &reqError{msg: err.Error(), code: 1}
		}
		files = []uintptr{stdinR.Fd(), outW.Fd(), errW.Fd()}
		closeAfter = append(closeAfter, stdinR, outW, errW)
		outputs = append(outputs, outR, errR)
	}

	t.mu.Lock()
	var pid int
	inContainerCgroup(func() {
		pid, err = syscall.ForkExec(argv0, s.args, &syscall.ProcAttr{Dir: cwd, Env: env, Files: files, Sys: sys})
	})
	if err == nil {
		p.pid = pid
		t.byPid[pid] = p
		t.procs[ch] = p
		if ch == 1 {
			t.state = stateRunning
		}
	}
	t.mu.Unlock()
	for _, f := range closeAfter {
		f.Close()
	}
	if err != nil {
		for _, f := range outputs {
			f.Close()
		}
		if p.stdin != nil {
			p.stdin.close()
		}
		return 0, startError(s.args[0], err)
	}

	for i, f := range outputs {
		typ := byte(frameStdout)
		if i == 1 {
			typ = frameStderr
		}
		p.outWG.Add(1)
		go t.pump(p, f, typ, f != p.master)
	}
	if p.stdin != nil {
		go p.stdin.run()
	}
	go t.waitExit(p)
	return pid, nil
}

func startError(name string, err error) error {
	switch {
	case errors.Is(err, syscall.ENOENT):
		return &reqError{msg: fmt.Sprintf("exec: %q: no such file or directory", name), code: 127}
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM), errors.Is(err, syscall.ENOEXEC):
		return &reqError{msg: fmt.Sprintf("exec: %q: %v", name, err), code: 126}
	}
	return &reqError{msg: fmt.Sprintf("exec: %q: %v", name, err), code: 1}
}

// pump copies one output stream into frames until EOF (a pty master
// reports EIO once the last slave fd is closed).
func (t *tether) pump(p *proc, f *os.File, typ byte, closeAtEOF bool) {
	defer p.outWG.Done()
	if closeAtEOF {
		defer f.Close()
	}
	buf := make([]byte, chunkSize)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			p.outMu.Lock()
			if !p.closed {
				t.w.send(typ, p.ch, buf[:n])
			}
			p.outMu.Unlock()
		}
		if err != nil {
			if err != io.EOF && !errors.Is(err, syscall.EIO) {
				logf("chan %d output: %v", p.ch, err)
			}
			return
		}
	}
}

// waitExit turns the reaped status into the exit event once the output is
// drained, and ends the container when the main process is done.
func (t *tether) waitExit(p *proc) {
	ws := <-p.status
	code := ws.ExitStatus()
	if ws.Signaled() {
		code = 128 + int(ws.Signal())
	}
	drained := make(chan struct{})
	go func() { p.outWG.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(drainGrace):
		if p.ch != 1 {
			logf("chan %d: output still open %v after exit, not waiting", p.ch, drainGrace)
		}
	}
	if p.ch == 1 {
		// The container is over: exec processes and anything the main
		// process left behind are killed (init is exempt from kill(-1)).
		syscall.Kill(-1, syscall.SIGKILL)
		select {
		case <-drained:
		case <-time.After(killGrace):
			logf("main output still open after kill")
		}
	}
	p.outMu.Lock()
	p.closed = true
	p.outMu.Unlock()
	if p.stdin != nil {
		p.stdin.close()
	}
	t.mu.Lock()
	p.exited = true
	if p.master != nil {
		p.master.Close()
		p.master, p.ptyFd = nil, -1
	}
	if p.ch == 1 {
		t.state = stateExited
		t.exitCode = &code
		reportExit(code)
	} else if t.procs[p.ch] == p {
		delete(t.procs, p.ch) // the host may reuse the channel
	}
	t.mu.Unlock()
	t.w.ctrl(map[string]any{"op": "exit", "chan": p.ch, "code": code})
}

// reaper reaps every child, including orphans reparented to PID 1, and
// routes the statuses of the processes we started.
func (t *tether) reaper() {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGCHLD)
	for {
		t.mu.Lock()
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if err == syscall.EINTR {
				continue
			}
			if pid <= 0 || err != nil {
				break
			}
			if ws.Stopped() || ws.Continued() {
				continue
			}
			if p := t.byPid[pid]; p != nil {
				delete(t.byPid, pid)
				p.status <- ws
			} else {
				routeHelper(pid, ws)
			}
		}
		t.mu.Unlock()
		<-sigs
	}
}

// stdinQueue decouples the port reader from a process that does not read
// its stdin: frames are queued and written by the queue's own goroutine.
type stdinQueue struct {
	mu        sync.Mutex
	cond      *sync.Cond
	data      [][]byte
	closed    bool
	f         *os.File
	closeFile bool // pipes are closed at STDIN_CLOSE; a pty master is not
}

func newStdinQueue(f *os.File, closeFile bool) *stdinQueue {
	q := &stdinQueue{f: f, closeFile: closeFile}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *stdinQueue) push(b []byte) {
	q.mu.Lock()
	if !q.closed {
		q.data = append(q.data, b)
		q.cond.Signal()
	}
	q.mu.Unlock()
}

func (q *stdinQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Signal()
	q.mu.Unlock()
}

func (q *stdinQueue) run() {
	broken := false
	for {
		q.mu.Lock()
		for len(q.data) == 0 && !q.closed {
			q.cond.Wait()
		}
		if len(q.data) == 0 && q.closed {
			q.mu.Unlock()
			if q.closeFile {
				q.f.Close()
			}
			return
		}
		b := q.data[0]
		q.data = q.data[1:]
		q.mu.Unlock()
		if !broken {
			if _, err := q.f.Write(b); err != nil {
				broken = true // EPIPE: the reader is gone; drain the queue
			}
		}
	}
}

// openPty allocates a pty in the devpts instance mounted at dir (the
// container's /dev/pts), so the slave is a path the process can see.
func openPty(dir string) (master, slave *os.File, err error) {
	fd, err := syscall.Open(dir+"/ptmx", syscall.O_RDWR|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	var unlock int32
	if err := ioctl(fd, syscall.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock))); err != nil {
		syscall.Close(fd)
		return nil, nil, fmt.Errorf("unlockpt: %v", err)
	}
	var n uint32
	if err := ioctl(fd, syscall.TIOCGPTN, uintptr(unsafe.Pointer(&n))); err != nil {
		syscall.Close(fd)
		return nil, nil, fmt.Errorf("ptsname: %v", err)
	}
	sfd, err := syscall.Open(fmt.Sprintf("%s/%d", dir, n), syscall.O_RDWR|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		syscall.Close(fd)
		return nil, nil, err
	}
	// NewFile on blocking fds: plain blocking reads on their own goroutines,
	// and Fd() stays usable for ioctls without changing the mode.
	return os.NewFile(uintptr(fd), "ptmx"), os.NewFile(uintptr(sfd), "pts"), nil
}

type winsize struct{ rows, cols, x, y uint16 }

func setWinsize(fd int, rows, cols uint16) error {
	ws := winsize{rows: rows, cols: cols}
	return ioctl(fd, syscall.TIOCSWINSZ, uintptr(unsafe.Pointer(&ws)))
}

func ioctl(fd int, req, arg uintptr) error {
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), req, arg); e != 0 {
		return e
	}
	return nil
}

func envGet(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if strings.HasPrefix(env[i], key+"=") {
			return env[i][len(key)+1:]
		}
	}
	return ""
}
