"""The sandbox's seccomp filter, compiled with libseccomp (Debian `libseccomp2`) through ctypes into
the classic-BPF program that bubblewrap loads with `--seccomp FD`.

Everything is allowed except the calls a test program never needs and that widen the kernel surface
or reach outside the run; those fail with EPERM (not a kill), so Python raises a clean
`PermissionError` the verdict can show:

    keyrings        keyctl, add_key, request_key (a key planted anywhere stays unreachable)
    namespaces      unshare, setns, and clone with CLONE_NEWUSER (no user namespace with full
                    capabilities inside it); clone3 fails with ENOSYS, because seccomp cannot read
                    its flags from memory and glibc then falls back to clone, whose flags it can
    mounts          mount, umount2, pivot_root and the new mount API (fsopen, fsmount, open_tree, ...)
    kernel surface  bpf, perf_event_open, io_uring_*, userfaultfd
    other processes ptrace, process_vm_readv/writev, kcmp, pidfd_getfd

The program is compiled once per process (`filter_bytes()`, ~1 ms) and the same bytes are handed
to every run. Calls of other architectures (i386 `int 0x80`) do not match the native filter and kill
the process (libseccomp's default for a foreign architecture), so the 32-bit table is no way around.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

__all__ = ["BLOCKED_SYSCALLS", "SeccompUnavailable", "filter_bytes", "CLONE_NEWUSER"]

BLOCKED_SYSCALLS = (
    "keyctl", "add_key", "request_key",
    "unshare", "setns",
    "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr",
    "bpf", "perf_event_open", "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
)
CLONE_NEWUSER = 0x10000000

_ACT_ALLOW = 0x7FFF0000
_CMP_MASKED_EQ = 7  # enum scmp_compare


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class SeccompUnavailable(RuntimeError):
    """libseccomp is missing or cannot build the filter; the message says which."""


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise SeccompUnavailable(f"libseccomp not found ({e}); install the Debian package libseccomp2") from e
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _add(lib, ctx, action: int, name: str, *cmps: _ArgCmp) -> bool:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return False  # unknown to this libseccomp/arch (io_uring on an old one): nothing to block
    array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
    if rc < 0:
        raise SeccompUnavailable(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")
    return True


@functools.lru_cache(maxsize=1)
def filter_bytes() -> bytes:
    """The compiled BPF program (struct sock_filter array), built once per process."""
    lib = _lib()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        eperm = _act_errno(errno.EPERM)
        for name in BLOCKED_SYSCALLS:
            _add(lib, ctx, eperm, name)
        _add(lib, ctx, eperm, "clone", _ArgCmp(0, _CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
        _add(lib, ctx, _act_errno(errno.ENOSYS), "clone3")
        fd = os.memfd_create("domino-seccomp-export", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    data = b"".join(chunks)
    if not data or len(data) % 8:
        raise SeccompUnavailable(f"seccomp_export_bpf wrote {len(data)} bytes, not a whole BPF program")
    return data


def filter_fd() -> int:
    """A fresh memfd holding the filter, positioned at 0, for bwrap's --seccomp (which reads it to
    the end). The caller passes it to the child and closes its own copy."""
    fd = os.memfd_create("domino-seccomp")  # close-on-exec; pass_fds hands it on
    os.write(fd, filter_bytes())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
