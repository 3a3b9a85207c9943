//! The operating-system layer: shared files, mappings, OFD locks, the robust
//! process-shared mutex and futexes. Every `unsafe` block of the crate that
//! talks to the kernel lives here, so the rest of the crate is safe code over
//! the small types defined below.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use rustix::fs::{FallocateFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};

fn os_error(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn open_error(path: &Path, e: Errno) -> Error {
    match e {
        Errno::ACCESS | Errno::PERM => Error::PermissionDenied {
            path: path.display().to_string(),
            why: "not accessible to this user".into(),
        },
        // O_NOFOLLOW met a symbolic link where a segment should be.
        Errno::LOOP => Error::PermissionDenied {
            path: path.display().to_string(),
            why: "it is a symbolic link, not a segment".into(),
        },
        Errno::NOENT => Error::NotFound {
            path: path.display().to_string(),
        },
        _ => Error::Io {
            context: format!("opening {}", path.display()),
            source: os_error(e),
        },
    }
}

fn no_space(dir: &Path, requested: u64) -> Error {
    let (total, available) = space(dir);
    Error::NoSpace {
        dir: dir.display().to_string(),
        requested,
        available,
        total,
    }
}

/// Reserves the backing store of `[offset, offset + len)` of `fd`, so that a
/// full tmpfs gives a clear error here instead of SIGBUS on first touch later.
/// `dir` names the file system in the error.
pub fn reserve(fd: &OwnedFd, offset: u64, len: u64, dir: &Path) -> Result<()> {
    loop {
        return match rustix::fs::fallocate(fd, FallocateFlags::empty(), offset, len) {
            Ok(()) => Ok(()),
            Err(Errno::INTR) => continue,
            Err(Errno::NOSPC) | Err(Errno::FBIG) | Err(Errno::NOMEM) => Err(no_space(dir, len)),
            Err(e) => Err(Error::Io {
                context: format!("reserving {len} bytes in {}", dir.display()),
                source: os_error(e),
            }),
        };
    }
}

/// Gives the pages of `[offset, offset + len)` of `fd` back to the kernel
/// (the file keeps its size; the range reads as zeros until it is written or
/// reserved again). Best effort: returns false if the kernel refused.
pub fn punch_hole(fd: &OwnedFd, offset: u64, len: u64) -> bool {
    let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    rustix::fs::fallocate(fd, mode, offset, len).is_ok()
}

/// Creates `path` exclusively with owner-only permissions (0600) and reserves
/// `size` bytes of backing store up front (see [`reserve`]). Never follows a
/// symbolic link and never opens a file someone else made.
pub fn create_file(path: &Path, size: u64) -> Result<OwnedFd> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let fd = rustix::fs::open(path, flags, Mode::from_raw_mode(0o600)).map_err(|e| match e {
        Errno::EXIST => Error::Exists {
            path: path.display().to_string(),
        },
        e => open_error(path, e),
    })?;
    // The umask may have removed bits but never adds any; make 0600 explicit.
    let _ = rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600));
    if let Err(e) = reserve(&fd, 0, size, path.parent().unwrap_or(Path::new("/"))) {
        unlink(path);
        return Err(e);
    }
    Ok(fd)
}

/// Creates an unnamed file of `size` bytes in directory `dir` (`O_TMPFILE`,
/// 0600), to be named with [`link_unnamed`] once it is ready: nobody can see
/// it half made. None if the file system does not support unnamed files.
pub fn create_unnamed(dir: &Path, size: u64) -> Result<Option<OwnedFd>> {
    let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(dir, flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => fd,
        Err(Errno::OPNOTSUPP) | Err(Errno::ISDIR) | Err(Errno::INVAL) => return Ok(None),
        Err(e) => return Err(open_error(dir, e)),
    };
    let _ = rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600));
    reserve(&fd, 0, size, dir)?;
    Ok(Some(fd))
}

