package main

import (
	"fmt"
	"os"
	"strconv"
	"syscall"
)

// The container's processes (main and exec) live in one cgroup v2 group,
// cgroupDir; the tether stays in the root group, so a CPU quota on the
// container never slows the tether's answers. The container sees its group
// as /sys/fs/cgroup, as with dockerd's private cgroup namespace.
const (
	cgroupRoot = "/sys/fs/cgroup"
	cgroupDir  = cgroupRoot + "/container"
)

// cpuMax is cgroup v2's cpu.max: Quota µs of CPU time per Period µs,
// summed over the vCPUs; Quota 0 means no limit.
type cpuMax struct {
	Quota  int64 `json:"quota"`
	Period int64 `json:"period"`
}

// setupCgroup makes the container's group with the cpu controller on and
// shows it read-only at the container's /sys/fs/cgroup. It runs at start,
// not at boot: a template snapshot holds no per-container state.
func setupCgroup() error {
	if _, err := os.Stat(cgroupDir); err != nil {
		if err := makeCgroup(); err != nil {
			return err
		}
	}
	target := containerRoot + cgroupRoot
	if fi, err := os.Lstat(target); err != nil || !fi.IsDir() {
		return nil // the container's sysfs has no such folder: nothing to show
	}
	if err := syscall.Mount(cgroupDir, target, "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s: %v", target, err)
	}
	return syscall.Mount("", target, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY|syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, "")
}

// makeCgroup mounts cgroup2 and makes the container's group with the cpu
// controller on. It runs at boot (main), so a template snapshot has it and
// a clone's start only shows it to the container.
func makeCgroup() error {
	if err := syscall.Mount("cgroup2", cgroupRoot, "cgroup2", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, ""); err != nil && err != syscall.EBUSY {
		return fmt.Errorf("mount cgroup2: %v", err)
	}
	if err := os.WriteFile(cgroupRoot+"/cgroup.subtree_control", []byte("+cpu"), 0); err != nil {
		return fmt.Errorf("enable the cpu controller: %v", err)
	}
	if err := os.Mkdir(cgroupDir, 0o755); err != nil && !os.IsExist(err) {
		return err
	}
	return nil
}

// inContainerCgroup runs fork (a ForkExec) with the tether itself in the
// container's group, so the child is born there and nothing it forks can
// escape (Go 1.19's ForkExec cannot start a child in another group), then
// moves the tether back to the root group. Without the group (a held
// guest, or a failed setup) fork just runs.
func inContainerCgroup(fork func()) {
	self := []byte(strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(cgroupDir+"/cgroup.procs", self, 0); err != nil {
		fork()
		return
	}
	defer func() {
		if err := os.WriteFile(cgroupRoot+"/cgroup.procs", self, 0); err != nil {
			logf("cgroup: back to the root group: %v", err)
		}
	}()
	fork()
}

// setCPUMax writes the container's CPU quota (docker run/update --cpus,
// --cpu-quota, --cpu-period).
func setCPUMax(m *cpuMax) error {
	if m == nil {
		return nil
	}
	period := m.Period
	if period == 0 {
		period = 100000
	}
	if period < 1000 || period > 1000000 {
		return fmt.Errorf("CPU period %d out of range (1000-1000000 µs)", period)
	}
	val := "max " + strconv.FormatInt(period, 10)
	if m.Quota > 0 {
		if m.Quota < 1000 {
			return fmt.Errorf("CPU quota %d is below the minimum of 1000 µs", m.Quota)
		}
		val = strconv.FormatInt(m.Quota, 10) + " " + strconv.FormatInt(period, 10)
	}
	if err := os.WriteFile(cgroupDir+"/cpu.max", []byte(val), 0); err != nil {
		return fmt.Errorf("cpu.max: %v", err)
	}
	return nil
}

func (t *tether) cpuMaxReq(req *request) (map[string]any, error) {
	if req.CPUMax == nil {
		return nil, fmt.Errorf("cpu_max without a value")
	}
	if err := setCPUMax(req.CPUMax); err != nil {
		return nil, err
	}
	return map[string]any{}, nil
}
