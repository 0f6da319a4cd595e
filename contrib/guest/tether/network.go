package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// netIface is one NIC as the daemon wants the guest to see it.
type netIface struct {
	Name    string `json:"name"`    // eth0; empty: the NIC of Slot
	Slot    int    `json:"slot"`    // 1..: a NIC slot on a daemon network (found by its boot MAC)
	MAC     string `json:"mac"`     // 02:42:...
	Address string `json:"address"` // CIDR, e.g. 10.0.2.15/24; empty: leave down
	Gateway string `json:"gateway"` // default route via this address, if set
}

// netConfig is the run request's "network" object (docs/tether.md).
type netConfig struct {
	Interfaces []netIface `json:"interfaces"`
	Hosts      string     `json:"hosts"`  // /etc/hosts contents
	Resolv     string     `json:"resolv"` // /etc/resolv.conf contents
}

const (
	siocgifflags  = 0x8913
	siocsifflags  = 0x8914
	siocsifaddr   = 0x8916
	siocsifnetmsk = 0x891c
	siocsifhwaddr = 0x8924
	siocaddrt     = 0x890b
	iffUp         = 0x1
	rtfUp         = 0x1
	rtfGateway    = 0x2
	arphrdEther   = 1
)

// ifreq is struct ifreq on 64-bit Linux: a name and a 24-byte union.
type ifreq struct {
	name [16]byte
	data [24]byte
}

func newIfreq(name string) *ifreq {
	r := &ifreq{}
	copy(r.name[:], name)
	return r
}

func putSockaddrIn(b []byte, ip net.IP) {
	binary.LittleEndian.PutUint16(b[0:2], syscall.AF_INET)
	copy(b[4:8], ip.To4())
}

// setupNetwork configures loopback and the container's NICs with plain
// ioctls: the container image may have no `ip` tool, and the initramfs has
// none either.
func setupNetwork(cfg *netConfig) error {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, 0)
	if err != nil {
		return fmt.Errorf("socket: %v", err)
	}
	defer syscall.Close(fd)
	if err := ifUp(fd, "lo"); err != nil {
		logf("lo up: %v", err)
	}
	if cfg == nil {
		return nil
	}
	for _, nic := range cfg.Interfaces {
		if err := configureNIC(fd, nic); err != nil {
			return fmt.Errorf("%s: %v", nic.Name, err)
		}
	}
	return nil
}

// reconfigureNetwork is the "net" op: NICs plugged into or unplugged from
// a daemon network while the container runs. An empty address takes the
// NIC down and drops its addresses.
func reconfigureNetwork(ifaces []netIface) (map[string]any, error) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %v", err)
	}
	defer syscall.Close(fd)
	for _, nic := range ifaces {
		if err := configureNIC(fd, nic); err != nil {
			return nil, fmt.Errorf("slot %d: %v", nic.Slot, err)
		}
	}
	return map[string]any{}, nil
}

// slotNames maps a slot's boot MAC to its interface name.
var slotNames = map[string]string{}

