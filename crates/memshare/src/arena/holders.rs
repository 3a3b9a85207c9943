//! Cross-process references: a block's holder bitmap has one bit per
//! process slot; a block is freed when no slot holds it and no pin keeps it.

use super::txn::Txn;
use crate::error::Result;
use crate::layout::*;

impl Txn<'_> {
    pub(super) fn set_holder(&mut self, r: BlockRef, slot: u32, on: bool) -> Result<()> {
        let h = self.hdr(r)?;
        let (w, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        if on {
            h.holders[w] |= bit;
        } else {
            h.holders[w] &= !bit;
        }
        Ok(())
    }

    /// True if `r` is live but neither held by any slot nor pinned.
    pub(super) fn unreferenced(&mut self, r: BlockRef) -> Result<bool> {
        let h = self.hdr(r)?;
        Ok(h.state == BLOCK_LIVE && h.pins == 0 && h.holders.iter().all(|w| *w == 0))
    }

    /// Drops this process's shared reference to a block; frees it if it was the last.
    pub(super) fn drop_holder(&mut self, r: BlockRef, generation: u64) -> Result<()> {
        // A child about to be forked holds what this process holds.
        let child = self.local.fork.as_ref().map(|f| f.slot);
        self.drop_holder_of(r, generation, self.local.slot, child)
    }

    /// Drops the shared reference of process slot `slot` (and of `child`, a
    /// child of it about to be forked) to a block; frees it if it was the last.
    pub(super) fn drop_holder_of(
        &mut self,
        r: BlockRef,
        generation: u64,
        slot: u32,
        child: Option<u32>,
    ) -> Result<()> {
        let h = self.hdr(r)?;
        if h.state != BLOCK_LIVE || h.generation != generation {
            return Ok(());
        }
        self.set_holder(r, slot, false)?;
        if let Some(child) = child {
            self.set_holder(r, child, false)?;
        }
        if self.unreferenced(r)? {
            self.free_block(r)?;
        }
        Ok(())
    }

    /// Frees a block and, transitively, the blocks that only its owned pins
    /// kept alive (the messages still inside a dropped queue).
    pub(super) fn free_block(&mut self, r: BlockRef) -> Result<()> {
        let mut work = vec![r];
        while let Some(r) = work.pop() {
            self.release_owned_pins(r, &mut work)?;
            self.release_block(r)?;
        }
        Ok(())
    }
}
