package main

// Archive ops (docker cp, export): tar streams of the container's files over
// a channel of their own. See docs/tether.md "Archives".
//
// Every path is resolved inside the container root with resolveIn, which
// treats symlinks as rooted there: neither a crafted path nor a symlink in
// the container can make the tether read or write a file outside it.

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// The tether's own mounts inside the container root: not archived.
var archiveSkip = map[string]bool{"/proc": true, "/sys": true, "/dev": true}

// archiveStream carries an archive_put's STDIN frames to its extractor.
// The channel is bounded: a full one blocks the port reader, which makes
// the host wait (virtio-serial flow control) instead of filling guest RAM.
type archiveStream struct {
	data chan []byte
	buf  []byte
}

func (s *archiveStream) Read(p []byte) (int, error) {
	for len(s.buf) == 0 {
		b, ok := <-s.data
		if !ok {
			return 0, io.EOF
		}
		s.buf = b
	}
	n := copy(p, s.buf)
	s.buf = s.buf[n:]
	return n, nil
}

// containerPath is docker's ResolvePath: the directory part resolved in
// the container's scope, the last element kept as given (a symlink there
// is not followed). abs is the cleaned absolute path, trailing "/." or "/"
// preserved.
func containerPath(p string) (resolved, abs string, err error) {
	abs = filepath.Join("/", p)
	if strings.HasSuffix(p, "/.") || p == "." {
		abs = strings.TrimSuffix(abs, "/") + "/."
	} else if strings.HasSuffix(p, "/") && abs != "/" {
		abs += "/"
	}
	dir, base := filepath.Split(abs)
	rdir, err := resolveIn(containerRoot, dir)
	if err != nil {
		return "", "", err
	}
	return strings.TrimSuffix(rdir, "/") + "/" + base, abs, nil
}

// pathStat is docker's ContainerPathStat (X-Docker-Container-Path-Stat).
func pathStat(resolved, abs string) (map[string]any, error) {
	fi, err := os.Lstat(resolved)
	if err != nil {
		return nil, err
	}
	link := ""
	if fi.Mode()&os.ModeSymlink != 0 {
		full, err := resolveIn(containerRoot, abs)
		if err != nil {
			return nil, err
		}
		link = "/" + strings.TrimPrefix(strings.TrimPrefix(full, containerRoot), "/")
	}
	return map[string]any{
		"name": filepath.Base(abs), "size": fi.Size(), "mode": uint32(fi.Mode()),
		"mtime": fi.ModTime().UTC().Format(time.RFC3339Nano), "linkTarget": link,
	}, nil
}

func statError(err error) error {
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		return &reqError{msg: "not found: " + err.Error(), code: 2}
	}
	return err
}

func (t *tether) archiveReady() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cfg == nil || (t.state != stateRunning && t.state != stateHeld) {
		return &reqError{msg: fmt.Sprintf("container filesystem not mounted (state %s)", t.state), code: 1}
	}
	return nil
}

// statPath answers `stat`.
func (t *tether) statPath(req *request) (map[string]any, error) {
	if err := t.archiveReady(); err != nil {
		return nil, err
	}
	resolved, abs, err := containerPath(req.Path)
	if err != nil {
		return nil, statError(err)
	}
	st, err := pathStat(resolved, abs)
	if err != nil {
		return nil, statError(err)
	}
	return map[string]any{"stat": st}, nil
}

