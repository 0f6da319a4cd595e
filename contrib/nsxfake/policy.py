"""The in-memory state of the fake NSX Manager: the part of the NSX-T Policy
API that vicd's ``nsx`` plugin uses, validated as NSX validates it.

Objects are kept as the API returns them (``Segment``, ``SegmentPort``,
``Group``, ``SecurityPolicy`` with ``Rule`` children, ``PolicyTransportZone``):
the caller's fields plus the ones NSX adds (``id``, ``path``,
``relative_path``, ``parent_path``, ``resource_type``, ``unique_id``,
``_revision``, ``_create_time``, ...). A PATCH merges the fields it carries;
a PUT replaces the object. What NSX refuses is refused with NSX's error body
(``httpStatus``, ``error_code``, ``module_name``, ``error_message``):
unknown paths, a segment on an unknown transport zone, a bad gateway CIDR,
too many or too long tags, a rule naming a group that does not exist,
deleting a group a rule still uses or a segment that still has ports.
"""

from __future__ import annotations

import copy
import ipaddress
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

TZ_BASE = "/infra/sites/default/enforcement-points/default/transport-zones"
MAX_TAGS, MAX_SCOPE, MAX_TAG = 30, 128, 256
GROUP_MEMBER_TYPES = {"VirtualMachine", "SegmentPort", "Segment", "LogicalPort",
                      "LogicalSwitch", "IPSet"}
CONDITION_KEYS = {"Tag", "Name", "OSName", "ComputerName"}
ACTIONS = {"ALLOW", "DROP", "REJECT", "JUMP_TO_APPLICATION"}
DIRECTIONS = {"IN", "OUT", "IN_OUT"}
CATEGORIES = {"Ethernet", "Emergency", "Infrastructure", "Environment", "Application"}


class PolicyError(Exception):
    """An NSX error answer: HTTP status plus the error body NSX sends."""

    REASONS = {400: "BAD_REQUEST", 403: "FORBIDDEN", 404: "NOT_FOUND", 409: "CONFLICT",
               412: "PRECONDITION_FAILED", 500: "INTERNAL_SERVER_ERROR"}

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        return {"httpStatus": self.REASONS.get(self.status, str(self.status)),
                "error_code": self.code, "module_name": "Policy",
                "error_message": self.message}


def not_found(path: str) -> PolicyError:
    return PolicyError(404, 500090, f"The path=[{path}] is invalid.")


def bad(message: str, code: int = 500012) -> PolicyError:
    return PolicyError(400, code, message)