// slotName finds a slot's interface by the MAC its device booted with
// (02:42:00:00:01:<slot>): the first lookup happens before any MAC is
// changed, and the map outlives template snapshots (same process). On
// vSphere a slot's vNIC has the endpoint's MAC (own) from the start, and a
// hot-added one appears a moment after the request: either MAC will do.
func slotName(slot int, own string) (string, error) {
	want := fmt.Sprintf("02:42:00:00:01:%02x", slot)
	own = strings.ToLower(own)
	deadline := time.Now().Add(3 * time.Second)
	for {
		if name, ok := slotNames[want]; ok {
			return name, nil
		}
		entries, _ := os.ReadDir("/sys/class/net")
		for _, e := range entries {
			addr, err := os.ReadFile("/sys/class/net/" + e.Name() + "/address")
			if err != nil {
				continue
			}
			mac := strings.TrimSpace(string(addr))
			if _, seen := slotNames[mac]; !seen && strings.HasPrefix(mac, "02:42:00:00:01:") {
				slotNames[mac] = e.Name()
			}
			if own != "" && mac == own && !isSlotName(e.Name()) {
				return e.Name(), nil
			}
		}
		if name, ok := slotNames[want]; ok {
			return name, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no interface for NIC slot %d", slot)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// isSlotName: the interface is a microvm slot's (known by its boot MAC), so
// its current MAC says nothing about which slot it is.
func isSlotName(name string) bool {
	for _, n := range slotNames {
		if n == name {
			return true
		}
	}
	return false
}

func configureNIC(fd int, nic netIface) error {
	if nic.Name == "" {
		name, err := slotName(nic.Slot, nic.MAC)
		if err != nil {
			return err
		}
		nic.Name = name
	}
	// virtio_net probes asynchronously after the module loads.
	deadline := time.Now().Add(3 * time.Second)
	for {
		if _, err := os.Stat("/sys/class/net/" + nic.Name); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no such interface")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if nic.Slot > 0 && nic.Address == "" {
		return ifDown(fd, nic.Name)
	}
	if nic.MAC != "" {
		mac, err := net.ParseMAC(nic.MAC)
		if err != nil {
			return fmt.Errorf("mac %q: %v", nic.MAC, err)
		}
		r := newIfreq(nic.Name)
		binary.LittleEndian.PutUint16(r.data[0:2], arphrdEther)
		copy(r.data[2:8], mac)
		if err := ioctl(fd, siocsifhwaddr, uintptr(unsafe.Pointer(r))); err != nil {
			return fmt.Errorf("set mac: %v", err)
		}
	}
	if nic.Address == "" {
		return nil
	}
	ip, ipnet, err := net.ParseCIDR(nic.Address)
	if err != nil {
		return fmt.Errorf("address %q: %v", nic.Address, err)
	}
	r := newIfreq(nic.Name)
	putSockaddrIn(r.data[:], ip)
	if err := ioctl(fd, siocsifaddr, uintptr(unsafe.Pointer(r))); err != nil {
		return fmt.Errorf("set address: %v", err)
	}
	r = newIfreq(nic.Name)
	putSockaddrIn(r.data[:], net.IP(ipnet.Mask))
	if err := ioctl(fd, siocsifnetmsk, uintptr(unsafe.Pointer(r))); err != nil {
		return fmt.Errorf("set netmask: %v", err)
	}
	if err := ifUp(fd, nic.Name); err != nil {
		return err
	}
	if nic.Slot > 0 {
		// A restored clone or a re-plumbed slot: tell the network's bridge and
		// neighbours where this address now lives.
		if err := announce(nic.Name, ip); err != nil {
			logf("%s: gratuitous ARP: %v", nic.Name, err)
		}
	}
	if nic.Gateway != "" {
		gw := net.ParseIP(nic.Gateway)
		if gw == nil {
			return fmt.Errorf("gateway %q", nic.Gateway)
		}
		// struct rtentry on 64-bit Linux: dst at 8, gateway at 24, genmask
		// at 40, flags at 56; 120 bytes in all. dst and genmask stay 0/0.
		var rt [120]byte
		binary.LittleEndian.PutUint16(rt[8:10], syscall.AF_INET)
		putSockaddrIn(rt[24:40], gw)
		binary.LittleEndian.PutUint16(rt[40:42], syscall.AF_INET)
		binary.LittleEndian.PutUint16(rt[56:58], rtfUp|rtfGateway)
		if err := ioctl(fd, siocaddrt, uintptr(unsafe.Pointer(&rt[0]))); err != nil && err != syscall.EEXIST {
			return fmt.Errorf("default route: %v", err)
		}
	}
	return nil
}

// announce sends a gratuitous ARP request (sender and target both ip) from
// the interface: switches learn its MAC, peers refresh their caches.
func announce(name string, ip net.IP) error {
	iface, err := net.InterfaceByName(name)
	if err != nil {
		return err
	}
	ip4 := ip.To4()
	if ip4 == nil || len(iface.HardwareAddr) != 6 {
		return fmt.Errorf("not an IPv4 Ethernet NIC")
	}
	const ethPArp = 0x0806
	fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, int(htons(ethPArp)))
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	frame := make([]byte, 42)
	copy(frame[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(frame[6:12], iface.HardwareAddr)
	binary.BigEndian.PutUint16(frame[12:14], ethPArp)
	arp := frame[14:]
	binary.BigEndian.PutUint16(arp[0:2], 1)      // Ethernet
	binary.BigEndian.PutUint16(arp[2:4], 0x0800) // IPv4
	arp[4], arp[5] = 6, 4
	binary.BigEndian.PutUint16(arp[6:8], 1) // request
	copy(arp[8:14], iface.HardwareAddr)
	copy(arp[14:18], ip4)
	copy(arp[24:28], ip4) // target hardware address stays zero
	to := &syscall.SockaddrLinklayer{Protocol: htons(ethPArp), Ifindex: iface.Index, Halen: 6}
	copy(to.Addr[:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	return syscall.Sendto(fd, frame, 0, to)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// ifDown takes a NIC down and removes its IPv4 address (and with it the
// subnet's route): a disconnected network is gone from the container.
func ifDown(fd int, name string) error {
	r := newIfreq(name)
	if err := ioctl(fd, siocgifflags, uintptr(unsafe.Pointer(r))); err != nil {
		return fmt.Errorf("get flags: %v", err)
	}
	flags := binary.LittleEndian.Uint16(r.data[0:2]) &^ iffUp
	binary.LittleEndian.PutUint16(r.data[0:2], flags)
	if err := ioctl(fd, siocsifflags, uintptr(unsafe.Pointer(r))); err != nil {
		return fmt.Errorf("down: %v", err)
	}
	r = newIfreq(name)
	putSockaddrIn(r.data[:], net.IPv4zero)
	if err := ioctl(fd, siocsifaddr, uintptr(unsafe.Pointer(r))); err != nil {
		return fmt.Errorf("clear address: %v", err)
	}
	return nil
}

func ifUp(fd int, name string) error {
	r := newIfreq(name)
	if err := ioctl(fd, siocgifflags, uintptr(unsafe.Pointer(r))); err != nil {
		return fmt.Errorf("get flags: %v", err)
	}
	flags := binary.LittleEndian.Uint16(r.data[0:2]) | iffUp
	binary.LittleEndian.PutUint16(r.data[0:2], flags)
	if err := ioctl(fd, siocsifflags, uintptr(unsafe.Pointer(r))); err != nil {
		return fmt.Errorf("up: %v", err)
	}
	return nil
}

// etcFiles are the files dockerd bind-mounts into every container.
var etcFiles = []string{"hosts", "resolv.conf", "hostname"}

// mountEtcFiles writes /etc/hosts, /etc/resolv.conf and /etc/hostname to
// the initramfs and bind-mounts them over the container's own, as dockerd
// does: the image's files stay untouched on its disk.
func mountEtcFiles(cfg *runConfig) {
	contents := map[string]string{"hostname": cfg.Hostname + "\n"}
	if cfg.Network != nil {
		contents["hosts"] = cfg.Network.Hosts
		contents["resolv.conf"] = cfg.Network.Resolv
	}
	os.MkdirAll("/tmp/etc", 0o755)
	os.MkdirAll(containerRoot+"/etc", 0o755)
	for _, name := range etcFiles {
		body, ok := contents[name]
		if !ok || body == "" {
			continue
		}
		src := filepath.Join("/tmp/etc", name)
		if err := os.WriteFile(src, []byte(body), 0o644); err != nil {
			logf("write %s: %v", src, err)
			continue
		}
		dst := filepath.Join(containerRoot, "etc", name)
		if fi, err := os.Lstat(dst); err != nil || !fi.Mode().IsRegular() {
			// A missing file (or a symlink, which could point anywhere)
			// becomes an empty regular file to mount on.
			os.Remove(dst)
			if f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
				f.Close()
			}
		}
		if err := syscall.Mount(src, dst, "", syscall.MS_BIND, ""); err != nil {
			logf("bind %s: %v", dst, err)
		}
	}
}
