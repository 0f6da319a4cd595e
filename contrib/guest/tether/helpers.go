package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"syscall"
)

// The tether is PID 1: its reaper (process.go) waits for every child, so a
// helper it runs itself (mke2fs, vmware-rpctool) must not be waited for by
// exec.Cmd.Wait, which would lose the race and fail with ECHILD. runHelper
// registers the child under helperMu before the reaper can see it exit, and
// the reaper hands the status over.
var (
	helperMu   sync.Mutex
	helperPids = map[int]chan syscall.WaitStatus{}
)

// routeHelper gives a reaped status to the helper that waits for it; false
// if the pid is not a helper's. The reaper calls it.
func routeHelper(pid int, ws syscall.WaitStatus) bool {
	helperMu.Lock()
	ch, ok := helperPids[pid]
	delete(helperPids, pid)
	helperMu.Unlock()
	if ok {
		ch <- ws
	}
	return ok
}

// runHelper runs a program of the initramfs and returns its stdout and
// stderr together (CombinedOutput without exec's own wait).
func runHelper(path string, args ...string) ([]byte, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = w, w
	done := make(chan syscall.WaitStatus, 1)
	helperMu.Lock()
	err = cmd.Start()
	if err == nil {
		helperPids[cmd.Process.Pid] = done
	}
	helperMu.Unlock()
	w.Close()
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	io.Copy(&out, r) // EOF once the helper (and any child of it) closed the pipe
	ws := <-done
	if !ws.Exited() || ws.ExitStatus() != 0 {
		return out.Bytes(), fmt.Errorf("%s: %v", path, waitText(ws))
	}
	return out.Bytes(), nil
}

func waitText(ws syscall.WaitStatus) string {
	if ws.Signaled() {
		return "killed by " + ws.Signal().String()
	}
	return fmt.Sprintf("exit status %d", ws.ExitStatus())
}
