package main

import (
	"fmt"
	"log"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/simulator"
)

var (
	diskNameRe = regexp.MustCompile(`<name[^>]*>\[([^\]]+)\] ([^<]+\.vmdk)</name>`)
	capacityRe = regexp.MustCompile(`<capacityKb[^>]*>(\d+)</capacityKb>`)
)

// materializeDisk gives a disk made by CreateVirtualDisk_Task the content
// ESXi would: the simulator only creates NAME.vmdk and NAME-flat.vmdk empty.
// NAME-flat.vmdk becomes a sparse file of the requested capacity (a thin
// disk) and NAME.vmdk its descriptor (createType "vmfs", as ESXi writes it),
// so QEMU in the host emulation can attach it.
func materializeDisk(body []byte) {
	m, c := diskNameRe.FindSubmatch(body), capacityRe.FindSubmatch(body)
	if m == nil || c == nil {
		return
	}
	kb, err := strconv.ParseInt(string(c[1]), 10, 64)
	if err != nil || kb <= 0 {
		return
	}
	var dir string
	for _, e := range simulator.Map.All("Datastore") {
		if ds, ok := e.(*simulator.Datastore); ok && ds.Name == string(m[1]) {
			dir = ds.Info.GetDatastoreInfo().Url
		}
	}
	if dir == "" {
		return
	}
	desc := filepath.Join(dir, string(m[2]))
	if st, err := os.Stat(desc); err != nil || st.Size() != 0 {
		return // the call failed (exists already, no folder) or it has content
	}
	flat := strings.TrimSuffix(desc, ".vmdk") + "-flat.vmdk"
	if err := os.Truncate(flat, kb*1024); err != nil {
		log.Printf("materialize %s: %v", flat, err)
		return
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

ddb.adapterType = "lsilogic"
ddb.thinProvisioned = "1"
ddb.virtualHWVersion = "14"
`, kb*2, filepath.Base(flat))
	if err := os.WriteFile(desc, []byte(text), 0o600); err != nil {
		log.Printf("materialize %s: %v", desc, err)
	}
}
