//! This process's cache of free blocks: a block it allocated and never
//! shared (no handle was made of it and no child was forked while it lived)
//! has no holder but this process, so when its last reference goes it can
//! be kept for the next allocation of its size without taking the arena's
//! lock, and handed out again without it. Scratch arrays that numpy's
//! allocator hook puts in shared memory are the common case: a worker's
//! temporaries of each task reuse those of the last one.
//!
//! A cached block stays LIVE in the shared metadata, held by this process's
//! slot, so every other process sees it as memory in use, and if this
//! process dies the reaper frees it like anything else a dead process held
//! (there is nothing to repair: the headers never change while cached).
//! The cache is bounded (at most [`MAX_BLOCKS`] blocks and a small share of
//! the arena's limit and directory, see [`cap_bytes`]) and goes back to the
//! shared heap in one transaction: when it overflows, when an allocation
//! finds no room, before a fork, when idle for a decay tick, and when the
//! process leaves. This process's figures ([`super::Arena::stats`]) count
//! its cache as free (`cached_bytes`); other processes see it in use.

use std::sync::atomic::{AtomicU64, Ordering};

use super::local::lock_local;
use super::txn::Txn;
use super::Arena;
use crate::error::Result;
use crate::layout::BlockRef;

/// Bytes in the caches of this process (every arena): one atomic load, for
/// a worker's "do I hold anything?" before it waits.
pub fn cached_bytes() -> u64 {
    CACHED.load(Ordering::Relaxed)
}

static CACHED: AtomicU64 = AtomicU64::new(0);

/// The byte count of one of this process's lists of blocks, kept in a
/// process-wide total too (which a worker reads with one atomic load before
/// it waits). Dropping it takes its bytes out of the total.
pub(super) struct CountedBytes {
    bytes: u64,
    total: &'static AtomicU64,
}

impl CountedBytes {
    pub(super) const fn new(total: &'static AtomicU64) -> CountedBytes {
        CountedBytes { bytes: 0, total }
    }

    pub(super) fn get(&self) -> u64 {
        self.bytes
    }

    pub(super) fn set(&mut self, bytes: u64) {
        if bytes >= self.bytes {
            self.total.fetch_add(bytes - self.bytes, Ordering::Relaxed);
        } else {
            self.total.fetch_sub(self.bytes - bytes, Ordering::Relaxed);
        }
        self.bytes = bytes;
    }
}

impl Drop for CountedBytes {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// Gives the caches of free blocks of this process (every arena it is
/// attached to) back to the shared heaps now: for a process about to idle
/// that must not hold memory meanwhile (a pool worker waiting for work, a
/// Dask worker between tasks). Carries out the releases this process put
/// off too (see `releases`). One transaction per arena with either.
pub fn flush_caches() -> Result<()> {
    if cached_bytes() == 0 && super::pending_release_bytes() == 0 {
        return Ok(()); // the common case: no arena to visit
    }
    for arena in Arena::all_attached() {
        let mut local = lock_local(&arena.inner.local);
        if !local.usable() {
            continue;
        }
        let slot = local.slot;
        local
            .releases
            .forget_carried_out(arena.inner.put_off_marks(slot));
        if local.cache.is_empty() && local.releases.is_empty() {
            continue;
        }
        // The transaction carries out the put-off releases as it starts.
        arena.inner.txn(&mut local)?.flush_cache()?;
    }
    Ok(())
}

/// Most blocks one process keeps.
pub(super) const MAX_BLOCKS: usize = 16;
/// Most bytes one process keeps (smaller on a small arena, see [`cap_bytes`]).
pub(super) const MAX_BYTES: u64 = 64 << 20;
/// A cached block serves a request this much smaller than itself at most
/// (in quarters: up to a quarter of it may go unused).
const WASTE_QUARTERS: u64 = 1;

/// A free block this process keeps.
#[derive(Clone, Copy, Debug)]
pub(super) struct CachedBlock {
    pub(super) bref: BlockRef,
    pub(super) generation: u64,
    pub(super) ptr: usize,
    pub(super) size: u64,
    /// Bytes asked for when this process allocated it last.
    pub(super) len: u64,
    pub(super) readonly: bool,
    /// When it was cached (monotonic ns), for the idle flush.
    pub(super) cached_ns: u64,
}

pub(super) struct BlockCache {
    blocks: Vec<CachedBlock>,
    bytes: CountedBytes,
    /// At most this many bytes (0: caching off); set on attach.
    pub(super) cap: u64,
}

impl Default for BlockCache {
    fn default() -> BlockCache {
        BlockCache {
            blocks: Vec::new(),
            bytes: CountedBytes::new(&CACHED),
            cap: 0,
        }
    }
}

/// The cache bound of a process: [`MAX_BYTES`], at most 1/32 of the arena's
/// limit and of its directory's size, so that the caches of many processes
/// never keep a small `/dev/shm` from the others.
pub(super) fn cap_bytes(limit: u64, dir_bytes: u64) -> u64 {
    MAX_BYTES.min(limit / 32).min(dir_bytes / 32)
}

impl BlockCache {
    /// Takes the smallest cached block that serves `size` bytes with the
    /// given flag, wasting at most a quarter of it.
    pub(super) fn take(&mut self, size: u64, readonly: bool) -> Option<CachedBlock> {
        let fits = |c: &CachedBlock| {
            c.readonly == readonly
                && c.size >= size
                && (c.size - size) * 4 <= c.size * WASTE_QUARTERS
        };
        let i = (0..self.blocks.len())
            .filter(|&i| fits(&self.blocks[i]))
            .min_by_key(|&i| self.blocks[i].size)?;
        let c = self.blocks.swap_remove(i);
        self.bytes.set(self.bytes.get() - c.size);
        Some(c)
    }

