"""The same docker CLI commands against vicd and the reference dockerd 20.10: what a user sees.

Every command runs with the stock CLI (/usr/local/bin/docker 28) on both daemons; the CLI
negotiates API 1.41 with dockerd and vicd's own version with vicd. Containers are created with
``--network none`` on both sides (dockerd here has no bridge; vicd accepts and ignores it), so
the command lines are identical.

Container IDs differ between the daemons: outputs are compared with IDs replaced by ``<id>``.
Where the outputs legitimately differ, the comparison is narrowed and a comment says why.
Where vicd is wrong, the test is ``xfail(strict=True)`` with the difference in the reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from conftest import Vicd, configured_vicd
from refdockerd import RefDockerd, dockerd  # noqa: F401
from registry_fixture import OCILayout, Registry, registry, tar_bytes  # noqa: F401

NET = ("--network", "none")
_ID64 = re.compile(r"\b[0-9a-f]{64}\b")
_ID12 = re.compile(r"\b[0-9a-f]{12}\b")
_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ", re.M)


def norm(text: str) -> str:
    return _ID12.sub("<id>", _ID64.sub("<id>", text))


@dataclass
class Seen:
    """What the user sees of one CLI invocation, with IDs normalised."""
    rc: int
    out: str
    err: str

    @classmethod
    def of(cls, r: subprocess.CompletedProcess[str]) -> Seen:
        return cls(r.returncode, norm(r.stdout), norm(r.stderr))


@dataclass
class Both:
    vicd: Vicd
    ref: RefDockerd

    def run(self, *args: str, **kw: object) -> tuple[Seen, Seen]:
        """(vicd, dockerd) for one command; never raises on a non-zero exit."""
        v = self.vicd.docker(*args, check=False, **kw)  # type: ignore[arg-type]
        d = self.ref.docker(*args, check=False, **kw)  # type: ignore[arg-type]
        return Seen.of(v), Seen.of(d)

    def ok(self, *args: str) -> tuple[str, str]:
        """Both must succeed: (vicd stdout, dockerd stdout), raw."""
        return self.vicd.docker(*args).stdout, self.ref.docker(*args).stdout

    def rm(self, *names: str) -> None:
        for n in names:
            self.vicd.docker("rm", "-f", n, check=False)
            self.ref.docker("rm", "-f", n, check=False)


@pytest.fixture
def both(vicd: Vicd, dockerd: RefDockerd) -> Both:  # noqa: F811
    return Both(vicd, dockerd)


@pytest.fixture
def exited(both: Both) -> Iterator[str]:
    """A container that ran ``echo out; echo err >&2; exit 3`` on both daemons."""
    name = "rc-exited"
    both.rm(name)
    both.run("run", *NET, "--name", name, "busybox", "sh", "-c", "echo out; echo err >&2; exit 3")
    yield name
    both.rm(name)


@pytest.fixture
def running(both: Both) -> Iterator[str]:
    name = "rc-running"
    both.rm(name)
    both.ok("run", "-d", *NET, "--name", name, "busybox", "sleep", "300")
    yield name
    both.rm(name)


# --- run, wait, logs -----------------------------------------------------------------------


def test_run_exit_code_and_stream_split(both: Both):
    both.rm("rc-run")
    try:
        v, d = both.run("run", *NET, "--name", "rc-run", "busybox", "sh", "-c",
                        "echo out; echo err >&2; exit 3")
        assert d == Seen(3, "out\n", "err\n")
        assert v == d
    finally:
        both.rm("rc-run")


def test_run_rm_exit_code(both: Both):
    v, d = both.run("run", "--rm", *NET, "busybox", "sh", "-c", "exit 42")
    assert d == Seen(42, "", "")
    assert v == d


def test_wait_output(both: Both, exited: str):
    v, d = both.run("wait", exited)
    assert d == Seen(0, "3\n", "")
    assert v == d


def test_wait_blocks_until_exit(both: Both):
    both.rm("rc-wait")
    try:
        both.ok("run", "-d", *NET, "--name", "rc-wait", "busybox", "sh", "-c", "sleep 2; exit 5")
        v, d = both.run("wait", "rc-wait")
        assert d == Seen(0, "5\n", "")
        assert v == d
    finally:
        both.rm("rc-wait")


def test_logs_keep_streams_apart(both: Both, exited: str):
    v, d = both.run("logs", exited)
    assert d == Seen(0, "out\n", "err\n")
    assert v == d


@pytest.fixture
def five_lines(both: Both) -> Iterator[str]:
    # stdout only: the relative order of stdout and stderr lines is not deterministic on either
    # daemon (two pipes read concurrently), and --tail counts lines across both streams.
    name = "rc-lines"
    both.rm(name)
    both.ok("run", *NET, "--name", name, "busybox", "sh", "-c",
            "for i in 1 2 3 4 5; do echo line$i; done")
    yield name
    both.rm(name)


@pytest.mark.parametrize("tail", ["0", "1", "2", "5", "10", "all"])
def test_logs_tail(both: Both, five_lines: str, tail: str):
    v, d = both.run("logs", "--tail", tail, five_lines)
    assert d.rc == 0
    assert v == d


def test_logs_timestamps(both: Both, five_lines: str, exited: str):
    for args in (("-t", five_lines), ("-t", "--tail", "2", five_lines), ("-t", exited)):
        v, d = both.run("logs", *args)
        # Timestamps differ; their format (RFC 3339, 9 fixed fraction digits, "Z", one space)
        # must not: _TS only matches that exact shape.
        assert d.out and all(_TS.match(line) for line in d.out.splitlines(keepends=True))
        assert all(_TS.match(line) for line in v.out.splitlines(keepends=True)), v.out
        assert all(_TS.match(line) for line in v.err.splitlines(keepends=True)), v.err
        strip = lambda s: _TS.sub("", s)  # noqa: E731
        assert (v.rc, strip(v.out), strip(v.err)) == (d.rc, strip(d.out), strip(d.err))


# --- errors --------------------------------------------------------------------------------


def test_inspect_missing(both: Both):
    v, d = both.run("inspect", "rc-nosuch")
    assert d == Seen(1, "[]\n", "Error: No such object: rc-nosuch\n")
    assert v == d


def test_create_name_in_use(both: Both, exited: str):
    v, d = both.run("create", *NET, "--name", exited, "busybox", "true")
    assert d.rc == 1 and "is already in use by container" in d.err
    assert v == d


def test_rm_running(both: Both, running: str):
    v, d = both.run("rm", running)
    assert d.rc == 1 and "You cannot remove a running container <id>" in d.err
    assert v == d


def test_start_missing(both: Both):
    v, d = both.run("start", "rc-nosuch")
    assert d == Seen(1, "", "Error response from daemon: No such container: rc-nosuch\n"
                            "Error: failed to start containers: rc-nosuch\n")
    assert v == d


def test_ps_bad_filter(both: Both):
    v, d = both.run("ps", "--filter", "foo=bar")
    assert d == Seen(1, "", "Error response from daemon: Invalid filter 'foo'\n")
    assert v == d


def test_kill_stopped(both: Both, exited: str):
    v, d = both.run("kill", exited)
    assert d == Seen(1, "", "Error response from daemon: Cannot kill container: rc-exited: "
                            "Container <id> is not running\n")
    assert v == d


@pytest.mark.parametrize("policy", [
    "bogus",
    "on-failure:-1",
    "always:3",
    "unless-stopped:2",
])
def test_bad_restart_policy(both: Both, policy: str):
    v, d = both.run("create", *NET, "--restart", policy, "busybox", "true")
    assert d.rc == 1 and d.err.startswith("Error response from daemon: ")
    assert v == d


def test_exec_in_stopped_container(both: Both, exited: str):
    v, d = both.run("exec", exited, "echo", "hi")
    assert d == Seen(1, "", "Error response from daemon: Container <id> is not running\n")
    assert v == d


# --- ps columns ------------------------------------------------------------------------------

# Every placeholder `docker ps --format` knows except .Size (below) and .Platform (API 1.46+).
PS_FIELDS = ["ID", "Image", "Command", "CreatedAt", "RunningFor", "Ports", "Status", "Names",
             "Labels", "Mounts", "Networks", "State", "LocalVolumes"]


def _ps_line(daemon: Vicd | RefDockerd, name: str, fmt: str) -> str:
    out = daemon.docker("ps", "-a", "--no-trunc", "--filter", f"name={name}",
                        "--format", fmt).stdout
    assert out.count("\n") == 1, out
    return out.strip()


def test_ps_columns(both: Both, exited: str, running: str):
    # The default table header (column widths follow the content, so compare the titles).
    v, d = both.ok("ps", "-a")
    titles = lambda out: re.split(r"\s{2,}", out.splitlines()[0].strip())  # noqa: E731
    assert titles(d) == ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]
    assert titles(v) == titles(d)
    # The JSON form: same keys. (Platform is null on both: the CLI fills it from API >= 1.46 only,
    # and both answer without it here.)
    for name in (exited, running):
        vj = json.loads(_ps_line(both.vicd, name, "{{json .}}"))
        dj = json.loads(_ps_line(both.ref, name, "{{json .}}"))
        assert sorted(vj) == sorted(dj)
    fmt = "|".join("{{." + f + "}}" for f in PS_FIELDS)
    for name, state in ((exited, "exited"), (running, "running")):
        vf = dict(zip(PS_FIELDS, _ps_line(both.vicd, name, fmt).split("|"), strict=True))
        df = dict(zip(PS_FIELDS, _ps_line(both.ref, name, fmt).split("|"), strict=True))
        assert df["State"] == state and df["Names"] == name
        # Times and IDs differ; the fields that describe the container must not.
        for f in ("Image", "Command", "Ports", "Names", "Labels", "Mounts", "Networks", "State",
                  "LocalVolumes"):
            assert vf[f] == df[f], f
        # Status: "Exited (3) 2 seconds ago" / "Up 3 seconds": compare the part before the age.
        assert vf["Status"].split(" ")[0:2 if state == "exited" else 1] == \
            df["Status"].split(" ")[0:2 if state == "exited" else 1]
        assert len(vf["ID"]) == len(df["ID"]) == 64
        for f in ("CreatedAt", "RunningFor"):
            assert vf[f] and vf[f] != "<no value>", f


def test_ps_size_column(both: Both, exited: str):
    v = _ps_line(both.vicd, exited, "{{.Size}}")
    d = _ps_line(both.ref, exited, "{{.Size}}")
    assert d.startswith("0B (virtual ")
    # The rootfs sizes need not be byte-identical (different stores); the shape must match.
    # vicd's SizeRw is block-level (what the container's qcow2 overlay holds, ext4 journal
    # and metadata included), so a container that wrote no file still shows a few hundred kB.
    assert re.fullmatch(r"\d[\d.]*[kMG]?B \(virtual \d[\d.]*[kMG]?B\)", v), v


def test_ps_filter_name_anchored(both: Both, exited: str):
    v, d = both.run("ps", "-a", "--filter", f"name=^{exited}$", "--format", "{{.Names}}")
    assert d == Seen(0, f"{exited}\n", "")
    assert v == d


# --- events ----------------------------------------------------------------------------------


def test_events_since_until_for_a_run(both: Both):
    name = "rc-ev"
    both.rm(name)
    since = str(int(time.time()) - 1)
    both.run("run", *NET, "--name", name, "busybox", "sh", "-c", "exit 4")
    both.ok("rm", name)
    until = str(int(time.time()) + 1)
    fmt = "{{.Type}} {{.Action}} {{.Actor.Attributes.name}} {{.Actor.Attributes.exitCode}}"
    v, d = both.ok("events", "--since", since, "--until", until, "--format", fmt)
    # dockerd also reports `network connect`/`network disconnect` for the "none" network
    # (libnetwork); vicd has no networks. Compare the container events of this container.
    pick = lambda out: [ln for ln in out.splitlines()  # noqa: E731
                        if ln.startswith("container ") and ln.split()[2] == name]
    assert pick(d) == [f"container {a} {name} {'4' if a == 'die' else '<no value>'}"
                       for a in ("create", "attach", "start", "die", "destroy")]
    assert pick(v) == pick(d)


# --- images ----------------------------------------------------------------------------------


IMGF = ("imgf-a:1", "imgf-b:1", "imgf-b:2", "imgf-c:1")


@pytest.fixture
def imgf(both: Both, busybox_tar: Path) -> Iterator[None]:
    """On both daemons, in this order: imgf-a:1 (LABEL tier=base), imgf-b:1 = imgf-b:2
    (LABEL tier=app), imgf-c:1 (no label)."""
    for d in (both.vicd, both.ref):
        d.docker("import", "--change", "LABEL tier=base", str(busybox_tar), "imgf-a:1")
        d.docker("import", "--change", "LABEL tier=app", str(busybox_tar), "imgf-b:1")
        d.docker("tag", "imgf-b:1", "imgf-b:2")
        d.docker("import", str(busybox_tar), "imgf-c:1")
    yield
    both.rm("imgf-user")
    for d in (both.vicd, both.ref):
        d.docker("rmi", "-f", *IMGF, check=False)


@pytest.mark.parametrize("filters", [("before=imgf-c:1",), ("since=imgf-a:1",), ("label=tier",),
                                     ("label=tier=app",), ("label=tier", "since=imgf-a:1"),
                                     ("dangling=false",)])
def test_images_filters(both: Both, imgf: None, filters: tuple[str, ...]):
    args = [x for f in filters for x in ("--filter", f)]
    v, d = both.run("images", "--filter", "reference=imgf-*", *args,
                    "--format", "{{.Repository}}:{{.Tag}}")
    assert d.rc == 0 and d.out.strip()
    # dockerd sorts by Created in whole seconds: images made in the same second come in any
    # order, so compare the sets of lines
    assert (v.rc, sorted(v.out.splitlines()), v.err) == (d.rc, sorted(d.out.splitlines()), d.err)


@pytest.mark.parametrize("bad", ["before=nosuch:1", "label!=tier", "dangling=maybe", "foo=bar"])
def test_images_bad_filters(both: Both, bad: str):
    v, d = both.run("images", "--filter", bad)
    assert d.rc == 1 and d.err
    assert v == d


def test_rmi_conflicts_and_prune_all(both: Both, imgf: None):
    """rmi of an image a (stopped) container uses, by tag and by ID; by ID when it has two
    tags; then `image prune -a` limited by a label: dockerd's texts and statuses."""
    both.ok("create", *NET, "--name", "imgf-user", "imgf-a:1", "true")

    def each(*args: str) -> tuple[Seen, Seen]:
        """The same command, with `{a}`/`{b}` replaced by each daemon's image IDs."""
        out = []
        for d in (both.vicd, both.ref):
            ids = {k: d.docker("images", "-q", f"imgf-{k}:1").stdout.strip() for k in "ab"}
            out.append(Seen.of(d.docker(*(x.format(**ids) for x in args), check=False)))
        return out[0], out[1]

    for args in (("rmi", "imgf-a:1"), ("rmi", "{a}"), ("rmi", "{b}")):
        v, d = each(*args)
        assert d.rc == 1 and "conflict: unable to" in d.err, (args, d)
        assert v == d, args
    both.ok("rm", "imgf-user")
    v, d = both.run("image", "prune", "-a", "-f", "--filter", "label=tier=base")
    assert d.out.startswith("Deleted Images:\nuntagged: imgf-a:1\ndeleted: sha256:<id>\n")
    assert v == d
    v, d = each("rmi", "-f", "{b}")
    assert d == Seen(0, "Untagged: imgf-b:1\nUntagged: imgf-b:2\nDeleted: sha256:<id>\n", "")
    assert v == d


