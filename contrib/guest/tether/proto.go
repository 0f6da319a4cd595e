package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"os"
	"sync"
	"syscall"
	"time"
)

// Frame types, see docs/tether.md "Framing".
const (
	frameCtrl       = 1
	frameStdin      = 2
	frameStdout     = 3
	frameStderr     = 4
	frameStdinClose = 5

	headerLen  = 12
	maxPayload = 1 << 20
	// virtio_console accepts at most 32 KiB per write; output is read in
	// chunks of that size so one frame is one write in the common case.
	chunkSize = 32 * 1024
)

var magic = [2]byte{0x56, 0x54}

type frame struct {
	typ     byte
	ch      uint32
	payload []byte
}

// portReader parses frames from the port. A read of 0 bytes means no host
// is connected: any partial frame then belongs to a dead connection and is
// dropped, so a reconnecting daemon starts on a clean frame boundary.
type portReader struct {
	f       *os.File
	buf     []byte
	dropped int
}

func (r *portReader) fill() {
	if len(r.buf) > 0 && cap(r.buf)-len(r.buf) < chunkSize {
		nb := make([]byte, len(r.buf), 2*cap(r.buf)+chunkSize)
		copy(nb, r.buf)
		r.buf = nb
	}
	for {
		n, err := r.f.Read(r.buf[len(r.buf):cap(r.buf)])
		if n > 0 {
			r.buf = r.buf[:len(r.buf)+n]
			return
		}
		if err != nil && err != io.EOF && !errors.Is(err, syscall.EAGAIN) && !errors.Is(err, syscall.EINTR) {
			logf("port read: %v", err)
		}
		if len(r.buf) > 0 {
			logf("host disconnected mid-frame: dropping %d bytes", len(r.buf))
			r.buf = r.buf[:0]
		}
		time.Sleep(pollInterval)
	}
}

func (r *portReader) next() frame {
	for {
		// Resync: drop bytes one at a time until a plausible header.
		for len(r.buf) >= 2 && (r.buf[0] != magic[0] || r.buf[1] != magic[1] ||
			(len(r.buf) >= headerLen && binary.BigEndian.Uint32(r.buf[8:12]) > maxPayload)) {
			r.buf = r.buf[1:]
			r.dropped++
		}
		if r.dropped > 0 && len(r.buf) >= 2 {
			logf("bad magic: resynced after dropping %d bytes", r.dropped)
			r.dropped = 0
		}
		if len(r.buf) >= headerLen {
			n := int(binary.BigEndian.Uint32(r.buf[8:12]))
			if len(r.buf) >= headerLen+n {
				f := frame{
					typ:     r.buf[2],
					ch:      binary.BigEndian.Uint32(r.buf[4:8]),
					payload: append([]byte(nil), r.buf[headerLen:headerLen+n]...),
				}
				rest := r.buf[headerLen+n:]
				// Move the remainder to the front so the buffer does not
				// creep forward forever.
				r.buf = r.buf[:copy(r.buf[:cap(r.buf)], rest)]
				return f
			}
			if cap(r.buf) < headerLen+n {
				nb := make([]byte, len(r.buf), headerLen+n+chunkSize)
				copy(nb, r.buf)
				r.buf = nb
			}
		}
		if cap(r.buf) == 0 {
			r.buf = make([]byte, 0, 4*chunkSize)
		}
		r.fill()
	}
}

// portWriter serializes frames onto the port: one mutex, one frame per
// critical section, so frames from output pumps and control replies never
// interleave. Writes block while no host is connected (virtio_console does
// that), which keeps output in the guest until the daemon is back.
type portWriter struct {
	mu sync.Mutex
	f  *os.File
}

func (w *portWriter) send(typ byte, ch uint32, payload []byte) {
	for len(payload) > maxPayload {
		w.send(typ, ch, payload[:maxPayload])
		payload = payload[maxPayload:]
	}
	buf := make([]byte, headerLen+len(payload))
	buf[0], buf[1], buf[2] = magic[0], magic[1], typ
	binary.BigEndian.PutUint32(buf[4:8], ch)
	binary.BigEndian.PutUint32(buf[8:12], uint32(len(payload)))
	copy(buf[headerLen:], payload)

	w.mu.Lock()
	defer w.mu.Unlock()
	for len(buf) > 0 {
		n, err := w.f.Write(buf)
		buf = buf[n:]
		if err != nil {
			if errors.Is(err, syscall.EINTR) || errors.Is(err, syscall.EAGAIN) {
				continue
			}
			logf("port write: %v", err)
			time.Sleep(pollInterval)
			if errors.Is(err, syscall.ENODEV) {
				return
			}
		}
	}
}

func (w *portWriter) ctrl(msg map[string]any) {
	data, err := json.Marshal(msg)
	if err != nil {
		logf("marshal %v: %v", msg["op"], err)
		return
	}
	w.send(frameCtrl, 0, data)
}

// request is the union of all host request fields; unknown fields are
// ignored so newer daemons can add optional ones.
type request struct {
	Op      string     `json:"op"`
	Req     *int64     `json:"req"`
	Version int        `json:"version"`
	Config  *runConfig `json:"config"`
	Chan    uint32     `json:"chan"`
	Args    []string   `json:"args"`
	Env     []string   `json:"env"`
	Cwd     string     `json:"cwd"`
	User    string     `json:"user"`
	Tty     bool       `json:"tty"`
	Stdin   bool       `json:"stdin"`
	Rows    uint16     `json:"rows"`
	Cols    uint16     `json:"cols"`
	Signal  int        `json:"signal"`
	// Archive ops (archive.go).
	Path                 string   `json:"path"`
	Rebase               *string  `json:"rebase"`
	Excludes             []string `json:"excludes"`
	NoOverwriteDirNonDir bool     `json:"no_overwrite_dir_non_dir"`
	Listing              bool     `json:"listing"`
	Only                 []string `json:"only"`
	OnlyTrees            []string `json:"only_trees"`
	Frozen               bool     `json:"frozen"`
	ChownUser            string   `json:"chown_user"`
	// net: NICs to (re)configure on a running guest (network connect/disconnect).
	Interfaces []netIface `json:"interfaces"`
	// cpu_max (cgroup.go).
	CPUMax *cpuMax `json:"cpu_max"`
}

type runConfig struct {
	Root     string   `json:"root"`
	FSType   string   `json:"fstype"`
	Args     []string `json:"args"`
	Env      []string `json:"env"`
	Cwd      string   `json:"cwd"`
	User     string   `json:"user"`
	Hostname string   `json:"hostname"`
	Tty      bool     `json:"tty"`
	Stdin    bool     `json:"stdin"`
	Rows     uint16   `json:"rows"`
	Cols     uint16   `json:"cols"`
	TimeNs   int64    `json:"time_ns"`
	Seed     string   `json:"seed"`
	// Network: NICs to configure and the /etc files to provide (optional).
	Network *netConfig `json:"network"`
	// Mounts: volume disks to mount in the container (optional).
	Mounts []volumeMount `json:"mounts"`
	// Hold: mount the disks but start no process (archive ops only).
	Hold bool `json:"hold"`
	// CPUMax: the container's CPU quota (optional, cgroup.go).
	CPUMax *cpuMax `json:"cpu_max"`
}

// reqError carries the exit code a failed start reports.
type reqError struct {
	msg  string
	code int
}

func (e *reqError) Error() string { return e.msg }
