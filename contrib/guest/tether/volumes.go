package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// volumeMount is one entry of the run request's "mounts": a disk the
// daemon attached (a docker volume) and where the container sees it.
type volumeMount struct {
	Device   string `json:"device"` // /dev/vdb
	FSType   string `json:"fstype"` // ext4
	Target   string `json:"target"` // absolute path in the container
	ReadOnly bool   `json:"readonly"`
	// CopyUp: the volume is new: copy what the image has at Target into it
	// first, as dockerd does for an empty volume.
	CopyUp bool `json:"copy_up"`
	// Mkfs: the disk may be blank (a VMDK made by CreateVirtualDisk_Task):
	// make its ext4 first if it has no filesystem, then copy up.
	Mkfs bool `json:"mkfs"`
	// File: for a 9p bind of a single host file, the file's name in the
	// shared folder; it is bind-mounted over Target.
	File string `json:"file"`
	// Options: for tmpfs and 9p, mount options as `--tmpfs` takes them
	// ("size=64m,mode=1777,noexec"): flags become mount flags, the rest data.
	Options string `json:"options"`
}

// mountFlags splits Docker-style options into mount flags and fs data.
func mountFlags(options string) (uintptr, string) {
	known := map[string]uintptr{
		"ro": syscall.MS_RDONLY, "noexec": syscall.MS_NOEXEC, "nosuid": syscall.MS_NOSUID,
		"nodev": syscall.MS_NODEV, "noatime": syscall.MS_NOATIME, "sync": syscall.MS_SYNCHRONOUS,
	}
	var flags uintptr
	var data []string
	for _, opt := range strings.Split(options, ",") {
		switch {
		case opt == "" || opt == "rw" || opt == "exec" || opt == "suid" || opt == "dev":
		case known[opt] != 0:
			flags |= known[opt]
		default:
			data = append(data, opt)
		}
	}
	return flags, strings.Join(data, ",")
}

const stagingDir = "/tmp/vol"

// mountVolumes mounts each volume disk at its target inside the container
// root. Targets are resolved inside the root, so a symlink in the image
// cannot send a mount outside it.
func mountVolumes(mounts []volumeMount) error {
	for i, m := range mounts {
		fstype := m.FSType
		if fstype == "" {
			fstype = "ext4"
		}
		if fstype == "tmpfs" {
			target, err := securePath(containerRoot, m.Target)
			if err != nil {
				return fmt.Errorf("tmpfs target %s: %v", m.Target, err)
			}
			os.MkdirAll(target, 0o755)
			flags, data := mountFlags(m.Options)
			if err := syscall.Mount("tmpfs", target, "tmpfs", flags, data); err != nil {
				return fmt.Errorf("tmpfs at %s: %v", m.Target, err)
			}
			continue
		}
		var flags uintptr
		data := ""
		if fstype == "9p" { // a 9p mount names a tag, not a device node
			flags, data = mountFlags(m.Options)
			if m.ReadOnly {
				flags |= syscall.MS_RDONLY
			}
		} else if err := waitDevice(m.Device); err != nil {
			return err
		}
		target, err := securePath(containerRoot, m.Target)
		if err != nil {
			return fmt.Errorf("volume target %s: %v", m.Target, err)
		}
		stage := filepath.Join(stagingDir, fmt.Sprint(i))
		os.MkdirAll(stage, 0o755)
		if m.Mkfs && fstype == "ext4" && !hasExtSuperblock(m.Device) {
			t0 := time.Now()
			out, err := runHelper("/sbin/mke2fs", "-q", "-t", "ext4", "-F",
				"-E", "root_owner=0:0", m.Device)
			if err != nil {
				return fmt.Errorf("mke2fs %s: %v: %s", m.Device, err, strings.TrimSpace(string(out)))
			}
			logf("made ext4 on %s in %v", m.Device, time.Since(t0))
			m.CopyUp = true // a new filesystem is an empty volume
		}
		if err := syscall.Mount(m.Device, stage, fstype, flags, data); err != nil {
			return fmt.Errorf("mount %s %s: %v", fstype, m.Device, err)
		}
		if m.File != "" {
			if err := bindFile(filepath.Join(stage, m.File), target, m.ReadOnly); err != nil {
				return fmt.Errorf("bind %s: %v", m.Target, err)
			}
			continue
		}
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("volume target %s: %v", m.Target, err)
		}
		if m.CopyUp {
			// First use: a docker volume starts empty, without mke2fs' lost+found.
			os.Remove(filepath.Join(stage, "lost+found"))
			if err := copyUp(target, stage); err != nil {
				logf("copy-up into %s: %v", m.Target, err)
			}
		}
		// Move the staged mount into place, then make it read-only if asked.
		if err := syscall.Mount(stage, target, "", syscall.MS_MOVE, ""); err != nil {
			return fmt.Errorf("mount volume at %s: %v", m.Target, err)
		}
		if m.ReadOnly {
			flags := uintptr(syscall.MS_REMOUNT | syscall.MS_BIND | syscall.MS_RDONLY)
			if err := syscall.Mount("", target, "", flags, ""); err != nil {
				return fmt.Errorf("read-only %s: %v", m.Target, err)
			}
		}
	}
	return nil
}

