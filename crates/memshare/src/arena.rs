//! The arena: named shared segments carved into 64-byte-aligned blocks, with
//! cross-process reference counts.
//!
//! Lifetime rules (see docs/how-it-works.md):
//! - Each attached process owns a *slot*; it holds an OFD lock on the slot's
//!   byte of the control file for as long as it lives. The kernel drops that
//!   lock when the process dies by any means, so a slot whose state says ALIVE
//!   but whose lock is free belongs to a dead process.
//! - A block is alive while any slot's bit is set in its holder bitmap or any
//!   in-flight handle pins it. Inside one process, references are counted
//!   locally; the shared bit is set on the first and cleared on the last.
//! - All metadata changes happen under one robust process-shared mutex. When a
//!   holder dies mid-change, the next locker gets EOWNERDEAD and rebuilds the
//!   free lists, pin counts and statistics from the block headers, which are
//!   written so that a walk of the segment is consistent at every instant.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::layout::*;
use crate::sys::{self, LockState, Mapping, RobustMutex};

/// Segments grow geometrically between these sizes (a single larger request
/// gets a segment of its own size).
const MIN_SEGMENT: u64 = 16 << 20;
const MAX_SEGMENT: u64 = 128 << 20;
/// A free block is split when the remainder is at least this large.
const SPLIT_MIN: u64 = BLOCK_HEADER + 4096;
/// How often an allocation checks for dead processes.
const REAP_INTERVAL_NS: u64 = 1_000_000_000;

/// Usage figures of an arena, counting the blocks of every attached process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes_reserved: u64,
    pub bytes_in_use: u64,
    pub live_blocks: u64,
    pub segments: u64,
    pub pins: u64,
    pub processes: u64,
    pub limit: u64,
}

/// One process slot as seen by `memshare ls`.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub slot: u32,
    pub pid: u32,
    pub alive: bool,
}

struct LocalRef {
    bref: u64,
    generation: u64,
    size: u64,
    count: usize,
    readonly: bool,
}

struct ForkReservation {
    fd: OwnedFd,
    slot: u32,
    epoch: u32,
}

struct Local {
    fd: OwnedFd,
    slot: u32,
    epoch: u32,
    segments: Vec<Option<Arc<Mapping>>>,
    /// Blocks this process references, keyed by payload address.
    refs: BTreeMap<usize, LocalRef>,
    by_ref: HashMap<u64, usize>,
    detached: bool,
    fork: Option<ForkReservation>,
}

impl Local {
    /// True while the process in `slot` lives: it is us, or another open file
    /// description holds the slot's lock.
    fn slot_alive(&self, slot: u32) -> bool {
        slot == self.slot || sys::ofd_is_locked(&self.fd, slot_lock_offset(slot), 1)
    }
}

struct Inner {
    token: [u8; 16],
    dir: PathBuf,
    ctl: Mapping,
    local: Mutex<Local>,
}

/// A process's attachment to one arena. Cheap to clone.
#[derive(Clone)]
pub struct Arena {
    inner: Arc<Inner>,
}

/// Process-wide table of attached arenas, so that one process attaches to an
/// arena once and the fork handlers can find every attachment.
fn attached() -> &'static Mutex<Vec<Weak<Inner>>> {
    static ATTACHED: OnceLock<Mutex<Vec<Weak<Inner>>>> = OnceLock::new();
    ATTACHED.get_or_init(|| Mutex::new(Vec::new()))
}

fn lock_local(m: &Mutex<Local>) -> MutexGuard<'_, Local> {
    // A panic while holding the local lock leaves nothing half-written that
    // the shared repair does not handle; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn hex(token: &[u8; 16]) -> String {
    token.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_hex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The directory holding segments: `MEMSHARE_DIR`, else /dev/shm.
pub fn default_dir() -> PathBuf {
    std::env::var_os("MEMSHARE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

pub fn ctl_path(dir: &Path, token: &[u8; 16]) -> PathBuf {
    dir.join(format!("memshare-{}", hex(token)))
}

pub fn seg_path(dir: &Path, token: &[u8; 16], index: u32) -> PathBuf {
    dir.join(format!("memshare-{}-{index}", hex(token)))
}

/// Parses `MEMSHARE_LIMIT`-style sizes: `1073741824`, `512M`, `8G`, `1.5GiB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.trim().parse().ok()?;
    let mult: u64 = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    if !num.is_finite() || num < 0.0 {
        return None;
    }
    Some((num * mult as f64) as u64)
}

fn slot_lock_offset(slot: u32) -> u64 {
    SLOT_LOCK_BASE + slot as u64
}

/// The metadata of an arena while its mutex is held.
struct Txn<'a> {
    inner: &'a Inner,
    local: &'a mut Local,
    ctl: &'a mut CtlHeader,
    mutex: RobustMutex,
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        self.mutex.unlock();
    }
}

impl Inner {
    fn ctl_ptr(&self) -> *mut CtlHeader {
        self.ctl.ptr().cast()
    }

    /// Locks the shared mutex; repairs the metadata first if a holder died.
    fn txn<'a>(&'a self, local: &'a mut Local) -> Result<Txn<'a>> {
        let ctl_ptr = self.ctl_ptr();
        // SAFETY: the control mapping is at least CTL_SIZE bytes (checked on
        // attach) and the mutex field lies inside it, 64-byte aligned.
        let mutex =
            unsafe { RobustMutex::from_ptr(std::ptr::addr_of_mut!((*ctl_ptr).mutex).cast()) };
        let state = mutex.lock()?;
        // SAFETY: we now hold the arena mutex, which every process takes before
        // touching the control header, so this is the only live reference to it.
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
        if state == LockState::OwnerDied {
            txn.repair()?;
        }
        Ok(txn)
    }
}

