"""Image reference parsing, normalization and matching (dockerd's distribution/reference)."""

import pytest

from vicd.errors import InvalidParameter
from vicd.references import (
    familiar,
    familiar_match,
    normalize,
    parse_any,
    parse_normalized,
    parse_tagged,
)

HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "full", "fam"),
    [
        ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("bb:2", "docker.io/library/bb:2", "bb:2"),
        ("library/bb:2", "docker.io/library/bb:2", "bb:2"),
        ("docker.io/library/bb", "docker.io/library/bb:latest", "bb:latest"),
        ("index.docker.io/foo/bar", "docker.io/foo/bar:latest", "foo/bar:latest"),
        ("foo/bar:1.0", "docker.io/foo/bar:1.0", "foo/bar:1.0"),
        ("localhost:5000/x/y:t", "localhost:5000/x/y:t", "localhost:5000/x/y:t"),
        ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
        ("quay.io/a/b", "quay.io/a/b:latest", "quay.io/a/b:latest"),
        (f"bb@sha256:{HEX}", f"docker.io/library/bb@sha256:{HEX}", f"bb@sha256:{HEX}"),
        ("a__b-c/e---f", "docker.io/a__b-c/e---f:latest", "a__b-c/e---f:latest"),
        ("a.b/c", "a.b/c:latest", "a.b/c:latest"),
    ],
)
def test_normalize(text, full, fam):
    assert normalize(text) == full
    assert parse_tagged(text).familiar() == fam
    assert familiar(full) == fam


def test_parts():
    ref = parse_normalized("localhost:5000/x/y:t")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("localhost:5000", "x/y", "t", None)
    assert ref.name == "localhost:5000/x/y"
    assert ref.familiar_name() == "localhost:5000/x/y"
    assert parse_normalized("busybox").tag is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Busybox", "invalid reference format: repository name must be lowercase"),
        ("docker.io/Foo/bar", "invalid reference format: repository name must be lowercase"),
        ("a:b:c", "invalid reference format"),
        ("bb:", "invalid reference format"),
        ("-bb", "invalid reference format"),
        ("bb:t@sha256:abc", "invalid reference format"),
        ("", "invalid reference format"),
        (HEX, f"invalid repository name ({HEX}), cannot specify 64-byte hexadecimal strings"),
        ("a/" * 130 + "b", "repository name must not be more than 255 characters"),
        ("bb@sha256:" + "a" * 40, "invalid checksum digest length"),
        ("bb@md5:" + "a" * 32, "unsupported digest algorithm"),
    ],
)
def test_invalid(text, message):
    with pytest.raises(InvalidParameter) as exc:
        parse_normalized(text)
    assert exc.value.message == message


def test_parse_any():
    assert parse_any(HEX) == f"sha256:{HEX}"
    assert parse_any(f"sha256:{HEX}") == f"sha256:{HEX}"
    ref = parse_any("sha256:abc")  # a short id prefix looks like a name:tag to dockerd
    assert not isinstance(ref, str) and ref.familiar() == "sha256:abc"


def test_with_tag():
    ref = parse_normalized("docker.io/library/bb").with_tag("v1")
    assert ref.familiar() == "bb:v1"
    with pytest.raises(InvalidParameter, match="invalid tag format"):
        parse_normalized("bb").with_tag("-bad")


@pytest.mark.parametrize(
    ("pattern", "ref", "expected"),
    [
        ("busybox", "busybox:latest", True),
        ("busybox:latest", "busybox:latest", True),
        ("busy*", "busybox:1", True),
        ("busybox:1*", "busybox:1.2", True),
        ("busybox:2", "busybox:1", False),
        ("*", "foo/bar:1", False),  # `*` does not cross `/`, like Go's path.Match
        ("*/*", "foo/bar:1", True),
        ("localhost:5000/*", "localhost:5000/x:t", True),
        ("b[a-u]sybox", "busybox:1", True),
    ],
)
def test_familiar_match(pattern, ref, expected):
    assert familiar_match(pattern, parse_normalized(ref)) is expected
