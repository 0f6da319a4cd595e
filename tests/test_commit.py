"""docker diff and docker commit with the stock CLI, compared with the reference dockerd;
a committed image saved from vicd loads and runs on dockerd."""

from __future__ import annotations

import json
import uuid

from conftest import Vicd
from refdockerd import RefDockerd, dockerd  # noqa: F401

SCRIPT = ("touch /tmp/new; mkdir -p /tmp/nd/x; echo hi > /tmp/nd/x/f; rm /etc/group; "
          "rm -r /home; echo extra >> /etc/passwd; ln -s /tmp/new /tmp/lnk; ")


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_diff_matches_dockerd(vicd: Vicd, dockerd: RefDockerd):  # noqa: F811
    v, d = _name("diff"), _name("diff")
    vicd.docker("run", "--name", v, "busybox", "sh", "-c", SCRIPT)
    dockerd.docker("run", "--network", "none", "--name", d, "busybox", "sh", "-c", SCRIPT)
    try:
        got = set(vicd.docker("diff", v).stdout.splitlines())
        want = set(dockerd.docker("diff", d).stdout.splitlines())
        assert got == want
        assert "D /etc/group" in got and "A /tmp/nd/x/f" in got and "C /etc/passwd" in got
    finally:
        vicd.docker("rm", "-f", v, check=False)
        dockerd.docker("rm", "-f", d, check=False)


def test_commit_running_with_changes(vicd: Vicd, tmp_path, dockerd: RefDockerd):  # noqa: F811
    name = _name("commit")
    repo = f"committed-{uuid.uuid4().hex[:6]}"
    vicd.docker("run", "-d", "--name", name, "busybox", "sh", "-c", SCRIPT + "sleep 1000")
    try:
        for _ in range(50):
            if "A /tmp/lnk" in vicd.docker("diff", name).stdout:
                break
        image_id = vicd.docker(
            "commit", "--pause", "-m", "a message", "-a", "Someone <s@example.com>",
            "-c", "ENV FOO=bar", "-c", 'CMD ["cat", "/tmp/nd/x/f"]', "-c", "WORKDIR /tmp",
            name, f"{repo}:v1").stdout.strip()
        assert image_id.startswith("sha256:")
        # The container still runs (it was paused only during the commit).
        assert vicd.inspect(name)["State"]["Running"]
    finally:
        vicd.docker("rm", "-f", name, check=False)
    img = json.loads(vicd.docker("image", "inspect", f"{repo}:v1").stdout)[0]
    assert img["Author"] == "Someone <s@example.com>" and img["Comment"] == "a message"
    assert img["Config"]["Cmd"] == ["cat", "/tmp/nd/x/f"]
    assert "FOO=bar" in img["Config"]["Env"] and img["Config"]["WorkingDir"] == "/tmp"
    base = json.loads(vicd.docker("image", "inspect", "busybox").stdout)[0]
    assert len(img["RootFS"]["Layers"]) == len(base["RootFS"]["Layers"]) + 1
    assert vicd.docker("run", "--rm", f"{repo}:v1").stdout == "hi\n"
    check = ("ls /etc/group /home 2>&1; tail -n1 /etc/passwd; readlink /tmp/lnk; "
             "echo $FOO; pwd")
    out = vicd.docker("run", "--rm", f"{repo}:v1", "sh", "-c", check).stdout.splitlines()
    assert "No such file" in out[0] and "No such file" in out[1]
    assert out[2:] == ["extra", "/tmp/new", "bar", "/tmp"]
    # The new layer holds exactly the changes (whiteouts for the deletions).
    saved = tmp_path / "img.tar"
    vicd.docker("save", "-o", str(saved), f"{repo}:v1")
    # It loads into the reference dockerd and runs there the same.
    dockerd.docker("load", "-i", str(saved))
    try:
        assert dockerd.docker("run", "--rm", "--network", "none", f"{repo}:v1").stdout == "hi\n"
        out = dockerd.docker("run", "--rm", "--network", "none", f"{repo}:v1", "sh", "-c",
                             check).stdout.splitlines()
        assert out[2:] == ["extra", "/tmp/new", "bar", "/tmp"]
        assert "No such file" in out[0] and "No such file" in out[1]
    finally:
        dockerd.docker("rmi", "-f", f"{repo}:v1", check=False)
        vicd.docker("rmi", "-f", f"{repo}:v1", check=False)


def test_commit_stopped_container(vicd: Vicd):
    name = _name("commitstop")
    repo = f"stopped-{uuid.uuid4().hex[:6]}"
    vicd.docker("run", "--name", name, "busybox", "sh", "-c", "echo kept > /kept")
    try:
        vicd.docker("commit", name, repo)
        assert vicd.docker("run", "--rm", repo, "cat", "/kept").stdout == "kept\n"
        assert vicd.inspect(name)["State"]["Status"] == "exited"
    finally:
        vicd.docker("rm", "-f", name, check=False)
        vicd.docker("rmi", "-f", repo, check=False)


def test_commit_bad_change_is_refused(vicd: Vicd):
    name = _name("commitbad")
    vicd.docker("create", "--name", name, "busybox", "true")
    try:
        r = vicd.docker("commit", "-c", "FROB x", name, "nope", check=False)
        assert r.returncode != 0 and "frob is not a valid change command" in r.stderr.lower()
    finally:
        vicd.docker("rm", "-f", name, check=False)
