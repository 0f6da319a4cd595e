package main

import (
	"os"
	"strconv"
	"strings"
)

// USER_HZ: the unit of the tick counts in /proc.
const clkTck = 100

// procEntry is one row of `ps`. vsz and rss are in KiB (as ps prints
// them), time_ticks is utime+stime and start_ticks the start time after
// boot, both in clock ticks (clk_tck in the reply).
type procEntry struct {
	Pid        int    `json:"pid"`
	Ppid       int    `json:"ppid"`
	Uid        int    `json:"uid"`
	State      string `json:"state"`
	Vsz        uint64 `json:"vsz"`
	Rss        uint64 `json:"rss"`
	TimeTicks  uint64 `json:"time_ticks"`
	StartTicks uint64 `json:"start_ticks"`
	Cmd        string `json:"cmd"`
	User       string `json:"user"`         // name from the container's /etc/passwd, else the uid
	Uptime     uint64 `json:"uptime_ticks"` // guest uptime, repeated per row for the daemon's convenience
}

// containerProcs lists the container's processes: everything but the
// tether (pid 1) and kernel threads (children of kthreadd, pid 2).
func containerProcs() []procEntry {
	dirs, _ := os.ReadDir("/proc")
	uptime := uptimeTicks()
	names := map[uint32]string{}
	for _, e := range readPasswd(containerRoot) {
		if _, dup := names[e.uid]; !dup {
			names[e.uid] = e.name
		}
	}
	pageKB := uint64(os.Getpagesize() / 1024)
	out := []procEntry{}
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil || pid <= 2 {
			continue
		}
		data, err := os.ReadFile("/proc/" + d.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		s := string(data)
		lp, rp := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if lp < 0 || rp < lp {
			continue
		}
		comm := s[lp+1 : rp]
		f := strings.Fields(s[rp+1:])
		// f[0] is field 3 (state) of proc(5).
		if len(f) < 22 {
			continue
		}
		num := func(i int) uint64 { v, _ := strconv.ParseUint(f[i-3], 10, 64); return v }
		ppid := int(num(4))
		if ppid == 2 {
			continue
		}
		e := procEntry{
			Pid: pid, Ppid: ppid, State: f[0],
			TimeTicks: num(14) + num(15), StartTicks: num(22),
			Vsz: num(23) / 1024, Rss: num(24) * pageKB, Uid: -1, Uptime: uptime,
		}
		if st, err := os.ReadFile("/proc/" + d.Name() + "/status"); err == nil {
			for _, l := range strings.Split(string(st), "\n") {
				if strings.HasPrefix(l, "Uid:") {
					if u := strings.Fields(l[4:]); len(u) > 0 {
						e.Uid, _ = strconv.Atoi(u[0])
					}
					break
				}
			}
		}
		if n, ok := names[uint32(e.Uid)]; ok && e.Uid >= 0 {
			e.User = n
		} else {
			e.User = strconv.Itoa(e.Uid)
		}
		cmd, _ := os.ReadFile("/proc/" + d.Name() + "/cmdline")
		e.Cmd = strings.TrimSpace(strings.ReplaceAll(string(cmd), "\x00", " "))
		if e.Cmd == "" {
			e.Cmd = "[" + comm + "]"
		}
		out = append(out, e)
	}
	return out
}

func psList() (map[string]any, error) {
	res := map[string]any{"processes": containerProcs(), "clk_tck": clkTck, "uptime_ticks": uptimeTicks()}
	if st, err := os.ReadFile("/proc/stat"); err == nil {
		for _, l := range strings.Split(string(st), "\n") {
			if strings.HasPrefix(l, "btime ") {
				if v, err := strconv.ParseInt(strings.TrimSpace(l[6:]), 10, 64); err == nil {
					res["btime"] = v
				}
			}
		}
	}
	return res, nil
}

// stats reports guest-wide figures in the units docker's stats use:
// nanoseconds and bytes.
func stats() (map[string]any, error) {
	res := map[string]any{}
	st, err := os.ReadFile("/proc/stat")
	if err != nil {
		return nil, err
	}
	const nsPerTick = 1e9 / clkTck
	cpus := 0
	for _, l := range strings.Split(string(st), "\n") {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		if f[0] == "cpu" {
			// user nice system idle iowait irq softirq steal (guest time
			// is already counted in user).
			var total, idle uint64
			for i := 1; i < len(f) && i <= 8; i++ {
				v, _ := strconv.ParseUint(f[i], 10, 64)
				total += v
				if i == 4 || i == 5 {
					idle += v
				}
			}
			res["cpu_ns"] = (total - idle) * nsPerTick
			res["system_ns"] = total * nsPerTick
		} else if strings.HasPrefix(f[0], "cpu") {
			cpus++
		}
	}
	res["online_cpus"] = cpus
	mi, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return nil, err
	}
	keys := map[string]string{"MemTotal:": "mem_total", "MemFree:": "mem_free", "MemAvailable:": "mem_available", "Cached:": "mem_cache"}
	for _, l := range strings.Split(string(mi), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 {
			if k, ok := keys[f[0]]; ok {
				v, _ := strconv.ParseUint(f[1], 10, 64)
				res[k] = v * 1024
			}
		}
	}
	res["pids"] = len(containerProcs())
	return res, nil
}

// uptimeTicks is the guest's uptime in clock ticks, the unit of start_ticks.
func uptimeTicks() uint64 {
	data, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return uint64(v * clkTck)
}
