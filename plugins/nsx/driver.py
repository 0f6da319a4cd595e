"""The ``nsx`` network driver: a docker network is an NSX-T segment with a group
and a distributed-firewall policy of its own (Policy API, ``client.PolicyClient``).

- ``create_network``: the transport zone is checked first, then
  ``/infra/segments/vicd-<id>`` (the network's gateway/prefix as its subnet,
  labels as tags), ``/infra/domains/<d>/groups/vicd-<id>`` (members: the
  segment ports tagged ``vicd/network-id|<id>``) and
  ``/infra/domains/<d>/security-policies/vicd-<id>`` (rules below). A
  failure part-way deletes what was made, so nothing is left half-created.
- Endpoints are segment ports (``.../ports/<endpoint id>``) with the
  address the engine's IPAM chose as an address binding and a VIF
  attachment id; ``join`` tags the port with the container and returns the
  NIC backing the vSphere backend plugs: the segment's ``unique_id``, which
  NSX gives the port group it realizes in vCenter as ``logicalSwitchUuid``,
  and the attachment id, which becomes the vNIC's ``externalId``.
- Rules (category Application, applied to the group): ``intra`` ALLOW
  group -> group; ``allow-from`` ALLOW from ``nsx.allow_from`` CIDRs;
  ``isolate`` DROP anything else into the group (unless ``nsx.isolate=false``);
  with ``--internal``, ``internal`` DROP from the group to anything else.
"""

from __future__ import annotations

import ipaddress
import logging
import uuid
from typing import Any

from vicd.errors import InvalidParameter
from vicd.network_driver import NetworkInfo
from vicd.plugins.nsx.client import NsxError, PolicyClient
from vicd.plugins.nsx.settings import NsxSettings

log = logging.getLogger(__name__)

OPTIONS = {"nsx.allow_from", "nsx.isolate"}
MAX_TAGS, MAX_SCOPE, MAX_TAG = 30, 128, 256  # NSX's limits per object
SCOPE_NET_ID, SCOPE_NET, SCOPE_DAEMON = "vicd/network-id", "vicd/network", "vicd/daemon"
SCOPE_ENDPOINT, SCOPE_CONTAINER = "vicd/endpoint", "vicd/container"


def _tag(scope: str, tag: str) -> dict[str, str]:
    return {"scope": scope, "tag": tag}