impl<'a> Txn<'a> {
    fn seg_base(&mut self, seg: u32) -> Result<*mut u8> {
        let idx = seg as usize;
        if idx >= self.ctl.segment_count as usize {
            return Err(Error::InvalidHandle(format!(
                "segment {seg} does not exist"
            )));
        }
        if let Some(Some(m)) = self.local.segments.get(idx) {
            return Ok(m.ptr());
        }
        let path = seg_path(&self.inner.dir, &self.inner.token, seg);
        let expected = self.ctl.segments[idx].size;
        let fd = sys::open_file(&path)?;
        let size = sys::fstat(&fd)?.size;
        if size != expected || size < SEG_HEADER + BLOCK_HEADER {
            return Err(Error::Corrupt {
                path: path.display().to_string(),
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
                path: path.display().to_string(),
                why: "bad segment header".into(),
            });
        }
        if self.local.segments.len() <= idx {
            self.local.segments.resize_with(idx + 1, || None);
        }
        let ptr = map.ptr();
        self.local.segments[idx] = Some(Arc::new(map));
        Ok(ptr)
    }

    fn seg_size(&self, seg: u32) -> u64 {
        self.ctl.segments[seg as usize].size
    }

    /// The header of block `r`. Offsets come from trusted metadata or from
    /// handles whose MAC was verified and whose bounds were checked.
    fn hdr(&mut self, r: u64) -> Result<&'a mut BlockHeader> {
        let seg = ref_seg(r);
        let off = ref_offset(r);
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

    fn payload_ptr(&mut self, r: u64) -> Result<*mut u8> {
        let base = self.seg_base(ref_seg(r))?;
        // SAFETY: callers pass refs of blocks whose header was validated, so
        // the payload offset lies within the segment mapping.
        Ok(unsafe { base.add((ref_offset(r) + BLOCK_HEADER) as usize) })
    }

    fn next_of(&mut self, r: u64, size: u64) -> Option<u64> {
        let next = ref_offset(r) + BLOCK_HEADER + size;
        (next + BLOCK_HEADER <= self.seg_size(ref_seg(r))).then(|| block_ref(ref_seg(r), next))
    }

    fn bin_insert(&mut self, r: u64) -> Result<()> {
        let size = self.hdr(r)?.size;
        let b = bin_of(size);
        let head = self.ctl.bins[b];
        {
            let h = self.hdr(r)?;
            h.free_prev = NIL;
            h.free_next = head;
        }
        if head != NIL {
            self.hdr(head)?.free_prev = r;
        }
        self.ctl.bins[b] = r;
        Ok(())
    }

    fn bin_remove(&mut self, r: u64) -> Result<()> {
        let (prev, next, size) = {
            let h = self.hdr(r)?;
            (h.free_prev, h.free_next, h.size)
        };
        if prev != NIL {
            self.hdr(prev)?.free_next = next;
        } else {
            self.ctl.bins[bin_of(size)] = next;
        }
        if next != NIL {
            self.hdr(next)?.free_prev = prev;
        }
        Ok(())
    }

    fn write_free_header(&mut self, r: u64, size: u64, prev_size: u64) -> Result<()> {
        let h = self.hdr(r)?;
        h.magic = BLOCK_MAGIC;
        h.state = BLOCK_FREE;
        h.generation = 0;
        h.size = size;
        h.prev_size = prev_size;
        h.len = 0;
        h.pins = 0;
        h.flags = 0;
        h.free_next = NIL;
        h.free_prev = NIL;
        h.holders = [0; HOLDER_WORDS];
        Ok(())
    }

    fn set_prev_size_after(&mut self, r: u64, size: u64) -> Result<()> {
        if let Some(n) = self.next_of(r, size) {
            self.hdr(n)?.prev_size = size;
        }
        Ok(())
    }