def test_load_progress_stream(both: Both, tmp_path: Path):
    """POST /images/load without quiet: `Loading layer` lines with dockerd's bar for a layer
    the daemon lacks, none for one it has, then the `Loaded image` stream line."""
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tf:
        ti = tarfile.TarInfo("random.bin")
        ti.size = 300_000
        tf.addfile(ti, io.BytesIO(os.urandom(ti.size)))
    streams = []
    for name, d in (("vicd", both.vicd), ("dockerd", both.ref)):
        archive = tmp_path / f"{name}.tar"
        d.docker("import", str(layer), "loadme:1")
        d.docker("save", "-o", str(archive), "loadme:1")
        d.docker("rmi", "loadme:1")
        api = docker.APIClient(base_url=d.host, version="1.41")
        first = list(api.load_image(archive.read_bytes(), quiet=False))
        again = list(api.load_image(archive.read_bytes(), quiet=False))
        d.docker("rmi", "loadme:1")
        streams.append((first, again))
    (v, v_again), (d, d_again) = streams
    assert v_again == d_again == [{"stream": "Loaded image: loadme:1\n"}]
    for items in (v, d):
        *loading, last = items
        assert last == {"stream": "Loaded image: loadme:1\n"}
        assert loading and all(i["status"] == "Loading layer" and len(i["id"]) == 12
                               and i["progress"].startswith("[") for i in loading)
        detail = loading[-1]["progressDetail"]
        assert detail["current"] == detail["total"] > 300_000
    assert v[-2:] == d[-2:]  # same layer: the same final bar, word for word


