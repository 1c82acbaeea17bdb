"""Seccomp for containers: the RuntimeDefault profile, Localhost files, selection.

RuntimeDefault is an allow-list in the shape of moby's/containerd's default
profile: everything not listed fails with EPERM, namespace-creating clone
flags need CAP_SYS_ADMIN, clone3 says ENOSYS (so libcs fall back to the
filterable clone), AF_VSOCK sockets are refused, and capability-gated
syscalls open up only when the container holds the capability.
Selection follows containerd: an unset profile means unconfined, and
privileged containers never get one.
"""

from __future__ import annotations

import json
import os
import platform
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from cri_shim.gen.runtime import v1 as cri
from cri_shim.oci.errors import SpecError

EPERM = 1
ENOSYS = 38
AF_VSOCK = 40
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
CLONE_NAMESPACE_FLAGS = 0x7E020000
LOCALHOST_PREFIX = "localhost/"
# Real profiles are a few KiB (RuntimeDefault as JSON is ~10 KiB).
MAX_PROFILE_BYTES = 1024 * 1024

# Allowed for every container, whatever its capabilities.
ALLOWED_SYSCALLS: tuple[str, ...] = (
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "cachestat",
    "capget", "capset", "chdir", "chmod", "chown", "chown32", "clock_adjtime",
    "clock_adjtime64", "clock_getres", "clock_getres_time64", "clock_gettime",
    "clock_gettime64", "clock_nanosleep", "clock_nanosleep_time64", "close",
    "close_range", "connect", "copy_file_range", "creat", "dup", "dup2", "dup3",
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_pwait",
    "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2", "execve",
    "execveat", "exit", "exit_group", "faccessat", "faccessat2", "fadvise64",
    "fadvise64_64", "fallocate", "fanotify_mark", "fchdir", "fchmod", "fchmodat",
    "fchmodat2", "fchown", "fchown32", "fchownat", "fcntl", "fcntl64", "fdatasync",
    "fgetxattr", "flistxattr", "flock", "fork", "fremovexattr", "fsetxattr", "fstat",
    "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate",
    "ftruncate64", "futex", "futex_requeue", "futex_time64", "futex_wait",
    "futex_waitv", "futex_wake", "futimesat", "getcpu", "getcwd", "getdents",
    "getdents64", "getegid", "getegid32", "geteuid", "geteuid32", "getgid",
    "getgid32", "getgroups", "getgroups32", "getitimer", "getpeername", "getpgid",
    "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid",
    "getresgid32", "getresuid", "getresuid32", "getrlimit", "get_robust_list",
    "getrusage", "getsid", "getsockname", "getsockopt", "get_thread_area", "gettid",
    "gettimeofday", "getuid", "getuid32", "getxattr", "inotify_add_watch",
    "inotify_init", "inotify_init1", "inotify_rm_watch", "io_cancel", "ioctl",
    "io_destroy", "io_getevents", "io_pgetevents", "io_pgetevents_time64",
    "ioprio_get", "ioprio_set", "io_setup", "io_submit", "ipc", "kill",
    "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self",
    "lchown", "lchown32", "lgetxattr", "link", "linkat", "listen", "listxattr",
    "llistxattr", "_llseek", "lremovexattr", "lseek", "lsetxattr", "lstat", "lstat64",
    "madvise", "map_shadow_stack", "membarrier", "memfd_create", "memfd_secret",
    "mincore", "mkdir", "mkdirat", "mknod", "mknodat", "mlock", "mlock2", "mlockall",
    "mmap", "mmap2", "mprotect", "mq_getsetattr", "mq_notify", "mq_open",
    "mq_timedreceive", "mq_timedreceive_time64", "mq_timedsend",
    "mq_timedsend_time64", "mq_unlink", "mremap", "msgctl", "msgget", "msgrcv",
    "msgsnd", "msync", "munlock", "munlockall", "munmap",
    "nanosleep", "newfstatat", "_newselect", "open", "openat", "openat2", "pause",
    "pidfd_open", "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc", "pkey_free",
    "pkey_mprotect", "poll", "ppoll", "ppoll_time64", "prctl", "pread64", "preadv",
    "preadv2", "prlimit64", "process_mrelease", "pselect6", "pselect6_time64",
    "ptrace", "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink",
    "readlinkat", "readv", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64",
    "recvmsg", "remap_file_pages", "removexattr", "rename", "renameat", "renameat2",
    "restart_syscall", "rmdir", "rseq", "rt_sigaction", "rt_sigpending",
    "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend",
    "rt_sigtimedwait", "rt_sigtimedwait_time64", "rt_tgsigqueueinfo",
    "sched_getaffinity", "sched_getattr", "sched_getparam", "sched_get_priority_max",
    "sched_get_priority_min", "sched_getscheduler", "sched_rr_get_interval",
    "sched_rr_get_interval_time64", "sched_setaffinity", "sched_setattr",
    "sched_setparam", "sched_setscheduler", "sched_yield", "seccomp", "select",
    "semctl", "semget", "semop", "semtimedop", "semtimedop_time64", "send",
    "sendfile", "sendfile64", "sendmmsg", "sendmsg", "sendto", "setfsgid",
    "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32", "setgroups",
    "setgroups32", "setitimer", "setpgid", "setpriority", "setregid", "setregid32",
    "setresgid", "setresgid32", "setresuid", "setresuid32", "setreuid", "setreuid32",
    "setrlimit", "set_robust_list", "setsid", "setsockopt", "set_thread_area",
    "set_tid_address", "setuid", "setuid32", "setxattr", "shmat", "shmctl", "shmdt",
    "shmget", "shutdown", "sigaltstack", "signalfd", "signalfd4", "sigprocmask",
    "sigreturn", "socketcall", "socketpair", "splice", "stat", "stat64", "statfs",
    "statfs64", "statx", "symlink", "symlinkat", "sync", "sync_file_range", "syncfs",
    "sysinfo", "tee", "tgkill", "time", "timer_create", "timer_delete",
    "timer_getoverrun", "timer_gettime", "timer_gettime64", "timer_settime",
    "timer_settime64", "timerfd_create", "timerfd_gettime", "timerfd_gettime64",
    "timerfd_settime", "timerfd_settime64", "times", "tkill", "truncate",
    "truncate64", "ugetrlimit", "umask", "uname", "unlink", "unlinkat", "utime",
    "utimensat", "utimensat_time64", "utimes", "vfork", "vmsplice", "wait4", "waitid",
    "waitpid", "write", "writev",
)  # fmt: skip

