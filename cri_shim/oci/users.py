"""Which uid, gid and supplementary groups a container's first process gets.

Follows kubelet/containerd: the security context wins over the image's
USER; names are looked up in the image's own /etc/passwd and /etc/group
(the host's files mean nothing inside the container); the primary gid is
always among the supplementary groups and the list is sorted, as
containerd reports it in ContainerStatus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from cri_shim.gen.runtime import v1 as cri
from cri_shim.oci.errors import SpecError

MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel
_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    username: str  # name of uid in the image's /etc/passwd; "" when it has none


class PasswdEntry(NamedTuple):
    name: str
    uid: int
    gid: int


class GroupEntry(NamedTuple):
    name: str
    gid: int
    members: tuple[str, ...]


def parse_passwd(text: str | None) -> list[PasswdEntry]:
    """name:password:uid:gid:gecos:home:shell lines; malformed ones are skipped."""
    entries: list[PasswdEntry] = []
    for line in (text or "").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < 4 or not _NUMBER.fullmatch(fields[2]) or not _NUMBER.fullmatch(fields[3]):
            continue
        entries.append(PasswdEntry(fields[0], int(fields[2]), int(fields[3])))
    return entries


def parse_group(text: str | None) -> list[GroupEntry]:
    """name:password:gid:member,member lines; malformed ones are skipped."""
    entries: list[GroupEntry] = []
    for line in (text or "").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < 3 or not _NUMBER.fullmatch(fields[2]):
            continue
        members = fields[3].split(",") if len(fields) > 3 else []
        entries.append(
            GroupEntry(fields[0], int(fields[2]), tuple(m.strip() for m in members if m.strip()))
        )
    return entries


def _check_id(value: int, what: str) -> int:
    if not 0 <= value <= MAX_ID:
        raise SpecError(f"{what} {value} is out of range (0..{MAX_ID})")
    return value


def _user_by_name(users: list[PasswdEntry], name: str, passwd: str | None) -> PasswdEntry:
    for entry in users:
        if entry.name == name:
            return entry
    where = "the image has no /etc/passwd" if passwd is None else "not in the image's /etc/passwd"
    raise SpecError(f"unable to find user {name}: {where}")


def _gid_by_name(groups: list[GroupEntry], name: str, group: str | None) -> int:
    for entry in groups:
        if entry.name == name:
            return entry.gid
    where = "the image has no /etc/group" if group is None else "not in the image's /etc/group"
    raise SpecError(f"unable to find group {name}: {where}")


def _parse_user_string(
    userstr: str,
    users: list[PasswdEntry],
    groups: list[GroupEntry],
    passwd: str | None,
    group: str | None,
) -> tuple[int, int, str | None]:
    """OCI image USER forms: uid, name, uid:gid, name:group (and mixes).

    Returns (uid, gid, name) where name is set when the user was given by name.
    """
    parts = userstr.split(":")
    if len(parts) > 2:
        raise SpecError(f"invalid user {userstr!r}: expected user, uid, user:group or uid:gid")
    user_part = parts[0]
    if not user_part:
        raise SpecError(f"invalid user {userstr!r}: the user part is empty")
    name: str | None = None
    if _NUMBER.fullmatch(user_part):
        uid = _check_id(int(user_part), "uid")
        found = next((u for u in users if u.uid == uid), None)
        # An unknown numeric uid is fine (gid 0), as in docker and containerd.
        gid = found.gid if found is not None else 0
    else:
        entry = _user_by_name(users, user_part, passwd)
        name, uid, gid = entry.name, entry.uid, entry.gid
    if len(parts) == 2:
        group_part = parts[1]
        if not group_part:
            raise SpecError(f"invalid user {userstr!r}: the group part is empty")
        if _NUMBER.fullmatch(group_part):
            gid = _check_id(int(group_part), "gid")
        else:
            gid = _gid_by_name(groups, group_part, group)
    return uid, gid, name


def resolve_user(
    *,
    image_user: str,
    context: cri.LinuxContainerSecurityContext | None,
    passwd: str | None,
    group: str | None,
) -> ResolvedUser:
    """uid: run_as_user > run_as_username > image USER > 0; gid: run_as_group >
    the USER's ":group" > the uid's primary group in /etc/passwd > 0."""
    users = parse_passwd(passwd)
    groups = parse_group(group)
    run_as_user = context.run_as_user if context is not None else None
    run_as_username = context.run_as_username if context is not None else ""
    run_as_group = context.run_as_group if context is not None else None
    supplemental = list(context.supplemental_groups) if context is not None else []
    policy = (
        cri.SupplementalGroupsPolicy(context.supplemental_groups_policy)
        if context is not None
        else cri.SupplementalGroupsPolicy.Merge
    )

    if run_as_user is not None:
        userstr = str(_check_id(run_as_user.value, "run_as_user"))
    elif run_as_username:
        if ":" in run_as_username:
            raise SpecError(f"run_as_username {run_as_username!r} must not contain ':'")
        userstr = run_as_username
    else:
        userstr = ""
    if run_as_group is not None:
        if not userstr:
            raise SpecError(
                f"run_as_group {run_as_group.value} is set without run_as_user or "
                "run_as_username; set a user too"
            )
        userstr += f":{_check_id(run_as_group.value, 'run_as_group')}"
    if not userstr:
        userstr = image_user.strip()

    if userstr:
        uid, gid, name = _parse_user_string(userstr, users, groups, passwd, group)
    else:
        uid, gid, name = 0, 0, None
    if name is None:
        found = next((u for u in users if u.uid == uid), None)
        name = found.name if found is not None else ""

    gids = [gid]
    if policy is cri.SupplementalGroupsPolicy.Merge:
        if name:
            # Groups listing the user by name; its own same-named group is its primary one.
            gids += [g.gid for g in groups if g.name != name and name in g.members]
    elif policy is not cri.SupplementalGroupsPolicy.Strict:
        raise SpecError(f"unsupported supplemental_groups_policy {int(policy)}")
    gids += [_check_id(g, "supplemental group") for g in supplemental]
    return ResolvedUser(uid=uid, gid=gid, additional_gids=tuple(sorted(set(gids))), username=name)
