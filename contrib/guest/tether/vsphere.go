package main

// vSphere mode (docs/vsphere.md). The microvm protocol is unchanged; these
// are the additions a VM on ESXi needs:
//   - identity: hello also reports the container id (`id`), so one daemon
//     listener can serve every VM's network serial port (and all instant
//     clones of one parent, which share its serial-port URI). The id comes
//     from the kernel command line (`vicd.id=`, the test emulation) or from
//     guestinfo.vicd.id (ESXi, read with vmware-rpctool);
//   - transport: `vicd.transport=serial` (cmdline or guestinfo) uses the
//     serial port /dev/ttyS1 (a VirtualSerialPort with a URI backing)
//     instead of the virtio port;
//   - frozen parent: guestinfo.vicd.parent=1 makes the tether freeze itself
//     (`vmware-rpctool instantclone.freeze`) before opening the port; each
//     instant clone resumes from there and reads its own guestinfo;
//   - the main process's exit code is also written to guestinfo.vicd.exit_code.

import (
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

const rpctool = "vmware-rpctool"

var (
	cmdlineOnce sync.Once
	cmdlineArgs map[string]string
)

func kernelArg(key string) string {
	cmdlineOnce.Do(func() {
		cmdlineArgs = map[string]string{}
		data, _ := os.ReadFile("/proc/cmdline")
		for _, f := range strings.Fields(string(data)) {
			if k, v, ok := strings.Cut(f, "="); ok {
				cmdlineArgs[k] = v
			}
		}
	})
	return cmdlineArgs[key]
}

// guestinfo reads guestinfo.<key> through the VMware backdoor; "" without tools.
func guestinfo(key string) string {
	path, err := exec.LookPath(rpctool)
	if err != nil {
		return ""
	}
	out, err := runHelper(path, "info-get guestinfo."+key)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

func setGuestinfo(key, value string) {
	if path, err := exec.LookPath(rpctool); err == nil {
		_, _ = runHelper(path, "info-set guestinfo."+key+" "+value)
	}
}

// setting: the kernel command line wins over guestinfo.
func setting(key string) string {
	if v := kernelArg("vicd." + key); v != "" {
		return v
	}
	return guestinfo("vicd." + key)
}

// vmID is read on every hello: an instant clone changes identity under us.
func vmID() string { return setting("id") }

// freezeIfParent blocks in the instant-clone parent until it is cloned; it
// returns at once elsewhere. After a resume the cached cmdline is still
// right (the child has the parent's kernel arguments), guestinfo is new.
func freezeIfParent() {
	if setting("parent") != "1" {
		return
	}
	path, err := exec.LookPath(rpctool)
	if err != nil {
		logf("vicd.parent set but %s is missing: not freezing", rpctool)
		return
	}
	for {
		logf("instant-clone parent: freezing")
		if _, err := runHelper(path, "instantclone.freeze"); err != nil {
			logf("instantclone.freeze: %v", err)
			time.Sleep(time.Second)
			continue
		}
		// Resumed as a child: the clone's guestinfo carries its id.
		if vmID() != "" {
			logf("instant clone resumed as %s", vmID())
			return
		}
	}
}

// openSerial opens the serial port a VirtualSerialPort backs, in raw mode.
func openSerial(dev string) *os.File {
	for {
		f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_NOCTTY, 0)
		if err == nil {
			var tio syscall.Termios
			fd := f.Fd()
			if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TCGETS, uintptr(unsafe.Pointer(&tio))); e == 0 {
				// cfmakeraw, 8N1, no flow control.
				tio.Iflag &^= syscall.IGNBRK | syscall.BRKINT | syscall.PARMRK | syscall.ISTRIP |
					syscall.INLCR | syscall.IGNCR | syscall.ICRNL | syscall.IXON
				tio.Oflag &^= syscall.OPOST
				tio.Lflag &^= syscall.ECHO | syscall.ECHONL | syscall.ICANON | syscall.ISIG | syscall.IEXTEN
				tio.Cflag &^= syscall.CSIZE | syscall.PARENB
				tio.Cflag |= syscall.CS8
				tio.Cc[syscall.VMIN] = 1
				tio.Cc[syscall.VTIME] = 0
				syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TCSETS, uintptr(unsafe.Pointer(&tio)))
			}
			return f
		}
		logf("open %s: %v", dev, err)
		time.Sleep(time.Second)
	}
}

// openTransport picks the virtio port (microvm, the emulation) or the serial port (ESXi).
func openTransport() *os.File {
	if setting("transport") == "serial" {
		dev := setting("serial")
		if dev == "" {
			dev = "/dev/ttyS1"
		}
		return openSerial(dev)
	}
	return openPort()
}

func reportExit(code int) {
	if _, err := exec.LookPath(rpctool); err == nil {
		go setGuestinfo("vicd.exit_code", itoa(code))
	}
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	neg := n < 0
	if neg {
		n = -n
	}
	var b []byte
	for n > 0 {
		b = append([]byte{byte('0' + n%10)}, b...)
		n /= 10
	}
	if neg {
		b = append([]byte{'-'}, b...)
	}
	return string(b)
}