// archiveGet answers `archive_get`: the stat in the reply, then (from the
// returned func, run after the reply went out) the tar as STDOUT frames on
// req.Chan and an `exit` event.
func (t *tether) archiveGet(req *request) (map[string]any, func(), error) {
	if err := t.archiveReady(); err != nil {
		return nil, nil, err
	}
	if req.Chan < 2 {
		return nil, nil, fmt.Errorf("archive channel %d: must be 2 or more", req.Chan)
	}
	resolved, abs, err := containerPath(req.Path)
	if err != nil {
		return nil, nil, statError(err)
	}
	st, err := pathStat(resolved, abs)
	if err != nil {
		return nil, nil, statError(err)
	}
	// docker's containerArchivePath: a directory is archived as ".", a file
	// from its parent; the top entry is renamed to the requested base name.
	clean := filepath.Clean(resolved)
	if filepath.Base(clean) == "." {
		clean += "/."
	}
	srcDir, srcBase := clean, "."
	if os.FileMode(st["mode"].(uint32))&os.ModeDir == 0 {
		srcDir, srcBase = filepath.Split(clean)
	}
	rebase := filepath.Base(abs)
	if req.Rebase != nil {
		rebase = *req.Rebase
	}
	ch := req.Chan
	run := func() {
		w := &chanWriter{t: t, ch: ch}
		var err error
		if req.Listing {
			err = writeListing(w, srcDir, srcBase, req.Excludes)
		} else {
			err = writeTarOnly(w, srcDir, srcBase, rebase, req.Excludes, req.Only, req.OnlyTrees)
		}
		if err == nil {
			err = w.flush()
		}
		msg := map[string]any{"op": "exit", "chan": ch, "code": 0}
		if err != nil {
			logf("archive_get %s: %v", req.Path, err)
			msg["code"], msg["error"] = 1, err.Error()
		}
		t.w.ctrl(msg)
	}
	return map[string]any{"stat": st}, run, nil
}

// chanWriter buffers tar output into chunk-sized STDOUT frames.
type chanWriter struct {
	t   *tether
	ch  uint32
	buf []byte
}

func (w *chanWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		room := chunkSize*4 - len(w.buf)
		k := len(p)
		if room < k {
			k = room
		}
		w.buf = append(w.buf, p[:k]...)
		p = p[k:]
		if len(w.buf) >= chunkSize*4 {
			w.flush()
		}
	}
	return n, nil
}

func (w *chanWriter) flush() error {
	if len(w.buf) > 0 {
		w.t.w.send(frameStdout, w.ch, w.buf)
		w.buf = nil
	}
	return nil
}

// writeTar archives srcDir/srcBase with the top entry renamed to rebase.
// Paths relative to the container root in excludes are left out, and the
// tether's kernel filesystems (/proc, /sys, /dev) are archived as empty
// directories.
func writeTar(out io.Writer, srcDir, srcBase, rebase string, excludes []string) error {
	return writeTarOnly(out, srcDir, srcBase, rebase, excludes, nil, nil)
}

