//! The metadata of an arena while its robust mutex is held: the control
//! header, and the block headers of the segments this process maps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::cell::Cell;
use std::time::Instant;

use super::naming::hex;
use super::{Inner, Local};
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::layout::*;
use crate::sys::{self, LockState, Mapping, RobustMutex};

thread_local! {
    /// When the arena operations of this thread give up waiting for an
    /// arena's lock (None: they wait as long as it takes).
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with every arena lock wait of this thread bounded by `deadline`
/// (a wait past it fails with [`Error::Busy`]): for calls that take a
/// timeout, such as a queue's put of a message that must first be shared.
pub fn with_deadline<T>(deadline: Option<Instant>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEADLINE.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DEADLINE.with(|d| d.replace(deadline)));
    f()
}

/// True if this thread's arena lock waits are bounded (see [`with_deadline`]).
pub fn has_deadline() -> bool {
    DEADLINE.with(|d| d.get()).is_some()
}

/// Arena-mutex acquisitions made by this process (every arena, since the
/// process started or forked): the figure that says how much the hot paths
/// rely on the one shared lock. Per process, so it needs no layout change and
/// costs one uncontended atomic add per transaction.
static LOCK_ACQUISITIONS: AtomicU64 = AtomicU64::new(0);

/// Acquisitions made only to read the figures (`Arena::stats`), left out of
/// the count so that watching it does not change it.
static STATS_READS: AtomicU64 = AtomicU64::new(0);

/// How many times this process has taken an arena's mutex (see
/// [`LOCK_ACQUISITIONS`]), leaving out reads of the figures themselves and
/// `memshare ls`.
pub fn lock_acquisitions() -> u64 {
    let reads = STATS_READS.load(Ordering::Relaxed);
    LOCK_ACQUISITIONS
        .load(Ordering::Relaxed)
        .saturating_sub(reads)
}

/// The next acquisition only reads the figures.
pub(super) fn uncount_lock() {
    STATS_READS.fetch_add(1, Ordering::Relaxed);
}

/// Restarts the count (in a forked child, which inherits its parent's).
pub(super) fn reset_lock_acquisitions() {
    LOCK_ACQUISITIONS.store(0, Ordering::Relaxed);
    STATS_READS.store(0, Ordering::Relaxed);
}

/// The metadata of an arena while its mutex is held.
pub(super) struct Txn<'a> {
    pub(super) inner: &'a Inner,
    pub(super) local: &'a mut Local,
    pub(super) ctl: &'a mut CtlHeader,
    mutex: RobustMutex,
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        self.mutex.unlock();
    }
}

impl Inner {
    pub(super) fn ctl_ptr(&self) -> *mut CtlHeader {
        self.ctl.ptr().cast()
    }

    fn mutex(&self) -> RobustMutex {
        let ctl_ptr = self.ctl_ptr();
        // SAFETY: the control mapping is at least CTL_SIZE bytes (checked on
        // attach) and the mutex field lies inside it, 64-byte aligned.
        unsafe { RobustMutex::from_ptr(std::ptr::addr_of_mut!((*ctl_ptr).mutex).cast()) }
    }

    /// True if nobody holds the arena's mutex at this instant (not taking it).
    pub(super) fn lock_looks_free(&self) -> bool {
        self.mutex().looks_free()
    }

    /// Locks the shared mutex; repairs the metadata first if a holder died.
    pub(super) fn txn<'a>(&'a self, local: &'a mut Local) -> Result<Txn<'a>> {
        self.txn_with(local, true)
            .map(|t| t.expect("a blocking lock always returns"))
    }

    /// As [`Inner::txn`], but None at once if another thread holds the mutex.
    pub(super) fn try_txn<'a>(&'a self, local: &'a mut Local) -> Result<Option<Txn<'a>>> {
        self.txn_with(local, false)
    }

