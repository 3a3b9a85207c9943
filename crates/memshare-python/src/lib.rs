//! `memshare._native`: thin PyO3 bindings over the `memshare` core crate.
//! The Python API in `python/memshare` is built on these few functions.
#![deny(unsafe_op_in_unsafe_fn)]

mod message;
mod numpy_hook;
mod plain;
mod queue;

use std::ffi::c_int;
use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use memshare::arena::{self, Arena};
use memshare::{Block, Error, Handle};
use pyo3::exceptions::{
    PyBufferError, PyOSError, PyPermissionError, PyRuntimeError, PyTimeoutError, PyValueError,
};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

// memshare's exceptions live in Python (`memshare._errors`) so that they
// pickle by reference like any exception class.
pyo3::import_exception!(memshare._errors, HandleError);
pyo3::import_exception!(memshare._errors, StaleHandleError);
pyo3::import_exception!(memshare._errors, CorruptSegmentError);
pyo3::import_exception!(memshare._errors, SharedMemoryError);

/// The one mapping from core errors to Python exceptions.
pub fn to_pyerr(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::OutOfMemory { .. }
        | Error::NoSpace { .. }
        | Error::NoMemory { .. }
        | Error::TooManyPins { .. } => SharedMemoryError::new_err(msg),
        Error::PermissionDenied { .. } | Error::UnsafeDir { .. } => PyPermissionError::new_err(msg),
        Error::NotFound { .. } | Error::StaleHandle(_) => StaleHandleError::new_err(msg),
        Error::InvalidHandle(_) => HandleError::new_err(msg),
        Error::Corrupt { .. } => CorruptSegmentError::new_err(msg),
        Error::InvalidArgument(_) | Error::Closed => PyValueError::new_err(msg),
        Error::TooManyProcesses { .. } => SharedMemoryError::new_err(msg),
        Error::Full => {
            Python::attach(
                |py| match py.import("queue").and_then(|q| q.getattr("Full")) {
                    Ok(cls) => PyErr::from_type(cls.cast_into().expect("queue.Full is a type"), ()),
                    Err(e) => e,
                },
            )
        }
        Error::Empty => {
            Python::attach(
                |py| match py.import("queue").and_then(|q| q.getattr("Empty")) {
                    Ok(cls) => {
                        PyErr::from_type(cls.cast_into().expect("queue.Empty is a type"), ())
                    }
                    Err(e) => e,
                },
            )
        }
        Error::Busy(_) => PyTimeoutError::new_err(msg),
        Error::Io { .. } | Error::Exists { .. } => PyOSError::new_err(msg),
    }
}

/// Runs a call into the core, turning a Rust panic (always a bug) into a
/// memshare error: a `PanicException` is a `BaseException` that
/// `except Exception` does not catch.
pub fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(PyRuntimeError::new_err(format!(
                "memshare: internal error (a bug; please report it): {what}"
            )))
        }
    }
}

/// Runs `f` without the GIL if this thread holds it (callers that may be
/// reached with or without it, such as numpy's allocator and deallocation).
#[cfg(all(not(test), not(feature = "abi3")))]
pub fn without_gil<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    // SAFETY: PyGILState_Check only reads the calling thread's state.
    if unsafe { ffi::PyGILState_Check() } == 1 {
        Python::attach(|py| py.detach(f))
    } else {
        f()
    }
}

/// The stable ABI has no way to ask whether this thread holds the GIL, so
/// the abi3 build takes it (a no-op when held, as it is in numpy's
/// allocator and in drops) and releases it around `f`; `f` runs without
/// attaching if the interpreter is not initialized.
#[cfg(all(not(test), feature = "abi3"))]
pub fn without_gil<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let mut f = Some(f);
    let ran = Python::try_attach(|py| py.detach(|| f.take().map(|f| f())));
    match ran.flatten() {
        Some(result) => result,
        None => f.take().expect("f has not run")(),
    }
}

/// The crate's unit tests run without an interpreter (nothing to release).
#[cfg(test)]
pub fn without_gil<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    f()
}

