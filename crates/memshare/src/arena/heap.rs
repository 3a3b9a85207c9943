//! The heap: segments carved into blocks, free lists binned by size,
//! best-fit allocation with splitting, merging of free neighbours, and
//! growth by new segments.
//!
//! Growth: small requests share segments that grow geometrically (an eighth
//! of what the arena holds, 16 to 128 MiB); a request of more than an eighth
//! of that gets a segment of exactly its size, so large blocks leave no
//! unusable pieces behind. Under a limit or a full directory, idle free
//! pages are given back to the OS before the arena grows.
//!
//! Headers are written so that a walk of a segment is consistent at every
//! instant (crash repair relies on it).

use super::crash::{self, CrashPoint};
use super::txn::Txn;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::sys::{self, Mapping};

/// Space the arena may use above its limit for block and segment headers and
/// page rounding: 1/64 of the limit.
fn headroom(limit: u64) -> u64 {
    limit / 64
}

/// Segments grow geometrically between these sizes (a single larger request
/// gets a segment of its own size).
const MIN_SEGMENT: u64 = 16 << 20;
const MAX_SEGMENT: u64 = 128 << 20;
/// A request larger than `geometric / DEDICATED_FRACTION` gets a segment of its own.
const DEDICATED_FRACTION: u64 = 8;
/// A free block is split when the remainder is at least this large.
const SPLIT_MIN: u64 = BLOCK_HEADER + 4096;
/// Allocations from this size on prefer a free block their process wrote
/// last (see `Txn::best_fit`); below, page faults cost little.
const WRITER_AFFINITY_MIN: u64 = 4 << 20;
/// How often an allocation (or the decay thread) checks for dead processes.
pub(super) const REAP_INTERVAL_NS: u64 = 1_000_000_000;

/// A block just allocated, held by this process.
pub(super) struct Allocated {
    pub(super) bref: BlockRef,
    pub(super) generation: u64,
    /// This process allocated all of the block last, for at least `len`
    /// bytes, and none of its pages were given back since: they are still in
    /// this process's page tables, so writing them faults nothing in.
    pub(super) pages_mapped: bool,
}

