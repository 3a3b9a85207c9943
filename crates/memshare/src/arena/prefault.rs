//! Memory at memory speed on first use: the page tables of large received
//! blocks are filled ahead of use by a background thread
//! (`madvise(MADV_POPULATE_READ)`), and segment mappings ask for transparent
//! huge pages where the system allows them.
//!
//! A process that opens a handle maps pages another process wrote; without
//! help its first read of a 1 GiB block takes one page-table fault per 4 KiB
//! page. Populating synchronously would put that cost on `open` (and on every
//! hand-off through a queue), so a per-process thread does it while the
//! caller goes on; it works through the block in chunks and stops as soon as
//! this process drops the block (the pages of a freed block are left alone).
//!
//! Populating is off unless asked for: on 2 loaded cores the populating
//! thread and the reader compete, and the first read came out slower (1.6x-2.4x
//! a warm read, against 1.0x-1.25x without; see BENCHMARKS.md). Huge pages are
//! the remedy that measured well: 512 times fewer faults.
//!
//! Switches (read once per process):
//! - `MEMSHARE_POPULATE=1` turns populating on.
//! - `MEMSHARE_HUGEPAGES=never` asks the kernel not to use huge pages for
//!   segments (`MADV_NOHUGEPAGE`); the default `auto` asks for them
//!   (`MADV_HUGEPAGE`, honoured when `shmem_enabled` is `advise` or the
//!   tmpfs is mounted `huge=advise`; a tmpfs mounted `huge=always` as
//!   `MEMSHARE_DIR` gives huge pages whatever this says). When the kernel has
//!   no huge pages to give the advice is ignored: 4 KiB pages, as before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sys::Mapping;

/// Blocks at least this large are populated ahead of use (smaller ones fault
/// in quickly, the kernel maps several pages per fault).
pub const POPULATE_MIN: usize = 4 << 20;
/// Populated at a time; the block's cancel flag is checked between chunks.
const CHUNK: usize = 8 << 20;

/// The huge-page policy for segment mappings (`MEMSHARE_HUGEPAGES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// Ask for huge pages where the kernel offers them (the default).
    Auto,
    /// Ask the kernel not to back segments with huge pages.
    Never,
}

impl HugePages {
    /// The policy named by a `MEMSHARE_HUGEPAGES` value (unset or empty:
    /// `Auto`). Anything but `auto`/`never` (or `1`/`0`) is refused.
    pub fn parse(value: Option<&str>) -> Option<HugePages> {
        match value.map(str::trim) {
            None | Some("") | Some("auto") | Some("1") => Some(HugePages::Auto),
            Some("never") | Some("0") => Some(HugePages::Never),
            Some(_) => None,
        }
    }
}

/// This process's huge-page policy; an unreadable value falls back to `Auto`
/// (huge pages change speed, never behaviour).
pub fn huge_pages() -> HugePages {
    static POLICY: OnceLock<HugePages> = OnceLock::new();
    *POLICY.get_or_init(|| {
        HugePages::parse(std::env::var("MEMSHARE_HUGEPAGES").ok().as_deref())
            .unwrap_or(HugePages::Auto)
    })
}

/// The `MEMSHARE_POPULATE` switch: unset, empty or `0` is off, `1` is on.
fn parse_populate(value: Option<&str>) -> Option<bool> {
    match value.map(str::trim) {
        None | Some("") | Some("0") => Some(false),
        Some("1") => Some(true),
        Some(_) => None,
    }
}

/// Refuses values of `MEMSHARE_HUGEPAGES` and `MEMSHARE_POPULATE` that mean
/// nothing, with an error naming the variable and what it accepts (checked
/// when a process creates or attaches an arena, so a typo is never silent).
pub fn check_env() -> Result<()> {
    let huge = std::env::var("MEMSHARE_HUGEPAGES").ok();
    if HugePages::parse(huge.as_deref()).is_none() {
        return Err(Error::InvalidArgument(format!(
            "MEMSHARE_HUGEPAGES={:?} is not a huge-page policy; use auto (the default) or never",
            huge.unwrap_or_default()
        )));
    }
    let populate = std::env::var("MEMSHARE_POPULATE").ok();
    if parse_populate(populate.as_deref()).is_none() {
        return Err(Error::InvalidArgument(format!(
            "MEMSHARE_POPULATE={:?} is not a switch; use 1 (populate page tables of received \
             blocks ahead of use) or 0 (the default)",
            populate.unwrap_or_default()
        )));
    }
    Ok(())
}

/// True if `MEMSHARE_POPULATE=1` (and the kernel has MADV_POPULATE_READ).
pub fn populate_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        parse_populate(std::env::var("MEMSHARE_POPULATE").ok().as_deref()).unwrap_or(false)
    }) && !UNSUPPORTED.load(Ordering::Relaxed)
}

/// Set once the kernel refused MADV_POPULATE_READ (Linux before 5.14).
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Gives the kernel this process's huge-page advice for a segment mapping.
/// Errors (no THP support in the kernel) leave ordinary pages.
pub(super) fn advise_segment(map: &Mapping) {
    let advice = match huge_pages() {
        HugePages::Auto => rustix::mm::Advice::LinuxHugepage,
        HugePages::Never => rustix::mm::Advice::LinuxNoHugepage,
    };
    // SAFETY: the range is exactly a live mapping of ours; the advice changes
    // how the kernel backs it, never its contents.
    let _ = unsafe { rustix::mm::madvise(map.ptr().cast(), map.len(), advice) };
}

struct Job {
    /// Keeps the segment mapped while the job runs.
    map: Arc<Mapping>,
    addr: usize,
    len: usize,
    /// Set when this process drops the block.
    cancel: Arc<AtomicBool>,
}

