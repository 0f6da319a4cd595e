// Command vcsim runs govmomi's simulator as the vCenter of vicd's tests.
//
// Debian ships the simulator library but no binary. On top of simulator.VPX()
// this adds what the vSphere backend relies on and the simulator lacks or does
// differently from vCenter (see /work/shared/specs/vcsim-notes.md):
//   - InstantClone_Task (unless -no-instant-clone), reported API version 7.0;
//   - CloneVM_Task honours spec.config (CPU, memory, annotation), spec.powerOn
//     and refuses a duplicate name in the folder, as vCenter does;
//   - ReconfigVM_Task replaces extraConfig keys (an empty value deletes one)
//     and publishes extraConfig/annotation changes to property collectors;
//   - CreateVirtualDisk_Task makes a real (thin, ESXi-style) disk, not two
//     empty files; CopyVirtualDisk_Task converts any VMDK QEMU reads (the
//     hosted sparse upload) into a VMFS-style disk, honouring destSpec unless
//     -vcenter-copy (then it refuses one, as vCenter does); MoveVirtualDisk_Task
//     also renames the flat file in the descriptor (disks.go).
//
// These are implemented by rewriting the _this of those SOAP requests to a
// managed object of ours (the simulator type-asserts *VirtualMachine too
// often for a wrapper type to work).
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const fixerType = "VicdFixer"

// fixer receives the rewritten requests. Only one runs at a time (mu): the
// original _this travels in `source`.
type fixer struct {
	Self   types.ManagedObjectReference
	mu     sync.Mutex
	source types.ManagedObjectReference
	// vcenterCopy: CopyVirtualDisk_Task refuses a destSpec (NotImplemented),
	// as vCenter does; without it the copy converts as an ESXi host does.
	vcenterCopy bool
}

func (f *fixer) Reference() types.ManagedObjectReference { return f.Self }

func fault(err types.BaseMethodFault) *soap.Fault {
	return simulator.Fault("", err)
}

func getVM(ref types.ManagedObjectReference) *simulator.VirtualMachine {
	vm, _ := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	return vm
}

// nameTaken: vCenter refuses a second VM of the same name in one folder.
func nameTaken(folder types.ManagedObjectReference, name string) bool {
	f, ok := simulator.Map.Get(folder).(*simulator.Folder)
	if !ok {
		return false
	}
	for _, ref := range f.ChildEntity {
		if vm := getVM(ref); vm != nil && vm.Name == name {
			return true
		}
	}
	return false
}

// mergeExtra applies extraConfig as vCenter does: a key replaces the old
// value, an empty value removes the key.
func mergeExtra(old []types.BaseOptionValue, set []types.BaseOptionValue) []types.BaseOptionValue {
	idx := map[string]int{}
	out := make([]types.BaseOptionValue, 0, len(old)+len(set))
	for _, o := range old {
		k := o.GetOptionValue().Key
		if i, ok := idx[k]; ok {
			out[i] = o
			continue
		}
		idx[k] = len(out)
		out = append(out, o)
	}
	for _, o := range set {
		v := o.GetOptionValue()
		if i, ok := idx[v.Key]; ok {
			out[i] = o
		} else {
			idx[v.Key] = len(out)
			out = append(out, o)
		}
	}
	res := out[:0]
	for _, o := range out {
		if s, ok := o.GetOptionValue().Value.(string); ok && s == "" {
			continue
		}
		res = append(res, o)
	}
	return res
}

func splitSet(ec []types.BaseOptionValue) (set, plain []types.BaseOptionValue) {
	for _, o := range ec {
		if strings.HasPrefix(o.GetOptionValue().Key, "SET.") {
			set = append(set, o)
		} else {
			plain = append(plain, o)
		}
	}
	return
}

// publish applies config changes through the registry so WaitForUpdates sees them.
func publish(vm *simulator.VirtualMachine, extra []types.BaseOptionValue, annotation *string) {
	var changes []types.PropertyChange
	if extra != nil {
		changes = append(changes, types.PropertyChange{Name: "config.extraConfig", Val: mergeExtra(vm.Config.ExtraConfig, extra)})
	}
	if annotation != nil {
		changes = append(changes,
			types.PropertyChange{Name: "config.annotation", Val: *annotation},
			types.PropertyChange{Name: "summary.config.annotation", Val: *annotation})
	}
	if len(changes) > 0 {
		simulator.Map.Update(vm, changes)
	}
}

func taskOf(ref types.ManagedObjectReference) *simulator.Task {
	return simulator.Map.Get(ref).(*simulator.Task)
}

