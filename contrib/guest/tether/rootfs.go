package main

import (
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"os"
	"sort"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// rndAddEntropy is RNDADDENTROPY, _IOW('R', 0x03, int[2]).
const rndAddEntropy = 0x40085203

// rndReseedCrng is RNDRESEEDCRNG, _IO('R', 0x07): reseed the kernel's CRNG now.
const rndReseedCrng = 0x5207

// blkFlsBuf is BLKFLSBUF, _IO(0x12, 97): flush and drop a block device's buffers.
const blkFlsBuf = 0x1261

// setClockAndSeed sets the wall clock from the host and credits the seed to
// the kernel RNG (a fresh VM, or one restored from a snapshot, would
// otherwise share its entropy pool with its siblings).
func setClockAndSeed(cfg *runConfig) {
	if cfg.TimeNs > 0 {
		tv := syscall.NsecToTimeval(cfg.TimeNs)
		if err := syscall.Settimeofday(&tv); err != nil {
			logf("settimeofday: %v", err)
		}
	}
	if cfg.Seed == "" {
		return
	}
	seed, err := base64.StdEncoding.DecodeString(cfg.Seed)
	if err != nil || len(seed) == 0 {
		logf("bad seed: %v", err)
		return
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		logf("urandom: %v", err)
		return
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+len(seed)+3)
	binary.LittleEndian.PutUint32(buf[0:4], uint32(len(seed)*8))
	binary.LittleEndian.PutUint32(buf[4:8], uint32(len(seed)))
	copy(buf[8:], seed)
	if err := ioctl(int(f.Fd()), rndAddEntropy, uintptr(unsafe.Pointer(&buf[0]))); err != nil {
		// Not credited, but still mixed in.
		f.Write(seed)
	}
	// Entropy added to the pool reaches the CRNG only at its next reseed
	// (up to a minute away): clones of one snapshot would share output
	// until then. Reseed now.
	if err := ioctl(int(f.Fd()), rndReseedCrng, 0); err != nil {
		logf("RNDRESEEDCRNG: %v", err)
	}
}

// mountRoot mounts the container disk at /root and the kernel filesystems
// inside it, the way a container runtime lays them out.
func mountRoot(cfg *runConfig) error {
	dev := cfg.Root
	if dev == "" {
		dev = "/dev/vda"
	}
	fstype := cfg.FSType
	if fstype == "" {
		fstype = "ext4"
	}
	// virtio_blk probes asynchronously: wait for the node.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(dev); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	// A guest restored from a template snapshot probed a placeholder disk
	// at this slot; drop what the kernel cached of it before mounting.
	if f, err := os.Open(dev); err == nil {
		if err := ioctl(int(f.Fd()), blkFlsBuf, 0); err != nil {
			logf("BLKFLSBUF %s: %v", dev, err)
		}
		f.Close()
	}
	os.MkdirAll(containerRoot, 0o755)
	if err := syscall.Mount(dev, containerRoot, fstype, 0, ""); err != nil {
		return &reqError{msg: fmt.Sprintf("mount %s (%s) on %s: %v", dev, fstype, containerRoot, err), code: 1}
	}
	r := containerRoot
	mounts := []struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}{
		{"proc", r + "/proc", "proc", syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_NOEXEC, ""},
		{"sysfs", r + "/sys", "sysfs", syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_NOEXEC | syscall.MS_RDONLY, ""},
		{"devtmpfs", r + "/dev", "devtmpfs", syscall.MS_NOSUID, "mode=0755"},
		{"devpts", r + "/dev/pts", "devpts", syscall.MS_NOSUID | syscall.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
		{"shm", r + "/dev/shm", "tmpfs", syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_NOEXEC, "mode=1777,size=65536k"},
	}
	for _, m := range mounts {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			logf("mkdir %s: %v", m.dst, err)
		}
		if err := syscall.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil {
			return &reqError{msg: fmt.Sprintf("mount %s: %v", m.dst, err), code: 1}
		}
	}
	// devtmpfs is one shared instance: its ptmx belongs to the initial
	// devpts. Point the container's /dev/ptmx at its own devpts instance.
	os.Remove(r + "/dev/ptmx")
	os.Symlink("pts/ptmx", r+"/dev/ptmx")
	for name, target := range map[string]string{
		"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2",
	} {
		os.Remove(r + "/dev/" + name)
		os.Symlink(target, r+"/dev/"+name)
	}
	return nil
}

// poweroff ends the VM: QEMU runs with -no-reboot, so a reboot exits it.
func (t *tether) poweroff() {
	logf("poweroff")
	syscall.Kill(-1, syscall.SIGKILL)
	syscall.Sync()
	r := containerRoot
	// Everything mounted below the root (kernel filesystems, /etc files,
	// volumes), deepest first; volumes need a clean unmount to keep data.
	for _, m := range mountsBelow(r) {
		for i := 0; i < 20; i++ {
			if err := syscall.Unmount(m, 0); err == nil || err == syscall.EINVAL {
				break
			}
			if i == 19 {
				syscall.Mount("", m, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, "")
				syscall.Unmount(m, syscall.MNT_DETACH)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// Killed processes release their files asynchronously: retry briefly
	// before falling back to a read-only remount (which flushes the
	// journal) and a lazy unmount.
	for i := 0; i < 20; i++ {
		err := syscall.Unmount(r, 0)
		if err == nil || err == syscall.EINVAL {
			break
		}
		if i == 19 {
			syscall.Mount("", r, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, "")
			syscall.Unmount(r, syscall.MNT_DETACH)
		}
		time.Sleep(10 * time.Millisecond)
	}
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_RESTART)
	// Not reached unless reboot failed.
	logf("reboot failed; halting")
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

// mountsBelow lists the mount points under root, deepest first.
func mountsBelow(root string) []string {
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && strings.HasPrefix(f[1], root+"/") {
			out = append(out, f[1])
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}