// bindFile mounts one file of a shared folder over target, creating an
// empty file to mount on if the image has none there.
func bindFile(src, target string, readOnly bool) error {
	if fi, err := os.Lstat(target); err != nil || fi.IsDir() || fi.Mode()&os.ModeSymlink != 0 {
		if err == nil && fi.IsDir() {
			return fmt.Errorf("cannot mount a file on a directory")
		}
		os.Remove(target)
		os.MkdirAll(filepath.Dir(target), 0o755)
		f, err := os.OpenFile(target, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		f.Close()
	}
	if err := syscall.Mount(src, target, "", syscall.MS_BIND, ""); err != nil {
		return err
	}
	if readOnly {
		return syscall.Mount("", target, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, "")
	}
	return nil
}

// hasExtSuperblock: the ext2/3/4 magic (0xEF53) at byte 1080 of the device.
func hasExtSuperblock(dev string) bool {
	f, err := os.Open(dev)
	if err != nil {
		return false
	}
	defer f.Close()
	magic := make([]byte, 2)
	if _, err := f.ReadAt(magic, 1080); err != nil {
		return false
	}
	return magic[0] == 0x53 && magic[1] == 0xEF
}

func waitDevice(dev string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(dev); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no device %s", dev)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// A clone restored from a template probed a placeholder at this slot.
	if f, err := os.Open(dev); err == nil {
		ioctl(int(f.Fd()), blkFlsBuf, 0)
		f.Close()
	}
	return nil
}

// securePath joins path to root, resolving symlinks as if root were "/":
// no link in the image can lead a mount outside the container's root.
func securePath(root, path string) (string, error) {
	cur := root
	for _, part := range strings.Split(filepath.Clean("/"+path), "/") {
		if part == "" {
			continue
		}
		next := filepath.Join(cur, part)
		for hops := 0; ; hops++ {
			fi, err := os.Lstat(next)
			if err != nil || fi.Mode()&os.ModeSymlink == 0 {
				break
			}
			if hops > 40 {
				return "", fmt.Errorf("too many levels of symbolic links")
			}
			link, err := os.Readlink(next)
			if err != nil {
				return "", err
			}
			if filepath.IsAbs(link) {
				next = filepath.Join(root, filepath.Clean(link))
			} else {
				next = filepath.Join(filepath.Dir(next), link)
			}
			if rel, err := filepath.Rel(root, next); err != nil || rel == ".." ||
				strings.HasPrefix(rel, "../") {
				next = root
			}
		}
		cur = next
	}
	return cur, nil
}

// copyUp copies the image's files at src into the new volume at dst,
// keeping modes, owners and symlinks; the volume's root takes src's mode
// and owner, as dockerd's local driver does.
func copyUp(src, dst string) error {
	fi, err := os.Lstat(src)
	if err != nil || !fi.IsDir() {
		return nil // nothing in the image there
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		os.Lchown(dst, int(st.Uid), int(st.Gid))
	}
	os.Chmod(dst, fi.Mode().Perm()|fi.Mode()&(os.ModeSetuid|os.ModeSetgid|os.ModeSticky))
	return filepath.Walk(src, func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		if rel == "." || rel == "lost+found" {
			return nil
		}
		target := filepath.Join(dst, rel)
		st, _ := info.Sys().(*syscall.Stat_t)
		switch {
		case info.Mode()&os.ModeSymlink != 0:
			link, err := os.Readlink(path)
			if err != nil {
				return err
			}
			if err := os.Symlink(link, target); err != nil {
				return err
			}
		case info.IsDir():
			if err := os.Mkdir(target, info.Mode().Perm()); err != nil && !os.IsExist(err) {
				return err
			}
		case info.Mode().IsRegular():
			if err := copyFile(path, target, info.Mode().Perm()); err != nil {
				return err
			}
		default:
			return nil // devices, fifos, sockets: not copied
		}
		if st != nil {
			os.Lchown(target, int(st.Uid), int(st.Gid))
		}
		if info.Mode()&os.ModeSymlink == 0 {
			os.Chmod(target, info.Mode().Perm()|info.Mode()&(os.ModeSetuid|os.ModeSetgid|os.ModeSticky))
		}
		return nil
	})
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
