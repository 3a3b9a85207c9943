//! Administration: usage figures, `memshare ls` (inspect without attaching)
//! and `memshare gc` (remove the files of arenas whose every process died).

use std::path::Path;
use std::time::{Duration, Instant};

use super::naming::{ctl_path, hex, parse_hex};
use super::slots::{slot_lock_offset, SlotInfo};
use super::txn::Txn;
use super::Arena;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::sys::{self, LockState, RobustMutex};

/// How long `memshare ls` and `gc` wait for one arena's lock.
const ADMIN_WAIT: Duration = Duration::from_secs(1);

/// Usage figures of an arena, counting the blocks of every attached process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Memory the arena holds: the backing store its segments have
    /// committed (live blocks, headers and the warm free pages not yet given
    /// back to the OS).
    pub bytes_reserved: u64,
    /// Total size of the segments (address space; punched pages included).
    pub bytes_segments: u64,
    /// Segments that are memory-backed (memfd) rather than files.
    pub memfd_segments: u64,
    /// Idle free bytes kept committed for reuse (the warm cache).
    pub retain: u64,
    pub bytes_in_use: u64,
    pub live_blocks: u64,
    pub segments: u64,
    pub pins: u64,
    pub processes: u64,
    /// Processes that can be attached at once (one slot each).
    pub max_processes: u64,
    pub limit: u64,
    /// Free blocks this process keeps for its next allocations (left out
    /// of its `bytes_in_use` and `live_blocks`; see `cache.rs`).
    pub cached_bytes: u64,
}

impl Stats {
    fn of(ctl: &CtlHeader) -> Stats {
        Stats {
            bytes_reserved: ctl.bytes_committed,
            bytes_segments: ctl.bytes_reserved,
            memfd_segments: ctl.segments[..ctl.segment_count as usize]
                .iter()
                .filter(|e| e.kind == SEG_MEMFD)
                .count() as u64,
            retain: ctl.retain,
            bytes_in_use: ctl.bytes_in_use,
            live_blocks: ctl.live_blocks,
            segments: ctl.segment_count as u64,
            pins: ctl.pins_in_use,
            processes: ctl.slots.iter().filter(|s| s.state == SLOT_ALIVE).count() as u64,
            max_processes: MAX_PROCS as u64,
            limit: ctl.limit,
            cached_bytes: 0,
        }
    }
}

impl Txn<'_> {
    fn stats(&self) -> Stats {
        Stats::of(self.ctl)
    }
}

impl Arena {
    /// Usage figures across every process attached to the arena.
    /// (The figure `lock_acquisitions` leaves this call's own lock out.)
    pub fn stats(&self) -> Result<Stats> {
        super::txn::uncount_lock();
        self.with_txn(|txn| {
            // This process's cache is free memory to this process: its
            // figures say so (another process's cache is memory in use).
            let mut s = txn.stats();
            let (bytes, blocks) = (txn.local.cache.bytes(), txn.local.cache.len() as u64);
            s.bytes_in_use = s.bytes_in_use.saturating_sub(bytes);
            s.live_blocks = s.live_blocks.saturating_sub(blocks);
            s.cached_bytes = bytes;
            Ok(s)
        })
    }

    /// Sets the byte limit of the arena (for every attached process); 0 or
    /// `u64::MAX` means no limit, as `MEMSHARE_LIMIT=0` does.
    pub fn set_limit(&self, limit: u64) -> Result<()> {
        self.with_txn(|txn| {
            txn.ctl.limit = if limit == 0 { u64::MAX } else { limit };
            Ok(())
        })
    }

    /// Sets how many idle free bytes the arena keeps committed for reuse
    /// (for every attached process); the rest goes back to the OS once idle
    /// for a few seconds.
    pub fn set_retain(&self, retain: u64) -> Result<()> {
        self.with_txn(|txn| {
            txn.ctl.retain = retain;
            txn.ctl.frees += 1; // wake the decay of a lowered cache
            Ok(())
        })
    }

    /// Releases what dead processes held. Returns true if any were found.
    pub fn reap(&self) -> Result<bool> {
        self.with_txn(|txn| txn.reap())
    }