    /// Keeps `c` if it fits under the bound, evicting the oldest blocks to
    /// make room; returns the evicted ones (and `c` itself if it cannot be
    /// kept), which the caller frees in one transaction.
    pub(super) fn put(&mut self, c: CachedBlock) -> Vec<CachedBlock> {
        if c.size > self.cap {
            return vec![c];
        }
        let mut out = Vec::new();
        while !self.blocks.is_empty()
            && (self.blocks.len() >= MAX_BLOCKS || self.bytes.get() + c.size > self.cap)
        {
            let oldest = (0..self.blocks.len())
                .min_by_key(|&i| self.blocks[i].cached_ns)
                .expect("the cache is not empty");
            let e = self.blocks.swap_remove(oldest);
            self.bytes.set(self.bytes.get() - e.size);
            out.push(e);
        }
        self.bytes.set(self.bytes.get() + c.size);
        self.blocks.push(c);
        out
    }

    /// Empties the cache (the caller frees what it returns).
    pub(super) fn drain(&mut self) -> Vec<CachedBlock> {
        self.bytes.set(0);
        std::mem::take(&mut self.blocks)
    }

    /// Takes out the blocks cached before `cutoff_ns`.
    pub(super) fn drain_older_than(&mut self, cutoff_ns: u64) -> Vec<CachedBlock> {
        let (old, keep): (Vec<_>, Vec<_>) =
            self.blocks.drain(..).partition(|c| c.cached_ns < cutoff_ns);
        self.blocks = keep;
        self.bytes.set(self.blocks.iter().map(|c| c.size).sum());
        old
    }

    pub(super) fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    pub(super) fn len(&self) -> usize {
        self.blocks.len()
    }
}

impl Txn<'_> {
    /// Gives `blocks` (cached by this process, held by it alone) back to
    /// the shared heap.
    pub(super) fn free_cached(&mut self, blocks: Vec<CachedBlock>) -> Result<()> {
        for c in blocks {
            self.drop_holder(c.bref, c.generation)?;
        }
        Ok(())
    }

    /// Gives this process's whole cache back to the shared heap; true if it
    /// held anything.
    pub(super) fn flush_cache(&mut self) -> Result<bool> {
        if self.local.cache.is_empty() {
            return Ok(false);
        }
        let blocks = self.local.cache.drain();
        self.free_cached(blocks)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(i: u64, size: u64, at: u64) -> CachedBlock {
        CachedBlock {
            bref: BlockRef::new(0, 128 + i * 64),
            generation: i,
            ptr: i as usize,
            size,
            len: size,
            readonly: false,
            cached_ns: at,
        }
    }

    #[test]
    fn takes_the_smallest_fit_and_never_wastes_more_than_a_quarter() {
        let mut c = BlockCache {
            cap: 1 << 30,
            ..Default::default()
        };
        assert!(c.put(block(1, 4096, 1)).is_empty());
        assert!(c.put(block(2, 8192, 2)).is_empty());
        assert!(c.take(4096, true).is_none(), "flags must match");
        assert!(c.take(2048, false).is_none(), "4096 would waste half");
        assert_eq!(c.take(3500, false).unwrap().size, 4096);
        assert_eq!(c.take(8192, false).unwrap().size, 8192);
        assert!(c.is_empty() && c.bytes() == 0);
    }

    #[test]
    fn stays_within_its_bounds_evicting_the_oldest() {
        let mut c = BlockCache {
            cap: 10_000,
            ..Default::default()
        };
        assert_eq!(c.put(block(1, 20_000, 1)).len(), 1, "larger than the cap");
        assert!(c.put(block(2, 6000, 2)).is_empty());
        let out = c.put(block(3, 6000, 3));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].generation, 2, "the oldest goes");
        assert_eq!(c.bytes(), 6000);
        let mut c = BlockCache {
            cap: 1 << 30,
            ..Default::default()
        };
        let evicted: usize = (0..40).map(|i| c.put(block(i, 64, i)).len()).sum();
        assert_eq!(evicted, 40 - MAX_BLOCKS);
        assert_eq!(c.drain_older_than(30).len(), MAX_BLOCKS - 10);
        assert_eq!(c.drain().len(), 10);
    }

    #[test]
    fn the_cap_is_a_small_share_of_the_limit_and_the_directory() {
        assert_eq!(cap_bytes(u64::MAX, 12 << 30), MAX_BYTES);
        assert_eq!(cap_bytes(u64::MAX, 64 << 20), 2 << 20);
        assert_eq!(cap_bytes(32 << 20, 12 << 30), 1 << 20);
    }
}
