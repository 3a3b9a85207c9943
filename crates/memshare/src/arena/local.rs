//! This process's side of an attachment: its slot, its segment mappings,
//! and the blocks it references, counted locally (the shared holder bit is
//! set on the first reference and cleared on the last).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::block::Block;
use super::fork::ForkReservation;
use super::Arena;
use crate::layout::BlockRef;
use crate::sys::Mapping;

pub(super) struct LocalRef {
    pub(super) bref: BlockRef,
    pub(super) generation: u64,
    pub(super) size: u64,
    pub(super) count: usize,
    pub(super) readonly: bool,
    /// Stops the background populating of this block (see `prefault`) when
    /// this process drops its last reference.
    pub(super) prefault: Option<Arc<AtomicBool>>,
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
    pub(super) detached: bool,
    pub(super) fork: Option<ForkReservation>,
}

impl Local {
    /// A fresh attachment through `fd` that has no slot yet.
    pub(super) fn new(fd: OwnedFd) -> Local {
        Local {
            fd,
            slot: u32::MAX,
            epoch: 0,
            segments: Vec::new(),
            memfds: HashMap::new(),
            refs: BTreeMap::new(),
            by_ref: HashMap::new(),
            detached: false,
            fork: None,
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
        if local.detached {
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
        let Some(e) = local.refs.get_mut(&addr) else {
            return;
        };
        e.count -= 1;
        if e.count > 0 {
            return;
        }
        let (bref, generation) = (e.bref, e.generation);
        local.refs.remove(&addr);
        local.by_ref.remove(&bref);
        if local.detached {
            return;
        }
        if let Ok(mut txn) = self.inner.txn(&mut local) {
            // Errors here mean the arena was removed; nothing left to release.
            let _ = txn.drop_holder(bref, generation);
        };
    }

    /// True if `addr` lies in a segment of this arena mapped by this process.
    pub fn contains(&self, addr: usize) -> bool {
        let local = lock_local(&self.inner.local);
        local.segments.iter().flatten().any(|m| m.contains(addr))
    }
}