# personality(2) personas moby allows: PER_LINUX, PER_LINUX32, UNAME26 variants, query.
PERSONALITY_VALUES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# Extra syscalls per machine (uname -m), as in moby's per-arch includes.
ARCH_SYSCALLS: dict[str, tuple[str, ...]] = {
    "x86_64": ("arch_prctl", "modify_ldt"),
    "i686": ("modify_ldt",),
    "aarch64": (
        "arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint",
        "cacheflush", "set_tls",
    ),
    "armv7l": (
        "arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint",
        "cacheflush", "set_tls",
    ),
    "ppc64le": ("sync_file_range2", "swapcontext"),
    "s390x": ("s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"),
    "riscv64": ("riscv_flush_icache",),
}  # fmt: skip

# libseccomp architectures a host's containers may use (native plus compat ABIs).
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "i686": ("SCMP_ARCH_X86",),
    "aarch64": ("SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"),
    "armv7l": ("SCMP_ARCH_ARM",),
    "ppc64le": ("SCMP_ARCH_PPC64LE",),
    "s390x": ("SCMP_ARCH_S390", "SCMP_ARCH_S390X"),
    "riscv64": ("SCMP_ARCH_RISCV64",),
}

# Syscalls that only make sense with a capability; allowed when the container has it.
CAPABILITY_SYSCALLS: dict[str, tuple[str, ...]] = {
    "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),
    "CAP_SYS_ADMIN": (
        "bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen",
        "fspick", "lookup_dcookie", "mount", "mount_setattr", "move_mount",
        "name_to_handle_at", "open_tree",
        "perf_event_open", "quotactl", "quotactl_fd", "setdomainname", "sethostname",
        "setns", "syslog", "umount", "umount2", "unshare",
    ),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_CHROOT": ("chroot",),
    "CAP_SYS_MODULE": ("delete_module", "init_module", "finit_module"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_PTRACE": (
        "kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev",
        "ptrace",
    ),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_TIME": ("settimeofday", "stime", "clock_settime", "clock_settime64"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_SYS_NICE": ("get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"),
    "CAP_SYSLOG": ("syslog",),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
}  # fmt: skip

# Keys of the OCI linux.seccomp object; anything else in a profile file is dropped,
# as containerd's JSON decoding into specs.LinuxSeccomp does.
OCI_SECCOMP_KEYS = frozenset(
    {
        "defaultAction",
        "defaultErrnoRet",
        "architectures",
        "flags",
        "listenerPath",
        "listenerMetadata",
        "syscalls",
    }
)


def _allow(names: Iterable[str], args: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"names": list(names), "action": "SCMP_ACT_ALLOW"}
    if args:
        rule["args"] = args
    return rule


