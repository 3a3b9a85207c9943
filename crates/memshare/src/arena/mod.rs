//! The arena: named shared segments carved into 64-byte-aligned blocks, with
//! cross-process reference counts.
//!
//! Modules by job: `naming` (paths, tokens, size settings), `txn` (the
//! metadata under the arena mutex), `heap` (blocks, bins, split/merge,
//! growth), `holders` (cross-process references), `pins` (in-flight handles),
//! `repair` (crash recovery), `slots` (process slots, liveness, leaving),
//! `fork`, `local` (this process's references and mappings), `cache` (free
//! blocks kept for the next allocations), `releases` (releases put off to
//! the next transaction), `admin` (stats, `ls`, `gc`) and `block` (`Block`,
//! `PrivateView`).
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

mod admin;
mod block;
mod cache;
#[doc(hidden)]
pub mod crash;
mod decay;
mod fork;
mod heap;
mod holders;
mod local;
mod naming;
mod pins;
mod prefault;
mod releases;
mod repair;
mod segments;
mod slots;
mod txn;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

pub use admin::Stats;
pub use block::{release_raw, Block, PrivateView};
pub use cache::{cached_bytes, flush_caches};
pub use decay::{pause_for_fork, resume_after_fork, DECAY_NS};
pub use fork::reserve_fork_slots;
pub use naming::{ctl_path, default_dir, hex, parse_hex, parse_size, seg_path};
pub use pins::Lease;
pub use prefault::{huge_pages, populate_idle, populated_bytes, HugePages, POPULATE_MIN};
pub use releases::pending_release_bytes;
pub use slots::SlotInfo;
pub use txn::{has_deadline, lock_acquisitions, with_deadline};

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::layout::*;
use crate::sys::{self, Mapping, RobustMutex};
use local::{lock_local, Local, LocalRef};
use txn::Txn;

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