@dataclass
class PolicyStore:
    user: str = "admin"
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> object

    def add_transport_zone(self, tz_id: str, tz_type: str = "OVERLAY_BACKED",
                           **extra: Any) -> dict[str, Any]:
        path = f"{TZ_BASE}/{tz_id}"
        obj = self._stamp(path, "PolicyTransportZone", {"tz_type": tz_type, "is_default": False,
                                                        "display_name": tz_id, **extra}, None)
        self.objects[path] = obj
        return obj

    # --- generic ----------------------------------------------------------------------

    def get(self, path: str) -> dict[str, Any]:
        obj = self.objects.get(path)
        if obj is None:
            raise not_found(path)
        return copy.deepcopy(obj)

    def children(self, parent: str, resource_type: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for p, o in sorted(self.objects.items())
                if o["parent_path"] == parent and o["resource_type"] == resource_type]

    def _stamp(self, path: str, rtype: str, body: dict[str, Any],
               old: dict[str, Any] | None) -> dict[str, Any]:
        now = int(time.time() * 1000)
        parent, _, rel = path.rpartition("/")
        obj = {**body, "id": rel, "path": path, "relative_path": rel, "parent_path": parent,
               "resource_type": rtype, "marked_for_delete": False, "overridden": False,
               "_system_owned": False, "_protection": "NOT_PROTECTED",
               "_last_modified_user": self.user, "_last_modified_time": now}
        obj.setdefault("display_name", rel)
        if old is None:
            obj.update(unique_id=str(uuid.uuid4()), _create_user=self.user, _create_time=now,
                       _revision=0)
        else:
            obj.update(unique_id=old["unique_id"], _create_user=old["_create_user"],
                       _create_time=old["_create_time"], _revision=old["_revision"] + 1)
        return obj

    def _write(self, path: str, rtype: str, body: dict[str, Any], replace: bool,
               check: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        body = {k: v for k, v in body.items() if not k.startswith("_") and k not in (
            "id", "path", "relative_path", "parent_path", "unique_id", "resource_type")}
        old = self.objects.get(path)
        if old is not None and replace and "_revision" in body and \
                body["_revision"] != old["_revision"]:
            raise PolicyError(412, 604, "The object was modified by somebody else.")
        merged = body if (replace or old is None) else {
            **{k: v for k, v in old.items() if not k.startswith("_")}, **body}
        _check_tags(merged.get("tags") or [])
        check(merged)
        obj = self._stamp(path, rtype, merged, old)
        self.objects[path] = obj
        return copy.deepcopy(obj), old

    def delete(self, path: str) -> dict[str, Any] | None:
        """NSX answers 200 to a DELETE of something already gone."""
        return self.objects.pop(path, None)

    # --- segments and ports -------------------------------------------------------------

    def write_segment(self, seg_id: str, body: dict[str, Any], replace: bool
                      ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        path = f"/infra/segments/{seg_id}"

        def check(s: dict[str, Any]) -> None:
            tz = s.get("transport_zone_path")
            if tz and (tz not in self.objects
                       or self.objects[tz]["resource_type"] != "PolicyTransportZone"):
                raise bad(f"Invalid transport zone path {tz}.", 503040)
            old = self.objects.get(path)
            if old is not None and old.get("transport_zone_path") and \
                    tz != old.get("transport_zone_path"):
                raise bad(f"Transport zone of segment {seg_id} cannot be changed.", 503046)
            for sub in s.get("subnets") or []:
                gw = sub.get("gateway_address", "")
                try:
                    iface = ipaddress.ip_interface(gw)
                except ValueError:
                    raise bad(f"Invalid gateway address {gw!r}: give it in CIDR notation "
                              "(e.g. 40.1.1.1/16).", 503041) from None
                if iface.network.prefixlen == iface.max_prefixlen:
                    raise bad(f"Invalid gateway address {gw!r}: give it in CIDR notation.",
                              503041)
                sub["network"] = str(iface.network)

        return self._write(path, "Segment", body, replace, check)

    def delete_segment(self, seg_id: str) -> dict[str, Any] | None:
        path = f"/infra/segments/{seg_id}"
        if self.children(f"{path}/ports", "SegmentPort"):
            raise bad(f"Segment {seg_id} has ports; delete them before the segment.", 503080)
        return self.delete(path)

    def write_port(self, seg_id: str, port_id: str, body: dict[str, Any], replace: bool
                   ) -> dict[str, Any]:
        seg = f"/infra/segments/{seg_id}"
        if seg not in self.objects:
            raise not_found(seg)

        def check(p: dict[str, Any]) -> None:
            for b in p.get("address_bindings") or []:
                try:
                    ipaddress.ip_address(b.get("ip_address", ""))
                except ValueError:
                    raise bad(f"Invalid IP address {b.get('ip_address')!r} in "
                              "address_bindings.", 503050) from None
            att = p.get("attachment")
            if att is not None and not att.get("id"):
                raise bad("attachment.id is required.", 503051)

        return self._write(f"{seg}/ports/{port_id}", "SegmentPort", body, replace, check)[0]

    # --- groups and security policies ----------------------------------------------------

    def write_group(self, domain: str, group_id: str, body: dict[str, Any], replace: bool
                    ) -> dict[str, Any]:
        def check(g: dict[str, Any]) -> None:
            for e in g.get("expression") or []:
                rtype = e.get("resource_type")
                if rtype == "ConjunctionOperator":
                    if e.get("conjunction_operator") not in ("OR", "AND"):
                        raise bad("conjunction_operator must be OR or AND.", 500063)
                    continue
                if rtype != "Condition":
                    raise bad(f"Unsupported expression type {rtype!r}.", 500063)
                if e.get("member_type") not in GROUP_MEMBER_TYPES:
                    raise bad(f"Invalid member_type {e.get('member_type')!r}.", 500063)
                if e.get("key") not in CONDITION_KEYS or not e.get("value"):
                    raise bad("A condition needs a key (Tag, Name, ...) and a value.", 500063)

        path = f"/infra/domains/{domain}/groups/{group_id}"
        return self._write(path, "Group", body, replace, check)[0]

    def group_members(self, domain: str, group_id: str) -> list[dict[str, Any]]:
        """The SegmentPorts a group's Tag conditions select (OR'ed/AND'ed left to right)."""
        group = self.get(f"/infra/domains/{domain}/groups/{group_id}")
        ports = [o for o in self.objects.values() if o["resource_type"] == "SegmentPort"]
        selected: set[str] | None = None
        op = "OR"
        for e in group.get("expression") or []:
            if e["resource_type"] == "ConjunctionOperator":
                op = e["conjunction_operator"]
                continue
            hits = {p["path"] for p in ports if e["member_type"] == "SegmentPort"
                    and _tag_matches(p.get("tags") or [], e)}
            if selected is None:
                selected = hits
            else:
                selected = selected | hits if op == "OR" else selected & hits
        return [copy.deepcopy(self.objects[p]) for p in sorted(selected or ())]

    def delete_group(self, domain: str, group_id: str) -> dict[str, Any] | None:
        path = f"/infra/domains/{domain}/groups/{group_id}"
        users = [o["path"] for o in self.objects.values()
                 if o["resource_type"] == "SecurityPolicy"
                 and path in _policy_group_paths(o)]
        if users:
            raise bad(f"Group {path} is referenced by {', '.join(sorted(users))}; "
                      "remove the references first.", 500030)
        return self.delete(path)

    def write_policy(self, domain: str, policy_id: str, body: dict[str, Any], replace: bool
                     ) -> dict[str, Any]:
        path = f"/infra/domains/{domain}/security-policies/{policy_id}"
        rules_in = body.pop("rules", None)

        def check(p: dict[str, Any]) -> None:
            if p.get("category", "Application") not in CATEGORIES:
                raise bad(f"Invalid category {p.get('category')!r}.", 500061)
            for g in p.get("scope") or []:
                self._check_group_ref(g)

        pol, old = self._write(path, "SecurityPolicy", body, replace, check)
        pol.setdefault("category", "Application")
        pol.setdefault("stateful", True)
        # The rules given replace the old ones (NSX: "this is a full replace").
        rules = {} if replace or old is None or rules_in is not None else {
            r["id"]: r for r in old.get("rules", [])}
        for r in rules_in or []:
            rid = r.get("id") or r.get("display_name")
            if not rid:
                raise bad("A rule needs an id.", 500062)
            if r.get("action", "ALLOW") not in ACTIONS:
                raise bad(f"Invalid action {r.get('action')!r}.", 500062)
            if r.get("direction", "IN_OUT") not in DIRECTIONS:
                raise bad(f"Invalid direction {r.get('direction')!r}.", 500062)
            for g in [*(r.get("source_groups") or []), *(r.get("destination_groups") or []),
                      *(r.get("scope") or [])]:
                self._check_group_ref(g)
            rule = self._stamp(f"{path}/rules/{rid}", "Rule",
                               {"action": "ALLOW", "direction": "IN_OUT", "services": ["ANY"],
                                "source_groups": ["ANY"], "destination_groups": ["ANY"],
                                "scope": ["ANY"], "disabled": False, "logged": False,
                                "sequence_number": 0, **r}, None)
            rules[rid] = rule
        pol["rules"] = sorted(rules.values(), key=lambda r: r["sequence_number"])
        self.objects[path] = pol
        return copy.deepcopy(pol)

    def _check_group_ref(self, ref: str) -> None:
        if ref == "ANY":
            return
        if ref.startswith("/"):
            if ref not in self.objects or self.objects[ref]["resource_type"] != "Group":
                raise bad(f"Invalid path {ref}: no such group.", 500070)
            return
        try:  # rules may name addresses directly
            ipaddress.ip_network(ref, strict=False)
        except ValueError:
            raise bad(f"Invalid group, IP address or path {ref!r}.", 500070) from None


def _check_tags(tags: list[dict[str, Any]]) -> None:
    if len(tags) > MAX_TAGS:
        raise bad(f"Too many tags ({len(tags)}); at most {MAX_TAGS} per object.", 500049)
    for t in tags:
        if len(t.get("scope", "")) > MAX_SCOPE or len(t.get("tag", "")) > MAX_TAG:
            raise bad(f"Tag scope longer than {MAX_SCOPE} or tag longer than {MAX_TAG} "
                      "characters.", 500049)


def _tag_matches(tags: list[dict[str, Any]], cond: dict[str, Any]) -> bool:
    """A Tag condition's value is ``scope|tag`` (or ``tag``, any scope); case-insensitive."""
    scope, sep, tag = cond["value"].rpartition("|")
    for t in tags:
        if t.get("tag", "").lower() != tag.lower():
            continue
        if not sep or t.get("scope", "").lower() == scope.lower():
            return True
    return False


def _policy_group_paths(pol: dict[str, Any]) -> set[str]:
    out = set(pol.get("scope") or [])
    for r in pol.get("rules") or []:
        for k in ("source_groups", "destination_groups", "scope"):
            out.update(r.get(k) or [])
    return out