def runtime_default_profile(
    capabilities: Iterable[str] = (), machine: str | None = None
) -> dict[str, Any]:
    """The RuntimeDefault profile for a container whose bounding set is `capabilities`."""
    machine = machine or platform.machine()
    caps = set(capabilities)
    syscalls: list[dict[str, Any]] = [_allow(ALLOWED_SYSCALLS)]
    for persona in PERSONALITY_VALUES:
        syscalls.append(
            _allow(["personality"], [{"index": 0, "value": persona, "op": "SCMP_CMP_EQ"}])
        )
    # Any socket family but AF_VSOCK, which reaches the hypervisor host.
    syscalls.append(_allow(["socket"], [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}]))
    if machine in ARCH_SYSCALLS:
        syscalls.append(_allow(ARCH_SYSCALLS[machine]))
    for cap, names in CAPABILITY_SYSCALLS.items():
        if cap in caps:
            syscalls.append(_allow(names))
    if "CAP_SYS_ADMIN" not in caps:
        # Plain fork/thread creation, but no new namespaces. s390 swaps clone's first args.
        flags_arg = 1 if machine.startswith("s390") else 0
        syscalls.append(
            _allow(
                ["clone"],
                [
                    {
                        "index": flags_arg,
                        "value": CLONE_NAMESPACE_FLAGS,
                        "valueTwo": 0,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            )
        )
        # clone3 passes flags in memory seccomp cannot see: ENOSYS makes glibc fall back.
        syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": list(ARCHITECTURES.get(machine, ())),
        "syscalls": syscalls,
    }


def _clean_absolute(path: str, what: str) -> PurePosixPath:
    if not path.startswith("/"):
        raise SpecError(f"{what} {path!r} must be an absolute path")
    pure = PurePosixPath(path)
    if ".." in pure.parts:
        raise SpecError(f"{what} {path!r} must not contain '..'")
    return pure


def _read_profile(pure: str, path: str) -> str:
    """The file's text, refusing what is not a small regular file: a FIFO would
    hang the call and /dev/zero would eat the shim's memory."""
    try:
        fd = os.open(pure, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise SpecError(f"cannot load seccomp profile {path!r}: {err.strerror}") from err
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SpecError(f"seccomp profile {path!r} is not a regular file")
        if info.st_size > MAX_PROFILE_BYTES:
            raise SpecError(
                f"seccomp profile {path!r} is {info.st_size} bytes; at most "
                f"{MAX_PROFILE_BYTES} are accepted"
            )
        data = handle.read(MAX_PROFILE_BYTES + 1)
    if len(data) > MAX_PROFILE_BYTES:
        raise SpecError(f"seccomp profile {path!r} is larger than {MAX_PROFILE_BYTES} bytes")
    return data.decode(errors="replace")


def load_localhost_profile(root: Path | None, path: str) -> dict[str, Any]:
    """A Localhost profile file (OCI linux.seccomp JSON); `root`, when set, must contain it."""
    pure = _clean_absolute(path, "seccomp profile path")
    if root is not None and str(root) not in ("", "."):
        allowed = PurePosixPath(os.path.normpath(str(root)))
        if not pure.is_relative_to(allowed):
            raise SpecError(f"seccomp profile {path!r} is outside the allowed directory {allowed}")
    text = _read_profile(str(pure), path)
    try:
        profile = json.loads(text)
    except ValueError as err:
        raise SpecError(f"seccomp profile {path!r} is not valid JSON: {err}") from err
    if not isinstance(profile, dict):
        raise SpecError(f"seccomp profile {path!r} must be a JSON object")
    return {k: v for k, v in profile.items() if k in OCI_SECCOMP_KEYS}


def profile_from_path(path: str, kind: str = "seccomp") -> cri.SecurityProfile | None:
    """The deprecated string form: runtime/default, docker/default, unconfined, localhost/<p>.

    Shared with AppArmor's legacy field, which uses the same words.
    """
    if not path:
        return None
    if path in ("runtime/default", "docker/default"):
        return cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.RuntimeDefault)
    if path == "unconfined":
        return cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.Unconfined)
    if path.startswith(LOCALHOST_PREFIX):
        return cri.SecurityProfile(
            profile_type=cri.SecurityProfileProfileType.Localhost,
            localhost_ref=path.removeprefix(LOCALHOST_PREFIX),
        )
    raise SpecError(
        f"invalid {kind} profile {path!r}: use runtime/default, unconfined or localhost/<name>"
    )


def seccomp_for(
    profile: cri.SecurityProfile | None,
    deprecated_path: str,
    *,
    privileged: bool,
    localhost_root: Path | None,
    capabilities: Iterable[str] = (),
) -> dict[str, Any] | None:
    """linux.seccomp for a container, or None for unconfined."""
    if privileged:
        return None
    if profile is None:
        profile = profile_from_path(deprecated_path)
    if profile is None:
        return None
    kind = cri.SecurityProfileProfileType(profile.profile_type)
    if kind is not cri.SecurityProfileProfileType.Localhost and profile.localhost_ref:
        raise SpecError("seccomp localhost_ref must only be set when profile_type is Localhost")
    if kind is cri.SecurityProfileProfileType.Unconfined:
        return None
    if kind is cri.SecurityProfileProfileType.RuntimeDefault:
        return runtime_default_profile(capabilities)
    if kind is cri.SecurityProfileProfileType.Localhost:
        ref = profile.localhost_ref.removeprefix(LOCALHOST_PREFIX)
        if not ref:
            raise SpecError("seccomp profile_type Localhost needs localhost_ref (a file path)")
        return load_localhost_profile(localhost_root, ref)
    raise SpecError(f"unsupported seccomp profile type {int(kind)}")
