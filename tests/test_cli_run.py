"""End to end: the stock docker CLI against vicd, every container a real QEMU VM."""

from __future__ import annotations

import json
import os
import platform
import pty
import re
import select
import subprocess
import time

from conftest import DOCKER, Vicd


def test_version_and_info(vicd: Vicd):
    out = vicd.docker("version", "--format", "{{json .}}").stdout
    v = json.loads(out)
    assert v["Server"]["ApiVersion"] == "1.47"
    assert v["Server"]["MinAPIVersion"] == "1.24"
    info = json.loads(vicd.docker("info", "--format", "{{json .}}").stdout)
    status = dict(info["DriverStatus"])
    assert status["Backend"] == "microvm"
    assert status["Accelerator"] in ("tcg", "kvm")
    assert info["KernelVersion"] != platform.release()
    assert info["Images"] >= 1
    plugins = [v for k, v in info["DriverStatus"] if k == "Plugin"]
    assert any(p.startswith("microvm ") for p in plugins), plugins


def test_run_echo_in_a_vm_with_its_own_kernel(vicd: Vicd):
    r = vicd.docker("run", "--rm", "busybox", "echo", "hello")
    assert r.stdout == "hello\n"
    kernel = vicd.docker("run", "--rm", "busybox", "uname", "-r").stdout.strip()
    assert kernel and kernel != platform.release()
    guest = json.loads(vicd.docker("info", "--format", "{{json .}}").stdout)["KernelVersion"]
    assert kernel == guest