def test_saved_by_dockerd_runs_on_vicd_and_back(both: Both, tmp_path: Path):
    """A two-layer image made by dockerd (commit over busybox): `docker save` there, `load`
    and run on vicd; vicd's `save` of it loads and runs on dockerd, with the same ID."""
    both.rm("rt-src")
    both.ref.docker("run", *NET, "--name", "rt-src", "busybox", "sh", "-c",
                    "echo from-dockerd > /hello")
    both.ref.docker("commit", "-c", 'CMD ["cat", "/hello"]', "rt-src", "rt-saved:1")
    both.rm("rt-src")
    image_id = both.ref.docker("images", "-q", "--no-trunc", "rt-saved:1").stdout.strip()
    theirs, ours = tmp_path / "dockerd.tar", tmp_path / "vicd.tar"
    both.ref.docker("save", "-o", str(theirs), "rt-saved:1")
    try:
        assert "Loaded image: rt-saved:1" in both.vicd.docker("load", "-i", str(theirs)).stdout
        assert both.vicd.inspect("rt-saved:1")["Id"] == image_id
        assert both.vicd.docker("run", "--rm", "rt-saved:1").stdout == "from-dockerd\n"
        both.vicd.docker("save", "-o", str(ours), "rt-saved:1")
        both.ref.docker("rmi", "rt-saved:1")
        assert "Loaded image: rt-saved:1" in both.ref.docker("load", "-i", str(ours)).stdout
        assert both.ref.docker("images", "-q", "--no-trunc", "rt-saved:1").stdout.strip() == \
            image_id
        assert both.ref.docker("run", "--rm", *NET, "rt-saved:1").stdout == "from-dockerd\n"
    finally:
        for d in (both.vicd, both.ref):
            d.docker("rmi", "rt-saved:1", check=False)


