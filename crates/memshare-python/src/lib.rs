//! `memshare._native`: thin PyO3 bindings over the `memshare` core crate.
//! The Python API in `python/memshare` is built on these few functions.
#![deny(unsafe_op_in_unsafe_fn)]

mod numpy_hook;
mod queue;

use std::ffi::c_int;
use std::path::PathBuf;

use memshare::arena::{self, Arena};
use memshare::{ArrayMeta, Block, Error, Handle};
use pyo3::exceptions::{PyBufferError, PyMemoryError, PyOSError, PyPermissionError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

pyo3::create_exception!(
    _native,
    HandleError,
    PyValueError,
    "Handle bytes that memshare cannot use: forged, truncated, foreign or from another version."
);
pyo3::create_exception!(
    _native,
    StaleHandleError,
    HandleError,
    "A handle to shared memory that has been freed: every process dropped the object."
);
pyo3::create_exception!(
    _native,
    CorruptSegmentError,
    PyValueError,
    "A file with a memshare name that is not a valid memshare segment."
);
pyo3::create_exception!(
    _native,
    SharedMemoryError,
    PyMemoryError,
    "Shared memory is exhausted: the arena limit or the file system's space is reached."
);

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
        Error::TooManyProcesses { .. } => PyOSError::new_err(msg),
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
        Error::Io { .. } | Error::Exists { .. } => PyOSError::new_err(msg),
    }
}

fn home() -> PyResult<Arena> {
    memshare::home().map_err(to_pyerr)
}

/// One reference to a block of shared memory. Exposes the block through the
/// buffer protocol (numpy arrays built over it keep it alive); dropping the
/// last reference in the last process frees the memory.
#[pyclass(frozen, module = "memshare._native", name = "Block")]
pub struct PyBlock {
    pub block: Block,
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
        let h = match owner {
            Some(o) => self.block.handle_owned_by(&o.block),
            None => self.block.handle(),
        }
        .map_err(to_pyerr)?;
        Ok(PyBytes::new(py, &h.to_bytes()))
    }

    /// An array message (handle + layout) for a view of this block.
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
        let meta = ArrayMeta {
            dtype: dtype.to_string(),
            itemsize,
            shape,
            strides,
            offset,
        };
        meta.check_bounds(self.block.len()).map_err(to_pyerr)?;
        let h = match owner {
            Some(o) => self.block.handle_owned_by(&o.block),
            None => self.block.handle(),
        }
        .map_err(to_pyerr)?;
        Ok(PyBytes::new(py, &meta.encode(&h)))
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
    let arena = home()?;
    let block = py
        .detach(|| arena.alloc(nbytes, readonly))
        .map_err(to_pyerr)?;
    if zero {
        let (ptr, len) = (block.as_ptr() as usize, block.len());
        // SAFETY: the block was just allocated and nobody else references it.
        py.detach(|| unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, len) });
    }
    Ok(PyBlock { block })
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
    Ok(PyBlock { block })
}

/// Opens an array message: (block, dtype, itemsize, shape, strides, offset),
/// with the layout bounds-checked against the block.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn open_array(
    py: Python<'_>,
    message: &[u8],
) -> PyResult<(PyBlock, String, usize, Vec<usize>, Vec<isize>, usize)> {
    let (h, meta) = ArrayMeta::decode(message).map_err(to_pyerr)?;
    let block = py.detach(|| memshare::open(&h)).map_err(to_pyerr)?;
    meta.check_bounds(block.len()).map_err(to_pyerr)?;
    Ok((
        PyBlock { block },
        meta.dtype,
        meta.itemsize,
        meta.shape,
        meta.strides,
        meta.offset,
    ))
}

/// The shared block holding `[address, address + nbytes)` in this process,
/// with the offset of `address` in it, or None if that memory is not shared.
#[pyfunction]
fn find(address: usize, nbytes: usize) -> Option<(PyBlock, usize)> {
    Arena::all_attached()
        .into_iter()
        .find_map(|a| a.find(address, nbytes))
        .map(|(block, off)| (PyBlock { block }, off))
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
    let s = home()?.stats().map_err(to_pyerr)?;
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
fn set_limit(limit: Option<u64>) -> PyResult<()> {
    home()?
        .set_limit(limit.unwrap_or(u64::MAX))
        .map_err(to_pyerr)
}

/// Sets how many idle free bytes the arena keeps committed for reuse.
#[pyfunction]
fn set_retain(nbytes: u64) -> PyResult<()> {
    home()?.set_retain(nbytes).map_err(to_pyerr)
}

/// Releases what dead processes held; True if any were found.
#[pyfunction]
fn reap(py: Python<'_>) -> PyResult<bool> {
    let arena = home()?;
    py.detach(|| arena.reap()).map_err(to_pyerr)
}

/// The token naming this process's arena (exported as MEMSHARE_ARENA).
#[pyfunction]
fn arena_token() -> PyResult<String> {
    Ok(arena::hex(&home()?.token()))
}

/// The directory holding segments.
#[pyfunction]
fn shm_dir() -> PathBuf {
    arena::default_dir()
}

/// Removes arenas in `dir` whose every process is dead; returns their tokens.
#[pyfunction]
#[pyo3(signature = (dir=None, dry_run=false))]
fn collect_garbage(dir: Option<PathBuf>, dry_run: bool) -> PyResult<Vec<String>> {
    Arena::collect_garbage(&dir.unwrap_or_else(arena::default_dir), dry_run).map_err(to_pyerr)
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
        match Arena::inspect(&dir, token) {
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

/// `os.register_at_fork(before=...)`: reserve child slots in every arena.
#[pyfunction]
fn before_fork() {
    // No decay pass may be half-done at the instant of the fork.
    memshare::arena::pause_for_fork();
    for a in Arena::all_attached() {
        // Failure (e.g. no free slot) leaves the child detached, never broken.
        let _ = a.prepare_fork();
    }
}

#[pyfunction]
fn after_fork_parent() {
    for a in Arena::all_attached() {
        a.after_fork_parent();
    }
    memshare::arena::resume_after_fork();
}

#[pyfunction]
fn after_fork_child() {
    for a in Arena::all_attached() {
        a.after_fork_child();
    }
    memshare::arena::resume_after_fork();
}

/// Detaches from every arena (at interpreter exit).
#[pyfunction]
fn shutdown() {
    memshare::clear_home();
    for a in Arena::all_attached() {
        let _ = a.detach();
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
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
    m.add_function(wrap_pyfunction!(open_array, m)?)?;
    m.add_function(wrap_pyfunction!(find, m)?)?;
    m.add_function(wrap_pyfunction!(stats, m)?)?;
    m.add_function(wrap_pyfunction!(populate_idle, m)?)?;
    m.add_function(wrap_pyfunction!(populate_min, m)?)?;
    m.add_function(wrap_pyfunction!(data_address, m)?)?;
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
    Ok(())
}