def test_exit_code_and_streams_apart(vicd: Vicd):
    r = vicd.docker("run", "--name", "t-exit", "busybox", "sh", "-c",
                    "echo out; echo err >&2; exit 3", check=False)
    assert r.returncode == 3
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"
    assert vicd.docker("wait", "t-exit").stdout.strip() == "3"
    state = vicd.inspect("t-exit")["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 3
    logs = vicd.docker("logs", "t-exit")
    assert logs.stdout == "out\n" and logs.stderr == "err\n"
    vicd.docker("rm", "t-exit")


def test_create_options_reach_the_process(vicd: Vicd, tmp_path):
    envfile = tmp_path / "env"
    envfile.write_text("FROMFILE=yes\n# comment\n")
    r = vicd.docker(
        "run", "--rm", "-e", "A=1", "--env-file", str(envfile), "-w", "/tmp", "-u", "65534",
        "--hostname", "vmhost", "--label", "k=v", "busybox", "sh", "-c",
        'echo "$A $FROMFILE $(pwd) $(id -u) $(hostname)"',
    )
    assert r.stdout.strip() == "1 yes /tmp 65534 vmhost"
    r = vicd.docker("run", "--rm", "--entrypoint", "/bin/echo", "busybox", "via", "entrypoint")
    assert r.stdout == "via entrypoint\n"


def test_stdin_piped(vicd: Vicd):
    r = vicd.docker("run", "--rm", "-i", "busybox", "sh", "-c", "tr a-z A-Z",
                    input=b"hello vm\n")
    assert r.stdout == "HELLO VM\n"


def test_tty_without_terminal(vicd: Vicd):
    r = vicd.docker("run", "--rm", "-t", "busybox", "sh", "-c", "tty; echo done")
    assert "/dev/pts/" in r.stdout
    assert "done\r\n" in r.stdout


def test_memory_and_cpus_size_the_vm(vicd: Vicd):
    r = vicd.docker("run", "--rm", "-m", "200m", "--cpus", "2", "busybox", "sh", "-c",
                    "grep MemTotal /proc/meminfo; nproc")
    lines = r.stdout.split("\n")
    mem_kb = int(lines[0].split()[1])
    assert 150_000 < mem_kb <= 205_000
    assert lines[1].strip() == "2"


def test_missing_command_exits_127(vicd: Vicd):
    r = vicd.docker("run", "--rm", "busybox", "nosuchcmd", check=False)
    assert r.returncode == 127
    assert "executable file not found" in r.stderr


def test_detached_lifecycle(vicd: Vicd):
    cid = vicd.docker("run", "-d", "--name", "life", "busybox", "sh", "-c",
                      "trap 'echo got-term; exit 7' TERM; echo started; "
                      "while true; do sleep 0.2; done").stdout.strip()
    assert len(cid) == 64
    _wait_log(vicd, "life", "started")
    ps = vicd.docker("ps", "--format", "{{.Names}} {{.Status}}").stdout
    assert "life Up" in ps
    vicd.docker("pause", "life")
    assert vicd.inspect("life")["State"]["Paused"] is True
    assert "(Paused)" in vicd.docker("ps", "--filter", "name=life", "--format",
                                     "{{.Status}}").stdout
    vicd.docker("unpause", "life")
    vicd.docker("stop", "-t", "5", "life")
    state = vicd.inspect("life")["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 7
    assert "got-term" in vicd.docker("logs", "life").stdout
    vicd.docker("start", "life")
    assert vicd.inspect("life")["State"]["Running"] is True
    vicd.docker("rename", "life", "life2")
    vicd.docker("kill", "-s", "KILL", "life2")
    assert vicd.docker("wait", "life2").stdout.strip() == "137"
    vicd.docker("restart", "-t", "1", "life2")
    assert vicd.inspect("life2")["State"]["Running"] is True
    r = vicd.docker("rm", "life2", check=False)
    assert r.returncode != 0 and "cannot remove a running container" in r.stderr
    vicd.docker("rm", "-f", "life2")
    r = vicd.docker("inspect", "life2", check=False)
    assert r.returncode == 1 and "No such object" in r.stderr


def test_kill_with_signal_reaches_process(vicd: Vicd):
    vicd.docker("run", "-d", "--name", "sig", "busybox", "sh", "-c",
                "trap 'echo usr1' USR1; echo ready; while true; do sleep 0.2; done")
    _wait_log(vicd, "sig", "ready")
    vicd.docker("kill", "-s", "USR1", "sig")
    _wait_log(vicd, "sig", "usr1")
    assert vicd.inspect("sig")["State"]["Running"] is True
    vicd.docker("rm", "-f", "sig")


def test_stop_signal_and_timeout_escalate_to_kill(vicd: Vicd):
    vicd.docker("run", "-d", "--name", "stubborn", "--stop-signal", "USR2", "--stop-timeout",
                "1", "busybox", "sh", "-c",
                "trap 'echo ignoring' USR2; echo ready; while true; do sleep 0.2; done")
    _wait_log(vicd, "stubborn", "ready")
    t0 = time.monotonic()
    vicd.docker("stop", "stubborn")
    assert time.monotonic() - t0 < 15
    st = vicd.inspect("stubborn")["State"]
    assert st["ExitCode"] == 137
    assert "ignoring" in vicd.docker("logs", "stubborn").stdout
    vicd.docker("rm", "stubborn")


def test_restart_policy_on_failure(vicd: Vicd):
    vicd.docker("run", "-d", "--name", "flaky", "--restart", "on-failure:2", "busybox",
                "sh", "-c", "echo run; exit 1")
    deadline = time.time() + 120
    while time.time() < deadline:
        info = vicd.inspect("flaky")
        if info["RestartCount"] == 2 and info["State"]["Status"] == "exited":
            break
        time.sleep(0.5)
    assert info["RestartCount"] == 2
    assert info["State"]["ExitCode"] == 1
    assert vicd.docker("logs", "flaky").stdout.count("run") == 3
    vicd.docker("rm", "flaky")


def test_ps_filters_and_formats(vicd: Vicd):
    a = vicd.docker("create", "--name", "pa", "--label", "team=x", "busybox", "true"
                    ).stdout.strip()
    vicd.docker("run", "--name", "pb", "busybox", "sh", "-c", "exit 2", check=False)
    names = vicd.docker("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert "pa" in names and "pb" in names
    assert vicd.docker("ps", "-a", "-q", "--no-trunc", "--filter", "label=team=x"
                       ).stdout.split() == [a]
    assert vicd.docker("ps", "-a", "--filter", "status=created", "--format", "{{.Names}}"
                       ).stdout.split() == ["pa"]
    assert vicd.docker("ps", "-a", "--filter", "exited=2", "--format", "{{.Names}}"
                       ).stdout.split() == ["pb"]
    assert vicd.docker("ps", "-a", "--filter", "id=" + a[:10], "-q").stdout.split() == [a[:12]]
    assert "pb" in vicd.docker("ps", "-a", "--filter", "ancestor=busybox", "--format",
                               "{{.Names}}").stdout
    assert len(vicd.docker("ps", "-a", "-n", "1", "-q").stdout.split()) == 1
    assert vicd.docker("ps", "-a", "--filter", "name=^/pa$", "--format", "{{.Names}}"
                       ).stdout.split() == ["pa"]
    r = vicd.docker("ps", "--filter", "foo=bar", check=False)
    assert r.returncode != 0 and "Invalid filter 'foo'" in r.stderr
    vicd.docker("rm", "pa", "pb")


def test_exec(vicd: Vicd):
    vicd.docker("run", "-d", "--name", "ex", "-e", "BASE=1", "busybox", "sleep", "300")
    r = vicd.docker("exec", "-e", "X=2", "-w", "/tmp", "-u", "65534", "ex", "sh", "-c",
                    'echo "$BASE $X $(pwd) $(id -u)"')
    assert r.stdout.strip() == "1 2 /tmp 65534"
    r = vicd.docker("exec", "ex", "sh", "-c", "exit 5", check=False)
    assert r.returncode == 5
    r = vicd.docker("exec", "-t", "ex", "tty")
    assert "/dev/pts/" in r.stdout
    r = vicd.docker("exec", "-i", "ex", "cat", input=b"through exec\n")
    assert r.stdout == "through exec\n"
    top = vicd.docker("top", "ex").stdout
    assert "sleep 300" in top
    stats = json.loads(vicd.docker("stats", "--no-stream", "--format", "{{json .}}", "ex"
                                   ).stdout)
    assert stats["Name"] == "ex"
    assert "MiB" in stats["MemUsage"]
    vicd.docker("rm", "-f", "ex")
    r = vicd.docker("exec", "ex", "true", check=False)
    assert r.returncode != 0 and "No such container" in r.stderr


def test_logs_options(vicd: Vicd):
    # stdout and stderr travel apart, so their relative order is only certain
    # with a pause between them (on dockerd too).
    vicd.docker("run", "--name", "lg", "busybox", "sh", "-c",
                "echo e >&2; sleep 0.5; for i in 1 2 3 4 5; do echo line$i; done")
    tail = vicd.docker("logs", "--tail", "2", "lg")
    assert (tail.stdout, tail.stderr) == ("line4\nline5\n", "")
    tail = vicd.docker("logs", "--tail", "6", "lg")  # --tail counts both streams
    assert (tail.stdout.count("line"), tail.stderr) == (5, "e\n")
    ts = vicd.docker("logs", "-t", "lg").stdout.split("\n")[0]
    assert ts.endswith(" line1") and ts[:4].isdigit()
    assert vicd.docker("logs", "--until", "2000-01-01T00:00:00Z", "lg").stdout == ""
    assert "line1" in vicd.docker("logs", "--since", "2000-01-01T00:00:00Z", "lg").stdout
    vicd.docker("rm", "lg")


def test_logs_follow(vicd: Vicd):
    vicd.docker("run", "-d", "--name", "fl", "busybox", "sh", "-c",
                "echo a; sleep 2; echo b")
    r = vicd.docker("logs", "-f", "fl", timeout=60)
    assert r.stdout == "a\nb\n"
    vicd.docker("rm", "fl")


def test_interactive_tty_shell(vicd: Vicd):
    pid, fd = pty.fork()
    if pid == 0:
        env = {**os.environ, "DOCKER_HOST": vicd.host, "TERM": "xterm"}
        os.execve(DOCKER, [DOCKER, "run", "-it", "--rm", "busybox", "sh"], env)
    out = b""
    deadline = time.time() + 90
    sent = False
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if not sent and b"# " in out:
            os.write(fd, b"echo in-$((6*7)); exit\r")
            sent = True
    _, status = os.waitpid(pid, 0)
    assert b"in-42" in out, out
    assert os.waitstatus_to_exitcode(status) == 0


def test_errors_look_like_dockerd(vicd: Vicd):
    r = vicd.docker("start", "nosuch", check=False)
    assert r.returncode == 1 and "No such container: nosuch" in r.stderr
    vicd.docker("create", "--name", "dup", "busybox", "true")
    r = vicd.docker("create", "--name", "dup", "busybox", "true", check=False)
    assert r.returncode == 1 and "is already in use" in r.stderr
    r = vicd.docker("create", "--name", "bad name!", "busybox", "true", check=False)
    assert "Invalid container name" in r.stderr
    r = vicd.docker("run", "--restart", "always", "--rm", "busybox", "true", check=False)
    assert r.returncode != 0
    vicd.docker("rm", "dup")
    r = vicd.docker("run", "--rm", "nosuchimage", check=False)
    assert r.returncode == 125


def test_events_stream(vicd: Vicd):
    since = str(int(time.time()) - 1)
    vicd.docker("run", "--name", "evt", "busybox", "true")
    vicd.docker("rm", "evt")
    until = str(int(time.time()) + 1)
    out = vicd.docker("events", "--since", since, "--until", until, "--filter",
                      "container=evt", "--format", "{{.Action}}").stdout.split()
    for action in ("create", "attach", "start", "die", "destroy"):
        assert action in out, out


def test_container_prune(vicd: Vicd):
    cid = vicd.docker("create", "busybox", "true").stdout.strip()
    out = vicd.docker("container", "prune", "-f").stdout
    assert cid in out
    r = vicd.docker("inspect", cid, check=False)
    assert r.returncode == 1


def _wait_log(vicd: Vicd, name: str, text: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in vicd.docker("logs", name).stdout:
            return
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared in the logs of {name}")


def test_docker_python_sdk(vicd: Vicd):
    import docker

    client = docker.DockerClient(base_url=vicd.host)
    assert client.ping()
    out = client.containers.run("busybox", ["echo", "from-sdk"], remove=True)
    assert out == b"from-sdk\n"
    c = client.containers.run("busybox", ["sleep", "300"], detach=True, name="sdk")
    code, output = c.exec_run(["sh", "-c", "echo exec-out; exit 4"])
    assert code == 4 and output == b"exec-out\n"
    c.kill()
    assert c.wait()["StatusCode"] == 137
    c.remove()


def test_stats_streams_with_the_stock_cli(vicd: Vicd):
    """`docker stats` without --no-stream keeps printing until it is stopped."""
    vicd.docker("run", "-d", "--name", "st", "busybox", "sh", "-c", "while :; do :; done")
    try:
        r = subprocess.run(
            # The stock CLI may outlive SIGINT/SIGTERM while streaming (on dockerd too): -k.
            ["timeout", "-s", "INT", "-k", "2", "8", DOCKER, "stats", "--format",
             "{{.Name}} {{.CPUPerc}} {{.MemUsage}} {{.PIDs}}", "st"],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "DOCKER_HOST": vicd.host})
        assert r.returncode in (124, -9), r.stderr  # still streaming when it was stopped
        # each refresh clears the screen (escape sequences) and prints the row again
        rows = re.findall(r"(?:^|\x1b\[[0-9;]*[A-Za-z])st ([\d.]+)% ([\d.]+)[KMG]iB / \S+ (\d+)",
                          r.stdout, re.M)
        assert len(rows) >= 3, r.stdout
        # after the first row (no previous sample yet) the busy loop shows
        assert any(float(cpu) > 10 for cpu, _, _ in rows[1:])
        assert all(float(used) > 0 and int(pids) >= 1 for _, used, pids in rows)
        # Without names: every running container, and one started meanwhile (events).
        env = {**os.environ, "DOCKER_HOST": vicd.host}
        with subprocess.Popen(["timeout", "-s", "INT", "-k", "2", "15", DOCKER, "stats",
                               "--format", "{{.Name}} {{.MemUsage}}"],
                              stdout=subprocess.PIPE, text=True, env=env) as p:
            time.sleep(3)
            vicd.docker("run", "-d", "--name", "st2", "busybox", "sleep", "300")
            out = p.communicate(timeout=60)[0]
        assert re.search(r"st [\d.]+MiB", out) and re.search(r"st2 [\d.]+MiB", out), out[-2000:]
    finally:
        vicd.docker("rm", "-f", "st", "st2", check=False)
