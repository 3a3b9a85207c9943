//! The operating-system layer: shared files, mappings, OFD locks, the robust
//! process-shared mutex and futexes. Every `unsafe` block of the crate that
//! talks to the kernel lives here, so the rest of the crate is safe code over
//! the small types defined below.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::InvalidArgument(format!("path {} contains a NUL byte", path.display())))
}

fn open_error(path: &Path, err: io::Error) -> Error {
    match err.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => Error::PermissionDenied {
            path: path.display().to_string(),
        },
        Some(libc::ENOENT) => Error::NotFound {
            path: path.display().to_string(),
        },
        _ => Error::Io {
            context: format!("opening {}", path.display()),
            source: err,
        },
    }
}

/// Creates `path` exclusively with owner-only permissions (0600) and reserves
/// `size` bytes of backing store up front, so that a full tmpfs gives a clear
/// error here instead of SIGBUS on first touch later.
pub fn create_file(path: &Path, size: u64) -> Result<OwnedFd> {
    create_at(path, size, libc::O_CREAT | libc::O_EXCL)?.ok_or_else(|| Error::Io {
        context: format!("creating {}", path.display()),
        source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
    })
}

/// Creates an unnamed file of `size` bytes in directory `dir` (`O_TMPFILE`,
/// 0600), to be named with [`link_unnamed`] once it is ready: nobody can see
/// it half made. None if the file system does not support unnamed files.
pub fn create_unnamed(dir: &Path, size: u64) -> Result<Option<OwnedFd>> {
    create_at(dir, size, libc::O_TMPFILE)
}

/// Gives the unnamed file `fd` (from [`create_unnamed`]) the name `path`.
pub fn link_unnamed(fd: &OwnedFd, path: &Path) -> Result<()> {
    let from = cpath(Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())))?;
    let to = cpath(path)?;
    // SAFETY: both paths are valid NUL-terminated strings; linkat has no
    // other preconditions.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc != 0 {
        return Err(open_error(path, io::Error::last_os_error()));
    }
    Ok(())
}

/// Opens `path` with `flags` (`O_CREAT|O_EXCL`, or `O_TMPFILE` on a
/// directory) and reserves `size` bytes. None: `O_TMPFILE` is not supported.
fn create_at(path: &Path, size: u64, flags: libc::c_int) -> Result<Option<OwnedFd>> {
    let c = cpath(path)?;
    let unnamed = flags & libc::O_TMPFILE == libc::O_TMPFILE;
    // SAFETY: `c` is a valid NUL-terminated path; open has no other preconditions.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | flags, 0o600) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if unnamed
            && matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
            )
        {
            return Ok(None);
        }
        return Err(open_error(path, e));
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The umask may have removed bits but never adds any; make 0600 explicit.
    // SAFETY: valid fd, plain integer mode.
    unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) };
    // SAFETY: valid fd; posix_fallocate reports errors through its return value.
    let rc = unsafe { libc::posix_fallocate(fd.as_raw_fd(), 0, size as libc::off_t) };
    if rc != 0 {
        let dir = if unnamed {
            path
        } else {
            // SAFETY: `c` is a valid path; removing the half-made file is best effort.
            unsafe { libc::unlink(c.as_ptr()) };
            path.parent().unwrap_or(Path::new("/"))
        };
        if rc == libc::ENOSPC || rc == libc::EFBIG {
            let (total, avail) = space(dir);
            return Err(Error::NoSpace {
                dir: dir.display().to_string(),
                requested: size,
                available: avail,
                total,
            });
        }
        return Err(Error::Io {
            context: format!("reserving {size} bytes for {}", path.display()),
            source: io::Error::from_raw_os_error(rc),
        });
    }
    Ok(Some(fd))
}