def test_push_output(both: Both, registry: Registry):  # noqa: F811
    """`docker push` of a fresh two-layer image as the CLI prints it (no terminal): the same
    lines from both daemons (repository names and digests aside), then a push of it again."""
    outs = []
    for name, d in (("vicd", both.vicd), ("dockerd", both.ref)):
        ref = f"{registry.host}/rc-push-{name}:1"
        d.docker("rm", "-f", "rc-push", check=False)
        d.docker("run", *NET, "--name", "rc-push", "busybox", "sh", "-c",
                 f"echo {name} > /pushed")
        d.docker("commit", "rc-push", ref)
        d.docker("rm", "rc-push")
        first = Seen.of(d.docker("push", ref))
        again = Seen.of(d.docker("push", ref))
        d.docker("rmi", ref)
        # the layers' gzip streams (so the manifests' sizes) may differ by a few bytes
        outs.append([(s.rc, re.sub(r"size: \d+", "size: N", s.out.replace(name, "NAME")), s.err)
                     for s in (first, again)])
    assert outs[0] == outs[1]
    first_out = outs[1][0][1].splitlines()
    assert first_out[0] == f"The push refers to repository [{registry.host}/rc-push-NAME]"
    assert "<id>: Pushed" in first_out and first_out[-1].startswith("1: digest: sha256:<id>")


