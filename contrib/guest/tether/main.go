// Command tether is PID 1 of a vicd guest VM. It implements tether protocol
// v1 (docs/tether.md): it brings up the minimal system, opens the
// virtio-serial control port and then serves the daemon's requests.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const (
	portName      = "vicd.0"
	moduleDir     = "/modules"
	protoVersion  = 1
	pollInterval  = 20 * time.Millisecond
	defaultPath   = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	containerRoot = "/root"
)

var bootStart = time.Now()

// logf writes a diagnostic to the console (ttyS0, console.log on the host).
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tether[%.3fs]: %s\n", time.Since(bootStart).Seconds(), fmt.Sprintf(format, args...))
}

func main() {
	if os.Getpid() == 1 {
		setupSystem()
		loadModules()
		if err := makeCgroup(); err != nil {
			logf("cgroup: %v (made again at run)", err)
		}
	}
	freezeIfParent()
	port := openTransport()
	t := newTether(port)
	logf("port open, waiting for the host")
	t.serve()
}

// setupSystem mounts the pseudo filesystems. The kernel does not mount
// devtmpfs for an initramfs, and the initramfs' only device node is
// /dev/console.
func setupSystem() {
	mounts := []struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}{
		{"proc", "/proc", "proc", syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_NOEXEC, ""},
		{"sysfs", "/sys", "sysfs", syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_NOEXEC, ""},
		{"devtmpfs", "/dev", "devtmpfs", syscall.MS_NOSUID, "mode=0755"},
		{"tmpfs", "/tmp", "tmpfs", syscall.MS_NOSUID | syscall.MS_NODEV, "mode=1777"},
	}
	for _, m := range mounts {
		os.MkdirAll(m.dst, 0o755)
		if err := syscall.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil && err != syscall.EBUSY {
			logf("mount %s: %v", m.dst, err)
		}
	}
	// Re-attach stdio to the console: the kernel's /dev/console fds may be
	// missing if the initramfs node was absent.
	if fd, err := syscall.Open("/dev/console", syscall.O_RDWR|syscall.O_NOCTTY, 0); err == nil {
		for i := 0; i < 3; i++ {
			if i != fd {
				syscall.Dup3(fd, i, 0)
			}
		}
		if fd > 2 {
			syscall.Close(fd)
		}
	}
	os.Setenv("PATH", defaultPath)
}

// loadModules inserts /modules/*.ko in the order of /modules/order (the
// build wrote them in dependency order).
func loadModules() {
	data, err := os.ReadFile(filepath.Join(moduleDir, "order"))
	if err != nil {
		logf("no module order: %v", err)
		return
	}
	for _, name := range strings.Fields(string(data)) {
		path := filepath.Join(moduleDir, name)
		fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			logf("module %s: %v", name, err)
			continue
		}
		params, _ := syscall.BytePtrFromString("")
		_, _, errno := syscall.Syscall(sysFinitModule, uintptr(fd), uintptr(unsafe.Pointer(params)), 0)
		syscall.Close(fd)
		if errno != 0 && errno != syscall.EEXIST {
			logf("finit_module %s: %v", name, errno)
		}
	}
}

// openPort finds the virtio-serial port named vicd.0. The driver probes
// asynchronously, so both the sysfs entry and the devtmpfs node may lag the
// module load: poll until they exist.
func openPort() *os.File {
	warned := time.Now()
	for {
		if dev := findPort(); dev != "" {
			f, err := os.OpenFile("/dev/"+dev, os.O_RDWR, 0)
			if err == nil {
				return f
			}
			if time.Since(warned) > 5*time.Second {
				logf("open /dev/%s: %v", dev, err)
				warned = time.Now()
			}
		} else if time.Since(warned) > 5*time.Second {
			logf("still looking for virtio port %q", portName)
			warned = time.Now()
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func findPort() string {
	names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, n := range names {
		data, err := os.ReadFile(n)
		if err == nil && strings.TrimSpace(string(data)) == portName {
			return filepath.Base(filepath.Dir(n))
		}
	}
	return ""
}

func kernelRelease() string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return ""
	}
	b := make([]byte, 0, len(u.Release))
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}
