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
        let h = self.hdr(r)?;
        if h.state != BLOCK_LIVE || h.generation != generation {
            return Ok(());
        }
        let slot = self.local.slot;
        self.set_holder(r, slot, false)?;
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