impl Arena {
    /// Creates a new arena in `dir` (normally /dev/shm).
    pub fn create(dir: &Path) -> Result<Arena> {
        let limit = naming::limit_from_env()?;
        let retain = naming::retain_from_env()?;
        prefault::check_env()?;
        sys::check_dir(dir)?;
        let mut token = [0u8; 16];
        let mut mac_key = [0u8; 16];
        sys::random_bytes(&mut mac_key)?;
        sys::random_bytes(&mut token)?;
        // Made unnamed and named only when complete, with this process's slot
        // locked: another program's start-up clean-up never sees a half-made
        // arena (no magic, or no live slot) and judges it dead.
        let (fd, unnamed) = match sys::create_unnamed(dir, CTL_SIZE)? {
            Some(fd) => (fd, true),
            // A random token names nothing that exists; if it does, take another.
            None => loop {
                match sys::create_file(&ctl_path(dir, &token), CTL_SIZE) {
                    Err(Error::Exists { .. }) => sys::random_bytes(&mut token)?,
                    r => break (r?, false),
                }
            },
        };
        let map = Mapping::new(&fd, CTL_SIZE as usize)?;
        let ctl_ptr = map.ptr() as *mut CtlHeader;
        // SAFETY: fresh zero-filled mapping of CTL_SIZE bytes that no other
        // process can see before the magic is written below.
        let ctl = unsafe { &mut *ctl_ptr };
        ctl.version = LAYOUT_VERSION;
        ctl.header_size = CTL_SIZE as u32;
        ctl.token = token;
        ctl.mac_key = mac_key;
        ctl.limit = limit;
        ctl.retain = retain;
        ctl.bins = [BlockRef::NIL; NBINS];
        // Every pin entry is free, on the free list in index order.
        for (i, p) in ctl.pins.iter_mut().enumerate() {
            p.block = BlockRef::NIL;
            p.owner = BlockRef::NIL;
            p.kind = PIN_FREE;
            p.prev = NO_PIN;
            p.next = if i + 1 < MAX_PINS {
                i as u32 + 1
            } else {
                NO_PIN
            };
        }
        ctl.pin_free = 0;
        for s in ctl.slots.iter_mut() {
            s.pin_head = NO_PIN;
        }
        // SAFETY: the mutex field is inside the mapping and 64-byte aligned.
        let mutex = unsafe { RobustMutex::from_ptr(std::ptr::addr_of_mut!(ctl.mutex).cast()) };
        mutex.init()?;
        // Slot 0 is ours, locked through our own open file description.
        let (slot, epoch) = (0, 1);
        let s = &mut ctl.slots[slot as usize];
        (s.state, s.epoch, s.pid, s.pins, s.pin_head) = (SLOT_ALIVE, epoch, sys::pid(), 0, NO_PIN);
        s.clear_put_off();
        if !sys::ofd_lock(&fd, slots::slot_lock_offset(slot), 1, false)? {
            return Err(Error::StaleHandle(
                "the new arena is locked by another process".into(),
            ));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ctl.magic = CTL_MAGIC;
        if unnamed {
            loop {
                match sys::link_unnamed(&fd, &ctl_path(dir, &token)) {
                    Err(Error::Exists { .. }) => {
                        sys::random_bytes(&mut token)?;
                        ctl.token = token;
                    }
                    r => break r?,
                }
            }
        }
        let mut local = Local::new(fd);
        local.claimed_here(slot, epoch);
        let dir_bytes = sys::space(dir).0;
        local.cache.cap = cache::cap_bytes(limit, dir_bytes);
        local.releases.cap = releases::cap_bytes(limit, dir_bytes);
        Ok(Self::register(dir, token, map, local))
    }

    /// Records a new attachment in the process-wide table.
    fn register(dir: &Path, token: [u8; 16], ctl: Mapping, local: Local) -> Arena {
        let inner = Arc::new(Inner {
            token,
            dir: dir.to_path_buf(),
            ctl,
            local: Mutex::new(local),
        });
        fork::install_fork_handlers();
        attached()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&inner));
        Arena { inner }
    }

    /// Attaches to an existing arena by token.
    pub fn attach(dir: &Path, token: [u8; 16]) -> Result<Arena> {
        {
            let list = attached().lock().unwrap_or_else(|p| p.into_inner());
            for w in list.iter() {
                if let Some(inner) = w.upgrade() {
                    if inner.token == token && inner.dir == dir && lock_local(&inner.local).usable()
                    {
                        return Ok(Arena { inner });
                    }
                }
            }
        }
        prefault::check_env()?;
        sys::check_dir(dir)?;
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
        let arena = Self::register(dir, token, ctl, Local::new(fd));
        {
            let mut local = lock_local(&arena.inner.local);
            let fd = sys::reopen(&ctl_path(dir, &token))?;
            let mut txn = arena.inner.txn(&mut local)?;
            let (slot, epoch) = txn.claim_slot(&fd)?;
            let (limit, dir_bytes) = (txn.ctl.limit, sys::space(dir).0);
            drop(txn);
            local.claimed(fd, slot, epoch);
            local.cache.cap = cache::cap_bytes(limit, dir_bytes);
            local.releases.cap = releases::cap_bytes(limit, dir_bytes);
        }
        Ok(arena)
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
        if !local.usable() {
            return Err(local.unusable_error());
        }
        let mut txn = self.inner.txn(&mut local)?;
        f(&mut txn)
    }

    /// Waits until this process can take the arena's lock (within this
    /// thread's deadline, see [`with_deadline`]): for a step that must not
    /// start unless the lock is to be had, such as taking a queued message
    /// whose blocks are then opened. A lock that nobody holds right now is
    /// not taken (one look at its word: no acquisition); a held one is
    /// waited for, taken and let go.
    pub fn wait_for_lock(&self) -> Result<()> {
        {
            let local = lock_local(&self.inner.local);
            if !local.usable() {
                return Err(local.unusable_error());
            }
        }
        if self.inner.lock_looks_free() {
            return Ok(());
        }
        self.with_txn(|_| Ok(()))
    }

    /// Allocates `len` bytes. The returned block holds one reference.
    pub fn alloc(&self, len: usize, readonly: bool) -> Result<Block> {
        decay::ensure_thread();
        let flags = if readonly { BLOCK_READONLY } else { 0 };
        let mut local = lock_local(&self.inner.local);
        if !local.usable() {
            return Err(local.unusable_error());
        }
        // A block this process freed while it alone held it: no lock.
        if local.fork.is_none() {
            if let Some(c) = local.cache.take(payload_size(len as u64), readonly) {
                // Only blocks this process allocated are cached.
                return Ok(self.hand_out(
                    &mut local,
                    c.bref,
                    c.generation,
                    c.ptr as *mut u8,
                    c.size,
                    len,
                    readonly,
                    true,
                    len as u64 <= c.len,
                ));
            }
        }
        let (a, ptr, size) = {
            let mut txn = self.inner.txn(&mut local)?;
            let a = txn.alloc(len as u64, flags)?;
            let ptr = txn.payload_ptr(a.bref)?;
            let size = txn.hdr(a.bref)?.size;
            (a, ptr, size)
        };
        // While a fork is prepared, the child holds what we allocate.
        let private = local.fork.is_none();
        Ok(self.hand_out(
            &mut local,
            a.bref,
            a.generation,
            ptr,
            size,
            len,
            readonly,
            private,
            a.pages_mapped,
        ))
    }

    /// Records a block just allocated (or taken from the cache) as this
    /// process's, with one reference.
    #[allow(clippy::too_many_arguments)]
    fn hand_out(
        &self,
        local: &mut Local,
        r: BlockRef,
        generation: u64,
        ptr: *mut u8,
        size: u64,
        len: usize,
        readonly: bool,
        private: bool,
        pages_mapped: bool,
    ) -> Block {
        local.refs.insert(
            ptr as usize,
            LocalRef {
                bref: r,
                generation,
                size,
                len: len as u64,
                count: 1,
                readonly,
                prefault: None,
                private,
            },
        );
        local.by_ref.insert(r, ptr as usize);
        Block {
            arena: self.clone(),
            bref: r,
            generation,
            ptr,
            len,
            capacity: size as usize,
            readonly,
            pages_mapped,
        }
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
        if !local.usable() {
            return Err(local.unusable_error());
        }
        let r = BlockRef::new(h.segment, h.offset);
        let (ptr, size, flags) = {
            let mut txn = self.inner.txn(&mut local)?;
            let (size, flags) = txn.check_handle(h)?;
            txn.consume_pin(h)?;
            let slot = txn.local.slot;
            txn.set_holder(r, slot, true)?;
            // A child about to be forked holds what this process holds.
            if let Some(child) = txn.local.fork.as_ref().map(|f| f.slot) {
                txn.set_holder(r, child, true)?;
            }
            (txn.payload_ptr(r)?, size, flags)
        };
        // The first reference in this process finds its page tables empty:
        // have them filled in the background (large blocks only).
        let seg = local.segments.get(r.segment() as usize).cloned().flatten();
        let entry = local.refs.entry(ptr as usize).or_insert_with(|| LocalRef {
            bref: r,
            generation: h.generation,
            size,
            len: 0,
            count: 0,
            readonly: flags & BLOCK_READONLY != 0,
            prefault: seg.and_then(|m| prefault::populate_soon(m, ptr as usize, h.len as usize)),
            private: false,
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
            pages_mapped: false,
        })
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
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.leave();
    }
}