/// This process's arena (attaching or creating it may wait on shared state:
/// never with the GIL).
pub(crate) fn home(py: Python<'_>) -> PyResult<Arena> {
    let arena = py.detach(|| guarded(|| memshare::home().map_err(to_pyerr)))?;
    export_home(py, &arena)?;
    Ok(arena)
}

/// Names the home arena in `MEMSHARE_ARENA` (through `os.environ`, under the
/// GIL), so that the children this process starts join it.
fn export_home(py: Python<'_>, arena: &Arena) -> PyResult<()> {
    // Only touched with the GIL held, so never contended (also not at fork).
    static EXPORTED: Mutex<Option<[u8; 16]>> = Mutex::new(None);
    let mut exported = EXPORTED.lock().unwrap_or_else(|p| p.into_inner());
    if *exported != Some(arena.token()) {
        py.import("os")?
            .getattr("environ")?
            .set_item(memshare::ARENA_ENV, arena::hex(&arena.token()))?;
        *exported = Some(arena.token());
    }
    Ok(())
}

/// One reference to a block of shared memory. Exposes the block through the
/// buffer protocol (numpy arrays built over it keep it alive); dropping the
/// last reference in the last process frees the memory.
#[pyclass(frozen, module = "memshare._native", name = "Block")]
pub struct PyBlock {
    /// Dropped in `Drop` without the GIL (dropping may wait on the arena lock).
    pub block: ManuallyDrop<Block>,
}

impl PyBlock {
    pub fn new(block: Block) -> PyBlock {
        PyBlock {
            block: ManuallyDrop::new(block),
        }
    }
}

impl Drop for PyBlock {
    fn drop(&mut self) {
        // SAFETY: `self.block` is never used again after this.
        let block = unsafe { ManuallyDrop::take(&mut self.block) };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            without_gil(move || drop(block))
        }));
    }
}

#[pymethods]
impl PyBlock {
    /// Bytes requested at allocation.
    #[getter]
    fn nbytes(&self) -> usize {
        self.block.len()
    }

    /// Address of the first byte in this process.
    #[getter]
    fn address(&self) -> usize {
        self.block.as_ptr() as usize
    }

    #[getter]
    fn readonly(&self) -> bool {
        self.block.readonly()
    }