// writeTarOnly is writeTar; with only (container paths), just those
// entries are archived (directories not recursively), and the whole of
// the trees: a commit's layer.
func writeTarOnly(out io.Writer, srcDir, srcBase, rebase string, excludes, only, trees []string) error {
	var want, ancestors map[string]bool
	if only != nil || trees != nil {
		want, ancestors = map[string]bool{}, map[string]bool{containerRoot: true}
		for _, o := range append(append([]string(nil), only...), trees...) {
			p := filepath.Join(containerRoot, filepath.Clean("/"+o))
			want[p] = true
			for d := filepath.Dir(p); len(d) > len(containerRoot); d = filepath.Dir(d) {
				ancestors[d] = true
			}
		}
	}
	treeSet := map[string]bool{}
	for _, t := range trees {
		treeSet[filepath.Join(containerRoot, filepath.Clean("/"+t))] = true
	}
	tw := tar.NewWriter(out)
	inodes := map[[2]uint64]string{}
	start := filepath.Join(srcDir, srcBase)
	skip := skipSet(excludes)
	err := filepath.Walk(start, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			if p == start {
				return err
			}
			logf("archive: %v", err)
			return nil
		}
		rel, _ := filepath.Rel(start, p)
		// Like docker's TarWithOptions with IncludeSourceDir: children of
		// a directory archived as "." are "./name", so the client's
		// rebase of "." reaches them.
		name := rebase
		if rel != "." {
			name = strings.TrimSuffix(rebase, "/") + "/" + filepath.ToSlash(rel)
		}
		name = strings.TrimPrefix(name, "/")
		if name == "" {
			return nil // export: the root itself has no entry, only its contents
		}
		if skip[p] && p != start {
			if want != nil && !want[p] {
				return filepath.SkipDir
			}
			if fi.IsDir() {
				if err := writeHeader(tw, p, name, fi, inodes); err != nil {
					return err
				}
				return filepath.SkipDir
			}
			return nil
		}
		if fi.Mode()&(os.ModeSocket) != 0 {
			return nil // dockerd skips sockets too
		}
		if want != nil && !want[p] && !underAny(p, treeSet) {
			if fi.IsDir() && !ancestors[p] && p != start {
				return filepath.SkipDir
			}
			return nil
		}
		return writeHeader(tw, p, name, fi, inodes)
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

func writeHeader(tw *tar.Writer, p, name string, fi os.FileInfo, inodes map[[2]uint64]string) error {
	link := ""
	if fi.Mode()&os.ModeSymlink != 0 {
		var err error
		if link, err = os.Readlink(p); err != nil {
			return err
		}
	}
	hdr, err := tar.FileInfoHeader(fi, link)
	if err != nil {
		return err
	}
	hdr.Name = name
	if fi.IsDir() && !strings.HasSuffix(hdr.Name, "/") {
		hdr.Name += "/"
	}
	hdr.Uname, hdr.Gname = "", ""
	hdr.Format = tar.FormatPAX
	hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && fi.Mode().IsRegular() && st.Nlink > 1 {
		key := [2]uint64{uint64(st.Dev), st.Ino}
		if first, seen := inodes[key]; seen {
			hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
		} else {
			inodes[key] = hdr.Name
		}
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if hdr.Typeflag == tar.TypeReg && hdr.Size > 0 {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := io.CopyN(tw, f, hdr.Size); err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
	}
	return nil
}

// archivePut answers `archive_put`: the destination is checked and the
// reply sent at once; the tar then arrives as STDIN frames on req.Chan
// (STDIN_CLOSE ends it) and an `exit` event reports the extraction.
func (t *tether) archivePut(req *request) (map[string]any, func(), error) {
	if err := t.archiveReady(); err != nil {
		return nil, nil, err
	}
	if req.Chan < 2 {
		return nil, nil, fmt.Errorf("archive channel %d: must be 2 or more", req.Chan)
	}
	abs := filepath.Join("/", req.Path)
	dest, err := resolveIn(containerRoot, abs)
	if err != nil {
		return nil, nil, statError(err)
	}
	fi, err := os.Lstat(dest)
	if err != nil {
		return nil, nil, statError(err)
	}
	if !fi.IsDir() {
		return nil, nil, &reqError{msg: "extraction point is not a directory", code: 3}
	}
	if ro, _ := readOnlyAt(dest); ro {
		return nil, nil, &reqError{msg: "mounted volume is marked read-only", code: 4}
	}
	// docker cp -a into a container with a User: the files become that
	// user's (docker's tarCopyOptions); else the archive's owners are kept.
	owner := (*userInfo)(nil)
	if req.ChownUser != "" {
		if owner, err = resolveUser(containerRoot, req.ChownUser); err != nil {
			return nil, nil, err
		}
	}
	s := &archiveStream{data: make(chan []byte, 16)}
	t.mu.Lock()
	if _, busy := t.archives[req.Chan]; busy || t.procs[req.Chan] != nil {
		t.mu.Unlock()
		return nil, nil, fmt.Errorf("channel %d is in use", req.Chan)
	}
	t.archives[req.Chan] = s
	t.mu.Unlock()
	ch := req.Chan
	destRel := strings.TrimPrefix(dest, containerRoot)
	run := func() {
		err := extractTar(s, destRel, req.NoOverwriteDirNonDir, owner)
		// Drain what the host still sends so the port reader never blocks.
		for range s.data {
		}
		t.mu.Lock()
		delete(t.archives, ch)
		t.mu.Unlock()
		msg := map[string]any{"op": "exit", "chan": ch, "code": 0}
		if err != nil {
			logf("archive_put %s: %v", req.Path, err)
			msg["code"], msg["error"] = 1, err.Error()
		}
		t.w.ctrl(msg)
	}
	return map[string]any{}, run, nil
}

// archiveFrame hands a STDIN/STDIN_CLOSE frame to an archive_put; false if
// the channel is not one.
func (t *tether) archiveFrame(f frame) bool {
	t.mu.Lock()
	s := t.archives[f.ch]
	if s != nil && f.typ == frameStdinClose {
		delete(t.archives, f.ch) // later frames on the channel are dropped
	}
	t.mu.Unlock()
	if s == nil {
		return false
	}
	if f.typ == frameStdin {
		s.data <- f.payload
	} else {
		close(s.data)
	}
	return true
}

func readOnlyAt(p string) (bool, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(p, &st); err != nil {
		return false, err
	}
	return st.Flags&1 != 0, nil // ST_RDONLY
}

// extractTar unpacks r under destRel (a path inside the container root,
// already resolved). Entries are placed with their parent directory
// resolved inside the root again, so a symlink in the container or one
// the archive itself created cannot send a write outside the root.
func extractTar(r io.Reader, destRel string, noOverwriteDirNonDir bool, owner *userInfo) error {
	tr := tar.NewReader(r)
	type dirTime struct {
		p     string
		mtime time.Time
	}
	var dirs []dirTime
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		name := filepath.Clean("/" + hdr.Name)
		if name == "/" && hdr.Typeflag != tar.TypeDir {
			continue
		}
		parent, err := resolveIn(containerRoot, path.Join(destRel, path.Dir(name)))
		if err != nil {
			return err
		}
		target := parent
		if name != "/" {
			target = filepath.Join(parent, path.Base(name))
		}
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return err
		}
		if old, err := os.Lstat(target); err == nil {
			newDir := hdr.Typeflag == tar.TypeDir
			if noOverwriteDirNonDir && old.IsDir() != newDir {
				if old.IsDir() {
					return fmt.Errorf("cannot overwrite directory %q with non-directory %q", path.Join(destRel, name), hdr.Name)
				}
				return fmt.Errorf("cannot overwrite non-directory %q with directory %q", path.Join(destRel, name), hdr.Name)
			}
			if !(old.IsDir() && newDir) {
				if err := os.RemoveAll(target); err != nil {
					return err
				}
			}
		}
		mode := os.FileMode(hdr.Mode).Perm()
		if hdr.Mode&0o4000 != 0 {
			mode |= os.ModeSetuid
		}
		if hdr.Mode&0o2000 != 0 {
			mode |= os.ModeSetgid
		}
		if hdr.Mode&0o1000 != 0 {
			mode |= os.ModeSticky
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.Mkdir(target, 0o755); err != nil && !os.IsExist(err) {
				return err
			}
			dirs = append(dirs, dirTime{target, hdr.ModTime})
		case tar.TypeReg, tar.TypeRegA:
			f, err := os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
			if err != nil {
				return err
			}
			if _, err := io.Copy(f, tr); err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := os.Symlink(hdr.Linkname, target); err != nil {
				return err
			}
		case tar.TypeLink:
			src, err := resolveIn(containerRoot, path.Join(destRel, path.Dir(filepath.Clean("/"+hdr.Linkname))))
			if err != nil {
				return err
			}
			src = filepath.Join(src, path.Base(filepath.Clean("/"+hdr.Linkname)))
			if fi, err := os.Lstat(src); err != nil || fi.IsDir() {
				return fmt.Errorf("invalid hardlink %q -> %q", hdr.Name, hdr.Linkname)
			}
			if err := os.Link(src, target); err != nil {
				return err
			}
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			m := uint32(hdr.Mode & 0o7777)
			switch hdr.Typeflag {
			case tar.TypeChar:
				m |= syscall.S_IFCHR
			case tar.TypeBlock:
				m |= syscall.S_IFBLK
			default:
				m |= syscall.S_IFIFO
			}
			dev := int((hdr.Devmajor&0xfff)<<8 | hdr.Devminor&0xff | (hdr.Devminor&^0xff)<<12)
			if err := syscall.Mknod(target, m, dev); err != nil {
				return err
			}
		case tar.TypeXGlobalHeader:
			continue
		default:
			logf("archive: %s: unsupported type %c, skipped", hdr.Name, hdr.Typeflag)
			continue
		}
		if owner != nil {
			os.Lchown(target, int(owner.uid), int(owner.gid))
		} else {
			os.Lchown(target, hdr.Uid, hdr.Gid)
		}
		if hdr.Typeflag != tar.TypeSymlink {
			if err := os.Chmod(target, mode); err != nil {
				return err
			}
		}
		if hdr.Typeflag != tar.TypeDir {
			lutimes(target, hdr.ModTime)
		}
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		lutimes(dirs[i].p, dirs[i].mtime)
	}
	return nil
}

