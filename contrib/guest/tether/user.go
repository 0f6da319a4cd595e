package main

import (
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"
	"syscall"
)

// Paths of the container are resolved by hand against its root: the tether
// itself is not chrooted, so an absolute symlink in the image (busybox's
// /bin/sh -> /bin/busybox) must be followed relative to /root, not to the
// initramfs.

const maxSymlinks = 40

// resolveIn returns the host path of p inside root, following symlinks
// within root. The last component need not exist.
func resolveIn(root, p string) (string, error) {
	links := 0
	cur := "/" // resolved path inside root
	rest := strings.Split(p, "/")
	for len(rest) > 0 {
		c := rest[0]
		rest = rest[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = path.Dir(cur)
			continue
		}
		next := path.Join(cur, c)
		fi, err := os.Lstat(root + next)
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			cur = next
			continue
		}
		links++
		if links > maxSymlinks {
			return "", &os.PathError{Op: "resolve", Path: p, Err: syscall.ELOOP}
		}
		target, err := os.Readlink(root + next)
		if err != nil {
			return "", err
		}
		if strings.HasPrefix(target, "/") {
			cur = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	return root + cur, nil
}

func statIn(root, p string) (os.FileInfo, error) {
	hp, err := resolveIn(root, p)
	if err != nil {
		return nil, err
	}
	return os.Stat(hp)
}

// lookPath mirrors Go's exec.LookPath inside root, with docker's messages
// and exit codes (127 not found, 126 not executable).
func lookPath(root, name, pathVar string) (string, error) {
	check := func(p string) error {
		fi, err := statIn(root, p)
		if err != nil {
			return err
		}
		if fi.IsDir() || fi.Mode()&0o111 == 0 {
			return syscall.EACCES
		}
		return nil
	}
	if strings.Contains(name, "/") {
		p := name
		if !strings.HasPrefix(p, "/") {
			p = "/" + p // relative to the working directory is rare; treat as from /
		}
		switch err := check(p); {
		case err == nil:
			return name, nil
		case os.IsNotExist(err):
			return "", &reqError{msg: fmt.Sprintf("exec: %q: stat %s: no such file or directory", name, name), code: 127}
		default:
			return "", &reqError{msg: fmt.Sprintf("exec: %q: permission denied", name), code: 126}
		}
	}
	var denied bool
	for _, dir := range strings.Split(pathVar, ":") {
		if dir == "" || !strings.HasPrefix(dir, "/") {
			continue
		}
		p := path.Join(dir, name)
		switch err := check(p); {
		case err == nil:
			return p, nil
		case err == syscall.EACCES:
			denied = true
		}
	}
	if denied {
		return "", &reqError{msg: fmt.Sprintf("exec: %q: permission denied", name), code: 126}
	}
	return "", &reqError{msg: fmt.Sprintf("exec: %q: executable file not found in $PATH", name), code: 127}
}

type userInfo struct {
	uid, gid uint32
	groups   []uint32
	home     string
}

type passwdEntry struct {
	name     string
	uid, gid uint32
	home     string
}

type groupEntry struct {
	name    string
	gid     uint32
	members []string
}

func readLines(root, p string) []string {
	hp, err := resolveIn(root, p)
	if err != nil {
		return nil
	}
	data, err := os.ReadFile(hp)
	if err != nil {
		return nil
	}
	return strings.Split(string(data), "\n")
}

func readPasswd(root string) []passwdEntry {
	var out []passwdEntry
	for _, l := range readLines(root, "/etc/passwd") {
		f := strings.Split(l, ":")
		if len(f) < 7 || strings.HasPrefix(l, "#") {
			continue
		}
		uid, err1 := strconv.ParseUint(f[2], 10, 32)
		gid, err2 := strconv.ParseUint(f[3], 10, 32)
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, passwdEntry{f[0], uint32(uid), uint32(gid), f[5]})
	}
	return out
}

func readGroup(root string) []groupEntry {
	var out []groupEntry
	for _, l := range readLines(root, "/etc/group") {
		f := strings.Split(l, ":")
		if len(f) < 4 || strings.HasPrefix(l, "#") {
			continue
		}
		gid, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			continue
		}
		var members []string
		if f[3] != "" {
			members = strings.Split(f[3], ",")
		}
		out = append(out, groupEntry{f[0], uint32(gid), members})
	}
	return out
}

// resolveUser implements docker's user forms: "", name, uid, uid:gid,
// name:group (and the mixed ones). A numeric uid missing from passwd runs
// with gid 0 and HOME=/, as in docker.
func resolveUser(root, spec string) (*userInfo, error) {
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if userPart == "" {
		userPart = "0"
	}
	pw := readPasswd(root)
	u := &userInfo{home: "/"}
	var name string
	if n, err := strconv.ParseUint(userPart, 10, 32); err == nil {
		u.uid = uint32(n)
		for _, e := range pw {
			if e.uid == u.uid {
				u.gid, u.home, name = e.gid, e.home, e.name
				break
			}
		}
	} else {
		found := false
		for _, e := range pw {
			if e.name == userPart {
				u.uid, u.gid, u.home, name = e.uid, e.gid, e.home, e.name
				found = true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("unable to find user %s: no matching entries in passwd file", userPart)
		}
	}
	if u.home == "" {
		u.home = "/"
	}
	groups := readGroup(root)
	if hasGroup && groupPart != "" {
		if n, err := strconv.ParseUint(groupPart, 10, 32); err == nil {
			u.gid = uint32(n)
		} else {
			found := false
			for _, g := range groups {
				if g.name == groupPart {
					u.gid, found = g.gid, true
					break
				}
			}
			if !found {
				return nil, fmt.Errorf("unable to find group %s: no matching entries in group file", groupPart)
			}
		}
	}
	// Supplementary groups: the user's memberships in /etc/group, plus the
	// primary group so setgroups never leaves root's groups behind.
	u.groups = []uint32{u.gid}
	if name != "" {
		for _, g := range groups {
			for _, m := range g.members {
				if m == name && g.gid != u.gid {
					u.groups = append(u.groups, g.gid)
				}
			}
		}
	}
	return u, nil
}