    /// A 64-byte handle another process can open. Pins the block until it is
    /// opened; with `owner`, the pin belongs to that block instead of this process.
    #[pyo3(signature = (owner=None))]
    fn handle<'py>(
        &self,
        py: Python<'py>,
        owner: Option<&PyBlock>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let h = py
            .detach(|| match owner {
                Some(o) => self.block.handle_owned_by(&o.block),
                None => self.block.handle(),
            })
            .map_err(to_pyerr)?;
        Ok(PyBytes::new(py, &h.to_bytes()))
    }

    /// A single-array message (one table entry, no payload) for a view of
    /// this block; with `owner`, its pin belongs to that block.
    #[pyo3(signature = (dtype, itemsize, shape, strides, offset, owner=None))]
    #[allow(clippy::too_many_arguments)]
    fn array_message<'py>(
        &self,
        py: Python<'py>,
        dtype: &str,
        itemsize: usize,
        shape: Vec<usize>,
        strides: Vec<isize>,
        offset: usize,
        owner: Option<&PyBlock>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let layout = memshare::ArrayMeta {
            dtype: dtype.to_string(),
            itemsize,
            shape,
            strides,
            offset,
        };
        memshare::message::check_layout(&layout, self.block.len()).map_err(to_pyerr)?;
        let handle = py
            .detach(|| match owner {
                Some(o) => self.block.handle_owned_by(&o.block),
                None => self.block.handle(),
            })
            .map_err(to_pyerr)?;
        let key = memshare::message::key_of(self.block.arena());
        let msg = memshare::message::encode(&[(memshare::Entry { handle, layout }, key)], &[])
            .map_err(to_pyerr)?;
        Ok(PyBytes::new(py, &msg))
    }

    /// A copy-on-write view of this block (see `PrivateView`).
    fn copy_on_write(&self) -> PyResult<PyPrivateView> {
        Ok(PyPrivateView {
            view: self.block.copy_on_write().map_err(to_pyerr)?,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "<memshare Block of {} bytes at {:#x}>",
            self.block.len(),
            self.block.as_ptr() as usize
        )
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let block = &slf.get().block;
        // SAFETY: forwarded from CPython; the block's memory lives as long as
        // `slf`, which the view references.
        unsafe {
            export_buffer(
                slf.as_any(),
                view,
                flags,
                block.as_ptr(),
                block.len(),
                block.readonly(),
            )
        }
    }

    /// # Safety
    /// Called by CPython; nothing to release (the view holds a reference to us).
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Fills a `Py_buffer` describing `len` bytes at `ptr`, owned by `owner`.
///
/// # Safety
/// `view` must be a valid buffer to fill (CPython's contract for
/// `__getbuffer__`) and `ptr..ptr+len` must stay valid while `owner` lives.
unsafe fn export_buffer(
    owner: &Bound<'_, PyAny>,
    view: *mut ffi::Py_buffer,
    flags: c_int,
    ptr: *mut u8,
    len: usize,
    readonly: bool,
) -> PyResult<()> {
    if readonly && (flags & ffi::PyBUF_WRITABLE) == ffi::PyBUF_WRITABLE {
        return Err(PyBufferError::new_err(
            "this shared array is read-only (shared with readonly=True)",
        ));
    }
    // SAFETY: per this function's contract; PyBuffer_FillInfo takes a new
    // reference to `owner` into view->obj, keeping the memory alive.
    let rc = unsafe {
        ffi::PyBuffer_FillInfo(
            view,
            owner.as_ptr(),
            ptr.cast(),
            len as ffi::Py_ssize_t,
            readonly as c_int,
            flags,
        )
    };
    if rc != 0 {
        return Err(PyErr::fetch(owner.py()));
    }
    Ok(())
}

/// A copy-on-write view of a block: reads share its pages, writes copy the
/// touched pages for this process alone (a private copy's semantics).
#[pyclass(frozen, module = "memshare._native", name = "PrivateView")]
pub struct PyPrivateView {
    view: memshare::PrivateView,
}

#[pymethods]
impl PyPrivateView {
    #[getter]
    fn nbytes(&self) -> usize {
        self.view.len()
    }

    #[getter]
    fn address(&self) -> usize {
        self.view.as_ptr() as usize
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let v = &slf.get().view;
        // SAFETY: forwarded from CPython; the private mapping lives as long as `slf`.
        unsafe { export_buffer(slf.as_any(), view, flags, v.as_ptr(), v.len(), false) }
    }

    /// # Safety
    /// Called by CPython; nothing to release.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Allocates `nbytes` of shared memory in this process's arena.
#[pyfunction]
#[pyo3(signature = (nbytes, readonly=false, zero=false))]
fn alloc(py: Python<'_>, nbytes: usize, readonly: bool, zero: bool) -> PyResult<PyBlock> {
    let arena = home(py)?;
    let block = py
        .detach(|| arena.alloc(nbytes, readonly))
        .map_err(to_pyerr)?;
    if zero {
        let (ptr, len) = (block.as_ptr() as usize, block.len());
        // SAFETY: the block was just allocated and nobody else references it.
        py.detach(|| unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, len) });
    }
    Ok(PyBlock::new(block))
}

/// Copies a C-contiguous byte buffer into the start of a freshly allocated
/// block (the creator's only write, also for read-only blocks). The GIL is
/// released during the copy.
#[pyfunction]
fn copy_into(py: Python<'_>, block: &PyBlock, src: &Bound<'_, PyAny>) -> PyResult<()> {
    let buf = pyo3::buffer::PyBuffer::<u8>::get(src)?;
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "copy_into needs a C-contiguous buffer",
        ));
    }
    let n = buf.len_bytes();
    if n > block.block.len() {
        return Err(PyValueError::new_err(format!(
            "{n} bytes do not fit in a block of {}",
            block.block.len()
        )));
    }
    let (src_ptr, dst_ptr) = (buf.buf_ptr() as usize, block.block.as_ptr() as usize);
    // SAFETY: `buf` keeps the source exported and alive for the whole copy; the
    // destination is a live block of at least `n` bytes; they cannot overlap
    // because the block was freshly allocated by the caller.
    py.detach(|| unsafe {
        std::ptr::copy_nonoverlapping(src_ptr as *const u8, dst_ptr as *mut u8, n)
    });
    drop(buf);
    Ok(())
}