impl Txn<'_> {
    pub(super) fn bin_insert(&mut self, r: BlockRef) -> Result<()> {
        let size = self.hdr(r)?.size;
        let b = bin_of(size);
        let head = self.ctl.bins[b];
        {
            let h = self.hdr(r)?;
            h.free_prev = BlockRef::NIL;
            h.free_next = head;
        }
        if !head.is_nil() {
            self.hdr(head)?.free_prev = r;
        }
        self.ctl.bins[b] = r;
        Ok(())
    }

    fn bin_remove(&mut self, r: BlockRef) -> Result<()> {
        let (prev, next, size) = {
            let h = self.hdr(r)?;
            (h.free_prev, h.free_next, h.size)
        };
        if !prev.is_nil() {
            self.hdr(prev)?.free_next = next;
        } else {
            self.ctl.bins[bin_of(size)] = next;
        }
        if !next.is_nil() {
            self.hdr(next)?.free_prev = prev;
        }
        Ok(())
    }

    fn write_free_header(&mut self, r: BlockRef, size: u64, prev_size: u64) -> Result<()> {
        init_free_header(self.hdr(r)?, size, prev_size);
        Ok(())
    }

    fn set_prev_size_after(&mut self, r: BlockRef, size: u64) -> Result<()> {
        if let Some(n) = self.next_of(r, size) {
            self.hdr(n)?.prev_size = size;
        }
        Ok(())
    }

    /// Takes the best-fitting free block of at least `size` bytes out of the
    /// bins. A memory-backed segment found gone on the way (its free blocks
    /// were still in the bins) is repaired away first, and the bins are
    /// tried again.
    fn take_free(&mut self, size: u64) -> Result<Option<BlockRef>> {
        match self.take_from_bins(size) {
            Err(Error::NotFound { .. }) if self.ctl.repair_needed != 0 => {
                self.repair()?;
                self.take_from_bins(size)
            }
            found => found,
        }
    }

    /// [`Txn::take_free`] without the repair. A block with punched pages is
    /// reserved again first (with the header of the tail split off it); if
    /// the file system has no room for that, it goes back to the bins and
    /// only blocks without holes are used.
    fn take_from_bins(&mut self, size: u64) -> Result<Option<BlockRef>> {
        let mut holes_ok = true;
        loop {
            let prefer = if size >= WRITER_AFFINITY_MIN {
                self.writer_tag()
            } else {
                (0, 0)
            };
            let Some(r) = self.best_fit(size, holes_ok, prefer)? else {
                return Ok(None);
            };
            self.bin_remove(r)?;
            let (total, flags) = {
                let h = self.hdr(r)?;
                (h.size, h.flags)
            };
            if flags & BLOCK_HOLES != 0 {
                let end =
                    (r.payload_offset() + size + BLOCK_HEADER).min(r.payload_offset() + total);
                let reserved = self.reserve_range(r.segment(), r.offset(), end - r.offset());
                if reserved.is_err() {
                    self.bin_insert(r)?;
                    holes_ok = false;
                    continue;
                }
            }
            self.split(r, size)?;
            return Ok(Some(r));
        }
    }

    /// This process's `(writer, writer_epoch)` tag for block headers.
    fn writer_tag(&self) -> (u32, u32) {
        (self.local.slot + 1, self.local.epoch)
    }

    /// The smallest free block of the first bin that has one of at least
    /// `size` bytes; but one that `prefer` (a [`Txn::writer_tag`], writer 0:
    /// none) wrote last if there is one at most a quarter larger, as its
    /// pages are already in that process's page tables (a fresh 200 MB block
    /// costs 51,200 page faults to write, some 100 ms on a virtual machine).
    fn best_fit(
        &mut self,
        size: u64,
        holes_ok: bool,
        prefer: (u32, u32),
    ) -> Result<Option<BlockRef>> {
        let near = size.saturating_add(size / 4);
        for b in bin_of(size)..NBINS {
            let mut cur = self.ctl.bins[b];
            let (mut best, mut best_size) = (BlockRef::NIL, u64::MAX);
            let (mut mine, mut mine_size) = (BlockRef::NIL, u64::MAX);
            let mut seen = 0;
            while !cur.is_nil() && seen < 64 {
                let h = self.hdr(cur)?;
                let usable = (holes_ok || h.flags & BLOCK_HOLES == 0) && h.size >= size;
                let ours = prefer.0 != 0 && (h.writer, h.writer_epoch) == prefer && h.size <= near;
                if usable && ours && h.size < mine_size {
                    (mine, mine_size) = (cur, h.size);
                }
                if usable && h.size < best_size {
                    (best, best_size) = (cur, h.size);
                }
                if usable && h.size == size && (prefer.0 == 0 || ours) {
                    break;
                }
                cur = h.free_next;
                seen += 1;
            }
            if !mine.is_nil() {
                return Ok(Some(mine));
            }
            if !best.is_nil() {
                return Ok(Some(best));
            }
        }
        Ok(None)
    }

    /// Cuts the tail off a block that is larger than needed. The tail header is
    /// written before the head shrinks, so a walk is consistent throughout.
    /// The tail keeps what is known of its pages: holes, dirt and age.
    fn split(&mut self, r: BlockRef, size: u64) -> Result<()> {
        let (total, flags, dirty, freed_ns, writer, writer_epoch) = {
            let h = self.hdr(r)?;
            (
                h.size,
                h.flags,
                h.dirty,
                h.freed_ns,
                h.writer,
                h.writer_epoch,
            )
        };
        if total - size < SPLIT_MIN {
            return Ok(());
        }
        let tail = BlockRef::new(r.segment(), r.payload_offset() + size);
        let tail_size = total - size - BLOCK_HEADER;
        self.write_free_header(tail, tail_size, size)?;
        {
            let t = self.hdr(tail)?;
            t.flags = flags & BLOCK_HOLES;
            t.dirty = dirty.min(tail_size);
            t.freed_ns = freed_ns;
            t.writer = writer;
            t.writer_epoch = writer_epoch;
        }
        self.set_prev_size_after(tail, tail_size)?;
        self.hdr(r)?.size = size;
        self.bin_insert(tail)
    }

    /// Gives every committed free page back to the OS, now (the arena is
    /// short of room under its limit or in its directory).
    fn purge(&mut self) -> Result<()> {
        for r in self.free_blocks()? {
            if self.hdr(r)?.dirty > 0 {
                self.punch(r)?;
            }
        }
        Ok(())
    }

    /// Every free block, from the bins.
    pub(super) fn free_blocks(&mut self) -> Result<Vec<BlockRef>> {
        let mut out = Vec::new();
        for b in 0..NBINS {
            let mut cur = self.ctl.bins[b];
            while !cur.is_nil() {
                out.push(cur);
                cur = self.hdr(cur)?.free_next;
            }
        }
        Ok(out)
    }

    fn grow(&mut self, size: u64) -> Result<()> {
        let idx = self.ctl.segment_count;
        if idx as usize >= MAX_SEGMENTS {
            return Err(self.oom(size));
        }
        let page = sys::page_size() as u64;
        let needed = (size + SEG_HEADER + BLOCK_HEADER).div_ceil(page) * page;
        // Reserved space is real memory on tmpfs: grow by an eighth of what is
        // reserved (at most MAX_SEGMENT); a large request gets a segment of
        // exactly its size.
        let geometric = (self.ctl.bytes_reserved / 8).clamp(MIN_SEGMENT, MAX_SEGMENT);
        let mut want = if needed > geometric / DEDICATED_FRACTION {
            needed
        } else {
            geometric.div_ceil(2 << 20) * (2 << 20)
        };
        let limit = self.ctl.limit.saturating_add(headroom(self.ctl.limit));
        let (_, avail) = sys::space(&self.inner.dir);
        if self.ctl.bytes_committed.saturating_add(want) > limit || want > avail {
            // Short of room: idle free pages go back to the OS first.
            self.purge()?;
            let (_, avail) = sys::space(&self.inner.dir);
            if self.ctl.bytes_committed.saturating_add(want) > limit || want > avail {
                want = needed;
            }
        }
        if self.ctl.bytes_committed.saturating_add(want) > limit {
            return Err(self.oom(size));
        }
        let fd = self.create_segment(idx, want)?;
        let map = Mapping::new(&fd, want as usize)?;
        // SAFETY: the fresh mapping is `want` >= SEG_HEADER bytes, page aligned,
        // and not yet visible to any other process.
        unsafe {
            std::ptr::write(
                map.ptr() as *mut SegHeader,
                SegHeader {
                    magic: SEG_MAGIC,
                    version: LAYOUT_VERSION,
                    index: idx,
                    token: self.inner.token,
                    size: want,
                    _reserved: [0; 88],
                },
            );
        }
        // Whole before it is published: a walk (repair's) of a segment
        // whose first header is not written yet finds a broken chain.
        // SAFETY: `want` >= SEG_HEADER + BLOCK_HEADER and SEG_HEADER is
        // 64-byte aligned, so the header lies inside the fresh mapping,
        // which no other process sees yet.
        let first_header =
            unsafe { &mut *(map.ptr().add(SEG_HEADER as usize) as *mut BlockHeader) };
        init_free_header(first_header, want - SEG_HEADER - BLOCK_HEADER, 0);
        self.local.set_segment(idx as usize, map);
        self.ctl.segments[idx as usize].size = want;
        self.ctl.segments[idx as usize].committed = 0;
        self.recount(idx, &fd);
        let first = BlockRef::new(idx, SEG_HEADER);
        crash::reached(CrashPoint::GrowBeforePublish);
        self.ctl.segment_count = idx + 1;
        self.sum_segments();
        crash::reached(CrashPoint::GrowAfterPublish);
        self.bin_insert(first)
    }

    pub(super) fn oom(&self, requested: u64) -> Error {
        Error::OutOfMemory {
            requested,
            in_use: self.ctl.bytes_in_use,
            reserved: self.ctl.bytes_committed,
            limit: self.ctl.limit,
        }
    }

    /// Allocates a block of `len` bytes held by this process.
    pub(super) fn alloc(&mut self, len: u64, flags: u32) -> Result<Allocated> {
        let size = payload_size(len);
        // The limit caps the bytes of live blocks (with room for their
        // rounding to whole pages: a block keeps a remainder too small to split).
        let limit = self.ctl.limit.saturating_add(headroom(self.ctl.limit));
        if size <= (1 << 47) && self.ctl.bytes_in_use.saturating_add(size) > limit {
            // This process's cache counts as in use, and so do the blocks
            // whose release any process put off: take them back first.
            self.flush_cache()?;
            self.carry_out_put_off_releases();
        }
        if size > (1 << 47) || self.ctl.bytes_in_use.saturating_add(size) > limit {
            return Err(self.oom(len));
        }
        if sys::monotonic_ns().saturating_sub(self.ctl.last_reap_ns) > REAP_INTERVAL_NS {
            self.reap()?;
        }
        let r = match self.take_free(size)? {
            Some(r) => r,
            None => {
                // Under pressure: this process's cache, the releases any
                // process put off, and what dead processes hold, go back
                // before the arena grows.
                if self.flush_cache()? | self.carry_out_put_off_releases() | self.reap()? {
                    if let Some(r) = self.take_free(size)? {
                        return self.mark_live(r, len, flags);
                    }
                }
                self.grow(size)?;
                self.take_free(size)?.ok_or_else(|| self.oom(len))?
            }
        };
        self.mark_live(r, len, flags)
    }

    fn mark_live(&mut self, r: BlockRef, len: u64, flags: u32) -> Result<Allocated> {
        self.ctl.next_generation += 1;
        let generation = self.ctl.next_generation;
        let slot = self.local.slot as usize;
        let child = self.local.fork.as_ref().map(|f| f.slot as usize);
        let tag = self.writer_tag();
        let h = self.hdr(r)?;
        // `h.len` is still what the last allocation asked for (0 for a piece
        // split off a block): the bytes its writer touched.
        let pages_mapped =
            (h.writer, h.writer_epoch) == tag && h.flags & BLOCK_HOLES == 0 && len <= h.len;
        // The writer before the length: a crash in between must not leave the
        // last writer's mark on a length another process asked for.
        (h.writer, h.writer_epoch) = tag;
        h.state = BLOCK_LIVE;
        h.generation = generation;
        h.len = len;
        h.pins = 0;
        h.flags = flags;
        h.free_next = BlockRef::NIL;
        h.free_prev = BlockRef::NIL;
        h.holders = [0; HOLDER_WORDS];
        h.holders[slot / 64] |= 1 << (slot % 64);
        // A child about to be forked holds what this process holds.
        if let Some(c) = child {
            h.holders[c / 64] |= 1 << (c % 64);
        }
        let size = h.size;
        self.ctl.bytes_in_use += size;
        self.ctl.live_blocks += 1;
        Ok(Allocated {
            bref: r,
            generation,
            pages_mapped,
        })
    }

    /// Returns a block to the free lists, merging it with free neighbours.
    pub(super) fn release_block(&mut self, r: BlockRef) -> Result<()> {
        let mut r = r;
        let size = {
            let h = self.hdr(r)?;
            h.state = BLOCK_FREE;
            h.flags = 0;
            h.generation = 0;
            h.holders = [0; HOLDER_WORDS];
            h.pins = 0;
            h.dirty = h.size;
            h.freed_ns = sys::monotonic_ns();
            h.size
        };
        self.ctl.bytes_in_use -= size;
        self.ctl.live_blocks -= 1;
        self.ctl.frees += 1;
        if let Some(n) = self.next_of(r, size) {
            let (nstate, nsize) = {
                let nh = self.hdr(n)?;
                (nh.state, nh.size)
            };
            if nstate == BLOCK_FREE {
                self.bin_remove(n)?;
                let merged = size + BLOCK_HEADER + nsize;
                self.absorb(r, n)?;
                self.hdr(r)?.size = merged;
                self.set_prev_size_after(r, merged)?;
            }
        }
        if r.offset() > SEG_HEADER {
            let (prev_size, size) = {
                let h = self.hdr(r)?;
                (h.prev_size, h.size)
            };
            let p = BlockRef::new(r.segment(), r.offset() - BLOCK_HEADER - prev_size);
            if self.hdr(p)?.state == BLOCK_FREE {
                self.bin_remove(p)?;
                let merged = prev_size + BLOCK_HEADER + size;
                self.absorb(p, r)?;
                self.hdr(p)?.size = merged;
                self.set_prev_size_after(p, merged)?;
                r = p;
            }
        }
        self.bin_insert(r)
    }

    /// Merges what is known of free block `b`'s pages into free block `a`,
    /// which is about to take `b` in: holes, committed bytes (with `b`'s
    /// header), and the later free time (a merged block is as fresh as its
    /// freshest part, so a block in use a moment ago stays warm).
    /// `a` keeps its writer and length: they describe its first bytes, which
    /// the merged block starts with.
    pub(super) fn absorb(&mut self, a: BlockRef, b: BlockRef) -> Result<()> {
        let (bflags, bdirty, bfreed) = {
            let h = self.hdr(b)?;
            (h.flags, h.dirty, h.freed_ns)
        };
        let h = self.hdr(a)?;
        h.flags |= bflags & BLOCK_HOLES;
        h.dirty += bdirty + BLOCK_HEADER;
        h.freed_ns = h.freed_ns.max(bfreed);
        Ok(())
    }
}

/// Writes the header of a free block of payload `size` into `h`.
fn init_free_header(h: &mut BlockHeader, size: u64, prev_size: u64) {
    h.magic = BLOCK_MAGIC;
    h.state = BLOCK_FREE;
    h.generation = 0;
    h.size = size;
    h.prev_size = prev_size;
    h.len = 0;
    h.pins = 0;
    h.flags = 0;
    h.free_next = BlockRef::NIL;
    h.free_prev = BlockRef::NIL;
    h.holders = [0; HOLDER_WORDS];
    h.dirty = size;
    h.freed_ns = sys::monotonic_ns();
    h.writer = 0;
    h.writer_epoch = 0;
}