    /// Takes the arena's lock and keeps it until [`Arena::release_held_lock`]
    /// (for tests of a peer that stops while holding it).
    #[doc(hidden)]
    pub fn hold_lock(&self) -> Result<()> {
        // SAFETY: the mutex lies inside this attachment's control mapping.
        let mutex = unsafe {
            RobustMutex::from_ptr(std::ptr::addr_of_mut!((*self.inner.ctl_ptr()).mutex).cast())
        };
        let state = mutex.lock()?;
        // SAFETY: we hold the mutex of this attachment's control mapping.
        unsafe { leave_repair_to_the_next(self.inner.ctl_ptr(), state) };
        Ok(())
    }

    /// Releases the lock taken by [`Arena::hold_lock`] on this thread.
    #[doc(hidden)]
    pub fn release_held_lock(&self) {
        // SAFETY: as in `hold_lock`.
        let mutex = unsafe {
            RobustMutex::from_ptr(std::ptr::addr_of_mut!((*self.inner.ctl_ptr()).mutex).cast())
        };
        mutex.unlock();
    }

    /// Reads an arena's figures and process slots without attaching to it
    /// (for `memshare ls`): nothing is changed, no slot is taken. Waits at
    /// most `ADMIN_WAIT` for the arena's lock ([`Error::Busy`] then).
    pub fn inspect(dir: &Path, token: [u8; 16]) -> Result<(Stats, Vec<SlotInfo>)> {
        let path = ctl_path(dir, &token);
        let fd = sys::open_file(&path)?;
        let map = Self::map_ctl(&path, &fd)?;
        let ctl_ptr = map.ptr() as *mut CtlHeader;
        // SAFETY: the mutex lies inside the validated control mapping.
        let mutex =
            unsafe { RobustMutex::from_ptr(std::ptr::addr_of_mut!((*ctl_ptr).mutex).cast()) };
        let Some(state) = mutex.lock_until(Some(Instant::now() + ADMIN_WAIT))? else {
            return Err(Error::Busy(hex(&token)));
        };
        // SAFETY: we hold the mutex of the validated control mapping.
        unsafe { leave_repair_to_the_next(ctl_ptr, state) };
        // SAFETY: we hold the arena mutex; we only read.
        let ctl = unsafe { &*ctl_ptr };
        let stats = Stats::of(ctl);
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
    /// Returns the tokens removed (or that would be, with `dry_run`). An
    /// arena whose lock stays busy for `ADMIN_WAIT` has a live holder (a dead
    /// one frees it at once): it is skipped.
    pub fn collect_garbage(dir: &Path, dry_run: bool) -> Result<Vec<String>> {
        Self::collect_garbage_within(dir, dry_run, ADMIN_WAIT)
    }

    /// [`Arena::collect_garbage`], waiting at most `wait` for each arena.
    pub fn collect_garbage_within(
        dir: &Path,
        dry_run: bool,
        wait: Duration,
    ) -> Result<Vec<String>> {
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
                    let Some(state) = mutex.lock_until(Some(Instant::now() + wait))? else {
                        continue; // held by a live (maybe stopped) process
                    };
                    // SAFETY: we hold the mutex of the validated control mapping.
                    unsafe { leave_repair_to_the_next(map.ptr() as *mut CtlHeader, state) };
                    let dead = sys::ofd_lock(&fd, SLOT_LOCK_BASE, MAX_PROCS as u64, false);
                    let Ok(dead) = dead else {
                        mutex.unlock();
                        continue;
                    };
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

/// After taking the arena's mutex without attaching (so with no way to
/// repair): if its holder died (`state`), marks the metadata for the next
/// transaction to repair, since this lock already made the mutex
/// consistent and the next locker gets no EOWNERDEAD.
///
/// # Safety
/// `ctl` points to a mapped control header whose mutex this thread holds.
unsafe fn leave_repair_to_the_next(ctl: *mut CtlHeader, state: LockState) {
    if state == LockState::OwnerDied {
        // SAFETY: per the function's contract.
        unsafe { (*ctl).repair_needed = 1 };
    }
}