/// Opens a 64-byte handle, adopting its pin.
#[pyfunction]
fn open_handle(py: Python<'_>, handle: &[u8]) -> PyResult<PyBlock> {
    let h = Handle::from_bytes(handle).map_err(to_pyerr)?;
    let block = py.detach(|| memshare::open(&h)).map_err(to_pyerr)?;
    Ok(PyBlock::new(block))
}

/// The shared block holding `[address, address + nbytes)` in this process,
/// with the offset of `address` in it, or None if that memory is not shared.
#[pyfunction]
fn find(py: Python<'_>, address: usize, nbytes: usize) -> Option<(PyBlock, usize)> {
    py.detach(|| {
        Arena::all_attached()
            .into_iter()
            .find_map(|a| a.find(address, nbytes))
    })
    .map(|(block, off)| (PyBlock::new(block), off))
}

fn stats_dict<'py>(py: Python<'py>, s: memshare::Stats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bytes_reserved", s.bytes_reserved)?;
    d.set_item("bytes_in_use", s.bytes_in_use)?;
    d.set_item("bytes_segments", s.bytes_segments)?;
    d.set_item("memfd_segments", s.memfd_segments)?;
    d.set_item("retain", s.retain)?;
    d.set_item("live_blocks", s.live_blocks)?;
    d.set_item("segments", s.segments)?;
    d.set_item("pins", s.pins)?;
    d.set_item("processes", s.processes)?;
    d.set_item("max_processes", s.max_processes)?;
    d.set_item("cached_bytes", s.cached_bytes)?;
    d.set_item(
        "limit",
        if s.limit == u64::MAX {
            None
        } else {
            Some(s.limit)
        },
    )?;
    Ok(d)
}

/// Usage of this process's arena, counting the blocks of every process.
#[pyfunction]
fn stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let arena = home(py)?;
    let s = py.detach(|| arena.stats()).map_err(to_pyerr)?;
    let d = stats_dict(py, s)?;
    d.set_item("lock_acquisitions", arena::lock_acquisitions())?;
    d.set_item("populated_bytes", arena::populated_bytes())?;
    Ok(d)
}

/// Waits up to `timeout` seconds for this process's background populating
/// of received blocks to finish; True if it has (tests and benchmarks).
#[pyfunction]
fn populate_idle(py: Python<'_>, timeout: f64) -> PyResult<bool> {
    let timeout = std::time::Duration::try_from_secs_f64(timeout)
        .map_err(|_| PyValueError::new_err("timeout must be a non-negative number of seconds"))?;
    Ok(py.detach(|| arena::populate_idle(timeout)))
}

/// The address of the first element of a buffer-exporting object (a numpy
/// array's `data` pointer), or None if it exports no buffer. Several times
/// cheaper than `__array_interface__`, which builds a dict on every call:
/// this is on the path of every array sent.
#[pyfunction]
fn data_address(obj: &Bound<'_, PyAny>) -> Option<usize> {
    let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::zeroed();
    // SAFETY: `view` is writable storage for one Py_buffer; on success it is
    // filled and released below exactly once, on failure it is untouched and
    // the error the exporter set is cleared.
    unsafe {
        if ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_STRIDED_RO) != 0 {
            ffi::PyErr_Clear();
            return None;
        }
        let addr = (*view.as_ptr()).buf as usize;
        ffi::PyBuffer_Release(view.as_mut_ptr());
        Some(addr)
    }
}

/// Blocks at least this many bytes are populated ahead of use when received.
#[pyfunction]
fn populate_min() -> usize {
    arena::POPULATE_MIN
}

/// Sets the arena's byte limit (None: no limit but the file system's).
#[pyfunction]
#[pyo3(signature = (limit))]
fn set_limit(py: Python<'_>, limit: Option<u64>) -> PyResult<()> {
    let arena = home(py)?;
    py.detach(|| arena.set_limit(limit.unwrap_or(u64::MAX)))
        .map_err(to_pyerr)
}