func (f *fixer) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	vm := getVM(f.source)
	if vm == nil {
		return &methods.ReconfigVM_TaskBody{Fault_: fault(&types.ManagedObjectNotFound{Obj: f.source})}
	}
	spec := req.Spec
	set, plain := splitSet(spec.ExtraConfig)
	spec.ExtraConfig = set
	res := vm.ReconfigVMTask(ctx, &types.ReconfigVM_Task{This: vm.Self, Spec: spec})
	body := res.(*methods.ReconfigVM_TaskBody)
	if body.Res != nil && taskOf(body.Res.Returnval).Info.Error == nil {
		var ann *string
		if req.Spec.Annotation != "" {
			ann = &req.Spec.Annotation
		}
		if plain == nil {
			plain = []types.BaseOptionValue{}
		}
		publish(vm, plain, ann)
	}
	return body
}

func (f *fixer) CloneVMTask(ctx *simulator.Context, req *types.CloneVM_Task) soap.HasFault {
	vm := getVM(f.source)
	if vm == nil {
		return &methods.CloneVM_TaskBody{Fault_: fault(&types.ManagedObjectNotFound{Obj: f.source})}
	}
	if nameTaken(req.Folder, req.Name) {
		return &methods.CloneVM_TaskBody{Fault_: fault(&types.DuplicateName{Name: req.Name, Object: req.Folder})}
	}
	req.This = vm.Self
	res := vm.CloneVMTask(ctx, req)
	body := res.(*methods.CloneVM_TaskBody)
	if body.Res == nil {
		return body
	}
	task := taskOf(body.Res.Returnval)
	if task.Info.Error != nil {
		return body
	}
	clone := getVM(task.Info.Result.(types.ManagedObjectReference))
	if c := req.Spec.Config; c != nil {
		hw := types.VirtualMachineConfigSpec{NumCPUs: c.NumCPUs, MemoryMB: c.MemoryMB}
		if hw.NumCPUs != 0 || hw.MemoryMB != 0 {
			clone.ReconfigVMTask(ctx, &types.ReconfigVM_Task{This: clone.Self, Spec: hw})
		}
		var ann *string
		if c.Annotation != "" {
			ann = &c.Annotation
		}
		_, plain := splitSet(c.ExtraConfig)
		// The simulator appended them already; publish the merged list.
		publish(clone, plain, ann)
	}
	if req.Spec.PowerOn {
		clone.PowerOnVMTask(ctx, &types.PowerOnVM_Task{This: clone.Self})
	}
	return body
}

func (f *fixer) InstantCloneTask(ctx *simulator.Context, req *types.InstantClone_Task) soap.HasFault {
	src := getVM(f.source)
	if src == nil {
		return &methods.InstantClone_TaskBody{Fault_: fault(&types.ManagedObjectNotFound{Obj: f.source})}
	}
	task := simulator.CreateTask(src, "instantClone", func(t *simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if src.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
			return nil, &types.InvalidPowerState{
				RequestedState: types.VirtualMachinePowerStatePoweredOn,
				ExistingState:  src.Runtime.PowerState,
			}
		}
		folder := src.Parent
		if req.Spec.Location.Folder != nil {
			folder = req.Spec.Location.Folder
		}
		if nameTaken(*folder, req.Spec.Name) {
			return nil, &types.DuplicateName{Name: req.Spec.Name, Object: *folder}
		}
		res := src.CloneVMTask(ctx, &types.CloneVM_Task{
			This:   src.Self,
			Folder: *folder,
			Name:   req.Spec.Name,
			Spec:   types.VirtualMachineCloneSpec{Location: req.Spec.Location},
		})
		ct := taskOf(res.(*methods.CloneVM_TaskBody).Res.Returnval)
		if ct.Info.Error != nil {
			return nil, ct.Info.Error.Fault
		}
		ref := ct.Info.Result.(types.ManagedObjectReference)
		clone := getVM(ref)
		// The child inherits the parent's extraConfig, spec.config on top.
		inherited := make([]types.BaseOptionValue, len(src.Config.ExtraConfig))
		copy(inherited, src.Config.ExtraConfig)
		simulator.Map.Update(clone, []types.PropertyChange{{Name: "config.extraConfig", Val: inherited}})
		publish(clone, req.Spec.Config, nil)
		pt := taskOf(clone.PowerOnVMTask(ctx, &types.PowerOnVM_Task{This: clone.Self}).(*methods.PowerOnVM_TaskBody).Res.Returnval)
		if pt.Info.Error != nil {
			return nil, pt.Info.Error.Fault
		}
		return ref, nil
	})
	return &methods.InstantClone_TaskBody{Res: &types.InstantClone_TaskResponse{Returnval: task.Run()}}
}

var thisRe = regexp.MustCompile(`<_this[^>]*type="(VirtualMachine|VirtualDiskManager)"[^>]*>([^<]+)</_this>`)