def _non_loopback_ipv4() -> str | None:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return next((a for a in out if "." in a and not a.startswith("127.")), None)


def test_plain_http_only_for_loopback_or_configured(both: Both, tmp_path: Path,
                                                    busybox_tar: Path):
    """A registry speaking plain HTTP on a non-loopback address: refused with dockerd's words
    unless it is in `insecure_registries`; a push of a tag that does not exist fails in the
    stream, after the `The push refers to` line, as on dockerd."""
    addr = _non_loopback_ipv4()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address here")
    reg = Registry(tmp_path / "reg", addr=addr)
    reg.start()
    allowed = None
    try:
        ref = f"{reg.host}/plain:1"
        v, d = both.run("pull", ref)
        assert d.rc == 1 and (f'Get "https://{reg.host}/v2/": http: server gave HTTP response '
                              "to HTTPS client") in d.err
        assert v == d
        v, d = both.run("push", f"{reg.host}/nosuchtag:1")
        assert d == Seen(1, f"The push refers to repository [{reg.host}/nosuchtag]\n",
                         f"An image does not exist locally with the tag: {reg.host}/nosuchtag\n")
        assert v == d

        (tmp_path / "v").mkdir()
        allowed = configured_vicd(tmp_path / "v", f'insecure_registries = ["{reg.host}"]\n')
        allowed.docker("import", str(busybox_tar), ref)
        assert "Pushed" in allowed.docker("push", ref).stdout
        allowed.docker("rmi", ref)
        assert "Downloaded newer image" in allowed.docker("pull", ref).stdout
    finally:
        if allowed is not None:
            allowed.stop()
        reg.stop()