/// Sets how many idle free bytes the arena keeps committed for reuse.
#[pyfunction]
fn set_retain(py: Python<'_>, nbytes: u64) -> PyResult<()> {
    let arena = home(py)?;
    py.detach(|| arena.set_retain(nbytes)).map_err(to_pyerr)
}

/// Releases what dead processes held; True if any were found.
#[pyfunction]
fn reap(py: Python<'_>) -> PyResult<bool> {
    let arena = home(py)?;
    py.detach(|| arena.reap()).map_err(to_pyerr)
}

/// The token naming this process's arena (exported as MEMSHARE_ARENA).
#[pyfunction]
fn arena_token(py: Python<'_>) -> PyResult<String> {
    Ok(arena::hex(&home(py)?.token()))
}

/// The directory holding segments.
#[pyfunction]
fn shm_dir() -> PathBuf {
    arena::default_dir()
}

/// Removes arenas in `dir` whose every process is dead; returns their tokens.
#[pyfunction]
#[pyo3(signature = (dir=None, dry_run=false))]
fn collect_garbage(py: Python<'_>, dir: Option<PathBuf>, dry_run: bool) -> PyResult<Vec<String>> {
    let dir = dir.unwrap_or_else(arena::default_dir);
    py.detach(|| guarded(|| Arena::collect_garbage(&dir, dry_run).map_err(to_pyerr)))
}