// lutimes sets atime and mtime without following a symlink.
func lutimes(p string, mtime time.Time) {
	ts := []syscall.Timespec{syscall.NsecToTimespec(mtime.UnixNano()), syscall.NsecToTimespec(mtime.UnixNano())}
	utimensat(p, ts)
}

func utimensat(p string, ts []syscall.Timespec) error {
	b, err := syscall.BytePtrFromString(p)
	if err != nil {
		return err
	}
	const atFdcwd, atSymlinkNofollow = -100, 0x100
	fd := atFdcwd
	_, _, e := syscall.Syscall6(syscall.SYS_UTIMENSAT, uintptr(fd), uintptr(unsafe.Pointer(b)),
		uintptr(unsafe.Pointer(&ts[0])), atSymlinkNofollow, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// skipSet is every path an archive or listing leaves out: the tether's own
// (archiveSkip) and the caller's excludes, as host paths below containerRoot.
func skipSet(excludes []string) map[string]bool {
	skip := map[string]bool{}
	for p := range archiveSkip {
		skip[containerRoot+p] = true
	}
	for _, e := range excludes {
		skip[filepath.Join(containerRoot, e)] = true
	}
	return skip
}

// writeListing writes one JSON line per entry below srcDir/srcBase (no
// contents): the container side of docker diff and commit.
func writeListing(out io.Writer, srcDir, srcBase string, excludes []string) error {
	start := filepath.Join(srcDir, srcBase)
	skip := skipSet(excludes)
	enc := json.NewEncoder(out)
	return filepath.Walk(start, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			if p == start {
				return err
			}
			return nil
		}
		rel, _ := filepath.Rel(start, p)
		if rel == "." {
			return nil
		}
		e := map[string]any{"p": "/" + filepath.ToSlash(rel), "m": uint32(fi.Mode()),
			"s": fi.Size(), "t": fi.ModTime().Unix()}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			e["u"], e["g"] = st.Uid, st.Gid
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			e["l"], _ = os.Readlink(p)
		}
		if fi.IsDir() {
			e["s"] = 0
		}
		if err := enc.Encode(e); err != nil {
			return err
		}
		if skip[p] && fi.IsDir() {
			return filepath.SkipDir
		}
		return nil
	})
}

// freeze stops (SIGSTOP) or continues (SIGCONT) every process but the
// tether: docker commit --pause. kill(-1) skips PID 1 itself.
func freeze(frozen bool) (map[string]any, error) {
	sig := syscall.SIGCONT
	if frozen {
		sig = syscall.SIGSTOP
	}
	if err := syscall.Kill(-1, sig); err != nil && err != syscall.ESRCH {
		return nil, err
	}
	return map[string]any{}, nil
}

// underAny: p lies below one of the trees.
func underAny(p string, trees map[string]bool) bool {
	if len(trees) == 0 {
		return false
	}
	for d := filepath.Dir(p); len(d) > len(containerRoot); d = filepath.Dir(d) {
		if trees[d] {
			return true
		}
	}
	return false
}
