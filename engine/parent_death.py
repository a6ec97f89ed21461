"""Processes that go when the process that started them goes: Linux's parent-death signal.

A cluster is a tree of processes: `pdserve launch` starts each component, a node starts its
scheduler process, a scheduler its tensor-parallel ranks. Each asks the kernel (prctl
PR_SET_PDEATHSIG) for a signal when the process above it dies, even by SIGKILL, so that killing
the top of the tree leaves no orphan holding a port or a GPU. Elsewhere than Linux these do
nothing.

NOTE: the kernel sends the signal when the *thread* that started the process ends, not its
whole process: every level starts its processes from its main thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """`signum` to this process when its parent dies (call it first thing in the child)."""
    prctl = libc_prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(signum))


def die_with_parent_preexec(signum: int) -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen: the child gets `signum` when this process dies (the
    setting outlives exec); a child whose parent died before it asked exits at once. None where
    there is no prctl.

    NOTE: everything it calls is looked up here, in the parent: after the fork the child runs
    only two system calls, with no import and no lock another thread might have held.
    """
    prctl = libc_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def ask() -> None:
        prctl(PR_SET_PDEATHSIG, int(signum))
        if os.getppid() != parent:  # it died before we asked: no signal would ever come
            os._exit(1)

    return ask


def libc_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
