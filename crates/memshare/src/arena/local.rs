//! This process's side of an attachment: its slot, its segment mappings,
//! and the blocks it references, counted locally (the shared holder bit is
//! set on the first reference and cleared on the last).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::block::Block;
use super::cache::{BlockCache, CachedBlock};
use super::fork::ForkReservation;
use super::releases::{PendingRelease, PendingReleases};
use super::Arena;
use crate::error::Error;
use crate::layout::BlockRef;
use crate::sys::{self, Mapping};

pub(super) struct LocalRef {
    pub(super) bref: BlockRef,
    pub(super) generation: u64,
    pub(super) size: u64,
    /// Bytes asked for when this process allocated it (0: opened).
    pub(super) len: u64,
    pub(super) count: usize,
    pub(super) readonly: bool,
    /// Stops the background populating of this block (see `prefault`) when
    /// this process drops its last reference.
    pub(super) prefault: Option<Arc<AtomicBool>>,
    /// Allocated here and held by this process alone ever since (no handle
    /// made of it, no child forked): freed into the cache (see `cache`).
    pub(super) private: bool,
}

impl Drop for LocalRef {
    fn drop(&mut self) {
        if let Some(cancel) = &self.prefault {
            cancel.store(true, Ordering::Release);
        }
    }
}

pub(super) struct Local {
    pub(super) fd: OwnedFd,
    pub(super) slot: u32,
    pub(super) epoch: u32,
    pub(super) segments: Vec<Option<Arc<Mapping>>>,
    /// Memory-backed segments this process holds open (others open them
    /// through these descriptors).
    pub(super) memfds: HashMap<u32, OwnedFd>,
    /// Blocks this process references, keyed by payload address.
    pub(super) refs: BTreeMap<usize, LocalRef>,
    pub(super) by_ref: HashMap<BlockRef, usize>,
    /// True until a slot is claimed, and after leaving.
    pub(super) detached: bool,
    /// The process this attachment belongs to. A child forked without
    /// memshare's fork handlers (a C `fork()`) inherits the attachment, and
    /// with it the parent's open file description and slot lock: it must
    /// neither use nor release them.
    pub(super) pid: u32,
    pub(super) fork: Option<ForkReservation>,
    /// Free blocks this process keeps for its next allocations.
    pub(super) cache: BlockCache,
    /// Blocks this process let go of, released at its next transaction.
    pub(super) releases: PendingReleases,
}

impl Local {
    /// A fresh attachment through `fd` that has no slot yet (detached
    /// until [`Local::claimed`]).
    pub(super) fn new(fd: OwnedFd) -> Local {
        Local {
            fd,
            slot: u32::MAX,
            epoch: 0,
            segments: Vec::new(),
            memfds: HashMap::new(),
            refs: BTreeMap::new(),
            by_ref: HashMap::new(),
            detached: true,
            pid: sys::pid(),
            fork: None,
            cache: BlockCache::default(),
            releases: PendingReleases::default(),
        }
    }

    /// Records the slot this process now holds, locked through `fd`.
    pub(super) fn claimed(&mut self, fd: OwnedFd, slot: u32, epoch: u32) {
        self.fd = fd;
        self.claimed_here(slot, epoch);
    }

    /// Records the slot this process now holds, locked through `self.fd`.
    pub(super) fn claimed_here(&mut self, slot: u32, epoch: u32) {
        self.slot = slot;
        self.epoch = epoch;
        self.pid = sys::pid();
        self.detached = false;
    }

    /// True if this process may use the attachment: it holds a slot, and it
    /// is the process that claimed it (not a child forked without handlers).
    pub(super) fn usable(&self) -> bool {
        !self.detached && self.pid == sys::pid()
    }

    /// This process's reference to block `r`, if it has one.
    fn ref_of(&mut self, r: BlockRef) -> Option<&mut LocalRef> {
        let addr = self.by_ref.get(&r)?;
        self.refs.get_mut(addr)
    }

    /// Block `r` is no longer this process's alone (see [`LocalRef::private`]).
    pub(super) fn not_private(&mut self, r: BlockRef) {
        if let Some(e) = self.ref_of(r) {
            e.private = false;
        }
    }

