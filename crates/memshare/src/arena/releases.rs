//! Releases put off. When this process drops its last reference to a block
//! that others may hold too, clearing its holder bit needs the arena's lock.
//! Instead the release waits, marked in this process's slot (see
//! [`PutOffRelease`]), for whichever of these comes first:
//! - this process's next transaction, which carries out its marks before
//!   doing anything else (so a pool worker's "allocate a result, send it,
//!   drop it" costs the lock of its next allocation only, and the parent's
//!   "open a result, sum it, drop it" the lock of its next open);
//! - an allocation of any process that finds no free block and would grow
//!   the arena (or fail): it carries out everyone's marks first, so memory
//!   that one process let go of is never kept from another, even while the
//!   first is busy or stopped;
//! - the caches' flush (a pool worker about to wait for work, `fork`, leaving);
//! - the decay thread's next tick (about a second).
//!
//! Meanwhile the block stays LIVE and held by this process, as if the
//! reference were still alive: nothing reuses it early, and if the process
//! dies the reaper clears its bit like any other (and its marks). The list is
//! bounded like the cache of free blocks ([`PUT_OFF_RELEASES`] blocks, 1/32 of
//! the arena's limit and of its directory), so it never keeps a small
//! `/dev/shm` from the processes that do not allocate through memshare: what
//! does not fit is released at once.

use std::sync::atomic::{AtomicU64, Ordering};

use super::cache::CountedBytes;
use super::txn::Txn;
use super::Inner;
use crate::error::Error;
use crate::layout::{BlockRef, PutOffRelease, MAX_PROCS, PUT_OFF_RELEASES, SLOT_ALIVE};

/// Bytes of the blocks whose release this process has put off (every arena;
/// one that another process has carried out meanwhile counts until this
/// process next looks at its marks).
pub fn pending_release_bytes() -> u64 {
    PENDING.load(Ordering::Relaxed)
}

static PENDING: AtomicU64 = AtomicU64::new(0);

/// The bound of one process's list: 1/32 of the arena's limit and of its
/// directory's size. Not capped further, unlike the cache: a put-off block
/// is memory its receiver or sender holds anyway most of the time, and an
/// allocation that needs it takes it back.
pub(super) fn cap_bytes(limit: u64, dir_bytes: u64) -> u64 {
    (limit / 32).min(dir_bytes / 32)
}

#[derive(Clone, Copy, Debug)]
pub(super) struct PendingRelease {
    pub(super) bref: BlockRef,
    pub(super) generation: u64,
    pub(super) size: u64,
}

/// A put-off release and the index of its mark in this process's slot.
#[derive(Clone, Copy, Debug)]
pub(super) struct Marked {
    pub(super) release: PendingRelease,
    pub(super) mark: usize,
}

impl Marked {
    /// True while nobody has carried it out (its mark still names it).
    fn pending(&self, marks: &[PutOffRelease]) -> bool {
        marks[self.mark].generation.load(Ordering::Acquire) == self.release.generation
    }
}

/// This process's put-off releases: what it marked in its slot. Another
/// process may carry out a mark at any time under the lock; the list
/// notices by the mark's generation ([`PendingReleases::forget_carried_out`]).
pub(super) struct PendingReleases {
    blocks: Vec<Marked>,
    bytes: CountedBytes,
    /// At most this many bytes (0: releases are never put off); set on attach.
    pub(super) cap: u64,
}

impl Default for PendingReleases {
    fn default() -> PendingReleases {
        PendingReleases {
            blocks: Vec::new(),
            bytes: CountedBytes::new(&PENDING),
            cap: 0,
        }
    }
}