    fn txn_with<'a>(&'a self, local: &'a mut Local, wait: bool) -> Result<Option<Txn<'a>>> {
        let ctl_ptr = self.ctl_ptr();
        let mutex = self.mutex();
        let state = if wait {
            match mutex.lock_until(DEADLINE.with(|d| d.get()))? {
                Some(state) => state,
                None => return Err(Error::Busy(hex(&self.token))),
            }
        } else {
            match mutex.try_lock()? {
                Some(state) => state,
                None => return Ok(None),
            }
        };
        if wait {
            // The decay thread's try-locks are not the hot paths' doing.
            LOCK_ACQUISITIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: we now hold the arena mutex, which every process takes before
        // touching the control header, so this is the only live reference to it
        // (save the put-off release marks, which other processes fill without
        // the mutex: they are atomics, only ever accessed atomically).
        let ctl = unsafe { &mut *ctl_ptr };
        let mut txn = Txn {
            inner: self,
            local,
            ctl,
            mutex,
        };
        if txn.ctl.magic != CTL_MAGIC {
            return Err(Error::StaleHandle("the arena has been removed".into()));
        }
        if state == LockState::OwnerDied || txn.ctl.repair_needed != 0 {
            txn.repair()?;
        }
        txn.apply_pending_releases();
        Ok(Some(txn))
    }
}

impl<'a> Txn<'a> {
    /// The base address of segment `seg`, mapping it on first use.
    pub(super) fn seg_base(&mut self, seg: u32) -> Result<*mut u8> {
        let idx = seg as usize;
        if idx >= self.ctl.segment_count as usize {
            return Err(Error::InvalidHandle(format!(
                "segment {seg} does not exist"
            )));
        }
        if let Some(Some(m)) = self.local.segments.get(idx) {
            return Ok(m.ptr());
        }
        let expected = self.ctl.segments[idx].size;
        let fd = self.open_segment(seg)?;
        let size = sys::fstat(&fd)?.size;
        if size != expected || size < SEG_HEADER + BLOCK_HEADER {
            return Err(Error::Corrupt {
                path: self.seg_label(seg),
                why: format!("size {size}, expected {expected}"),
            });
        }
        let map = Mapping::new(&fd, size as usize)?;
        // SAFETY: the mapping is `size` >= SEG_HEADER bytes long and page aligned.
        let hdr = unsafe { &*(map.ptr() as *const SegHeader) };
        if hdr.magic != SEG_MAGIC
            || hdr.version != LAYOUT_VERSION
            || hdr.index != seg
            || hdr.token != self.inner.token
            || hdr.size != size
        {
            return Err(Error::Corrupt {
                path: self.seg_label(seg),
                why: "bad segment header".into(),
            });
        }
        let ptr = map.ptr();
        self.local.set_segment(idx, map);
        Ok(ptr)
    }

    pub(super) fn seg_size(&self, seg: u32) -> u64 {
        self.ctl.segments[seg as usize].size
    }

    /// The header of block `r`. Offsets come from trusted metadata or from
    /// handles whose MAC was verified and whose bounds were checked.
    pub(super) fn hdr(&mut self, r: BlockRef) -> Result<&'a mut BlockHeader> {
        let (seg, off) = (r.segment(), r.offset());
        let base = self.seg_base(seg)?;
        if off < SEG_HEADER || off % ALIGN != 0 || off + BLOCK_HEADER > self.seg_size(seg) {
            return Err(Error::InvalidHandle(format!(
                "block offset {off} is outside segment {seg}"
            )));
        }
        // SAFETY: `off + BLOCK_HEADER` is within the mapped segment and 64-byte
        // aligned; we hold the arena mutex, so no other process writes headers.
        Ok(unsafe { &mut *(base.add(off as usize) as *mut BlockHeader) })
    }

    pub(super) fn payload_ptr(&mut self, r: BlockRef) -> Result<*mut u8> {
        let base = self.seg_base(r.segment())?;
        // SAFETY: callers pass refs of blocks whose header was validated, so
        // the payload offset lies within the segment mapping.
        Ok(unsafe { base.add(r.payload_offset() as usize) })
    }

    /// The block after `r` (of payload `size`) in its segment, if any.
    pub(super) fn next_of(&mut self, r: BlockRef, size: u64) -> Option<BlockRef> {
        let next = r.payload_offset() + size;
        (next + BLOCK_HEADER <= self.seg_size(r.segment()))
            .then(|| BlockRef::new(r.segment(), next))
    }
}

impl super::Local {
    /// Records this process's mapping of segment `idx`.
    pub(super) fn set_segment(&mut self, idx: usize, map: Mapping) {
        if self.segments.len() <= idx {
            self.segments.resize_with(idx + 1, || None);
        }
        super::prefault::advise_segment(&map);
        self.segments[idx] = Some(Arc::new(map));
    }
}

impl Txn<'_> {
    /// Validates a handle against the live metadata. Returns the block's
    /// (payload capacity, flags).
    pub(super) fn check_handle(&mut self, h: &Handle) -> Result<(u64, u32)> {
        let seg = h.segment;
        if seg >= self.ctl.segment_count {
            return Err(Error::InvalidHandle(format!(
                "segment {seg} does not exist in this arena"
            )));
        }
        let seg_size = self.seg_size(seg);
        if h.offset < SEG_HEADER || h.offset % ALIGN != 0 || h.offset + BLOCK_HEADER > seg_size {
            return Err(Error::InvalidHandle("block offset out of range".into()));
        }
        let r = BlockRef::new(seg, h.offset);
        let hdr = self.hdr(r)?;
        if hdr.magic != BLOCK_MAGIC {
            return Err(Error::InvalidHandle("no block at that offset".into()));
        }
        if hdr.state != BLOCK_LIVE || hdr.generation != h.generation {
            return Err(Error::StaleHandle(
                "the shared object was freed before this handle was opened (every process dropped it)".into(),
            ));
        }
        if h.len > hdr.size || h.offset + BLOCK_HEADER + hdr.size > seg_size {
            return Err(Error::InvalidHandle("length exceeds the block".into()));
        }
        Ok((hdr.size, hdr.flags))
    }
}
