//! Releases put off to this process's next transaction. When this process
//! drops its last reference to a block that others may hold too, clearing
//! its holder bit needs the arena's lock. For the blocks of
//! [`worth_putting_off`] the release waits instead, in this list, for
//! whichever of these comes first:
//! - this process's next transaction, which applies the list before doing
//!   anything else (so a pool worker's "allocate a result, send it, drop it"
//!   costs the lock of its next allocation only);
//! - the caches' flush (a pool worker about to wait for work, `fork`, leaving);
//! - the decay thread's next tick (about a second).
//!
//! Meanwhile the block stays LIVE and held by this process, as if the
//! reference were still alive: nothing reuses it early, and if the process
//! dies the reaper clears its bit like any other. The list is bounded like
//! the cache of free blocks ([`MAX_BLOCKS`] blocks, 1/32 of the arena's
//! limit and of its directory), so it never keeps a small `/dev/shm` from
//! the other processes: what does not fit is released at once.

use std::sync::atomic::{AtomicU64, Ordering};

use super::cache::{CountedBytes, MAX_BLOCKS};
use super::txn::Txn;
use crate::layout::BlockRef;

/// Received blocks larger than this are released at once.
pub(super) const RECEIVED_MAX: u64 = 16 << 20;

/// Whether to put off the release of a block of `size` bytes: always for one
/// this process made a handle of (`sent`: its receiver most often still holds
/// it, so the release frees nothing yet), and for a received one only up to
/// [`RECEIVED_MAX`]. A receiver is most often the last holder, so putting its
/// release off puts off the free: a large allocation elsewhere meanwhile
/// finds no room and grows the arena, and fresh pages cost far more than the
/// lock saved (workload (a), 200 MB results: 7% slower, one result more in
/// the arena). A small block late costs little; its lock is the same.
pub(super) fn worth_putting_off(sent: bool, size: u64) -> bool {
    sent || size <= RECEIVED_MAX
}

/// Bytes of the blocks whose release this process has put off (every arena).
pub fn pending_release_bytes() -> u64 {
    PENDING.load(Ordering::Relaxed)
}

static PENDING: AtomicU64 = AtomicU64::new(0);

/// The bound of one process's list: 1/32 of the arena's limit and of its
/// directory's size. Not capped further, unlike the cache: a put-off block
/// is memory its receiver or sender holds anyway most of the time, and it
/// waits for a second at most.
pub(super) fn cap_bytes(limit: u64, dir_bytes: u64) -> u64 {
    (limit / 32).min(dir_bytes / 32)
}

#[derive(Clone, Copy, Debug)]
pub(super) struct PendingRelease {
    pub(super) bref: BlockRef,
    pub(super) generation: u64,
    pub(super) size: u64,
}

pub(super) struct PendingReleases {
    blocks: Vec<PendingRelease>,
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
    /// Puts off the release of `r`; false if it does not fit (release it now).
    pub(super) fn put(&mut self, r: PendingRelease) -> bool {
        if self.blocks.len() >= MAX_BLOCKS || self.bytes.get().saturating_add(r.size) > self.cap {
            return false;
        }
        self.bytes.set(self.bytes.get() + r.size);
        self.blocks.push(r);
        true
    }

    /// Empties the list (the caller releases what it returns, or forgets it).
    pub(super) fn drain(&mut self) -> Vec<PendingRelease> {
        self.bytes.set(0);
        std::mem::take(&mut self.blocks)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.blocks.is_empty()
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
        for r in self.local.releases.drain() {
            // Errors here mean the arena was removed; nothing left to release.
            let _ = self.drop_holder(r.bref, r.generation);
        }
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

    #[test]
    fn stays_within_its_bounds() {
        let mut p = PendingReleases {
            cap: 10_000,
            ..Default::default()
        };
        assert!(!p.put(pending(1, 20_000)), "larger than the cap");
        assert!(p.put(pending(2, 6000)));
        assert!(!p.put(pending(3, 6000)), "over the cap with the first");
        assert_eq!(p.drain().len(), 1);
        p.cap = u64::MAX;
        let kept = (0..40).filter(|&i| p.put(pending(i, 64))).count();
        assert_eq!(kept, MAX_BLOCKS);
        assert!(pending_release_bytes() >= 64 * MAX_BLOCKS as u64);
        assert_eq!(p.drain().len(), MAX_BLOCKS);
        assert!(p.is_empty());
    }

    #[test]
    fn sent_blocks_and_small_received_ones_are_worth_putting_off() {
        assert!(worth_putting_off(true, 1 << 30));
        assert!(worth_putting_off(false, RECEIVED_MAX));
        assert!(!worth_putting_off(false, RECEIVED_MAX + 1));
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