/// Gives the unnamed file `fd` (from [`create_unnamed`]) the name `path`.
pub fn link_unnamed(fd: &OwnedFd, path: &Path) -> Result<()> {
    let from = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        from.as_str(),
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(|e| match e {
        Errno::EXIST => Error::Exists {
            path: path.display().to_string(),
        },
        e => open_error(path, e),
    })
}

/// Opens an existing shared file read-write, refusing symbolic links, files
/// of another user and files that others may read or write.
pub fn open_file(path: &Path) -> Result<OwnedFd> {
    let flags = OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let fd = rustix::fs::open(path, flags, Mode::empty()).map_err(|e| open_error(path, e))?;
    check_private(path, &fd)?;
    Ok(fd)
}

/// Refuses a segment that is not a regular file owned by this user with
/// owner-only permissions: another user could have made or changed it.
fn check_private(path: &Path, fd: &OwnedFd) -> Result<()> {
    let st = fstat(fd)?;
    let why = if st.uid != uid() {
        Some(format!(
            "it belongs to user {}, not to this user ({})",
            st.uid,
            uid()
        ))
    } else if st.mode & 0o170000 != 0o100000 {
        Some("it is not a regular file".into())
    } else if st.mode & 0o077 != 0 {
        Some(format!(
            "its mode {:o} lets other users read or write it",
            st.mode & 0o777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::PermissionDenied {
            path: path.display().to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// Refuses a segment directory in which other users could replace our files:
/// one that others may write without the sticky bit (which limits removing
/// and renaming to each file's owner).
pub fn check_dir(dir: &Path) -> Result<()> {
    let st = rustix::fs::stat(dir).map_err(|e| Error::Io {
        context: format!("inspecting the shared memory directory {}", dir.display()),
        source: os_error(e),
    })?;
    let mode = st.st_mode as u32;
    // Group- or world-writable without the sticky bit.
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(Error::UnsafeDir {
            path: dir.display().to_string(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Removes a file; a missing file is not an error.
pub fn unlink(path: &Path) {
    let _ = rustix::fs::unlink(path);
}

/// What `fstat` says about an open file.
#[derive(Debug, Clone, Copy)]
pub struct FileInfo {
    pub size: u64,
    pub nlink: u64,
    pub uid: u32,
    pub mode: u32,
    /// Bytes of backing store the file holds (pages written or reserved).
    pub allocated: u64,
    pub dev: u64,
    pub ino: u64,
}

/// Size, owner, mode and identity of an open file.
pub fn fstat(fd: &impl AsFd) -> Result<FileInfo> {
    let st = rustix::fs::fstat(fd).map_err(|e| Error::Io {
        context: "fstat".into(),
        source: os_error(e),
    })?;
    Ok(FileInfo {
        size: st.st_size as u64,
        nlink: st.st_nlink as u64,
        uid: st.st_uid,
        mode: st.st_mode as u32,
        allocated: st.st_blocks as u64 * 512,
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
    })
}

/// Total and available bytes of the file system holding `dir`.
pub fn space(dir: &Path) -> (u64, u64) {
    match rustix::fs::statvfs(dir) {
        Ok(st) => (st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize),
        Err(_) => (0, 0),
    }
}

/// Creates an anonymous memory-backed file (memfd) of `size` bytes, reserved
/// up front. It has no name in any directory: other processes open it through
/// a process that holds it (see [`open_held`]); it is freed when the last
/// descriptor and mapping go away.
pub fn create_memfd(size: u64) -> Result<OwnedFd> {
    let fd =
        rustix::fs::memfd_create("memshare", rustix::fs::MemfdFlags::CLOEXEC).map_err(|e| {
            Error::Io {
                context: "creating a memory-backed segment (memfd_create)".into(),
                source: os_error(e),
            }
        })?;
    rustix::fs::ftruncate(&fd, size).map_err(|e| Error::Io {
        context: format!("sizing a memory-backed segment of {size} bytes"),
        source: os_error(e),
    })?;
    match rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(fd),
        Err(Errno::NOSPC) | Err(Errno::NOMEM) | Err(Errno::FBIG) => Err(Error::NoMemory {
            dir: String::new(),
            requested: size,
            available: 0,
            dir_available: 0,
            dir_total: 0,
        }),
        Err(e) => Err(Error::Io {
            context: format!("reserving a memory-backed segment of {size} bytes"),
            source: os_error(e),
        }),
    }
}

/// Opens descriptor `fd` of process `pid` (`/proc/<pid>/fd/<fd>`) if it is
/// the file `(dev, ino)` and this user's: the way into another process's
/// memfd. None if that process or descriptor is gone or is another file.
pub fn open_held(pid: u32, fd: u32, dev: u64, ino: u64) -> Option<OwnedFd> {
    let path = format!("/proc/{pid}/fd/{fd}");
    // /proc/<pid>/fd entries are symbolic links by design: follow this one,
    // but open only the file we were told about (stat first: opening some
    // other kind of file, a terminal say, could have effects), and check
    // again on the opened file.
    let st = rustix::fs::stat(path.as_str()).ok()?;
    if st.st_dev as u64 != dev || st.st_ino as u64 != ino {
        return None;
    }
    let f = rustix::fs::open(path.as_str(), OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let st = fstat(&f).ok()?;
    (st.dev == dev && st.ino == ino && st.uid == uid()).then_some(f)
}

/// Finds, among the open descriptors of process `pid`, the file `(dev, ino)`
/// and opens it (see [`open_held`]).
pub fn find_held(pid: u32, dev: u64, ino: u64) -> Held {
    let entries = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Held::No,
        Err(_) => return Held::Unknown,
    };
    for fd in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        let Ok(st) = rustix::fs::stat(format!("/proc/{pid}/fd/{fd}").as_str()) else {
            continue; // closed meanwhile
        };
        if st.st_dev == dev && st.st_ino == ino {
            return open_held(pid, fd, dev, ino).map_or(Held::Unknown, Held::Yes);
        }
    }
    Held::No
}

/// Whether a process holds a file open, as [`find_held`] could tell.
pub enum Held {
    /// It does: the file, opened.
    Yes(OwnedFd),
    /// It surely does not (or the process no longer exists).
    No,
    /// It could not be told: its descriptors cannot be read, or the file it
    /// holds cannot be opened.
    Unknown,
}

/// The current user id.
pub fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The current process id.
pub fn pid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// Fills `buf` from the kernel's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::rand::getrandom(&mut buf[done..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => {
                return Err(Error::Io {
                    context: "getrandom".into(),
                    source: os_error(e),
                })
            }
        }
    }
    Ok(())
}

/// A random 64-bit number from the kernel.
pub fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    random_bytes(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Faults `[ptr, ptr + len)` in with one system call instead of one page
/// fault per page on first touch. Best effort: kernels before 5.14 refuse and
/// nothing breaks.
///
/// # Safety
/// The range must lie in a live shared mapping of this process.
pub unsafe fn prefault_write(ptr: *mut u8, len: usize) {
    let page = page_size();
    let start = ptr as usize & !(page - 1);
    let end = (ptr as usize).saturating_add(len);
    // SAFETY: the caller promises a live mapping; POPULATE_WRITE only faults
    // pages in and never changes their contents.
    let _ = unsafe {
        rustix::mm::madvise(
            start as *mut std::ffi::c_void,
            end - start,
            rustix::mm::Advice::LinuxPopulateWrite,
        )
    };
}

/// A shared, read-write mapping of a whole file. Unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access to what it holds goes
// through raw pointers whose synchronisation is the caller's (atomics or the
// arena mutex), so moving or sharing the handle between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and read-write.
    pub fn new(fd: &OwnedFd, len: usize) -> Result<Mapping> {
        Self::map(fd, 0, len, rustix::mm::MapFlags::SHARED, "")
    }

    /// Maps `len` bytes of `fd` from `offset` (page aligned) privately:
    /// reads see the file's pages without copying, the first write to a page
    /// copies it for this process alone (copy-on-write).
    pub fn new_private(fd: &OwnedFd, offset: u64, len: usize) -> Result<Mapping> {
        if offset % page_size() as u64 != 0 {
            return Err(Error::InvalidArgument(
                "private mappings need a page-aligned, non-empty range".into(),
            ));
        }
        Self::map(fd, offset, len, rustix::mm::MapFlags::PRIVATE, " privately")
    }

    fn map(
        fd: &OwnedFd,
        offset: u64,
        len: usize,
        flags: rustix::mm::MapFlags,
        how: &str,
    ) -> Result<Mapping> {
        if len == 0 {
            return Err(Error::InvalidArgument("cannot map an empty segment".into()));
        }
        let prot = rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE;
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no
        // Rust object; the fd is valid for the duration of the call.
        let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) }
            .map_err(|e| Error::Io {
            context: format!("mapping {len} bytes{how}"),
            source: os_error(e),
        })?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.ptr as usize && addr < self.ptr as usize + self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; no references into the
        // mapping outlive it because every user holds the `Mapping` alive.
        let _ = unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) };
    }
}

