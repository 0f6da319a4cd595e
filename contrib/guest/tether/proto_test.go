package main

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"testing"
)

func mkframe(typ byte, ch uint32, payload string) []byte {
	b := make([]byte, headerLen+len(payload))
	b[0], b[1], b[2] = 'V', 'T', typ
	binary.BigEndian.PutUint32(b[4:8], ch)
	binary.BigEndian.PutUint32(b[8:12], uint32(len(payload)))
	copy(b[12:], payload)
	return b
}

func TestReaderResync(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	var in []byte
	in = append(in, mkframe(frameCtrl, 0, `{"op":"a"}`)...)
	in = append(in, "garbage\x00\xffVx"...)
	// A header claiming more than 1 MiB is skipped too.
	in = append(in, 'V', 'T', 1, 0, 0, 0, 0, 0, 0xff, 0, 0, 0)
	in = append(in, mkframe(frameStdin, 7, "data")...)
	w.Write(in)
	pr := portReader{f: r}
	f := pr.next()
	if f.typ != frameCtrl || string(f.payload) != `{"op":"a"}` {
		t.Fatalf("first frame %+v", f)
	}
	f = pr.next()
	if f.typ != frameStdin || f.ch != 7 || string(f.payload) != "data" {
		t.Fatalf("second frame %+v", f)
	}
}

func TestBadReqType(t *testing.T) {
	var req request
	err := json.Unmarshal([]byte(`{"op":"hello","req":"x"}`), &req)
	if err == nil {
		t.Fatal("expected an error")
	}
}

func TestResolveIn(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(root+"/bin", 0o755)
	os.WriteFile(root+"/bin/busybox", []byte("x"), 0o755)
	os.Symlink("/bin/busybox", root+"/bin/sh")
	os.Symlink("bin", root+"/usrbin")
	p, err := resolveIn(root, "/usrbin/sh")
	if err != nil || p != root+"/bin/busybox" {
		t.Fatalf("got %q %v", p, err)
	}
	if _, err := lookPath(root, "sh", "/nope:/usrbin"); err != nil {
		t.Fatal(err)
	}
}