/// Opens an existing shared file read-write.
pub fn open_file(path: &Path) -> Result<OwnedFd> {
    let c = cpath(path)?;
    // SAFETY: valid NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(open_error(path, io::Error::last_os_error()));
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes a file; a missing file is not an error.
pub fn unlink(path: &Path) {
    if let Ok(c) = cpath(path) {
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::unlink(c.as_ptr()) };
    }
}

/// (size in bytes, number of links) of an open file.
pub fn fstat(fd: &OwnedFd) -> Result<(u64, u64, u32)> {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a valid pointer to a `stat`.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(Error::Io {
            context: "fstat".into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok((st.st_size as u64, st.st_nlink, st.st_uid))
}

/// Total and available bytes of the file system holding `dir`.
pub fn space(dir: &Path) -> (u64, u64) {
    let Ok(c) = cpath(dir) else { return (0, 0) };
    // SAFETY: an all-zero statvfs is valid to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let frsize = st.f_frsize as u64;
    (st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize)
}

/// The current user id.
pub fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// The current process id.
pub fn pid() -> u32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() as u32 }
}

/// Fills `buf` from the kernel's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io {
                context: "getrandom".into(),
                source: e,
            });
        }
        done += n as usize;
    }
    Ok(())
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
        if len == 0 {
            return Err(Error::InvalidArgument("cannot map an empty segment".into()));
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no Rust
        // object; the fd is valid for the duration of the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io {
                context: format!("mapping {len} bytes"),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Maps `len` bytes of `fd` from `offset` (page aligned) privately:
    /// reads see the file's pages without copying, the first write to a page
    /// copies it for this process alone (copy-on-write).
    pub fn new_private(fd: &OwnedFd, offset: u64, len: usize) -> Result<Mapping> {
        if len == 0 || offset % page_size() as u64 != 0 {
            return Err(Error::InvalidArgument(
                "private mappings need a page-aligned, non-empty range".into(),
            ));
        }
        // SAFETY: as in `new`; a private mapping aliases nothing either.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io {
                context: format!("mapping {len} bytes privately"),
                source: io::Error::last_os_error(),
            });
        }
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
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
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
        match rc {
            0 => Ok(LockState::Clean),
            libc::EOWNERDEAD => {
                // SAFETY: we hold the mutex (EOWNERDEAD grants it); marking it
                // consistent lets later lockers proceed normally. The caller
                // repairs the guarded data before unlocking.
                unsafe { libc::pthread_mutex_consistent(self.ptr) };
                Ok(LockState::OwnerDied)
            }
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
        match rc {
            0 => Ok(Some(LockState::Clean)),
            libc::ETIMEDOUT => Ok(None),
            libc::EOWNERDEAD => {
                // SAFETY: as in `lock`: EOWNERDEAD grants the mutex.
                unsafe { libc::pthread_mutex_consistent(self.ptr) };
                Ok(Some(LockState::OwnerDied))
            }
            _ => Err(Error::Io {
                context: "locking the arena mutex".into(),
                source: io::Error::from_raw_os_error(rc),
            }),
        }
    }

    pub fn unlock(&self) {
        // SAFETY: only called by the thread that holds the lock (see `ArenaLock`).
        unsafe { libc::pthread_mutex_unlock(self.ptr) };
    }
}

/// Waits while `*word == expected`, at most `timeout` (None: forever).
/// Returns false on timeout. Uses a shared (not private) futex so that waiters
/// in other processes mapping the same page are woken too.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> bool {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid aligned u32 for the duration of the call; the
    // timeout pointer is null or points to a live timespec.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            0usize,
            0u32,
        )
    };
    !(rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT))
}

/// Wakes up to `n` waiters on `word`, in any process.
pub fn futex_wake(word: &AtomicU32, n: u32) {
    // SAFETY: `word` is a valid aligned u32; FUTEX_WAKE only reads the address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n.min(i32::MAX as u32),
            0usize,
            0usize,
            0u32,
        )
    };
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
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Monotonic clock in nanoseconds.
pub fn monotonic_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid to be overwritten.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