impl PendingReleases {
    /// Puts off the release of `r`, marking it in `marks` (this process's
    /// slot's); false if it does not fit (release it now).
    pub(super) fn put(&mut self, marks: &[PutOffRelease], r: PendingRelease) -> bool {
        self.forget_carried_out(marks);
        if self.blocks.len() >= PUT_OFF_RELEASES
            || self.bytes.get().saturating_add(r.size) > self.cap
        {
            return false;
        }
        // Only this process fills its marks; an empty one stays empty until then.
        let Some(mark) = marks
            .iter()
            .position(|m| m.generation.load(Ordering::Acquire) == 0)
        else {
            return false;
        };
        marks[mark].block.store(r.bref.raw(), Ordering::Relaxed);
        marks[mark]
            .generation
            .store(r.generation, Ordering::Release);
        self.bytes.set(self.bytes.get() + r.size);
        self.blocks.push(Marked { release: r, mark });
        true
    }

    /// Forgets the releases that another process has carried out.
    pub(super) fn forget_carried_out(&mut self, marks: &[PutOffRelease]) {
        let before = self.blocks.len();
        self.blocks.retain(|m| m.pending(marks));
        if self.blocks.len() != before {
            self.bytes
                .set(self.blocks.iter().map(|m| m.release.size).sum());
        }
    }

