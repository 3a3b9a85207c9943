//! Crash repair. When a process dies (its slot lock is gone) or dies inside
//! the mutex (EOWNERDEAD), the survivors rebuild all derived metadata from
//! the block headers, which are consistent at every instant.

use super::crash::{self, CrashPoint};
use super::txn::Txn;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::sys;

impl Txn<'_> {
    /// Releases everything held by processes that died. Returns true if any
    /// process was reaped.
    pub(super) fn reap(&mut self) -> Result<bool> {
        self.ctl.last_reap_ns = sys::monotonic_ns();
        let dead: Vec<u32> = (0..MAX_PROCS as u32)
            .filter(|&s| self.ctl.slots[s as usize].state == SLOT_ALIVE && !self.slot_alive(s))
            .collect();
        if dead.is_empty() {
            return Ok(false);
        }
        self.repair()?;
        Ok(true)
    }

    /// Rebuilds all derived metadata from the block headers: releases the
    /// references and pins of dead processes, recounts pins, frees unreferenced
    /// blocks, merges free neighbours and rebuilds the bins and statistics.
    pub(super) fn repair(&mut self) -> Result<()> {
        // Until the last pass is done: a repair that fails part way (an
        // error, not a death, so no EOWNERDEAD) is redone by the next
        // transaction instead of leaving half-rebuilt lists behind.
        self.ctl.repair_needed = 1;
        // A memory-backed segment that nobody holds any more is gone
        // (`open_segment` marks it so on this first try): every walk below
        // skips it. Any other failure to map one shows in pass 1.
        for seg in 0..self.ctl.segment_count {
            if self.ctl.segments[seg as usize].kind == SEG_MEMFD {
                let _ = self.seg_base(seg);
            }
        }
        let mut dead = [0u64; HOLDER_WORDS];
        let mut dead_epochs: Vec<(u32, u32)> = Vec::new();
        for s in 0..MAX_PROCS as u32 {
            let slot = &self.ctl.slots[s as usize];
            if slot.state == SLOT_ALIVE && !self.slot_alive(s) {
                dead[s as usize / 64] |= 1 << (s % 64);
                // Pins and leases of a crashed process die with it (its
                // epoch ends here).
                dead_epochs.push((s, slot.epoch));
                // Its put-off releases go with all its holder bits (pass 1).
                slot.clear_put_off();
            }
        }
        for l in self.ctl.leases.iter_mut() {
            if l.state == LEASE_LIVE && dead_epochs.contains(&(l.slot, l.epoch)) {
                l.state = LEASE_FREE;
            }
            l.pin_head = NO_PIN;
        }
        for s in self.ctl.slots.iter_mut() {
            s.pins = 0;
            s.pin_head = NO_PIN;
        }
        // Pass 1: clear dead holders, pin counts and pin lists everywhere.
        let segs = self.ctl.segment_count;
        for seg in 0..segs {
            if self.seg_gone(seg) {
                continue;
            }
            let mut r = BlockRef::new(seg, SEG_HEADER);
            loop {
                let h = self.hdr(r)?;
                if h.magic != BLOCK_MAGIC {
                    return Err(Error::Corrupt {
                        path: self.seg_label(seg),
                        why: "block chain broken".into(),
                    });
                }
                for (w, d) in h.holders.iter_mut().zip(dead.iter()) {
                    *w &= !d;
                }
                h.pins = 0;
                h.pin_head = NO_PIN;
                let size = h.size;
                match self.next_of(r, size) {
                    Some(n) => r = n,
                    None => break,
                }
            }
        }
        crash::reached(CrashPoint::RepairAfterHolders);
        // Pass 2: keep the valid pins of the table, recount them and link
        // each onto its owner's list again; the rest go to the free list.
        let mut pins_in_use = 0;
        for i in 0..MAX_PINS {
            let p = &self.ctl.pins[i];
            if p.kind == PIN_FREE {
                continue;
            }
            let (r, generation, kind, owner, owner_generation) =
                (p.block, p.generation, p.kind, p.owner, p.owner_generation);
            let owner_ok = match kind {
                PIN_PROCESS => !dead_epochs.contains(&(p.slot, p.epoch)),
                PIN_LEASE | PIN_LEASE_KEPT => {
                    let (index, generation) = p.lease();
                    self.ctl
                        .leases
                        .get(index as usize)
                        .is_some_and(|l| l.state == LEASE_LIVE && l.generation == generation)
                }
                PIN_BLOCK => {
                    !owner.is_nil()
                        && owner.segment() < segs
                        && !self.seg_gone(owner.segment())
                        && {
                            let oh = self.hdr(owner)?;
                            oh.magic == BLOCK_MAGIC
                                && oh.state == BLOCK_LIVE
                                && oh.generation == owner_generation
                        }
                }
                _ => false,
            };
            let ok =
                owner_ok && !r.is_nil() && r.segment() < segs && !self.seg_gone(r.segment()) && {
                    let h = self.hdr(r)?;
                    h.magic == BLOCK_MAGIC && h.state == BLOCK_LIVE && h.generation == generation
                };
            if !ok {
                self.ctl.pins[i].kind = PIN_FREE;
                continue;
            }
            if kind == PIN_BLOCK {
                let oh = self.hdr(owner)?;
                if oh.flags & BLOCK_OWNS_PINS == 0 {
                    oh.flags |= BLOCK_OWNS_PINS;
                }
            }
            self.link_pin(i as u32)?;
            if let Some(s) = self.quota_slot(i) {
                self.ctl.slots[s].pins += 1;
            }
            self.hdr(r)?.pins += 1;
            pins_in_use += 1;
        }
        self.ctl.pins_in_use = pins_in_use;
        self.rebuild_free_pins();
        crash::reached(CrashPoint::RepairAfterPins);
        // Pass 2b: a block about to be freed (its last holder died) releases
        // the pins it owns, as `free_block` does, transitively (a dropped
        // queue frees the messages still inside it).
        loop {
            let mut changed = false;
            for i in 0..MAX_PINS {
                let p = &self.ctl.pins[i];
                if p.kind != PIN_BLOCK {
                    continue;
                }
                if self.unreferenced(p.owner)? {
                    self.unpin(i as u32)?;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        crash::reached(CrashPoint::RepairAfterOwnedPins);
        // Pass 3: free unreferenced blocks, merge neighbours, rebuild bins and stats.
        self.ctl.bins = [BlockRef::NIL; NBINS];
        let (mut in_use, mut live) = (0, 0);
        for seg in 0..segs {
            if self.seg_gone(seg) {
                continue;
            }
            let mut r = BlockRef::new(seg, SEG_HEADER);
            let mut prev: Option<BlockRef> = None;
            loop {
                if self.unreferenced(r)? {
                    let h = self.hdr(r)?;
                    h.state = BLOCK_FREE;
                    h.flags = 0;
                    h.dirty = h.size;
                    h.freed_ns = sys::monotonic_ns();
                }
                let prev_size = match prev {
                    Some(p) => self.hdr(p)?.size,
                    None => 0,
                };
                let (state, size) = {
                    let h = self.hdr(r)?;
                    h.prev_size = prev_size;
                    (h.state, h.size)
                };
                let next = self.next_of(r, size);
                let merged = match prev {
                    Some(p) if state == BLOCK_FREE && self.hdr(p)?.state == BLOCK_FREE => {
                        self.absorb(p, r)?;
                        self.hdr(p)?.size = prev_size + BLOCK_HEADER + size;
                        true
                    }
                    _ => false,
                };
                if !merged {
                    if state == BLOCK_LIVE {
                        in_use += size;
                        live += 1;
                    } else {
                        let h = self.hdr(r)?;
                        h.generation = 0;
                        h.holders = [0; HOLDER_WORDS];
                    }
                    prev = Some(r);
                }
                match next {
                    Some(n) => r = n,
                    None => break,
                }
            }
            // Insert the free blocks of this segment now that their sizes are final.
            let mut r = BlockRef::new(seg, SEG_HEADER);
            loop {
                let (state, size) = {
                    let h = self.hdr(r)?;
                    (h.state, h.size)
                };
                if state == BLOCK_FREE {
                    self.bin_insert(r)?;
                }
                match self.next_of(r, size) {
                    Some(n) => {
                        self.hdr(n)?.prev_size = size;
                        r = n
                    }
                    None => break,
                }
            }
        }
        self.ctl.bytes_in_use = in_use;
        self.ctl.live_blocks = live;
        self.sum_segments();
        crash::reached(CrashPoint::RepairAfterBlocks);
        // The dead give up their slots last: a reaper that dies before this
        // point leaves them marked alive, so the next locker (EOWNERDEAD)
        // finds them dead again and redoes every pass, which are idempotent.
        // Freed first, a reaper killed mid-pass would leave their holder
        // bits set on blocks that no process would ever release.
        for (s, _) in dead_epochs {
            self.ctl.slots[s as usize].state = SLOT_FREE;
        }
        self.ctl.repair_needed = 0;
        Ok(())
    }
}