    /// Takes the best-fitting free block of at least `size` bytes out of the bins.
    fn take_free(&mut self, size: u64) -> Result<Option<u64>> {
        for b in bin_of(size)..NBINS {
            let mut cur = self.ctl.bins[b];
            let mut best = NIL;
            let mut best_size = u64::MAX;
            let mut seen = 0;
            while cur != NIL && seen < 64 {
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
            if best != NIL {
                self.bin_remove(best)?;
                self.split(best, size)?;
                return Ok(Some(best));
            }
        }
        Ok(None)
    }

    /// Cuts the tail off a block that is larger than needed. The tail header is
    /// written before the head shrinks, so a walk is consistent throughout.
    fn split(&mut self, r: u64, size: u64) -> Result<()> {
        let total = self.hdr(r)?.size;
        if total - size < SPLIT_MIN {
            return Ok(());
        }
        let tail = block_ref(ref_seg(r), ref_offset(r) + BLOCK_HEADER + size);
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
        if self.local.segments.len() <= idx as usize {
            self.local.segments.resize_with(idx as usize + 1, || None);
        }
        self.local.segments[idx as usize] = Some(Arc::new(map));
        self.ctl.segments[idx as usize].size = want;
        self.ctl.segment_count = idx + 1;
        self.ctl.bytes_reserved += want;
        let first = block_ref(idx, SEG_HEADER);
        self.write_free_header(first, want - SEG_HEADER - BLOCK_HEADER, 0)?;
        self.bin_insert(first)
    }

    fn oom(&self, requested: u64) -> Error {
        Error::OutOfMemory {
            requested,
            in_use: self.ctl.bytes_in_use,
            reserved: self.ctl.bytes_reserved,
            limit: self.ctl.limit,
        }
    }

    fn alloc(&mut self, len: u64, flags: u32) -> Result<(u64, u64)> {
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

    fn mark_live(&mut self, r: u64, len: u64, flags: u32) -> Result<(u64, u64)> {
        self.ctl.next_generation += 1;
        let generation = self.ctl.next_generation;
        let slot = self.local.slot as usize;
        let h = self.hdr(r)?;
        h.state = BLOCK_LIVE;
        h.generation = generation;
        h.len = len;
        h.pins = 0;
        h.flags = flags;
        h.free_next = NIL;
        h.free_prev = NIL;
        h.holders = [0; HOLDER_WORDS];
        h.holders[slot / 64] |= 1 << (slot % 64);
        let size = h.size;
        self.ctl.bytes_in_use += size;
        self.ctl.live_blocks += 1;
        Ok((r, generation))
    }

    /// Frees a block and, transitively, the blocks that only its owned pins
    /// kept alive (the messages still inside a dropped queue).
    fn free_block(&mut self, r: u64) -> Result<()> {
        let mut work = vec![r];
        while let Some(r) = work.pop() {
            let (flags, generation) = {
                let h = self.hdr(r)?;
                (h.flags, h.generation)
            };
            if flags & BLOCK_OWNS_PINS != 0 {
                for i in 0..MAX_PINS {
                    let p = &self.ctl.pins[i];
                    if p.block != NIL && p.owner == r && p.owner_generation == generation {
                        let target = p.block;
                        self.ctl.pins[i].block = NIL;
                        self.ctl.pins_in_use -= 1;
                        let th = self.hdr(target)?;
                        th.pins = th.pins.saturating_sub(1);
                        if self.unreferenced(target)? {
                            work.push(target);
                        }
                    }
                }
            }
            self.release_block(r)?;
        }
        Ok(())
    }

    /// Returns a block to the free lists, merging it with free neighbours.
    fn release_block(&mut self, r: u64) -> Result<()> {
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
        if ref_offset(r) > SEG_HEADER {
            let (prev_size, size) = {
                let h = self.hdr(r)?;
                (h.prev_size, h.size)
            };
            let p = block_ref(ref_seg(r), ref_offset(r) - BLOCK_HEADER - prev_size);
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

    fn set_holder(&mut self, r: u64, slot: u32, on: bool) -> Result<()> {
        let h = self.hdr(r)?;
        let (w, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        if on {
            h.holders[w] |= bit;
        } else {
            h.holders[w] &= !bit;
        }
        Ok(())
    }

    fn unreferenced(&mut self, r: u64) -> Result<bool> {
        let h = self.hdr(r)?;
        Ok(h.state == BLOCK_LIVE && h.pins == 0 && h.holders.iter().all(|w| *w == 0))
    }

    /// Drops this process's shared reference to a block; frees it if it was the last.
    fn drop_holder(&mut self, r: u64, generation: u64) -> Result<()> {
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

    /// Pins a block for an in-flight handle, on behalf of this process or of
    /// an owner block. Returns (pin index, slot, epoch) for the handle.
    fn pin(
        &mut self,
        r: u64,
        generation: u64,
        owner: Option<(u64, u64)>,
    ) -> Result<(u32, u32, u32)> {
        let (slot, epoch, owner, owner_generation) = match owner {
            Some((o, og)) => {
                let oh = self.hdr(o)?;
                if oh.state != BLOCK_LIVE || oh.generation != og {
                    return Err(Error::StaleHandle("the owner block was freed".into()));
                }
                oh.flags |= BLOCK_OWNS_PINS;
                (OWNED_PIN_SLOT, 0, o, og)
            }
            None => (self.local.slot, self.local.epoch, NIL, 0),
        };
        for i in 0..MAX_PINS {
            let idx = (self.ctl.pin_cursor as usize + i) % MAX_PINS;
            if self.ctl.pins[idx].block == NIL {
                self.ctl.pins[idx] = PinEntry {
                    block: r,
                    generation,
                    slot,
                    epoch,
                    owner,
                    owner_generation,
                };
                self.ctl.pin_cursor = ((idx + 1) % MAX_PINS) as u32;
                self.ctl.pins_in_use += 1;
                self.hdr(r)?.pins += 1;
                return Ok((idx as u32, slot, epoch));
            }
        }
        Err(Error::TooManyPins { max: MAX_PINS })
    }

    /// Validates a handle against the live metadata. Returns the block's
    /// (payload capacity, flags).
    fn check_handle(&mut self, h: &Handle) -> Result<(u64, u32)> {
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
        let r = block_ref(seg, h.offset);
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

    fn consume_pin(&mut self, h: &Handle) -> Result<()> {
        let Some(idx) = h.pin else { return Ok(()) };
        let idx = idx as usize;
        if idx >= MAX_PINS {
            return Err(Error::InvalidHandle("pin index out of range".into()));
        }
        let r = block_ref(h.segment, h.offset);
        let e = &self.ctl.pins[idx];
        if e.block == r
            && e.generation == h.generation
            && e.slot == h.pin_slot
            && e.epoch == h.pin_epoch
        {
            self.ctl.pins[idx].block = NIL;
            self.ctl.pins_in_use -= 1;
            let hdr = self.hdr(r)?;
            hdr.pins = hdr.pins.saturating_sub(1);
        }
        // Otherwise the pin was consumed already (a handle unpickled twice);
        // the caller's reference is valid because the block is live.
        Ok(())
    }

    fn slot_alive(&self, slot: u32) -> bool {
        self.local.slot_alive(slot)
    }

    /// Releases everything held by processes that died. Returns true if any
    /// process was reaped.
    fn reap(&mut self) -> Result<bool> {
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
    fn repair(&mut self) -> Result<()> {
        let mut dead = [0u64; HOLDER_WORDS];
        for s in 0..MAX_PROCS as u32 {
            let slot = &self.ctl.slots[s as usize];
            if slot.state == SLOT_ALIVE && !self.slot_alive(s) {
                dead[s as usize / 64] |= 1 << (s % 64);
                let slot = &mut self.ctl.slots[s as usize];
                // Pins of a crashed process die with it (its epoch ends here).
                let epoch = slot.epoch;
                slot.state = SLOT_FREE;
                for p in self.ctl.pins.iter_mut() {
                    if p.block != NIL && p.slot == s && p.epoch == epoch {
                        p.block = NIL;
                    }
                }
            }
        }
        // Pass 1: clear dead holders and pin counts everywhere.
        let segs = self.ctl.segment_count;
        for seg in 0..segs {
            let mut r = block_ref(seg, SEG_HEADER);
            loop {
                let h = self.hdr(r)?;
                if h.magic != BLOCK_MAGIC {
                    return Err(Error::Corrupt {
                        path: seg_path(&self.inner.dir, &self.inner.token, seg)
                            .display()
                            .to_string(),
                        why: "block chain broken".into(),
                    });
                }
                for (w, d) in h.holders.iter_mut().zip(dead.iter()) {
                    *w &= !d;
                }
                h.pins = 0;
                let size = h.size;
                match self.next_of(r, size) {
                    Some(n) => r = n,
                    None => break,
                }
            }
        }
        // Pass 2: recount pins from the pin table.
        let mut pins_in_use = 0;
        for i in 0..MAX_PINS {
            let p = &self.ctl.pins[i];
            if p.block == NIL {
                continue;
            }
            let (r, generation, owner, owner_generation) =
                (p.block, p.generation, p.owner, p.owner_generation);
            let ok = ref_seg(r) < segs
                && {
                    let h = self.hdr(r)?;
                    h.magic == BLOCK_MAGIC && h.state == BLOCK_LIVE && h.generation == generation
                }
                && (owner == NIL
                    || ref_seg(owner) < segs && {
                        let oh = self.hdr(owner)?;
                        oh.magic == BLOCK_MAGIC
                            && oh.state == BLOCK_LIVE
                            && oh.generation == owner_generation
                    });
            if ok {
                self.hdr(r)?.pins += 1;
                pins_in_use += 1;
            } else {
                self.ctl.pins[i].block = NIL;
            }
        }
        self.ctl.pins_in_use = pins_in_use;
        // Pass 2b: a block about to be freed (its last holder died) releases
        // the pins it owns, as `free_block` does, transitively (a dropped
        // queue frees the messages still inside it).
        loop {
            let mut changed = false;
            for i in 0..MAX_PINS {
                let p = &self.ctl.pins[i];
                if p.block == NIL || p.owner == NIL {
                    continue;
                }
                let (target, owner) = (p.block, p.owner);
                if self.unreferenced(owner)? {
                    self.ctl.pins[i].block = NIL;
                    self.ctl.pins_in_use -= 1;
                    let th = self.hdr(target)?;
                    th.pins = th.pins.saturating_sub(1);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        // Pass 3: free unreferenced blocks, merge neighbours, rebuild bins and stats.
        self.ctl.bins = [NIL; NBINS];
        let (mut in_use, mut live) = (0, 0);
        for seg in 0..segs {
            let mut r = block_ref(seg, SEG_HEADER);
            let mut prev: Option<u64> = None;
            loop {
                if self.unreferenced(r)? {
                    self.hdr(r)?.state = BLOCK_FREE;
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
            let mut r = block_ref(seg, SEG_HEADER);
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
        Ok(())
    }

    fn take_slot(&mut self) -> Result<(u32, u32)> {
        for s in 0..MAX_PROCS {
            if self.ctl.slots[s].state == SLOT_FREE {
                let slot = &mut self.ctl.slots[s];
                slot.state = SLOT_ALIVE;
                slot.epoch = slot.epoch.wrapping_add(1);
                slot.pid = sys::pid();
                return Ok((s as u32, slot.epoch));
            }
        }
        Err(Error::TooManyProcesses { max: MAX_PROCS })
    }

    fn stats(&self) -> Stats {
        Stats {
            bytes_reserved: self.ctl.bytes_reserved,
            bytes_in_use: self.ctl.bytes_in_use,
            live_blocks: self.ctl.live_blocks,
            segments: self.ctl.segment_count as u64,
            pins: self.ctl.pins_in_use,
            processes: self
                .ctl
                .slots
                .iter()
                .filter(|s| s.state == SLOT_ALIVE)
                .count() as u64,
            limit: self.ctl.limit,
        }
    }
}

/// Takes a free slot under the arena mutex and locks its liveness byte with
/// `fd` before the mutex is released, so no reaper ever sees it unlocked.
fn claim_slot(txn: &mut Txn<'_>, fd: &OwnedFd) -> Result<(u32, u32)> {
    let (slot, epoch) = txn.take_slot()?;
    if !sys::ofd_lock(fd, slot_lock_offset(slot), 1, false)? {
        txn.ctl.slots[slot as usize].state = SLOT_FREE;
        return Err(Error::StaleHandle("the arena is being removed".into()));
    }
    Ok((slot, epoch))
}

impl Arena {
    /// Creates a new arena in `dir` (normally /dev/shm).
    pub fn create(dir: &Path) -> Result<Arena> {
        let mut token = [0u8; 16];
        sys::random_bytes(&mut token)?;
        let mut mac_key = [0u8; 16];
        sys::random_bytes(&mut mac_key)?;
        let path = ctl_path(dir, &token);
        let fd = sys::create_file(&path, CTL_SIZE)?;
        let map = Mapping::new(&fd, CTL_SIZE as usize)?;
        let ctl_ptr = map.ptr() as *mut CtlHeader;
        // SAFETY: fresh zero-filled mapping of CTL_SIZE bytes that no other
        // process can see before the magic is written below.
        let ctl = unsafe { &mut *ctl_ptr };
        ctl.version = LAYOUT_VERSION;
        ctl.header_size = CTL_SIZE as u32;
        ctl.token = token;
        ctl.mac_key = mac_key;
        ctl.limit = std::env::var("MEMSHARE_LIMIT")
            .ok()
            .and_then(|s| parse_size(&s))
            .unwrap_or(u64::MAX);
        ctl.bins = [NIL; NBINS];
        for p in ctl.pins.iter_mut() {
            p.block = NIL;
            p.owner = NIL;
        }
        // SAFETY: the mutex field is inside the mapping and 64-byte aligned.
        let mutex = unsafe { RobustMutex::from_ptr(std::ptr::addr_of_mut!(ctl.mutex).cast()) };
        mutex.init()?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ctl.magic = CTL_MAGIC;
        Self::finish_attach(dir, token, fd, map)
    }

    /// Attaches to an existing arena by token.
    pub fn attach(dir: &Path, token: [u8; 16]) -> Result<Arena> {
        {
            let list = attached().lock().unwrap_or_else(|p| p.into_inner());
            for w in list.iter() {
                if let Some(inner) = w.upgrade() {
                    if inner.token == token
                        && inner.dir == dir
                        && !lock_local(&inner.local).detached
                    {
                        return Ok(Arena { inner });
                    }
                }
            }
        }
        let path = ctl_path(dir, &token);
        let fd = sys::open_file(&path)?;
        let map = Self::map_ctl(&path, &fd)?;
        Self::finish_attach(dir, token, fd, map)
    }

    fn map_ctl(path: &Path, fd: &OwnedFd) -> Result<Mapping> {
        let corrupt = |why: &str| Error::Corrupt {
            path: path.display().to_string(),
            why: why.into(),
        };
        let sys::FileInfo { size, nlink, .. } = sys::fstat(fd)?;
        if nlink == 0 {
            return Err(Error::StaleHandle("the arena has been removed".into()));
        }
        if size < CTL_SIZE {
            return Err(corrupt(&format!(
                "control segment has {size} bytes, expected {CTL_SIZE}"
            )));
        }
        let map = Mapping::new(fd, CTL_SIZE as usize)?;
        // SAFETY: the mapping holds CTL_SIZE bytes; the fields read are plain integers.
        let ctl = unsafe { &*(map.ptr() as *const CtlHeader) };
        if ctl.magic != CTL_MAGIC {
            return Err(corrupt("not a memshare control segment (bad magic)"));
        }
        if ctl.version != LAYOUT_VERSION || ctl.header_size as u64 != CTL_SIZE {
            return Err(corrupt(&format!(
                "layout version {} is not {} (made by another memshare version)",
                ctl.version, LAYOUT_VERSION
            )));
        }
        Ok(map)
    }

    fn finish_attach(dir: &Path, token: [u8; 16], ctl_fd: OwnedFd, ctl: Mapping) -> Result<Arena> {
        // Our own open file description, so our slot lock is ours alone.
        let fd = sys::reopen(&ctl_path(dir, &token))?;
        drop(ctl_fd);
        let inner = Arc::new(Inner {
            token,
            dir: dir.to_path_buf(),
            ctl,
            local: Mutex::new(Local {
                fd,
                slot: u32::MAX,
                epoch: 0,
                segments: Vec::new(),
                refs: BTreeMap::new(),
                by_ref: HashMap::new(),
                detached: false,
                fork: None,
            }),
        });
        {
            let mut local = lock_local(&inner.local);
            let fd = sys::reopen(&ctl_path(dir, &token))?;
            let mut txn = inner.txn(&mut local)?;
            let (slot, epoch) = claim_slot(&mut txn, &fd)?;
            drop(txn);
            local.fd = fd;
            local.slot = slot;
            local.epoch = epoch;
        }
        attached()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&inner));
        Ok(Arena { inner })
    }

    pub fn token(&self) -> [u8; 16] {
        self.inner.token
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub(crate) fn mac_key(&self) -> [u8; 16] {
        // SAFETY: the key is written once at creation, before the magic, and
        // never changes; reading it needs no lock.
        unsafe { (*self.inner.ctl_ptr()).mac_key }
    }

    fn with_txn<T>(&self, f: impl FnOnce(&mut Txn<'_>) -> Result<T>) -> Result<T> {
        let mut local = lock_local(&self.inner.local);
        if local.detached {
            return Err(Error::StaleHandle(
                "this process has detached from the arena (interpreter shutting down)".into(),
            ));
        }
        let mut txn = self.inner.txn(&mut local)?;
        f(&mut txn)
    }

    /// Allocates `len` bytes. The returned block holds one reference.
    pub fn alloc(&self, len: usize, readonly: bool) -> Result<Block> {
        let flags = if readonly { BLOCK_READONLY } else { 0 };
        let mut local = lock_local(&self.inner.local);
        if local.detached {
            return Err(Error::StaleHandle(
                "this process has detached from the arena".into(),
            ));
        }
        let (r, generation, ptr, size) = {
            let mut txn = self.inner.txn(&mut local)?;
            let (r, generation) = txn.alloc(len as u64, flags)?;
            let ptr = txn.payload_ptr(r)?;
            let size = txn.hdr(r)?.size;
            (r, generation, ptr, size)
        };
        local.refs.insert(
            ptr as usize,
            LocalRef {
                bref: r,
                generation,
                size,
                count: 1,
                readonly,
            },
        );
        local.by_ref.insert(r, ptr as usize);
        Ok(Block {
            arena: self.clone(),
            bref: r,
            generation,
            ptr,
            len,
            capacity: size as usize,
            readonly,
        })
    }

    /// Opens a handle (possibly made by another process), adopting its pin.
    pub fn open(&self, h: &Handle) -> Result<Block> {
        if h.token != self.inner.token {
            return Err(Error::InvalidHandle(
                "handle belongs to another arena".into(),
            ));
        }
        h.verify(&self.mac_key())?;
        let mut local = lock_local(&self.inner.local);
        if local.detached {
            return Err(Error::StaleHandle(
                "this process has detached from the arena".into(),
            ));
        }
        let r = block_ref(h.segment, h.offset);
        let (ptr, size, flags) = {
            let mut txn = self.inner.txn(&mut local)?;
            let (size, flags) = txn.check_handle(h)?;
            txn.consume_pin(h)?;
            let slot = txn.local.slot;
            txn.set_holder(r, slot, true)?;
            (txn.payload_ptr(r)?, size, flags)
        };
        let entry = local.refs.entry(ptr as usize).or_insert(LocalRef {
            bref: r,
            generation: h.generation,
            size,
            count: 0,
            readonly: flags & BLOCK_READONLY != 0,
        });
        entry.count += 1;
        local.by_ref.insert(r, ptr as usize);
        Ok(Block {
            arena: self.clone(),
            bref: r,
            generation: h.generation,
            ptr,
            len: h.len as usize,
            capacity: size as usize,
            readonly: flags & BLOCK_READONLY != 0,
        })
    }

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

    fn owns_block_start(&self, addr: usize) -> bool {
        lock_local(&self.inner.local).refs.contains_key(&addr)
    }

    fn retain(&self, ptr: *mut u8) {
        let mut local = lock_local(&self.inner.local);
        if let Some(e) = local.refs.get_mut(&(ptr as usize)) {
            e.count += 1;
        }
    }

    fn release(&self, ptr: *mut u8) {
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

    fn pin(
        &self,
        bref: u64,
        generation: u64,
        owner: Option<(u64, u64)>,
    ) -> Result<(u32, u32, u32)> {
        self.with_txn(|txn| txn.pin(bref, generation, owner))
    }

    /// This process's slot in the arena (an owner tag for shared structures).
    pub fn my_slot(&self) -> u32 {
        lock_local(&self.inner.local).slot
    }

    /// This process's (slot, epoch). The epoch changes each time a slot is
    /// taken, so the pair names one process even after its slot is reused.
    pub fn my_owner(&self) -> (u32, u32) {
        let local = lock_local(&self.inner.local);
        (local.slot, local.epoch)
    }

    /// The epoch of the process that currently occupies `slot`, if any.
    pub fn slot_epoch(&self, slot: u32) -> Result<Option<u32>> {
        if slot as usize >= MAX_PROCS {
            return Ok(None);
        }
        self.with_txn(|txn| {
            let s = &txn.ctl.slots[slot as usize];
            Ok((s.state == SLOT_ALIVE).then_some(s.epoch))
        })
    }

    /// True while the process in `slot` lives (it holds the slot's OFD lock).
    pub fn is_alive(&self, slot: u32) -> bool {
        lock_local(&self.inner.local).slot_alive(slot)
    }

    /// Usage figures across every process attached to the arena.
    pub fn stats(&self) -> Result<Stats> {
        self.with_txn(|txn| Ok(txn.stats()))
    }

    /// Sets the byte limit of the arena (for every attached process).
    pub fn set_limit(&self, limit: u64) -> Result<()> {
        self.with_txn(|txn| {
            txn.ctl.limit = limit;
            Ok(())
        })
    }

    /// Releases what dead processes held. Returns true if any were found.
    pub fn reap(&self) -> Result<bool> {
        self.with_txn(|txn| txn.reap())
    }

    /// The process slots in use, with liveness.
    pub fn slots(&self) -> Result<Vec<SlotInfo>> {
        self.with_txn(|txn| {
            Ok((0..MAX_PROCS as u32)
                .filter(|&s| txn.ctl.slots[s as usize].state == SLOT_ALIVE)
                .map(|s| SlotInfo {
                    slot: s,
                    pid: txn.ctl.slots[s as usize].pid,
                    alive: txn.slot_alive(s),
                })
                .collect())
        })
    }

    /// Detaches this process: drops its references, gives up its slot and, if
    /// it was the last process, removes the arena's files. Mappings stay valid
    /// until every `Block` of this process is gone.
    pub fn detach(&self) -> Result<()> {
        self.inner.leave()
    }

    /// Call before `fork()`: reserves a slot for the child that already holds
    /// this process's references, locked through a new open file description
    /// that the child inherits.
    pub fn prepare_fork(&self) -> Result<()> {
        let mut local = lock_local(&self.inner.local);
        if local.detached {
            return Ok(());
        }
        let fd = sys::reopen(&ctl_path(&self.inner.dir, &self.inner.token))?;
        let refs: Vec<u64> = local.refs.values().map(|e| e.bref).collect();
        let (slot, epoch) = {
            let mut txn = self.inner.txn(&mut local)?;
            let (slot, epoch) = claim_slot(&mut txn, &fd)?;
            for r in refs {
                txn.set_holder(r, slot, true)?;
            }
            (slot, epoch)
        };
        local.fork = Some(ForkReservation { fd, slot, epoch });
        Ok(())
    }

    /// Call in the parent after `fork()`: the child owns the reservation now
    /// (if fork failed, the slot is reclaimed as a dead process's).
    pub fn after_fork_parent(&self) {
        lock_local(&self.inner.local).fork = None;
    }

    /// Call in the child after `fork()`: switch to the reserved slot.
    pub fn after_fork_child(&self) {
        let mut local = lock_local(&self.inner.local);
        if let Some(f) = local.fork.take() {
            local.fd = f.fd;
            local.slot = f.slot;
            local.epoch = f.epoch;
        } else {
            // Not prepared (fork without handlers): this process has no slot;
            // the parent's references are not ours to drop.
            local.detached = true;
            local.refs.clear();
            local.by_ref.clear();
        }
    }

    /// Every arena this process is attached to.
    pub fn all_attached() -> Vec<Arena> {
        let mut list = attached().lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.iter()
            .filter_map(|w| w.upgrade())
            .map(|inner| Arena { inner })
            .collect()
    }

    /// True if `addr` lies in a segment of this arena mapped by this process.
    pub fn contains(&self, addr: usize) -> bool {
        let local = lock_local(&self.inner.local);
        local.segments.iter().flatten().any(|m| m.contains(addr))
    }

    /// Reads an arena's figures and process slots without attaching to it
    /// (for `memshare ls`): nothing is changed, no slot is taken.
    pub fn inspect(dir: &Path, token: [u8; 16]) -> Result<(Stats, Vec<SlotInfo>)> {
        let path = ctl_path(dir, &token);
        let fd = sys::open_file(&path)?;
        let map = Self::map_ctl(&path, &fd)?;
        let ctl_ptr = map.ptr() as *mut CtlHeader;
        // SAFETY: the mutex lies inside the validated control mapping.
        let mutex =
            unsafe { RobustMutex::from_ptr(std::ptr::addr_of_mut!((*ctl_ptr).mutex).cast()) };
        mutex.lock()?;
        // SAFETY: we hold the arena mutex; we only read.
        let ctl = unsafe { &*ctl_ptr };
        let stats = Stats {
            bytes_reserved: ctl.bytes_reserved,
            bytes_in_use: ctl.bytes_in_use,
            live_blocks: ctl.live_blocks,
            segments: ctl.segment_count as u64,
            pins: ctl.pins_in_use,
            processes: ctl.slots.iter().filter(|s| s.state == SLOT_ALIVE).count() as u64,
            limit: ctl.limit,
        };
        // `fd` is a fresh open file description holding no lock, so every
        // live holder shows up as a conflict.
        let slots = (0..MAX_PROCS as u32)
            .filter(|&s| ctl.slots[s as usize].state == SLOT_ALIVE)
            .map(|s| SlotInfo {
                slot: s,
                pid: ctl.slots[s as usize].pid,
                alive: sys::ofd_is_locked(&fd, slot_lock_offset(s), 1),
            })
            .collect();
        mutex.unlock();
        Ok((stats, slots))
    }

    /// Tokens of the arenas whose control segment is in `dir`.
    pub fn list(dir: &Path) -> Vec<[u8; 16]> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut v: Vec<[u8; 16]> = entries
            .filter_map(|e| parse_hex(e.ok()?.file_name().to_str()?.strip_prefix("memshare-")?))
            .collect();
        v.sort();
        v
    }

    /// Removes the files of arenas in `dir` whose every process is dead.
    /// Returns the tokens removed (or that would be, with `dry_run`).
    pub fn collect_garbage(dir: &Path, dry_run: bool) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(removed);
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in &names {
            let Some(rest) = name.strip_prefix("memshare-") else {
                continue;
            };
            let Some(token) = parse_hex(rest) else {
                continue;
            };
            let path = dir.join(name);
            let Ok(fd) = sys::open_file(&path) else {
                continue;
            };
            let dead = match Self::map_ctl(&path, &fd) {
                Ok(map) => {
                    // SAFETY: the mutex lies inside the validated control mapping.
                    let mutex = unsafe {
                        RobustMutex::from_ptr(
                            std::ptr::addr_of_mut!((*(map.ptr() as *mut CtlHeader)).mutex).cast(),
                        )
                    };
                    mutex.lock()?;
                    let dead = sys::ofd_lock(&fd, SLOT_LOCK_BASE, MAX_PROCS as u64, false)?;
                    if dead && !dry_run {
                        // SAFETY: we hold the arena mutex.
                        unsafe { (*(map.ptr() as *mut CtlHeader)).magic = 0 };
                        remove_files(dir, &token, &names);
                    }
                    mutex.unlock();
                    dead
                }
                Err(Error::PermissionDenied { .. }) => false,
                // Not ours to judge if another user's; a corrupt one with no
                // live lock holder is garbage.
                Err(_) => {
                    let dead = sys::ofd_lock(&fd, SLOT_LOCK_BASE, MAX_PROCS as u64, false)
                        .unwrap_or(false);
                    if dead && !dry_run {
                        remove_files(dir, &token, &names);
                    }
                    dead
                }
            };
            if dead {
                removed.push(hex(&token));
            }
        }
        // Data segments whose control segment is gone (creator died mid-grow).
        for name in &names {
            if let Some(rest) = name.strip_prefix("memshare-") {
                if let Some((tok, _)) = rest.split_once('-') {
                    if let Some(token) = parse_hex(tok) {
                        if !ctl_path(dir, &token).exists() && !dry_run {
                            sys::unlink(&dir.join(name));
                        }
                    }
                }
            }
        }
        Ok(removed)
    }
}

fn remove_files(dir: &Path, token: &[u8; 16], names: &[String]) {
    let prefix = format!("memshare-{}-", hex(token));
    for n in names.iter().filter(|n| n.starts_with(&prefix)) {
        sys::unlink(&dir.join(n));
    }
    sys::unlink(&ctl_path(dir, token));
}

impl Inner {
    fn leave(&self) -> Result<()> {
        let mut local = lock_local(&self.local);
        if local.detached {
            return Ok(());
        }
        let refs: Vec<(u64, u64)> = local
            .refs
            .values()
            .map(|e| (e.bref, e.generation))
            .collect();
        let slot = local.slot;
        let result = (|| {
            let mut txn = self.txn(&mut local)?;
            for (r, generation) in refs {
                txn.drop_holder(r, generation)?;
            }
            txn.ctl.slots[slot as usize].state = SLOT_FREE;
            sys::ofd_unlock(&txn.local.fd, slot_lock_offset(slot), 1);
            // Last one out: nobody holds a slot lock any more.
            if sys::ofd_lock(&txn.local.fd, SLOT_LOCK_BASE, MAX_PROCS as u64, false)? {
                txn.ctl.magic = 0;
                for i in 0..txn.ctl.segment_count {
                    sys::unlink(&seg_path(&self.dir, &self.token, i));
                }
                sys::unlink(&ctl_path(&self.dir, &self.token));
                sys::ofd_unlock(&txn.local.fd, SLOT_LOCK_BASE, MAX_PROCS as u64);
            }
            Ok(())
        })();
        local.detached = true;
        local.refs.clear();
        local.by_ref.clear();
        result
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.leave();
    }
}

/// One reference, held by this process, to a block of shared memory.
/// Cloning adds a reference; dropping the last reference of the last process
/// frees the block.
pub struct Block {
    arena: Arena,
    bref: u64,
    generation: u64,
    ptr: *mut u8,
    len: usize,
    capacity: usize,
    readonly: bool,
}

// SAFETY: a Block is a counted reference to shared memory that stays mapped
// while the Block (and thus its Arena) lives; the pointer may be used from any
// thread, and the reference count is protected by the arena's locks.
unsafe impl Send for Block {}
// SAFETY: see `Send`; &Block only exposes the pointer and immutable metadata.
unsafe impl Sync for Block {}

impl Block {
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes requested at allocation.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Usable bytes (the requested length rounded up to 64).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    /// A handle that another process can open. The block stays alive while the
    /// handle is in flight: the receiver adopts the pin when it opens it.
    pub fn handle(&self) -> Result<Handle> {
        self.make_handle(None)
    }

    /// A handle whose pin belongs to `owner` (for example a queue the handle
    /// is stored in) rather than to this process: it stays valid if this
    /// process dies, and is released when `owner` is freed.
    pub fn handle_owned_by(&self, owner: &Block) -> Result<Handle> {
        if owner.arena.token() != self.arena.token() {
            return Err(Error::InvalidArgument(
                "owner block belongs to another arena".into(),
            ));
        }
        self.make_handle(Some((owner.bref, owner.generation)))
    }

    fn make_handle(&self, owner: Option<(u64, u64)>) -> Result<Handle> {
        let (pin, slot, epoch) = self.arena.pin(self.bref, self.generation, owner)?;
        Ok(Handle::new(
            self.arena.token(),
            ref_seg(self.bref),
            ref_offset(self.bref),
            self.generation,
            self.len as u64,
            Some(pin),
            slot,
            epoch,
            self.readonly,
            &self.arena.mac_key(),
        ))
    }

    /// The block's bytes.
    ///
    /// # Safety
    /// Other processes may write the block concurrently; the caller must know
    /// that nobody does while the slice is alive.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe live mapped memory owned by this reference;
        // the absence of concurrent writers is the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The block's bytes, writable.
    ///
    /// # Safety
    /// As for [`Block::as_slice`], and no other reader or writer may access the
    /// bytes while the slice is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as above; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Block {
    /// Gives up the Rust value but keeps its reference: for allocators that
    /// hand the pointer to foreign code (numpy's allocator hook). Release it
    /// with [`Arena::release_raw`] or [`release_raw`].
    /// The forgotten value keeps its arena attached, so the pointer stays
    /// mapped for as long as the foreign code holds it.
    pub fn into_raw(self) -> *mut u8 {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }
}

/// Releases a reference given up with [`Block::into_raw`], in whichever
/// attached arena holds `ptr`. Returns false if `ptr` is not a block start.
pub fn release_raw(ptr: *mut u8) -> bool {
    for a in Arena::all_attached() {
        if a.owns_block_start(ptr as usize) {
            a.release(ptr);
            return true;
        }
    }
    false
}

/// A copy-on-write view of a block: reads share the block's pages, writes
/// copy the pages they touch for this process alone. Holds a reference to the
/// block, so the pages it has not copied stay valid.
pub struct PrivateView {
    _block: Block,
    map: Mapping,
    delta: usize,
    len: usize,
}

// SAFETY: the view owns its private mapping and a counted block reference;
// nothing in it is tied to a thread.
unsafe impl Send for PrivateView {}
// SAFETY: &PrivateView exposes only the pointer and lengths.
unsafe impl Sync for PrivateView {}

impl PrivateView {
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: `delta` < page size <= mapping length.
        unsafe { self.map.ptr().add(self.delta) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Block {
    /// A copy-on-write view of this block (the semantics of a private copy,
    /// at the cost of copying only the pages that are written).
    pub fn copy_on_write(&self) -> Result<PrivateView> {
        let path = seg_path(
            &self.arena.inner.dir,
            &self.arena.inner.token,
            ref_seg(self.bref),
        );
        let fd = sys::open_file(&path)?;
        let page = sys::page_size() as u64;
        let payload = ref_offset(self.bref) + BLOCK_HEADER;
        let start = payload / page * page;
        let delta = (payload - start) as usize;
        let map_len = (delta + self.len.max(1)).div_ceil(page as usize) * page as usize;
        let map = Mapping::new_private(&fd, start, map_len)?;
        Ok(PrivateView {
            _block: self.clone(),
            map,
            delta,
            len: self.len,
        })
    }
}

impl Clone for Block {
    fn clone(&self) -> Block {
        self.arena.retain(self.ptr);
        Block {
            arena: self.arena.clone(),
            ..*self
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.arena.release(self.ptr);
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("len", &self.len)
            .field("generation", &self.generation)
            .finish()
    }
}
