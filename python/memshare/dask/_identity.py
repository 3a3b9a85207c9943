"""Which processes share a host's memory: the identity each process advertises.

Two processes can open each other's handles when they run on the same kernel
(boot id), see the same shared-memory directory (its device and inode, so a
private tmpfs mounted in another mount namespace differs) and run as the same
user (arena files are mode 0600). A hostname says none of this: containers and
mount namespaces share hostnames.
"""

from __future__ import annotations

import functools
import os

from .. import _native

__all__ = ["memory_identity"]

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@functools.lru_cache(maxsize=1)
def memory_identity() -> str:
    """A string equal in exactly the processes that can open this one's handles.

    ``boot-id:st_dev:st_ino:uid`` of the kernel, the shm directory
    (``MEMSHARE_DIR`` or ``/dev/shm``) and the user.
    """
    with open(_BOOT_ID, encoding="ascii") as f:
        boot_id = f.read().strip()
    st = os.stat(_native.shm_dir())
    return f"{boot_id}:{st.st_dev}:{st.st_ino}:{os.getuid()}"
