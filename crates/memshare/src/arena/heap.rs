//! The heap: segments carved into blocks, free lists binned by size,
//! best-fit allocation with splitting, merging of free neighbours, and
//! growth by new segments.
//!
//! Headers are written so that a walk of a segment is consistent at every
//! instant (crash repair relies on it).

use super::naming::seg_path;
use super::txn::Txn;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::sys::{self, Mapping};

/// Segments grow geometrically between these sizes (a single larger request
/// gets a segment of its own size).
const MIN_SEGMENT: u64 = 16 << 20;
const MAX_SEGMENT: u64 = 128 << 20;
/// A free block is split when the remainder is at least this large.
const SPLIT_MIN: u64 = BLOCK_HEADER + 4096;
/// How often an allocation checks for dead processes.
const REAP_INTERVAL_NS: u64 = 1_000_000_000;

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
        let h = self.hdr(r)?;
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
        Ok(())
    }

    fn set_prev_size_after(&mut self, r: BlockRef, size: u64) -> Result<()> {
        if let Some(n) = self.next_of(r, size) {
            self.hdr(n)?.prev_size = size;
        }
        Ok(())
    }

    /// Takes the best-fitting free block of at least `size` bytes out of the bins.
    fn take_free(&mut self, size: u64) -> Result<Option<BlockRef>> {
        for b in bin_of(size)..NBINS {
            let mut cur = self.ctl.bins[b];
            let mut best = BlockRef::NIL;
            let mut best_size = u64::MAX;
            let mut seen = 0;
            while !cur.is_nil() && seen < 64 {
                let h = self.hdr(cur)?;
                if h.size >= size && h.size < best_size {
                    best = cur;
                    best_size = h.size;
                    if h.size == size {
                        break;
                    }
                }
                cur = h.free_next;
                seen += 1;
            }
            if !best.is_nil() {
                self.bin_remove(best)?;
                self.split(best, size)?;
                return Ok(Some(best));
            }
        }
        Ok(None)
    }

    /// Cuts the tail off a block that is larger than needed. The tail header is
    /// written before the head shrinks, so a walk is consistent throughout.
    fn split(&mut self, r: BlockRef, size: u64) -> Result<()> {
        let total = self.hdr(r)?.size;
        if total - size < SPLIT_MIN {
            return Ok(());
        }
        let tail = BlockRef::new(r.segment(), r.payload_offset() + size);
        let tail_size = total - size - BLOCK_HEADER;
        self.write_free_header(tail, tail_size, size)?;
        self.set_prev_size_after(tail, tail_size)?;
        self.hdr(r)?.size = size;
        self.bin_insert(tail)
    }

    fn grow(&mut self, size: u64) -> Result<()> {
        let idx = self.ctl.segment_count;
        if idx as usize >= MAX_SEGMENTS {
            return Err(self.oom(size));
        }
        let needed = (size + SEG_HEADER + BLOCK_HEADER).div_ceil(4096) * 4096;
        // Reserved space is real memory on tmpfs: grow by an eighth of what is
        // reserved (at most MAX_SEGMENT), and give large requests a segment of
        // exactly their size.
        let geometric = (self.ctl.bytes_reserved / 8).clamp(MIN_SEGMENT, MAX_SEGMENT);
        let mut want = needed.max(geometric).div_ceil(2 << 20) * (2 << 20);
        let room = self.ctl.limit.saturating_sub(self.ctl.bytes_reserved);
        let (_, avail) = sys::space(&self.inner.dir);
        if want > room || want > avail {
            want = needed;
        }
        if want > room {
            return Err(self.oom(size));
        }
        let path = seg_path(&self.inner.dir, &self.inner.token, idx);
        // A file at this index can only be left over from a process that died
        // while growing the arena (segment_count was never advanced).
        sys::unlink(&path);
        let fd = sys::create_file(&path, want)?;
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
        self.local.set_segment(idx as usize, map);
        self.ctl.segments[idx as usize].size = want;
        self.ctl.segment_count = idx + 1;
        self.ctl.bytes_reserved += want;
        let first = BlockRef::new(idx, SEG_HEADER);
        self.write_free_header(first, want - SEG_HEADER - BLOCK_HEADER, 0)?;
        self.bin_insert(first)
    }

    pub(super) fn oom(&self, requested: u64) -> Error {
        Error::OutOfMemory {
            requested,
            in_use: self.ctl.bytes_in_use,
            reserved: self.ctl.bytes_reserved,
            limit: self.ctl.limit,
        }
    }

    /// Allocates a block of `len` bytes held by this process. Returns its
    /// reference and generation.
    pub(super) fn alloc(&mut self, len: u64, flags: u32) -> Result<(BlockRef, u64)> {
        let size = payload_size(len);
        if size > (1 << 47) {
            return Err(self.oom(len));
        }
        if sys::monotonic_ns().saturating_sub(self.ctl.last_reap_ns) > REAP_INTERVAL_NS {
            self.reap()?;
        }
        let r = match self.take_free(size)? {
            Some(r) => r,
            None => {
                // Under pressure: reclaim what dead processes hold before growing.
                if self.reap()? {
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

    fn mark_live(&mut self, r: BlockRef, len: u64, flags: u32) -> Result<(BlockRef, u64)> {
        self.ctl.next_generation += 1;
        let generation = self.ctl.next_generation;
        let slot = self.local.slot as usize;
        let h = self.hdr(r)?;
        h.state = BLOCK_LIVE;
        h.generation = generation;
        h.len = len;
        h.pins = 0;
        h.flags = flags;
        h.free_next = BlockRef::NIL;
        h.free_prev = BlockRef::NIL;
        h.holders = [0; HOLDER_WORDS];
        h.holders[slot / 64] |= 1 << (slot % 64);
        let size = h.size;
        self.ctl.bytes_in_use += size;
        self.ctl.live_blocks += 1;
        Ok((r, generation))
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
            h.size
        };
        self.ctl.bytes_in_use -= size;
        self.ctl.live_blocks -= 1;
        if let Some(n) = self.next_of(r, size) {
            let (nstate, nsize) = {
                let nh = self.hdr(n)?;
                (nh.state, nh.size)
            };
            if nstate == BLOCK_FREE {
                self.bin_remove(n)?;
                let merged = size + BLOCK_HEADER + nsize;
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
                self.hdr(p)?.size = merged;
                self.set_prev_size_after(p, merged)?;
                r = p;
            }
        }
        self.bin_insert(r)
    }
}