fn ofd_flock(kind: libc::c_int, start: u64, len: u64) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    fl
}

/// Takes an open-file-description write lock on `len` bytes at `start`.
/// Returns false if another description holds a conflicting lock and `wait` is false.
///
/// OFD locks belong to the open file description, not the process: the kernel
/// drops them when the last descriptor closes, i.e. when the holder dies by any
/// means. That makes them a pid-reuse-proof liveness signal.
pub fn ofd_lock(fd: &OwnedFd, start: u64, len: u64, wait: bool) -> Result<bool> {
    let fl = ofd_flock(libc::F_WRLCK, start, len);
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: valid fd and a pointer to an initialised flock.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &fl) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) if !wait => return Ok(false),
            _ => {
                return Err(Error::Io {
                    context: "taking a lock on the arena".into(),
                    source: e,
                })
            }
        }
    }
}

/// Releases an OFD lock taken with [`ofd_lock`].
pub fn ofd_unlock(fd: &OwnedFd, start: u64, len: u64) {
    let fl = ofd_flock(libc::F_UNLCK, start, len);
    // SAFETY: valid fd and flock; unlocking cannot fail in a way we can act on.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
}

/// True if some other open file description holds a lock overlapping the range.
pub fn ofd_is_locked(fd: &OwnedFd, start: u64, len: u64) -> bool {
    let mut fl = ofd_flock(libc::F_WRLCK, start, len);
    // SAFETY: valid fd and a pointer to a writable flock.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    // If the query itself fails, assume alive: never reclaim a live process.
    rc != 0 || fl.l_type != libc::F_UNLCK as libc::c_short
}

