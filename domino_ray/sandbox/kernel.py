"""Thin ctypes wrappers of the kernel calls the sandbox launcher needs and Python's os module lacks:
session keyrings (keyctl), per-thread uid switches (the raw setresuid syscall, not glibc's
process-wide one), and tmpfs mounts with an inode cap (mount/umount2).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

__all__ = ["KernelCallError", "join_fresh_session_keyring", "clear_user_keyrings", "mount_tmpfs", "unmount"]

# syscall numbers of the calls glibc has no wrapper for (or whose wrapper acts on every thread)
_SYSCALLS = {
    "x86_64": {"keyctl": 250, "setresuid": 117},
    "aarch64": {"keyctl": 219, "setresuid": 147},
}
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_CLEAR = 7
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2


class KernelCallError(OSError):
    pass


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def _nr(name: str) -> int:
    table = _SYSCALLS.get(platform.machine())
    if table is None:
        raise KernelCallError(f"no syscall table for architecture {platform.machine()!r}")
    return table[name]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise KernelCallError(err, f"{what}: {os.strerror(err)}")
    return rc


def join_fresh_session_keyring() -> int:
    """Give the calling THREAD a new, empty, anonymous session keyring (credentials are per
    thread in Linux, so other threads keep theirs). Children it starts inherit the new one."""
    libc = _libc()
    return _check(libc.syscall(_nr("keyctl"), KEYCTL_JOIN_SESSION_KEYRING, None, 0, 0, 0), "keyctl(JOIN_SESSION_KEYRING)")


def clear_user_keyrings(uid: int) -> None:
    """Empty the user and user-session keyrings of `uid` (they outlive its processes, so a key one
    run leaves there would reach the next run with that uid). Needs root; switches only the calling
    thread's uid, and back."""
    libc = _libc()
    nr = _nr("setresuid")
    _check(libc.syscall(nr, uid, uid, 0), f"setresuid({uid}) of the launcher thread")
    try:
        for spec in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING):
            _check(libc.syscall(_nr("keyctl"), KEYCTL_CLEAR, spec, 0, 0, 0), f"keyctl(CLEAR) of uid {uid}'s keyring")
    finally:
        if libc.syscall(nr, 0, 0, 0) != 0 or os.geteuid() != 0:
            # cannot happen with saved uid 0; never go on spawning with the wrong identity
            os.abort()


def mount_tmpfs(path: str, size_bytes: int, inodes: int, uid: int, gid: int, mode: int = 0o700) -> None:
    """Mount a tmpfs at `path` capped at `size_bytes` and `inodes` files, owned by uid:gid."""
    opts = f"size={size_bytes},nr_inodes={inodes},mode={mode:o},uid={uid},gid={gid}"
    _check(_libc().mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()), f"mount tmpfs at {path}")


def unmount(path: str) -> None:
    _check(_libc().umount2(path.encode(), MNT_DETACH), f"umount {path}")
