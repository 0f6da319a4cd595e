"""Bearer-token auth against a real registry: Debian's docker-registry (Distribution 2.8) with
`auth: token:` verifying the JWTs of tests/token_server.py. docker login / push / pull go
through vicd with the stock CLI; the refusals are compared with the reference dockerd's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Vicd
from refdockerd import RefDockerd, dockerd  # noqa: F401
from registry_fixture import (
    PASSWORD,
    USER,
    Registry,
    lines,
    registries_available,
    token_registry,  # noqa: F401
)
from token_server import LOCKED

pytestmark = pytest.mark.skipif(not registries_available(),
                                reason="docker-registry/skopeo/htpasswd not installed")

WRONG = "Wrong-Secret-0x5e"


def login(d: Vicd | RefDockerd, host: str, password: str, env: dict[str, str]):
    return d.docker("login", "-u", USER, "--password-stdin", host, input=password.encode() + b"\n",
                    env=env, check=False)


def test_token_login_push_pull(vicd: Vicd, token_registry: Registry,  # noqa: F811
                               docker_config: dict[str, str]) -> None:
    host, server = token_registry.host, token_registry.token
    assert server is not None
    ref = f"{host}/tokrepo:1"
    denied = "denied: requested access to the resource is denied"

    # anonymous: the token server hands out a token with no access; the registry refuses it
    r = vicd.docker("pull", ref, env=docker_config, check=False)
    assert r.returncode != 0
    assert (f"pull access denied for {host}/tokrepo, repository does not exist or may require "
            f"'docker login': {denied}") in r.stderr

    r = login(vicd, host, WRONG, docker_config)
    assert r.returncode != 0
    assert (f'Error response from daemon: Get "http://{host}/v2/": unauthorized: '
            "incorrect username or password") in r.stderr

    server.requests.clear()
    r = login(vicd, host, PASSWORD, docker_config)
    assert "Login Succeeded" in r.stdout
    assert server.requests == [{"method": "GET", "user": USER, "scope": ""}]
    saved = json.loads((Path(docker_config["DOCKER_CONFIG"]) / "config.json").read_text())
    entry = saved["auths"][host]
    assert entry["identitytoken"] in server.refresh_tokens  # a refresh token, not the password
    assert PASSWORD not in json.dumps(saved)

    # push and pull with the identity token: OAuth2 refresh-token grants, scoped per repo
    server.requests.clear()
    vicd.docker("tag", "busybox", ref)
    out = vicd.docker("push", ref, env=docker_config).stdout
    assert "Pushed" in out and any(x.startswith("1: digest: sha256:") for x in lines(out))
    assert {"method": "POST", "grant": "refresh_token", "user": USER,
            "scope": "repository:tokrepo:push,pull"} in server.requests
    vicd.docker("rmi", ref)
    server.requests.clear()
    out = vicd.docker("pull", ref, env=docker_config).stdout
    assert f"Status: Downloaded newer image for {ref}" in out
    assert server.requests == [{"method": "POST", "grant": "refresh_token", "user": USER,
                                "scope": "repository:tokrepo:pull"}]
    assert vicd.inspect(ref)["Id"] == vicd.inspect("busybox")["Id"]

    # a token without pull (or push) scope for LOCKED is refused by the registry
    r = vicd.docker("pull", f"{host}/{LOCKED}:1", env=docker_config, check=False)
    assert r.returncode != 0 and f"pull access denied for {host}/{LOCKED}" in r.stderr
    assert denied in r.stderr
    vicd.docker("tag", "busybox", f"{host}/{LOCKED}:1")
    r = vicd.docker("push", f"{host}/{LOCKED}:1", env=docker_config, check=False)
    assert r.returncode != 0 and denied in r.stderr
    vicd.docker("rmi", f"{host}/{LOCKED}:1", ref)

    log = vicd.log.read_text()
    assert PASSWORD not in log and WRONG not in log and entry["identitytoken"] not in log


def test_token_refusals_match_dockerd(vicd: Vicd, dockerd: RefDockerd,  # noqa: F811
                                      token_registry: Registry, tmp_path: Path) -> None:  # noqa: F811
    """The same refusals, word for word, from vicd and from dockerd 20.10."""
    host = token_registry.host
    answers: dict[str, list[str]] = {}
    for name, d in (("vicd", vicd), ("dockerd", dockerd)):
        cfg = tmp_path / name
        cfg.mkdir()
        env = {"DOCKER_CONFIG": str(cfg)}
        d.docker("tag", "busybox", f"{host}/{LOCKED}:{name}")
        got = [login(d, host, WRONG, env).stderr,
               d.docker("pull", f"{host}/anon-{name}:1", env=env, check=False).stderr]
        assert "Login Succeeded" in login(d, host, PASSWORD, env).stdout
        got.append(d.docker("pull", f"{host}/{LOCKED}:1", env=env, check=False).stderr)
        got.append(d.docker("push", f"{host}/{LOCKED}:{name}", env=env, check=False).stderr)
        d.docker("rmi", f"{host}/{LOCKED}:{name}")
        answers[name] = [x.strip().replace(name, "NAME") for x in got]
    assert answers["vicd"] == answers["dockerd"]
    assert all(answers["vicd"]), answers