/// The populating thread of this process: (pid that started it, its queue).
/// After `fork` the pid differs and the child starts its own.
static WORKER: Mutex<Option<(u32, Sender<Job>)>> = Mutex::new(None);

/// Fills the page tables of `[addr, addr + len)` (inside `map`) on the
/// background thread. Returns the flag that stops it (set it when the block
/// is dropped), or None if the block is too small or populating is off.
pub(super) fn populate_soon(map: Arc<Mapping>, addr: usize, len: usize) -> Option<Arc<AtomicBool>> {
    if len < POPULATE_MIN || !populate_enabled() {
        return None;
    }
    // madvise wants page-aligned ranges; blocks are 64-byte aligned. The
    // page around either end lies in the same (page-aligned) mapping.
    let page = crate::sys::page_size();
    let start = addr & !(page - 1);
    let end = (addr + len).div_ceil(page) * page;
    let end = end.min(map.ptr() as usize + map.len());
    if start < map.ptr() as usize || end <= start {
        return None;
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job {
        map,
        addr: start,
        len: end - start,
        cancel: cancel.clone(),
    };
    let pid = std::process::id();
    let mut worker = WORKER.lock().unwrap_or_else(|p| p.into_inner());
    if worker.as_ref().is_some_and(|(p, _)| *p != pid) {
        // Inherited from the parent, whose thread is not in this process:
        // forget the sender rather than drop it (its channel may have been
        // mid-operation in that thread when we forked).
        if let Some(old) = worker.take() {
            std::mem::forget(old);
        }
    }
    if worker.is_none() {
        let (tx, rx) = channel();
        let started = std::thread::Builder::new()
            .name("memshare-populate".into())
            .spawn(move || run(rx));
        if started.is_err() {
            return None; // no thread, no populating: pages fault in on use
        }
        *worker = Some((pid, tx));
    }
    pending_add(1);
    let sent = worker.as_ref().is_some_and(|(_, tx)| tx.send(job).is_ok());
    if !sent {
        pending_add(-1);
    }
    sent.then_some(cancel)
}

fn run(jobs: Receiver<Job>) {
    for job in jobs {
        // From the end backwards: a reader usually starts at the front, so
        // the two meet in the middle instead of faulting the same pages.
        let mut left = job.len;
        while left > 0 && !job.cancel.load(Ordering::Acquire) {
            let n = CHUNK.min(left);
            left -= n;
            // SAFETY: the range lies inside `job.map`, which this job keeps
            // mapped; populating for read faults pages in without changing
            // them (the block may even have been freed meanwhile: its pages
            // are still part of the mapped segment).
            let r = unsafe {
                rustix::mm::madvise(
                    (job.addr + left) as *mut _,
                    n,
                    rustix::mm::Advice::LinuxPopulateRead,
                )
            };
            if r == Err(rustix::io::Errno::INVAL) {
                UNSUPPORTED.store(true, Ordering::Relaxed);
                break;
            }
            POPULATED.fetch_add(n as u64, Ordering::Relaxed);
        }
        drop(job.map);
        pending_add(-1);
    }
}

/// (pid, jobs queued and not finished) with the condition variable that says
/// when the count reaches zero. A forked child's count starts again at zero
/// (its parent's jobs run in the parent).
static PENDING: (Mutex<(u32, usize)>, Condvar) = (Mutex::new((0, 0)), Condvar::new());
/// Bytes this process has populated ahead of use.
static POPULATED: AtomicU64 = AtomicU64::new(0);

fn pending_add(delta: isize) {
    let pid = std::process::id();
    let mut g = PENDING.0.lock().unwrap_or_else(|p| p.into_inner());
    if g.0 != pid {
        *g = (pid, 0);
    }
    g.1 = g.1.saturating_add_signed(delta);
    if g.1 == 0 {
        PENDING.1.notify_all();
    }
}

/// Bytes of received blocks this process has populated ahead of use.
pub fn populated_bytes() -> u64 {
    POPULATED.load(Ordering::Relaxed)
}

/// Waits up to `timeout` until the background thread has finished (or
/// stopped) every job queued so far; true if it has. For tests and
/// benchmarks that measure a read with the page tables already filled.
pub fn populate_idle(timeout: Duration) -> bool {
    let pid = std::process::id();
    let g = PENDING.0.lock().unwrap_or_else(|p| p.into_inner());
    let (g, _) = PENDING
        .1
        .wait_timeout_while(g, timeout, |g| g.0 == pid && g.1 > 0)
        .unwrap_or_else(|p| p.into_inner());
    g.0 != pid || g.1 == 0
}

#[cfg(test)]
mod tests {
    use super::{parse_populate, HugePages};

    #[test]
    fn huge_page_policy_parses_its_values_and_refuses_others() {
        assert_eq!(HugePages::parse(None), Some(HugePages::Auto));
        assert_eq!(HugePages::parse(Some("")), Some(HugePages::Auto));
        assert_eq!(HugePages::parse(Some("auto")), Some(HugePages::Auto));
        assert_eq!(HugePages::parse(Some(" never ")), Some(HugePages::Never));
        assert_eq!(HugePages::parse(Some("0")), Some(HugePages::Never));
        assert_eq!(HugePages::parse(Some("always")), None);
        assert_eq!(parse_populate(None), Some(false));
        assert_eq!(parse_populate(Some(" 1 ")), Some(true));
        assert_eq!(parse_populate(Some("0")), Some(false));
        assert_eq!(parse_populate(Some("yes")), None);
    }
}