class NsxDriver:
    name = "nsx"

    def __init__(self, settings: NsxSettings) -> None:
        self.settings = settings
        self.client = PolicyClient(settings)
        self.networks: dict[str, dict[str, Any]] = {}  # network id -> segment (as NSX gave it)

    def capabilities(self) -> dict[str, Any]:
        # Segments span every host of the transport zone, like an overlay network.
        return {"Scope": "global", "ConnectivityScope": "global"}

    # --- paths ---------------------------------------------------------------------------

    @staticmethod
    def object_id(network_id: str) -> str:
        return f"vicd-{network_id}"

    def segment_path(self, network_id: str) -> str:
        return f"/infra/segments/{self.object_id(network_id)}"

    def group_path(self, network_id: str) -> str:
        return f"/infra/domains/{self.settings.domain}/groups/{self.object_id(network_id)}"

    def policy_path(self, network_id: str) -> str:
        return (f"/infra/domains/{self.settings.domain}/security-policies/"
                f"{self.object_id(network_id)}")

    def port_path(self, network_id: str, endpoint_id: str) -> str:
        return f"{self.segment_path(network_id)}/ports/{endpoint_id}"

    @staticmethod
    def attachment_id(endpoint_id: str) -> str:
        """The VIF attachment id: stable per endpoint, so retries are idempotent."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vicd-endpoint:{endpoint_id}"))

    # --- networks ------------------------------------------------------------------------

    def _network_tags(self, net: NetworkInfo) -> list[dict[str, str]]:
        tags = [_tag(SCOPE_NET_ID, net.id), _tag(SCOPE_NET, net.name),
                _tag(SCOPE_DAEMON, self.settings.daemon)]
        for key, value in sorted(net.labels.items()):
            if len(key) > MAX_SCOPE or len(value) > MAX_TAG:
                raise InvalidParameter(f"nsx: label {key!r} is too long for an NSX tag "
                                       f"(key at most {MAX_SCOPE}, value at most {MAX_TAG} "
                                       "characters)")
            tags.append(_tag(key, value))
        if len(tags) > MAX_TAGS:
            raise InvalidParameter(f"nsx: at most {MAX_TAGS - 3} labels on an nsx network "
                                   f"(NSX takes {MAX_TAGS} tags per object, vicd uses 3)")
        return tags

    def _rules(self, net: NetworkInfo) -> list[dict[str, Any]]:
        opts = {k: v for k, v in net.options.items() if k.startswith("nsx.")}
        unknown = sorted(set(opts) - OPTIONS)
        if unknown:
            raise InvalidParameter(f"nsx: unknown driver options {', '.join(unknown)} "
                                   f"(known: {', '.join(sorted(OPTIONS))})")
        isolate = opts.get("nsx.isolate", "true").lower()
        if isolate not in ("true", "false"):
            raise InvalidParameter("nsx: nsx.isolate must be true or false")
        allow_from = [c.strip() for c in opts.get("nsx.allow_from", "").split(",") if c.strip()]
        for cidr in allow_from:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise InvalidParameter(f"nsx: nsx.allow_from: {cidr!r} is not an address or "
                                       "CIDR") from None
        group = self.group_path(net.id)

        def rule(rid: str, seq: int, src: list[str], dst: list[str], action: str,
                 direction: str, what: str) -> dict[str, Any]:
            return {"id": rid, "display_name": f"{net.name}: {what}", "sequence_number": seq,
                    "source_groups": src, "destination_groups": dst, "services": ["ANY"],
                    "scope": [group], "action": action, "direction": direction,
                    "logged": False}

        rules = [rule("intra", 10, [group], [group], "ALLOW", "IN_OUT",
                      "containers on the network talk")]
        if allow_from:
            rules.append(rule("allow-from", 20, allow_from, [group], "ALLOW", "IN",
                              "nsx.allow_from"))
        if isolate == "true":
            rules.append(rule("isolate", 30, ["ANY"], [group], "DROP", "IN",
                              "nothing else reaches the network"))
        if net.internal:
            rules.append(rule("internal", 40, [group], ["ANY"], "DROP", "OUT",
                              "--internal: no traffic leaves the network"))
        return rules

    def create_network(self, network: NetworkInfo) -> None:
        net = network
        tags = self._network_tags(net)
        rules = self._rules(net)
        prefix = ipaddress.ip_network(net.subnet).prefixlen
        iface = ipaddress.ip_interface(f"{net.gateway}/{prefix}")
        c = self.client
        self._check_transport_zone()
        display = f"{net.name}-{net.id[:12]}"
        made: list[str] = []
        try:
            seg_path = self.segment_path(net.id)
            c.patch(seg_path, {
                "display_name": display, "description": f"docker network {net.name} (vicd)",
                "transport_zone_path": self.settings.transport_zone,
                "subnets": [{"gateway_address": str(iface)}], "tags": tags})
            made.append(seg_path)
            c.patch(self.group_path(net.id), {
                "display_name": display, "description": f"containers on docker network "
                f"{net.name}", "tags": tags[:3],
                "expression": [{"resource_type": "Condition", "member_type": "SegmentPort",
                                "key": "Tag", "operator": "EQUALS",
                                "value": f"{SCOPE_NET_ID}|{net.id}"}]})
            made.append(self.group_path(net.id))
            c.patch(self.policy_path(net.id), {
                "display_name": display, "description": f"micro-segmentation of docker "
                f"network {net.name}", "category": "Application", "stateful": True,
                "scope": [self.group_path(net.id)], "tags": tags[:3], "rules": rules})
            made.append(self.policy_path(net.id))
            self.networks[net.id] = c.get(seg_path)
        except Exception:
            self._undo(made)
            raise
        log.info("nsx: network %s is segment %s (%s)", net.name, seg_path, display)

    def _check_transport_zone(self) -> None:
        """Before anything is made: a wrong transport zone is the likelier mistake."""
        tz = self.settings.transport_zone
        try:
            self.client.get(tz)
        except NsxError as e:
            if e.http_status == 404:
                raise InvalidParameter(f"nsx: transport zone {tz} not found in NSX Manager "
                                       f"{self.settings.safe_url}") from None
            raise

    def _undo(self, paths: list[str]) -> None:
        for path in reversed(paths):
            try:
                self.client.delete(path)
            except NsxError as e:
                log.warning("nsx: could not remove %s after a failed create: %s", path,
                            e.message)

    def delete_network(self, network_id: str) -> None:
        c = self.client
        # Ports first (NSX refuses to delete a segment that has some), then the
        # policy that names the group, the group, the segment.
        seg = self.segment_path(network_id)
        try:
            ports = c.get(f"{seg}/ports").get("results", [])
        except NsxError as e:
            if e.http_status != 404:
                raise
            ports = []
        for p in ports:
            c.delete(p["path"])
        c.delete(self.policy_path(network_id))
        c.delete(self.group_path(network_id))
        c.delete(seg)
        self.networks.pop(network_id, None)

    def restore(self, networks: list[NetworkInfo]) -> None:
        """Make every stored network real again; PATCH is idempotent in NSX."""
        for net in networks:
            try:
                self.networks[net.id] = self.client.get(self.segment_path(net.id))
            except NsxError as e:
                if e.http_status != 404:
                    raise
                log.info("nsx: segment of network %s is gone; making it again", net.name)
                self.create_network(net)

    def dns_socket(self, network_id: str, gateway: str) -> None:
        # The daemon is not on the segment: containers there use the resolvers
        # of their egress NIC (docs/networking.md).
        return None

    # --- endpoints -----------------------------------------------------------------------

    def _segment(self, network_id: str) -> dict[str, Any]:
        seg = self.networks.get(network_id)
        if seg is None:
            seg = self.networks[network_id] = self.client.get(self.segment_path(network_id))
        return seg

    def create_endpoint(self, network_id: str, endpoint_id: str, address: str, mac: str,
                        options: dict[str, Any]) -> None:
        self._segment(network_id)
        binding = {"ip_address": str(ipaddress.ip_interface(address).ip)} if address else {}
        if mac:
            binding["mac_address"] = mac
        self.client.patch(self.port_path(network_id, endpoint_id), {
            "display_name": f"vicd-{endpoint_id[:12]}",
            "attachment": {"id": self.attachment_id(endpoint_id), "type": "PARENT"},
            "address_bindings": [binding] if binding else [],
            "tags": [_tag(SCOPE_NET_ID, network_id), _tag(SCOPE_ENDPOINT, endpoint_id),
                     _tag(SCOPE_DAEMON, self.settings.daemon)]})

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        self.client.delete(self.port_path(network_id, endpoint_id))

    def join(self, network_id: str, endpoint_id: str, container_id: str) -> dict[str, Any]:
        seg = self._segment(network_id)
        port = self.port_path(network_id, endpoint_id)
        tags = [_tag(SCOPE_NET_ID, network_id), _tag(SCOPE_ENDPOINT, endpoint_id),
                _tag(SCOPE_DAEMON, self.settings.daemon), _tag(SCOPE_CONTAINER, container_id)]
        self.client.patch(port, {"tags": tags})
        return {"kind": "nsx-segment", "segment_path": seg["path"], "port_path": port,
                "logical_switch_uuid": seg["unique_id"],
                "portgroup_name": seg.get("display_name", ""),
                "attachment_id": self.attachment_id(endpoint_id)}

    def leave(self, network_id: str, endpoint_id: str) -> None:
        try:
            self.client.patch(self.port_path(network_id, endpoint_id), {
                "tags": [_tag(SCOPE_NET_ID, network_id), _tag(SCOPE_ENDPOINT, endpoint_id),
                         _tag(SCOPE_DAEMON, self.settings.daemon)]})
        except NsxError as e:
            if e.http_status != 404:  # the port is gone: nothing to leave
                raise
