#!/usr/bin/env python3
"""Pull and push: the same multi-layer image pulled by vicd and by the reference dockerd 20.10
from a registry on loopback, then pushed by each to an empty one, side by side, interleaved in
one run.

Builds an OCI layout of L gzip layers (S MiB of random-ish data each: half random bytes, half
text from a small vocabulary, so gzip has work both ways), pushes it with skopeo to Debian's
docker-registry on a loopback port (``tests/registry_fixture.py``), then times
``docker pull 127.0.0.1:PORT/bench/img:1`` on each daemon with the stock docker CLI, removing the
image (``docker rmi``) between rounds; a round whose output says "Already exists" is an error, so
every round downloads every layer. An untimed warm-up pull on each daemon comes first (it brings
the registry's blobs into the page cache).

Push: each daemon keeps the pulled image and, per round, pushes it to a registry started empty
for that push (untimed), so every layer is compressed and uploaded (a round whose output says
"Layer already exists" or "Mounted from" is an error). vicd uploads in PATCH chunks above its
``push_chunk_size`` (16 MiB by default); dockerd streams each layer in one PATCH.

The daemons take turns, the order reversing every round. Everything started here is stopped and
removed at the end.

    .venv/bin/python benchmarks/bench_pull.py [--quick] [-n N] [--layers L] [--layer-mb S]
        [--no-push]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from common import (
    DOCKER_CLI,
    REPO,
    Daemon,
    DockerdDaemon,
    Row,
    VicdDaemon,
    add_shared_args,
    build_guest,
    fmt_mb,
    fmt_s,
    interleave,
    print_table,
    reference_missing,
    running,
    workdir,
)

sys.path.insert(0, str(REPO / "tests"))
from registry_fixture import OCILayout, Registry, registries_available, tar_bytes  # noqa: E402

REPO_TAG = "bench/img:1"
WORDS = [f"w{i:03x}" for i in range(512)]


def layer_files(rng: random.Random, mib: int, index: int) -> dict[str, bytes]:
    """``mib`` MiB of files of 256 KiB: random bytes, then text, alternately."""
    files = {}
    for j in range(mib * 4):
        if j % 2 == 0:
            data = rng.randbytes(256 * 1024)
        else:
            data = " ".join(rng.choices(WORDS, k=256 * 1024 // 5)).encode()[:256 * 1024]
        files[f"data/l{index}/f{j:03d}.bin"] = data
    return files


def build_layout(path: Path, layers: int, mib: int) -> tuple[int, int]:
    """The image as an OCI layout tagged "1": (compressed bytes, uncompressed bytes) of layers."""
    rng = random.Random(1234)
    oci = OCILayout(path)
    tars = [tar_bytes(layer_files(rng, mib, i)) for i in range(layers)]
    desc = oci.image(tars, cmd=["/bin/sh"])
    oci.tag(desc, "1")
    manifest = json.loads((path / "blobs/sha256" / desc["digest"].split(":")[1]).read_bytes())
    return sum(la["size"] for la in manifest["layers"]), sum(len(t) for t in tars)


def pull(d: Daemon, ref: str) -> float:
    """One timed pull, then (untimed) its removal."""
    t0 = time.perf_counter()
    r = d.docker("pull", ref)
    dt = time.perf_counter() - t0
    if b"Already exists" in r.stdout:
        raise RuntimeError(f"[{d.name}] a layer was still there: {r.stdout.decode()}")
    d.docker("rmi", ref)
    return dt


def push(d: Daemon, ref: str, base: Path) -> float:
    """One timed push of `ref` to a registry started empty for it (start and stop untimed)."""
    reg = Registry(base)
    reg.start()
    try:
        target = f"{reg.host}/{REPO_TAG}"
        d.docker("tag", ref, target)
        t0 = time.perf_counter()
        r = d.docker("push", target)
        dt = time.perf_counter() - t0
        if b"Layer already exists" in r.stdout or b"Mounted from" in r.stdout:
            raise RuntimeError(f"[{d.name}] a layer was not uploaded: {r.stdout.decode()}")
        d.docker("rmi", target)
        return dt
    finally:
        reg.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--rounds", type=int, help="timed pulls per daemon (7)")
    ap.add_argument("--layers", type=int, default=4, help="layers in the image (4)")
    ap.add_argument("--layer-mb", type=int, default=4, help="MiB of data per layer (4)")
    ap.add_argument("--quick", action="store_true", help="n=3")
    ap.add_argument("--no-push", action="store_true", help="measure pulls only")
    add_shared_args(ap)
    a = ap.parse_args()
    if a.rounds is None:
        a.rounds = 3 if a.quick else 7
    if reference_missing():
        return 2
    if not registries_available():
        print("docker-registry, skopeo or htpasswd missing (contrib/install.sh)", file=sys.stderr)
        return 2

    build_guest()  # vicd's microvm backend will not start without it
    with workdir("vp") as work:
        print(f"building a {a.layers} x {a.layer_mb} MiB image ...", file=sys.stderr)
        packed, unpacked = build_layout(work / "oci", a.layers, a.layer_mb)
        reg = Registry(work / "reg")
        daemons: list[Daemon] = [VicdDaemon(work / "v", a.vicd_arg), DockerdDaemon()]
        try:
            reg.start()
            reg.skopeo_copy(work / "oci", "1", REPO_TAG)
            ref = f"{reg.host}/{REPO_TAG}"
            with running(daemons):
                for d in daemons:
                    pull(d, ref)  # warm-up, untimed
                print(f"pull: {a.rounds} rounds ...", file=sys.stderr)
                times = interleave(daemons, a.rounds, lambda d, i: pull(d, ref))
                pushes: dict[str, list[float]] = {}
                if not a.no_push:
                    for d in daemons:
                        d.docker("pull", ref)
                    print(f"push: {a.rounds} rounds ...", file=sys.stderr)
                    pushes = interleave(daemons, a.rounds,
                                        lambda d, i: push(d, ref, work / f"push-{d.name}-{i}"))
        finally:
            reg.stop()

    rows: list[Row] = []
    for stat, f in (("median", statistics.median), ("min", min), ("max", max)):
        rows.append((f"pull {a.layers} layers, {stat}", {k: f(v) for k, v in times.items()},
                     fmt_s))
    rows.append(("throughput at the median (compressed)",
                 {k: packed / statistics.median(v) for k, v in times.items()},
                 lambda x: fmt_mb(x) + "/s"))
    if pushes:
        for stat, f in (("median", statistics.median), ("min", min), ("max", max)):
            rows.append((f"push {a.layers} layers, {stat}",
                         {k: f(v) for k, v in pushes.items()}, fmt_s))
        rows.append(("push throughput at the median (unpacked)",
                     {k: unpacked / statistics.median(v) for k, v in pushes.items()},
                     lambda x: fmt_mb(x) + "/s"))
    print_table(rows, ["vicd", "dockerd"], [("vicd/dockerd", "vicd", "dockerd")])
    print(f"\n(stock docker CLI {DOCKER_CLI}; times include the CLI's own start-up; n={a.rounds}; "
          f"image: {a.layers} gzip layers, {fmt_mb(packed)} compressed, {fmt_mb(unpacked)} "
          f"unpacked; docker-registry on 127.0.0.1:{reg.port}; rmi between pull rounds; "
          "each push to an empty registry)")
    if a.json:
        Path(a.json).write_text(json.dumps({"pull": times, "push": pushes, "compressed": packed,
                                            "uncompressed": unpacked, "args": vars(a)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