/// Describes every arena in `dir` for `memshare ls`, without attaching.
#[pyfunction]
#[pyo3(signature = (dir=None))]
fn list_arenas(py: Python<'_>, dir: Option<PathBuf>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    let dir = dir.unwrap_or_else(arena::default_dir);
    let mut out = Vec::new();
    for token in Arena::list(&dir) {
        let d = PyDict::new(py);
        d.set_item("token", arena::hex(&token))?;
        d.set_item("path", arena::ctl_path(&dir, &token))?;
        match py.detach(|| Arena::inspect(&dir, token)) {
            Ok((s, slots)) => {
                let d2 = stats_dict(py, s)?;
                d.update(d2.as_mapping())?;
                let owners: Vec<(u32, bool)> = slots.iter().map(|s| (s.pid, s.alive)).collect();
                d.set_item("alive", owners.iter().any(|o| o.1))?;
                d.set_item("owners", owners)?;
            }
            Err(e) => {
                d.set_item("error", e.to_string())?;
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// `os.register_at_fork(before=...)`: reserves a slot for the child in every
/// arena (waiting without the GIL). The switch to it, and the process-local
/// locks that must not be inherited held, are handled inside `fork()` itself
/// by the core's `pthread_atfork` handlers.
#[pyfunction]
fn before_fork(py: Python<'_>) {
    py.detach(|| {
        // No decay pass may be half-done at the instant of the fork.
        memshare::arena::pause_for_fork();
        arena::reserve_fork_slots();
    });
}

/// `os.register_at_fork(after_in_parent=...)`: lets the decay thread go on.
#[pyfunction]
fn after_fork_parent() {
    memshare::arena::resume_after_fork();
}

/// `os.register_at_fork(after_in_child=...)`: lets the decay thread go on.
#[pyfunction]
fn after_fork_child() {
    memshare::arena::resume_after_fork();
}

/// Detaches from every arena (at interpreter exit).
#[pyfunction]
fn shutdown(py: Python<'_>) {
    let home = memshare::clear_home();
    py.detach(move || {
        drop(home);
        for a in Arena::all_attached() {
            let _ = a.detach();
        }
    });
}

/// Rust panics seen in this process. A panic is a bug: tests assert none.
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts panics (then reports them as Rust's default hook does).
fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        previous(info);
    }));
}

/// Calls `f(*args)` with every wait of this thread for an arena's lock
/// bounded by `timeout` seconds (past it, they raise `TimeoutError`).
#[pyfunction]
#[pyo3(signature = (timeout, f, *args))]
fn call_with_timeout(
    timeout: f64,
    f: &Bound<'_, PyAny>,
    args: &Bound<'_, pyo3::types::PyTuple>,
) -> PyResult<Py<PyAny>> {
    let t = std::time::Duration::try_from_secs_f64(timeout.max(0.0))
        .map_err(|_| PyValueError::new_err("timeout must be a finite number of seconds"))?;
    let deadline = std::time::Instant::now().checked_add(t);
    arena::with_deadline(deadline, || f.call1(args).map(|r| r.unbind()))
}

/// For tests: takes this process's arena lock and keeps it (a peer that
/// then stops while holding it).
#[pyfunction]
fn _debug_hold_arena_lock(py: Python<'_>) -> PyResult<()> {
    home(py)?.hold_lock().map_err(to_pyerr)
}

/// For tests: releases the lock taken by `_debug_hold_arena_lock` (same thread).
#[pyfunction]
fn _debug_release_arena_lock(py: Python<'_>) -> PyResult<()> {
    home(py)?.release_held_lock();
    Ok(())
}

/// Gives this process's caches of free blocks back to the shared heap now,
/// and carries out the releases it put off (a worker about to idle; both
/// also go by themselves within a second or two).
#[pyfunction]
fn flush_block_cache(py: Python<'_>) -> PyResult<()> {
    py.detach(memshare::arena::flush_caches).map_err(to_pyerr)
}

/// Bytes this process holds back: its caches of free blocks and the blocks
/// whose release it put off (two atomic loads; a release another process
/// has carried out meanwhile still counts until this process looks).
#[pyfunction]
fn held_back_bytes() -> u64 {
    memshare::arena::cached_bytes() + memshare::arena::pending_release_bytes()
}

/// How many Rust panics happened in this process (tests assert none).
#[pyfunction]
fn panic_count() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    count_panics();
    numpy_hook::install_fork_handlers();
    m.add_function(wrap_pyfunction!(panic_count, m)?)?;
    m.add_function(wrap_pyfunction!(flush_block_cache, m)?)?;
    m.add_function(wrap_pyfunction!(held_back_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(call_with_timeout, m)?)?;
    m.add_function(wrap_pyfunction!(_debug_hold_arena_lock, m)?)?;
    m.add_function(wrap_pyfunction!(_debug_release_arena_lock, m)?)?;
    m.add_class::<PyBlock>()?;
    m.add_class::<PyPrivateView>()?;
    m.add("HandleError", py.get_type::<HandleError>())?;
    m.add("StaleHandleError", py.get_type::<StaleHandleError>())?;
    m.add("CorruptSegmentError", py.get_type::<CorruptSegmentError>())?;
    m.add("SharedMemoryError", py.get_type::<SharedMemoryError>())?;
    m.add("HANDLE_LEN", memshare::handle::HANDLE_LEN)?;
    // The one version number: Cargo's, which maturin also writes into the wheel.
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(alloc, m)?)?;
    m.add_function(wrap_pyfunction!(copy_into, m)?)?;
    m.add_function(wrap_pyfunction!(open_handle, m)?)?;
    m.add_function(wrap_pyfunction!(find, m)?)?;
    m.add_function(wrap_pyfunction!(stats, m)?)?;
    m.add_function(wrap_pyfunction!(populate_idle, m)?)?;
    m.add_function(wrap_pyfunction!(populate_min, m)?)?;
    m.add_function(wrap_pyfunction!(data_address, m)?)?;
    m.add_function(wrap_pyfunction!(plain::is_plain, m)?)?;
    m.add_function(wrap_pyfunction!(set_limit, m)?)?;
    m.add_function(wrap_pyfunction!(set_retain, m)?)?;
    m.add_function(wrap_pyfunction!(reap, m)?)?;
    m.add_function(wrap_pyfunction!(arena_token, m)?)?;
    m.add_function(wrap_pyfunction!(shm_dir, m)?)?;
    m.add_function(wrap_pyfunction!(collect_garbage, m)?)?;
    m.add_function(wrap_pyfunction!(list_arenas, m)?)?;
    m.add_function(wrap_pyfunction!(before_fork, m)?)?;
    m.add_function(wrap_pyfunction!(after_fork_parent, m)?)?;
    m.add_function(wrap_pyfunction!(after_fork_child, m)?)?;
    m.add_function(wrap_pyfunction!(shutdown, m)?)?;
    numpy_hook::register(m)?;
    queue::register(m)?;
    message::register(m)?;
    Ok(())
}