def test_pulled_image_inspect_and_history(both: Both, registry: Registry,  # noqa: F811
                                          busybox_tar: Path, tmp_path: Path):
    """The same image pulled by both daemons: inspect's fields and `docker history` agree."""
    oci = OCILayout(tmp_path / "oci")
    extra = tar_bytes({"etc/extra.txt": b"extra\n"})
    oci.tag(oci.image([busybox_tar.read_bytes(), extra], cmd=["cat", "/etc/extra.txt"]), "i")
    registry.skopeo_copy(tmp_path / "oci", "i", "rc-inspect:1")
    ref = f"{registry.host}/rc-inspect:1"
    fields = ("{{.Id}} {{.RepoTags}} {{.RepoDigests}} {{.RootFS.Layers}} {{.Architecture}} "
              "{{.Os}} {{.Size}} {{json .Config.Cmd}} {{json .Config.Env}} {{.Created}}")
    try:
        both.ok("pull", ref)
        v, d = both.ok("image", "inspect", "--format", fields, ref)
        assert v == d
        v, d = both.ok("history", "--no-trunc", "--format",
                       "{{.ID}} {{.CreatedBy}} {{.Size}} {{.Comment}}", ref)
        assert len(d.splitlines()) == 2
        assert v == d
    finally:
        for dd in (both.vicd, both.ref):
            dd.docker("rmi", ref, check=False)
