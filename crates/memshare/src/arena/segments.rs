//! Segments: the files (or memory-backed memfds) that hold the heap.
//!
//! - Names: each segment file is `memshare-<token>-<index>-<random>`, the
//!   random part chosen when it is made and recorded in the control segment,
//!   so another user who can list the directory cannot take the name first.
//! - Memory-backed segments: when the shm directory cannot hold a new
//!   segment, it is a memfd instead. It has no name; other processes open it
//!   through a process that holds it (`/proc/<pid>/fd/<fd>`, checked by device
//!   and inode), and it disappears when the last process holding it exits.
//! - Backing store: free pages can be punched (given back to the OS) and are
//!   reserved again before reuse, so a full tmpfs is an error, not SIGBUS.
//!   What each segment holds is read back from the kernel after every change.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use super::naming::seg_path;
use super::txn::Txn;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::sys;

/// Random names tried before giving up on creating a segment file (only a
/// name collision, astronomically unlikely, makes a second try necessary).
const NAME_TRIES: usize = 16;

fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    fd.try_clone().map_err(|e| Error::Io {
        context: "duplicating a segment descriptor".into(),
        source: e,
    })
}

impl Txn<'_> {
    /// The file of segment `seg` (meaningless for a memory-backed one).
    pub(super) fn seg_file(&self, seg: u32) -> PathBuf {
        let name = self.ctl.segments[seg as usize].name;
        seg_path(&self.inner.dir, &self.inner.token, seg, name)
    }

    /// How segment `seg` is named in messages.
    pub(super) fn seg_label(&self, seg: u32) -> String {
        match self.ctl.segments[seg as usize].kind {
            SEG_MEMFD | SEG_GONE => format!(
                "memory-backed segment {seg} of arena {}",
                super::hex(&self.inner.token)
            ),
            _ => self.seg_file(seg).display().to_string(),
        }
    }

    /// A descriptor of segment `seg`, checked to be this user's.
    pub(super) fn open_segment(&mut self, seg: u32) -> Result<OwnedFd> {
        let gone = |txn: &Self| Error::NotFound {
            path: txn.seg_label(seg),
        };
        let e = &self.ctl.segments[seg as usize];
        match e.kind {
            SEG_GONE => {
                // Nothing of it should be reachable any more; if a block
                // of it was (freed by a process that still maps it), the
                // next transaction's repair unlinks it.
                self.ctl.repair_needed = 1;
                return Err(gone(self));
            }
            SEG_MEMFD => {}
            _ => return sys::open_file(&self.seg_file(seg)),
        }
        if let Some(fd) = self.local.memfds.get(&seg) {
            return dup(fd);
        }
        let (dev, ino, holders) = (e.dev, e.ino, e.holders);
        let mut found = holders
            .iter()
            .filter(|h| h.pid != 0)
            .find_map(|h| sys::open_held(h.pid, h.fd, dev, ino));
        let mut unsure = false;
        if found.is_none() {
            // No recorded holder has it any more; every live process that
            // maps it keeps it open, so look through theirs.
            let pids: Vec<u32> = (0..MAX_PROCS as u32)
                .filter(|&s| self.ctl.slots[s as usize].state == SLOT_ALIVE && self.slot_alive(s))
                .map(|s| self.ctl.slots[s as usize].pid)
                .collect();
            for pid in pids {
                match sys::find_held(pid, dev, ino) {
                    sys::Held::Yes(fd) => {
                        found = Some(fd);
                        break;
                    }
                    sys::Held::No => {}
                    sys::Held::Unknown => unsure = true,
                }
            }
        }
        let Some(fd) = found else {
            if !unsure {
                // No live process holds it: its memory is gone. Its free
                // blocks are still linked into the bins (through headers
                // nobody can read now), so the next transaction repairs,
                // which rebuilds the bins without it.
                self.ctl.segments[seg as usize].kind = SEG_GONE;
                self.ctl.repair_needed = 1;
            }
            return Err(gone(self));
        };
        self.add_holder(seg, &fd);
        let out = dup(&fd)?;
        self.local.memfds.insert(seg, fd);
        Ok(out)
    }

    /// Records this process as a holder of memory-backed segment `seg`, in
    /// an empty entry or in place of a holder that is gone.
    fn add_holder(&mut self, seg: u32, fd: &OwnedFd) {
        let e = &self.ctl.segments[seg as usize];
        let (dev, ino) = (e.dev, e.ino);
        let free = e
            .holders
            .iter()
            .position(|h| h.pid == 0 || sys::open_held(h.pid, h.fd, dev, ino).is_none());
        if let Some(i) = free {
            self.ctl.segments[seg as usize].holders[i] = SegHolder {
                pid: sys::pid(),
                fd: fd.as_raw_fd() as u32,
            };
        }
    }

    /// Makes the backing of new segment `idx` of `size` bytes, fully
    /// reserved: a file under a fresh random name, or a memfd when the shm
    /// directory has no room for it.
    pub(super) fn create_segment(&mut self, idx: u32, size: u64) -> Result<OwnedFd> {
        let i = idx as usize;
        // A name recorded at an unused index is a file left by a process
        // that died while growing the arena (segment_count never advanced).
        if self.ctl.segments[i].kind == SEG_FILE && self.ctl.segments[i].name != 0 {
            sys::unlink(&self.seg_file(idx));
        }
        let (_, avail) = sys::space(&self.inner.dir);
        if size <= avail {
            for _ in 0..NAME_TRIES {
                let e = &mut self.ctl.segments[i];
                e.kind = SEG_FILE;
                // Recorded before the file exists, so a crash leaves it findable.
                e.name = sys::random_u64()? | 1;
                match sys::create_file(&self.seg_file(idx), size) {
                    Ok(fd) => return Ok(fd),
                    // Someone else's file: another name, not a failure.
                    Err(Error::Exists { .. }) => continue,
                    Err(Error::NoSpace { .. }) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        self.create_memfd_segment(idx, size)
    }

    fn create_memfd_segment(&mut self, idx: u32, size: u64) -> Result<OwnedFd> {
        let dir = &self.inner.dir;
        let (total, dir_avail) = sys::space(dir);
        let no_memory = |available: u64| Error::NoMemory {
            dir: dir.display().to_string(),
            requested: size,
            available,
            dir_available: dir_avail,
            dir_total: total,
        };
        let available = sys::memory_available();
        if size > available {
            return Err(no_memory(available));
        }
        let fd = match sys::create_memfd(size) {
            Ok(fd) => fd,
            Err(Error::NoMemory { .. }) => return Err(no_memory(sys::memory_available())),
            Err(e) => return Err(e),
        };
        let st = sys::fstat(&fd)?;
        let e = &mut self.ctl.segments[idx as usize];
        e.kind = SEG_MEMFD;
        e.name = 0;
        e.dev = st.dev;
        e.ino = st.ino;
        e.holders = [SegHolder::default(); SEG_HOLDERS];
        e.holders[0] = SegHolder {
            pid: sys::pid(),
            fd: fd.as_raw_fd() as u32,
        };
        self.local.memfds.insert(idx, dup(&fd)?);
        Ok(fd)
    }

    /// Removes the files of every segment (the last process is leaving).
    pub(super) fn remove_segment_files(&self) {
        let n = (self.ctl.segment_count as usize + 1).min(MAX_SEGMENTS) as u32;
        for i in 0..n {
            let e = &self.ctl.segments[i as usize];
            if e.kind == SEG_FILE && e.name != 0 {
                sys::unlink(&self.seg_file(i));
            }
        }
    }

    /// Re-reads how much backing store segment `seg` holds.
    pub(super) fn recount(&mut self, seg: u32, fd: &OwnedFd) {
        if let Ok(st) = sys::fstat(fd) {
            self.ctl.segments[seg as usize].committed = st.allocated;
            self.sum_segments();
        }
    }

    /// True if segment `seg` is a memory-backed one whose memory is gone.
    pub(super) fn seg_gone(&self, seg: u32) -> bool {
        self.ctl.segments[seg as usize].kind == SEG_GONE
    }

    /// Sets the arena's totals to the sums over its segments' entries. They
    /// are always derived, never adjusted by a difference: a process killed
    /// between writing an entry and a total leaves nothing the next sum
    /// (or repair) does not put right.
    pub(super) fn sum_segments(&mut self) {
        let published = &self.ctl.segments[..self.ctl.segment_count as usize];
        let (size, committed) = published
            .iter()
            .filter(|e| e.kind != SEG_GONE)
            .fold((0, 0), |(s, c), e| (s + e.size, c + e.committed));
        self.ctl.bytes_reserved = size;
        self.ctl.bytes_committed = committed;
    }

    /// Gives the whole pages inside the payload of free block `r` back to
    /// the OS. The header page stays: headers are read at every walk.
    pub(super) fn punch(&mut self, r: BlockRef) -> Result<()> {
        let page = sys::page_size() as u64;
        // Flag the holes first: a crash after the punch must not leave pages
        // in use that nothing reserves.
        let size = {
            let h = self.hdr(r)?;
            h.flags |= BLOCK_HOLES;
            h.size
        };
        let start = r.payload_offset().div_ceil(page) * page;
        let end = (r.payload_offset() + size) / page * page;
        if end > start {
            let fd = self.open_segment(r.segment())?;
            sys::punch_hole(&fd, start, end - start);
            self.recount(r.segment(), &fd);
        }
        self.hdr(r)?.dirty = 0;
        Ok(())
    }

    /// Reserves `[offset, offset + len)` of segment `seg` again (pages that
    /// may have been punched), before anything is written there.
    pub(super) fn reserve_range(&mut self, seg: u32, offset: u64, len: u64) -> Result<()> {
        let fd = self.open_segment(seg)?;
        let r = sys::reserve(&fd, offset, len, &self.inner.dir);
        self.recount(seg, &fd);
        r
    }
}