/// Opens a second, independent open file description of the same file.
pub fn reopen(path: &Path) -> Result<OwnedFd> {
    open_file(path)
}

/// A robust, process-shared pthread mutex living in shared memory.
///
/// Robust means: if the holder dies, the next `lock` returns
/// [`LockState::OwnerDied`] instead of blocking forever, and the caller repairs
/// the protected state before continuing.
pub struct RobustMutex {
    ptr: *mut libc::pthread_mutex_t,
}

/// How a lock was obtained.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum LockState {
    Clean,
    /// The previous holder died holding the lock; the data it guards may be
    /// half-updated and must be repaired.
    OwnerDied,
}

/// Bytes reserved in shared layouts for a `pthread_mutex_t`.
pub const MUTEX_BYTES: usize = 64;
const _: () = assert!(std::mem::size_of::<libc::pthread_mutex_t>() <= MUTEX_BYTES);

impl RobustMutex {
    /// # Safety
    /// `ptr` must point to `MUTEX_BYTES` bytes of shared memory, suitably aligned,
    /// that stay mapped for as long as the returned value is used, and that hold
    /// a mutex initialised by [`RobustMutex::init`] (or are about to be).
    pub unsafe fn from_ptr(ptr: *mut u8) -> RobustMutex {
        RobustMutex { ptr: ptr.cast() }
    }

