"""Docker image references, parsed and normalized like distribution/reference (dockerd 20.10).

`busybox` -> docker.io/library/busybox:latest; familiar form drops the default domain and
the `library/` prefix again for display. Error texts are dockerd's, since clients show them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from vicd.errors import InvalidParameter

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO = "library"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEP = r"(?:[._]|__|[-]+)"
_COMPONENT = rf"{_ALNUM}(?:{_SEP}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"

_REFERENCE_RE = re.compile(rf"^({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?$")
_ANCHORED_NAME_RE = re.compile(rf"^(?:({_DOMAIN})/)?({_COMPONENT}(?:/{_COMPONENT})*)$")
_TAG_RE = re.compile(rf"^{_TAG}$")
_DIGEST_RE = re.compile(rf"^{_DIGEST}$")
_IDENTIFIER_RE = re.compile(r"^[a-f0-9]{64}$")

ERR_FORMAT = "invalid reference format"
ERR_UPPERCASE = "invalid reference format: repository name must be lowercase"


@dataclass(frozen=True)
class Reference:
    """A named reference: domain + path, optionally a tag and/or a digest."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """Full repository name, e.g. docker.io/library/busybox."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    def familiar_name(self) -> str:
        """Repository name as the docker CLI shows it, e.g. busybox or localhost:5000/x."""
        if self.domain != DEFAULT_DOMAIN:
            return self.name
        parts = self.path.split("/")
        if len(parts) == 2 and parts[0] == OFFICIAL_REPO:
            return parts[1]
        return self.path

    def _suffix(self) -> str:
        out = f":{self.tag}" if self.tag is not None else ""
        return out + (f"@{self.digest}" if self.digest is not None else "")

    def familiar(self) -> str:
        """Familiar string: busybox:latest, localhost:5000/x:t, bb@sha256:..."""
        return self.familiar_name() + self._suffix()

    def __str__(self) -> str:
        return self.name + self._suffix()

    def with_default_tag(self) -> Reference:
        """dockerd's TagNameOnly: add :latest when there is neither tag nor digest."""
        if self.tag is None and self.digest is None:
            return replace(self, tag=DEFAULT_TAG)
        return self

    def with_tag(self, tag: str) -> Reference:
        """The repository with this tag (any digest dropped), validating the tag."""
        if not _TAG_RE.match(tag):
            raise InvalidParameter("invalid tag format")
        return Reference(self.domain, self.path, tag, None)

    def repository(self) -> Reference:
        """The bare repository (no tag, no digest)."""
        return Reference(self.domain, self.path)


def _split_docker_domain(name: str) -> tuple[str, str]:
    i = name.find("/")
    first = name[:i] if i >= 0 else ""
    if i == -1 or (not any(c in first for c in ".:") and first != "localhost"):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, name[i + 1 :]
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = f"{OFFICIAL_REPO}/{remainder}"
    return domain, remainder


def validate_digest(digest: str) -> None:
    """Validate `algo:hex` like opencontainers/go-digest."""
    algo, _, hexpart = digest.partition(":")
    if not _DIGEST_RE.match(digest):
        raise InvalidParameter("invalid digest format")
    lengths = {"sha256": 64, "sha384": 96, "sha512": 128}
    if algo not in lengths:
        raise InvalidParameter("unsupported digest algorithm")
    if len(hexpart) != lengths[algo]:
        raise InvalidParameter("invalid checksum digest length")
    if not re.fullmatch(r"[a-f0-9]+", hexpart):
        raise InvalidParameter("invalid checksum digest format")


def parse(s: str) -> Reference:
    """distribution's reference.Parse: no normalization, domain may be absent."""
    m = _REFERENCE_RE.match(s)
    if m is None:
        if s == "":
            raise InvalidParameter("repository name must have at least one component")
        if _REFERENCE_RE.match(s.lower()):
            raise InvalidParameter(ERR_UPPERCASE)
        raise InvalidParameter(ERR_FORMAT)
    name, tag, digest = m.group(1), m.group(2), m.group(3)
    if len(name) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidParameter(
            f"repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters"
        )
    nm = _ANCHORED_NAME_RE.match(name)
    if nm is None:  # cannot happen: _REFERENCE_RE already matched the same grammar
        raise InvalidParameter(ERR_FORMAT)
    if digest is not None:
        validate_digest(digest)
    return Reference(nm.group(1) or "", nm.group(2), tag, digest)


def parse_normalized(s: str) -> Reference:
    """dockerd's ParseNormalizedNamed: `busybox` -> docker.io/library/busybox (no tag added)."""
    if _IDENTIFIER_RE.match(s):
        raise InvalidParameter(
            f"invalid repository name ({s}), cannot specify 64-byte hexadecimal strings"
        )
    domain, remainder = _split_docker_domain(s)
    remote = remainder.split(":", 1)[0] if ":" in remainder else remainder
    remote = remote.split("@", 1)[0]
    if remote.lower() != remote:
        raise InvalidParameter(ERR_UPPERCASE)
    return parse(f"{domain}/{remainder}")


def parse_any(s: str) -> Reference | str:
    """dockerd's ParseAnyReference: a bare 64-hex id or `sha256:<hex>` gives that digest
    string; anything else is a normalized named reference."""
    if _IDENTIFIER_RE.match(s):
        return "sha256:" + s
    if _DIGEST_RE.match(s):
        try:
            validate_digest(s)
            return s
        except InvalidParameter:
            pass
    return parse_normalized(s)


def parse_tagged(s: str) -> Reference:
    """Normalized reference with :latest added when neither tag nor digest is given."""
    return parse_normalized(s).with_default_tag()


def normalize(s: str) -> str:
    """`busybox` -> `docker.io/library/busybox:latest`."""
    return str(parse_tagged(s))


def familiar(s: str) -> str:
    """`docker.io/library/busybox:latest` -> `busybox:latest` (any accepted spelling)."""
    return parse_normalized(s).familiar()


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Go's path.Match: `*` and `?` never match `/`; `[...]` classes, `\\` escapes."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("^", "]") else i + 1)
            if j < 0:
                raise InvalidParameter("syntax error in pattern")
            body = pattern[i + 1 : j]
            if body.startswith("^"):
                body = "^" + body[1:].replace("\\", "\\\\")
            else:
                body = body.replace("\\", "\\\\")
            out.append(f"(?!/)[{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


def familiar_match(pattern: str, ref: Reference) -> bool:
    """dockerd's FamiliarMatch (reference filter): glob against `name:tag`, then `name`."""
    rx = _glob_to_regex(pattern)
    return bool(rx.match(ref.familiar()) or rx.match(ref.familiar_name()))