    /// Forgets every reference without touching shared state.
    pub(super) fn forget(&mut self) {
        self.detached = true;
        self.refs.clear();
        self.by_ref.clear();
        self.cache.drain();
        self.releases.drain();
    }

    /// The error for an attachment that is not [`Local::usable`].
    pub(super) fn unusable_error(&self) -> Error {
        if !self.detached {
            Error::StaleHandle(
                "this process was forked without memshare's fork handlers (a C fork()); \
                 it cannot use its parent's attachment"
                    .into(),
            )
        } else {
            Error::StaleHandle(
                "this process has detached from the arena (interpreter shutting down)".into(),
            )
        }
    }
}

pub(super) fn lock_local(m: &Mutex<Local>) -> MutexGuard<'_, Local> {
    // A panic while holding the local lock leaves nothing half-written that
    // the shared repair does not handle; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Arena {
    /// The block of this process that contains `[addr, addr + len)`, with a new
    /// reference, and the offset of `addr` in it.
    pub fn find(&self, addr: usize, len: usize) -> Option<(Block, usize)> {
        let mut local = lock_local(&self.inner.local);
        if !local.usable() {
            return None;
        }
        let (&start, entry) = local.refs.range_mut(..=addr).next_back()?;
        if addr.checked_add(len)? > start + entry.size as usize || entry.count == 0 {
            return None;
        }
        entry.count += 1;
        let block = Block {
            arena: self.clone(),
            bref: entry.bref,
            generation: entry.generation,
            ptr: start as *mut u8,
            len: entry.size as usize,
            capacity: entry.size as usize,
            readonly: entry.readonly,
            pages_mapped: false,
        };
        Some((block, addr - start))
    }

    pub(super) fn owns_block_start(&self, addr: usize) -> bool {
        lock_local(&self.inner.local).refs.contains_key(&addr)
    }

    pub(super) fn retain(&self, ptr: *mut u8) {
        let mut local = lock_local(&self.inner.local);
        if let Some(e) = local.refs.get_mut(&(ptr as usize)) {
            e.count += 1;
        }
    }

    pub(super) fn release(&self, ptr: *mut u8) {
        let mut local = lock_local(&self.inner.local);
        let addr = ptr as usize;
        let forking = local.fork.is_some();
        let Some(e) = local.refs.get_mut(&addr) else {
            return;
        };
        e.count -= 1;
        if e.count > 0 {
            return;
        }
        let (bref, generation) = (e.bref, e.generation);
        let cached = CachedBlock {
            bref,
            generation,
            ptr: addr,
            size: e.size,
            len: e.len,
            readonly: e.readonly,
            cached_ns: sys::monotonic_ns(),
        };
        let private = e.private && !forking;
        let slot = local.slot;
        local.refs.remove(&addr);
        local.by_ref.remove(&bref);
        if !local.usable() {
            return;
        }
        // Held by this process alone: kept for the next allocation, no lock.
        // Held by others too: released at this process's next transaction,
        // or by whoever needs the room first (see `releases`).
        let to_free = if private {
            local.cache.put(cached)
        } else if !forking
            && local.releases.put(
                self.inner.put_off_marks(slot),
                PendingRelease {
                    bref,
                    generation,
                    size: cached.size,
                },
            )
        {
            super::decay::ensure_thread(); // applies it within a tick at the latest
            return;
        } else {
            vec![cached]
        };
        if to_free.is_empty() {
            return;
        }
        if let Ok(mut txn) = self.inner.txn(&mut local) {
            // Errors here mean the arena was removed; nothing left to release.
            let _ = txn.free_cached(to_free);
        };
    }

    /// True if this process may use this attachment (it holds a slot of its
    /// own: not detached, not inherited through a fork without handlers).
    pub fn usable(&self) -> bool {
        lock_local(&self.inner.local).usable()
    }

    /// True if `addr` lies in a segment of this arena mapped by this process.
    pub fn contains(&self, addr: usize) -> bool {
        let local = lock_local(&self.inner.local);
        local.segments.iter().flatten().any(|m| m.contains(addr))
    }
}