    /// Initialises the mutex in place. Only the creator of the segment calls it,
    /// before any other process can see the segment.
    pub fn init(&self) -> Result<()> {
        // SAFETY: the attribute object is initialised by pthread_mutexattr_init
        // before use and destroyed after; `self.ptr` is valid per `from_ptr`.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            libc::pthread_mutexattr_init(&mut attr);
            libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            let rc = libc::pthread_mutex_init(self.ptr, &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
            if rc != 0 {
                return Err(Error::Io {
                    context: "initialising the arena mutex".into(),
                    source: io::Error::from_raw_os_error(rc),
                });
            }
        }
        Ok(())
    }

    /// Blocks until the mutex is held by this thread.
    pub fn lock(&self) -> Result<LockState> {
        // SAFETY: `self.ptr` points to an initialised process-shared mutex.
        let rc = unsafe { libc::pthread_mutex_lock(self.ptr) };
        self.locked(rc, 0)
            .map(|state| state.unwrap_or(LockState::Clean))
    }

    /// What a pthread lock call's result `rc` means: the mutex is ours
    /// (`Some`), or not taken because of `not_taken` (ETIMEDOUT, EBUSY: `None`).
    fn locked(&self, rc: i32, not_taken: i32) -> Result<Option<LockState>> {
        match rc {
            0 => Ok(Some(LockState::Clean)),
            libc::EOWNERDEAD => {
                // SAFETY: we hold the mutex (EOWNERDEAD grants it); marking it
                // consistent lets later lockers proceed normally. The caller
                // repairs the guarded data before unlocking.
                unsafe { libc::pthread_mutex_consistent(self.ptr) };
                Ok(Some(LockState::OwnerDied))
            }
            rc if rc == not_taken && rc != 0 => Ok(None),
            _ => Err(Error::Io {
                context: "locking the arena mutex".into(),
                source: io::Error::from_raw_os_error(rc),
            }),
        }
    }

    /// Like [`RobustMutex::lock`], but gives up at `deadline` (None: waits
    /// forever) and returns None then.
    pub fn lock_until(&self, deadline: Option<Instant>) -> Result<Option<LockState>> {
        let Some(deadline) = deadline else {
            return self.lock().map(Some);
        };
        // pthread_mutex_timedlock takes an absolute CLOCK_REALTIME time.
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: an all-zero timespec is valid to be overwritten.
        let mut now: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer; CLOCK_REALTIME always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
        let total_ns = now.tv_nsec as u64 + left.subsec_nanos() as u64;
        let abs = libc::timespec {
            tv_sec: now.tv_sec
                + left.as_secs().min(i32::MAX as u64) as libc::time_t
                + (total_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (total_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `self.ptr` points to an initialised process-shared mutex;
        // `abs` is a valid timespec.
        let rc = unsafe { libc::pthread_mutex_timedlock(self.ptr, &abs) };
        self.locked(rc, libc::ETIMEDOUT)
    }

    /// Takes the mutex if it is free; None if another thread holds it.
    pub fn try_lock(&self) -> Result<Option<LockState>> {
        // SAFETY: `self.ptr` points to an initialised process-shared mutex.
        let rc = unsafe { libc::pthread_mutex_trylock(self.ptr) };
        self.locked(rc, libc::EBUSY)
    }

    pub fn unlock(&self) {
        // SAFETY: only called by the thread that holds the lock (see `ArenaLock`).
        unsafe { libc::pthread_mutex_unlock(self.ptr) };
    }

    /// True if nobody held the mutex at the instant of the call, seen
    /// without taking it: its futex word is 0. A robust mutex's word is the
    /// owner's thread id while held (the kernel's robust-futex protocol, which
    /// also sets `FUTEX_OWNER_DIED` in it when the owner dies), and glibc
    /// keeps it first in `pthread_mutex_t`. Elsewhere than glibc: false (the
    /// caller then takes the lock to know).
    pub fn looks_free(&self) -> bool {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: `self.ptr` points to an initialised mutex in a live
            // mapping, 64-byte aligned; its first 4 bytes are glibc's futex
            // word (`__data.__lock`), which the kernel and glibc change only
            // atomically, so an atomic load of it is sound.
            let word = unsafe { &*(self.ptr as *const AtomicU32) };
            word.load(std::sync::atomic::Ordering::Acquire) == 0
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        {
            false
        }
    }
}

/// Waits while `*word == expected`, at most `timeout` (None: forever).
/// Returns false on timeout. Uses a shared (not private) futex so that waiters
/// in other processes mapping the same page are woken too.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> bool {
    use rustix::thread::futex;
    let ts = timeout.map(|d| futex::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos() as _,
    });
    !matches!(
        futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()),
        Err(Errno::TIMEDOUT)
    )
}