// wrap rewrites the requests the fixer handles.
func wrap(next http.Handler, f *fixer, instantClone bool) http.Handler {
	vmOps := []string{"CloneVM_Task", "ReconfigVM_Task"}
	if instantClone {
		vmOps = append(vmOps, "InstantClone_Task")
	}
	opsOf := map[string][]string{
		"VirtualMachine":     vmOps,
		"VirtualDiskManager": {"CopyVirtualDisk_Task", "MoveVirtualDisk_Task"},
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/sdk") {
			next.ServeHTTP(w, r)
			return
		}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		if bytes.Contains(body, []byte("CreateVirtualDisk_Task>")) {
			// Served as is, then the empty files get a disk's content.
			r.Body = io.NopCloser(bytes.NewReader(body))
			next.ServeHTTP(w, r)
			materializeDisk(body)
			return
		}
		var op string
		m := thisRe.FindSubmatch(body)
		if m != nil {
			for _, o := range opsOf[string(m[1])] {
				if bytes.Contains(body, []byte("<"+o)) || bytes.Contains(body, []byte(":"+o)) {
					op = o
				}
			}
		}
		if op == "" {
			r.Body = io.NopCloser(bytes.NewReader(body))
			next.ServeHTTP(w, r)
			return
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		kind := string(m[1])
		f.source = types.ManagedObjectReference{Type: kind, Value: string(m[2])}
		body = thisRe.ReplaceAll(body, []byte(`<_this type="`+fixerType+`">`+f.Self.Value+`</_this>`))
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
		// Faults name _this (NotAuthenticated's object): give the client its object back.
		rec := &recorder{header: w.Header(), status: http.StatusOK}
		next.ServeHTTP(rec, r)
		out := bytes.ReplaceAll(rec.body.Bytes(), []byte(`type="`+fixerType+`">`+f.Self.Value+`<`),
			[]byte(`type="`+kind+`">`+string(m[2])+`<`))
		w.Header().Set("Content-Length", fmt.Sprint(len(out)))
		w.WriteHeader(rec.status)
		w.Write(out)
	})
}

// recorder buffers a response so it can be rewritten.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }
func (r *recorder) WriteHeader(status int)      { r.status = status }

// prepareTemplate turns one of the model's VMs into the powered-off template VM.
func prepareTemplate(name string) {
	vm := simulator.Map.Any("VirtualMachine").(*simulator.VirtualMachine)
	for _, e := range simulator.Map.All("VirtualMachine") {
		if e.Entity().Name == "DC0_C0_RP0_VM0" {
			vm = e.(*simulator.VirtualMachine)
		}
	}
	simulator.Map.Update(vm, []types.PropertyChange{
		{Name: "name", Val: name},
		{Name: "config.name", Val: name},
		{Name: "summary.config.name", Val: name},
		{Name: "runtime.powerState", Val: types.VirtualMachinePowerStatePoweredOff},
		{Name: "summary.runtime.powerState", Val: types.VirtualMachinePowerStatePoweredOff},
	})
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	noIC := flag.Bool("no-instant-clone", false, "do not offer InstantClone_Task")
	template := flag.String("template", "vicd-template", "rename a model VM to this (powered off); empty: none")
	idle := flag.Duration("session-idle", 0, "expire idle sessions after this long (0: never)")
	urlFile := flag.String("url-file", "", "write the SDK URL here once serving")
	vcenterCopy := flag.Bool("vcenter-copy", false, "CopyVirtualDisk_Task refuses a destSpec, as vCenter does")
	flag.Parse()

	if *idle > 0 {
		simulator.SessionIdleTimeout = *idle
	}
	model := simulator.VPX()
	if !*noIC {
		// pyvmomi refuses InstantClone below vim.version.version12 (7.0).
		model.ServiceContent.About.ApiVersion = "7.0.0.0"
	}
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()
	if *template != "" {
		prepareTemplate(*template)
	}
	f := &fixer{Self: types.ManagedObjectReference{Type: fixerType, Value: "vicd-fixer"}, vcenterCopy: *vcenterCopy}
	simulator.Map.Put(f)

	model.Service.Listen = &url.URL{Host: *listen}
	s := model.Service.NewServer()
	defer s.Close()
	s.Config.Handler = wrap(s.Config.Handler, f, !*noIC)

	u := *s.URL
	fmt.Println(u.String())
	if *urlFile != "" {
		tmp := *urlFile + ".tmp"
		if err := os.WriteFile(tmp, []byte(u.String()+"\n"), 0o600); err != nil {
			log.Fatal(err)
		}
		os.Rename(tmp, *urlFile)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	_ = mo.Reference(f)
	time.Sleep(10 * time.Millisecond)
}
