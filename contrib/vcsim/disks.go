package main

import (
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

var (
	diskNameRe = regexp.MustCompile(`<name[^>]*>\[([^\]]+)\] ([^<]+\.vmdk)</name>`)
	capacityRe = regexp.MustCompile(`<capacityKb[^>]*>(\d+)</capacityKb>`)
	dsPathRe   = regexp.MustCompile(`^\[([^\]]+)\] (.+)$`)
)

// datastoreDir is the local folder behind a simulated datastore ("" if none).
func datastoreDir(name string) string {
	for _, e := range simulator.Map.All("Datastore") {
		if ds, ok := e.(*simulator.Datastore); ok && ds.Name == name {
			return ds.Info.GetDatastoreInfo().Url
		}
	}
	return ""
}

// localPath maps "[ds] path" to the simulator's file.
func localPath(dsPath string) (string, bool) {
	m := dsPathRe.FindStringSubmatch(dsPath)
	if m == nil {
		return "", false
	}
	dir := datastoreDir(m[1])
	if dir == "" {
		return "", false
	}
	return filepath.Join(dir, m[2]), true
}

func flatOf(desc string) string {
	return strings.TrimSuffix(desc, ".vmdk") + "-flat.vmdk"
}

// ddbAdapter is the descriptor's name for a VirtualDiskAdapterType.
func ddbAdapter(t string) string {
	switch t {
	case string(types.VirtualDiskAdapterTypeBusLogic):
		return "buslogic"
	case string(types.VirtualDiskAdapterTypeIde):
		return "ide"
	}
	return "lsilogic"
}

// writeDescriptor writes what ESXi writes for a VMFS disk: createType "vmfs"
// and one VMFS extent, the raw NAME-flat.vmdk beside it (QEMU reads this).
func writeDescriptor(desc string, sectors int64, adapter string, thin bool) error {
	t := "0"
	if thin {
		t = "1"
	}
	text := fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
createType="vmfs"

# Extent description
RW %d VMFS "%s"

# The Disk Data Base
#DDB

ddb.adapterType = "%s"
ddb.thinProvisioned = "%s"
ddb.virtualHWVersion = "14"
`, sectors, filepath.Base(flatOf(desc)), adapter, t)
	return os.WriteFile(desc, []byte(text), 0o600)
}

// materializeDisk gives a disk made by CreateVirtualDisk_Task the content
// ESXi would: the simulator only creates NAME.vmdk and NAME-flat.vmdk empty.
// NAME-flat.vmdk becomes a sparse file of the requested capacity (a thin
// disk) and NAME.vmdk its descriptor, so QEMU in the host emulation can
// attach it.
func materializeDisk(body []byte) {
	m, c := diskNameRe.FindSubmatch(body), capacityRe.FindSubmatch(body)
	if m == nil || c == nil {
		return
	}
	kb, err := strconv.ParseInt(string(c[1]), 10, 64)
	if err != nil || kb <= 0 {
		return
	}
	desc, ok := localPath(fmt.Sprintf("[%s] %s", m[1], m[2]))
	if !ok {
		return
	}
	if st, err := os.Stat(desc); err != nil || st.Size() != 0 {
		return // the call failed (exists already, no folder) or it has content
	}
	if err := os.Truncate(flatOf(desc), kb*1024); err != nil {
		log.Printf("materialize %s: %v", desc, err)
		return
	}
	if err := writeDescriptor(desc, kb*2, "lsilogic", true); err != nil {
		log.Printf("materialize %s: %v", desc, err)
	}
}

func fileFault(f types.BaseMethodFault, name string) types.BaseMethodFault {
	switch e := f.(type) {
	case *types.FileNotFound:
		e.File = name
	case *types.FileAlreadyExists:
		e.File = name
	case *types.CannotCreateFile:
		e.File = name
	}
	return f
}

// copyDisk does what CopyVirtualDisk_Task does on ESXi: it reads the source
// in whatever format it has (a hosted monolithicSparse upload too) and writes
// a VMFS disk: descriptor plus flat extent, thin (sparse) or preallocated.
// The simulator's own copy duplicates NAME.vmdk and NAME-flat.vmdk byte for
// byte and fails on a single-file sparse disk. The format conversion is
// qemu-img's (the host emulation needs QEMU anyway).
func copyDisk(src, dst string, spec types.BaseVirtualDiskSpec) types.BaseMethodFault {
	from, ok1 := localPath(src)
	to, ok2 := localPath(dst)
	if !ok1 || !ok2 {
		return &types.InvalidDatastorePath{DatastorePath: src + " " + dst}
	}
	if _, err := os.Stat(from); err != nil {
		return fileFault(new(types.FileNotFound), src)
	}
	// The API's force flag is ignored: an existing destination is a fault.
	if _, err := os.Stat(to); err == nil {
		return fileFault(new(types.FileAlreadyExists), dst)
	}
	if st, err := os.Stat(filepath.Dir(to)); err != nil || !st.IsDir() {
		return fileFault(new(types.FileNotFound), dst)
	}
	// No destSpec: "a preallocated format and busLogic adapter type is assumed".
	diskType, adapter := string(types.VirtualDiskTypePreallocated), string(types.VirtualDiskAdapterTypeBusLogic)
	if spec != nil {
		s := spec.GetVirtualDiskSpec()
		diskType, adapter = s.DiskType, s.AdapterType
	}
	thin := diskType == string(types.VirtualDiskTypeThin)
	args := []string{"convert", "-q", "-O", "raw"}
	if !thin {
		args = append(args, "-o", "preallocation=falloc")
	}
	flat := flatOf(to)
	out, err := exec.Command("qemu-img", append(args, from, flat)...).CombinedOutput()
	if err != nil {
		os.Remove(flat)
		log.Printf("copyVirtualDisk %s: %v: %s", src, err, out)
		return fileFault(new(types.CannotCreateFile), dst)
	}
	st, err := os.Stat(flat)
	if err == nil {
		err = writeDescriptor(to, st.Size()/512, ddbAdapter(adapter), thin)
	}
	if err != nil {
		os.Remove(flat)
		return fileFault(new(types.CannotCreateFile), dst)
	}
	return nil
}

func (f *fixer) CopyVirtualDiskTask(ctx *simulator.Context, req *types.CopyVirtualDisk_Task) soap.HasFault {
	vdm := simulator.Map.Get(f.source)
	task := simulator.CreateTask(vdm, "copyVirtualDisk", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if req.DestSpec != nil && f.vcenterCopy {
			return nil, new(types.NotImplemented) // vCenter takes no destSpec: ESXi only
		}
		return nil, copyDisk(req.SourceName, req.DestName, req.DestSpec)
	})
	return &methods.CopyVirtualDisk_TaskBody{Res: &types.CopyVirtualDisk_TaskResponse{Returnval: task.Run()}}
}

// MoveVirtualDiskTask is the simulator's move (both files renamed) plus what
// ESXi also does: the descriptor's extent then names the renamed flat file.
func (f *fixer) MoveVirtualDiskTask(ctx *simulator.Context, req *types.MoveVirtualDisk_Task) soap.HasFault {
	vdm := simulator.Map.Get(f.source).(*simulator.VirtualDiskManager)
	req.This = vdm.Self
	body := vdm.MoveVirtualDiskTask(ctx, req).(*methods.MoveVirtualDisk_TaskBody)
	if body.Res == nil || taskOf(body.Res.Returnval).Info.Error != nil {
		return body
	}
	from, ok1 := localPath(req.SourceName)
	to, ok2 := localPath(req.DestName)
	if ok1 && ok2 {
		if text, err := os.ReadFile(to); err == nil {
			old := `"` + filepath.Base(flatOf(from)) + `"`
			text = []byte(strings.Replace(string(text), old, `"`+filepath.Base(flatOf(to))+`"`, 1))
			if err := os.WriteFile(to, text, 0o600); err != nil {
				log.Printf("moveVirtualDisk %s: %v", to, err)
			}
		}
	}
	return body
}