/// Wakes up to `n` waiters on `word`, in any process.
pub fn futex_wake(word: &AtomicU32, n: u32) {
    use rustix::thread::futex;
    let _ = futex::wake(word, futex::Flags::empty(), n.min(i32::MAX as u32));
}

/// Registers `pthread_atfork` handlers: `prepare` runs in the forking
/// thread right before `fork()`, `parent` and `child` right after it.
pub fn at_fork(prepare: extern "C" fn(), parent: extern "C" fn(), child: extern "C" fn()) {
    // SAFETY: the handlers are plain functions that live for the whole
    // process; registration has no other precondition.
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
}

/// The size of a memory page.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// Monotonic clock in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Bytes of memory this process could still take: the kernel's
/// `MemAvailable`, and the room left under this cgroup's memory limit (a
/// container's), whichever is smaller. `u64::MAX` if neither can be read.
pub fn memory_available() -> u64 {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let mut avail = read("/proc/meminfo")
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(u64::MAX);
    // The memory cgroup: v2 ("0::/path") or v1 ("N:memory:/path").
    let groups = read("/proc/self/cgroup").unwrap_or_default();
    for line in groups.lines() {
        let (max, cur) = if let Some(g) = line.strip_prefix("0::") {
            let dir = format!("/sys/fs/cgroup{}", g.trim_end_matches('/'));
            (format!("{dir}/memory.max"), format!("{dir}/memory.current"))
        } else if let Some((_, g)) = line.split_once(":memory:") {
            let dir = format!("/sys/fs/cgroup/memory{}", g.trim_end_matches('/'));
            (
                format!("{dir}/memory.limit_in_bytes"),
                format!("{dir}/memory.usage_in_bytes"),
            )
        } else {
            continue;
        };
        let num = |p: &str| read(p).and_then(|s| s.trim().parse::<u64>().ok());
        if let (Some(max), Some(cur)) = (num(&max), num(&cur)) {
            avail = avail.min(max.saturating_sub(cur));
        }
    }
    avail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(64))]
    struct MutexBytes([u8; MUTEX_BYTES]);

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_robust_mutex_looks_free_only_while_nobody_holds_it() {
        let mut bytes = Box::new(MutexBytes([0; MUTEX_BYTES]));
        // SAFETY: 64 aligned bytes that outlive the mutex value, initialised next.
        let m = unsafe { RobustMutex::from_ptr(bytes.0.as_mut_ptr()) };
        m.init().unwrap();
        assert!(m.looks_free());
        assert_eq!(m.lock().unwrap(), LockState::Clean);
        assert!(!m.looks_free(), "held by this thread");
        m.unlock();
        assert!(m.looks_free());
        let addr = bytes.0.as_mut_ptr() as usize;
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: as above; the box outlives the thread (joined below).
            let m = unsafe { RobustMutex::from_ptr(addr as *mut u8) };
            m.lock().unwrap();
            held_tx.send(()).unwrap();
            go_rx.recv_timeout(Duration::from_secs(60)).unwrap();
            m.unlock();
        });
        held_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert!(!m.looks_free(), "held by another thread");
        go_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(m.looks_free());
    }
}