    /// Empties the list (the caller carries out what it returns, or forgets it).
    pub(super) fn drain(&mut self) -> Vec<Marked> {
        self.bytes.set(0);
        std::mem::take(&mut self.blocks)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

impl Inner {
    /// The put-off release marks of process slot `slot` (< `MAX_PROCS`),
    /// read and filled without the lock. Callers hold this attachment's
    /// local lock for as long as they use them.
    pub(super) fn put_off_marks(&self, slot: u32) -> &[PutOffRelease] {
        let ctl = self.ctl_ptr();
        // SAFETY: the control mapping is CTL_SIZE bytes and lives as long as
        // `self`; `slot` indexes the slot table. The marks are atomics: other
        // processes change them only with atomic operations, and in this
        // process the callers hold its local lock while they use the slice,
        // so no transaction (which holds it too) has the control header
        // borrowed meanwhile.
        let marks: &[PutOffRelease; PUT_OFF_RELEASES] =
            unsafe { &*std::ptr::addr_of!((*ctl).slots[slot as usize].put_off) };
        marks
    }
}

impl Txn<'_> {
    /// Carries out the releases this process put off (every transaction
    /// starts with this, so none is ever applied after a later change of
    /// this process: opening the same block again sets the bit anew).
    pub(super) fn apply_pending_releases(&mut self) {
        if self.local.releases.is_empty() {
            return;
        }
        let slot = self.local.slot as usize;
        for m in self.local.releases.drain() {
            if !m.pending(&self.ctl.slots[slot].put_off) {
                continue; // carried out by another process meanwhile
            }
            // Errors here mean the arena was removed; nothing left to release.
            let _ = self.drop_holder(m.release.bref, m.release.generation);
            self.ctl.slots[slot].put_off[m.mark]
                .generation
                .store(0, Ordering::Release);
        }
    }

    /// Carries out the put-off releases of every process (for an allocation
    /// that finds no free block). True if there were any.
    pub(super) fn carry_out_put_off_releases(&mut self) -> bool {
        let mut any = false;
        for slot in 0..MAX_PROCS {
            if self.ctl.slots[slot].state != SLOT_ALIVE {
                continue;
            }
            for i in 0..PUT_OFF_RELEASES {
                let mark = &self.ctl.slots[slot].put_off[i];
                let generation = mark.generation.load(Ordering::Acquire);
                if generation == 0 {
                    continue;
                }
                let bref = BlockRef::from_raw(mark.block.load(Ordering::Relaxed));
                let done = if slot as u32 == self.local.slot {
                    self.drop_holder(bref, generation)
                } else {
                    self.drop_holder_of(bref, generation, slot as u32, None)
                };
                // A mark naming no block of this arena (never written so by
                // memshare), or one in a corrupt segment, goes; one whose
                // segment this process cannot map now (out of descriptors)
                // stays for its owner. Neither fails the allocation.
                if matches!(
                    done,
                    Ok(()) | Err(Error::InvalidHandle(_) | Error::Corrupt { .. })
                ) {
                    self.ctl.slots[slot].put_off[i]
                        .generation
                        .store(0, Ordering::Release);
                    any = true;
                }
            }
        }
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(i: u64, size: u64) -> PendingRelease {
        PendingRelease {
            bref: BlockRef::new(0, 128 + i * 64),
            generation: i,
            size,
        }
    }

    fn marks() -> Vec<PutOffRelease> {
        (0..PUT_OFF_RELEASES)
            .map(|_| PutOffRelease {
                generation: AtomicU64::new(0),
                block: AtomicU64::new(0),
            })
            .collect()
    }

    fn marked(marks: &[PutOffRelease]) -> Vec<(u64, BlockRef)> {
        marks
            .iter()
            .filter(|m| m.generation.load(Ordering::Relaxed) != 0)
            .map(|m| {
                let generation = m.generation.load(Ordering::Relaxed);
                (
                    generation,
                    BlockRef::from_raw(m.block.load(Ordering::Relaxed)),
                )
            })
            .collect()
    }

    #[test]
    fn stays_within_its_bounds_and_marks_what_it_keeps() {
        let m = marks();
        let mut p = PendingReleases {
            cap: 10_000,
            ..Default::default()
        };
        assert!(!p.put(&m, pending(1, 20_000)), "larger than the cap");
        assert!(p.put(&m, pending(2, 6000)));
        assert!(!p.put(&m, pending(3, 6000)), "over the cap with the first");
        assert_eq!(marked(&m), vec![(2, pending(2, 0).bref)]);
        assert_eq!(p.drain().len(), 1);
        for mark in &m {
            mark.generation.store(0, Ordering::Relaxed);
        }
        p.cap = u64::MAX;
        let kept = (1..40).filter(|&i| p.put(&m, pending(i, 64))).count();
        assert_eq!(kept, PUT_OFF_RELEASES);
        assert_eq!(
            marked(&m).len(),
            PUT_OFF_RELEASES,
            "every kept one is marked"
        );
        assert!(pending_release_bytes() >= 64 * PUT_OFF_RELEASES as u64);
        assert_eq!(p.drain().len(), PUT_OFF_RELEASES);
        assert!(p.is_empty());
    }

    #[test]
    fn forgets_what_another_process_carried_out_and_reuses_its_mark() {
        let m = marks();
        let mut p = PendingReleases {
            cap: u64::MAX,
            ..Default::default()
        };
        for i in 1..=PUT_OFF_RELEASES as u64 {
            assert!(p.put(&m, pending(i, 100)));
        }
        assert!(!p.put(&m, pending(99, 100)), "every mark is in use");
        // Another process carries out the third one under the lock.
        m[2].generation.store(0, Ordering::Release);
        p.forget_carried_out(&m);
        assert_eq!(p.blocks.len(), PUT_OFF_RELEASES - 1);
        assert_eq!(p.bytes.get(), 100 * (PUT_OFF_RELEASES as u64 - 1));
        assert!(p.put(&m, pending(99, 100)), "its mark is free again");
        assert_eq!(m[2].generation.load(Ordering::Relaxed), 99);
        // The owner's own pass skips what someone else did: only pending ones remain.
        m[0].generation.store(0, Ordering::Release);
        let left: Vec<u64> = p
            .drain()
            .iter()
            .filter(|r| r.pending(&m))
            .map(|r| r.release.generation)
            .collect();
        assert_eq!(left.len(), PUT_OFF_RELEASES - 1);
        assert!(!left.contains(&1) && left.contains(&99));
    }

    #[test]
    fn the_cap_is_a_small_share_of_the_limit_and_the_directory() {
        assert_eq!(cap_bytes(u64::MAX, 12 << 30), 384 << 20);
        assert_eq!(cap_bytes(u64::MAX, 64 << 20), 2 << 20);
        assert_eq!(cap_bytes(32 << 20, 12 << 30), 1 << 20);
        let off = PendingReleases::default();
        assert_eq!(off.cap, 0, "off until attached");
    }
}
