//! numpy's allocator hook (NEP 49): arrays born in shared memory.
//!
//! A version-1 `PyDataMem_Handler` named "memshare" routes data allocations
//! of at least `threshold` bytes to the home arena ([`memshare::Block::into_raw`])
//! and smaller ones to numpy's default handler (which keeps numpy's
//! small-buffer cache), or to libc when numpy's default handler is unknown.
//! numpy stores the handler in a context variable (`PyDataMem_SetHandler`), and
//! every array keeps a reference to the handler that allocated it, so its
//! free comes back here even after the handler was switched off.
//!
//! The hook never panics across the FFI boundary and never fails an
//! allocation that libc could serve: any arena error falls back to the small
//! allocator. Pointers this module handed out are recorded in `LIVE`, so a
//! free or realloc knows which allocator owns a pointer without guessing.
#![deny(unsafe_op_in_unsafe_fn)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_uint, c_void, CStr};
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The capsule name numpy requires for handlers.
const CAPSULE_NAME: &CStr = c"mem_handler";
/// `PyDataMem_SetHandler` in numpy's C-API table (API version 0x0f, numpy 1.22).
const SLOT_SET_HANDLER: usize = 304;
/// `PyDataMem_GetHandler`.
const SLOT_GET_HANDLER: usize = 305;
/// `PyDataMem_DefaultHandler` (a `PyObject *` capsule stored in the table).
const SLOT_DEFAULT_HANDLER: usize = 306;
/// `PyArray_GetNDArrayCFeatureVersion`.
const SLOT_FEATURE_VERSION: usize = 211;
const MIN_FEATURE_VERSION: c_uint = 0x0f;

type MallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type CallocFn = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void, *mut c_void, usize);

/// numpy's `PyDataMemAllocator` (version 1).
#[repr(C)]
#[derive(Clone, Copy)]
struct PyDataMemAllocator {
    ctx: *mut c_void,
    malloc: MallocFn,
    calloc: CallocFn,
    realloc: ReallocFn,
    free: FreeFn,
}

/// numpy's `PyDataMem_Handler` (version 1).
#[repr(C)]
struct PyDataMemHandler {
    name: [c_char; 127],
    version: u8,
    allocator: PyDataMemAllocator,
}

/// What a memshare handler capsule points to: numpy reads `handler`, our
/// functions read `threshold` through `handler.allocator.ctx`.
#[repr(C)]
struct HandlerBox {
    handler: PyDataMemHandler,
    threshold: usize,
}

/// Maps a block's pages into this process in one system call instead of one
/// page fault per page on first touch (a recycled block another process
/// used is new to this one). Skipped for a block whose pages this process
/// still maps ([`memshare::Block::pages_mapped`]). Best effort: older kernels
/// refuse, nothing breaks.
pub(crate) fn prefault(ptr: *mut u8, len: usize) {
    // SAFETY: the range is a live block of a shared mapping of this process.
    unsafe { memshare::sys::prefault_write(ptr, len) };
}

/// The allocator for small arrays: numpy's default handler once known.
static SMALL: OnceLock<SmallAllocator> = OnceLock::new();

#[derive(Clone, Copy)]
struct SmallAllocator(PyDataMemAllocator);
// SAFETY: numpy's default allocator is a set of process-global C functions and
// a context pointer that numpy never frees; it may be called from any thread.
unsafe impl Send for SmallAllocator {}
// SAFETY: see `Send`.
unsafe impl Sync for SmallAllocator {}

/// Arena pointers handed out by this module, with their usable length.
static LIVE: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
/// `LIVE.len()`, readable without the lock (the fast path of every free).
static LIVE_COUNT: AtomicUsize = AtomicUsize::new(0);
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Allocations served by the arena since the process started.
static ARENA_ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Large allocations that the arena refused (served by the small allocator).
static ARENA_FALLBACKS: AtomicU64 = AtomicU64::new(0);
/// Arena allocations whose pages were populated ahead of numpy's writes
/// (the others' pages were still mapped in this process).
static POPULATED_AHEAD: AtomicU64 = AtomicU64::new(0);

fn live() -> MutexGuard<'static, HashMap<usize, usize>> {
    LIVE.get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// `LIVE`'s guard, held by the forking thread across `fork()` so that the
    /// child never inherits it locked by a thread that is gone.
    static HELD_FOR_FORK: RefCell<Option<MutexGuard<'static, HashMap<usize, usize>>>> =
        const { RefCell::new(None) };
}

extern "C" fn lock_for_fork() {
    let _ = catch_unwind(|| {
        let guard = live();
        HELD_FOR_FORK.with(|h| *h.borrow_mut() = Some(guard));
    });
}

extern "C" fn unlock_after_fork() {
    let _ = catch_unwind(|| HELD_FOR_FORK.with(|h| drop(h.borrow_mut().take())));
}

/// Holds `LIVE` across every `fork()` (inside it, as `pthread_atfork`
/// handlers), so a child never inherits it locked by a thread that is gone.
pub(crate) fn install_fork_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| memshare::sys::at_fork(lock_for_fork, unlock_after_fork, unlock_after_fork));
}

fn live_len(ptr: *mut c_void) -> Option<usize> {
    if LIVE_COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    live().get(&(ptr as usize)).copied()
}

fn take_live(ptr: *mut c_void) -> Option<usize> {
    if LIVE_COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    let len = live().remove(&(ptr as usize))?;
    LIVE_COUNT.fetch_sub(1, Ordering::AcqRel);
    LIVE_BYTES.fetch_sub(len, Ordering::AcqRel);
    Some(len)
}

/// A block of at least `size` bytes from the home arena, or None.
fn arena_alloc(size: usize) -> Option<*mut c_void> {
    // The arena's lock may be busy (a stopped peer): never wait with the GIL.
    let r = catch_unwind(|| {
        crate::without_gil(|| {
            let arena = memshare::home().ok()?;
            let block = arena.alloc(size, false).ok()?;
            let mapped = block.pages_mapped();
            let p = block.into_raw();
            if !mapped {
                prefault(p, size);
                POPULATED_AHEAD.fetch_add(1, Ordering::Relaxed);
            }
            Some(p as usize)
        })
        .map(|p| p as *mut u8)
    });
    match r {
        Ok(Some(p)) => {
            let mut map = live();
            map.insert(p as usize, size);
            LIVE_COUNT.fetch_add(1, Ordering::AcqRel);
            LIVE_BYTES.fetch_add(size, Ordering::AcqRel);
            ARENA_ALLOCS.fetch_add(1, Ordering::Relaxed);
            Some(p.cast())
        }
        _ => {
            ARENA_FALLBACKS.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Releases an arena pointer already removed from `LIVE`.
fn arena_release(ptr: *mut c_void) {
    // The block's reference is dropped in whichever attached arena holds it.
    // If the process already detached (interpreter exit), release_raw finds no
    // arena and the memory stays mapped: it must not go to libc either way.
    let addr = ptr as usize;
    let _ = catch_unwind(|| crate::without_gil(|| memshare::release_raw(addr as *mut u8)));
}

fn small_malloc(size: usize) -> *mut c_void {
    match SMALL.get() {
        // SAFETY: numpy's default allocator with its own context, as numpy calls it.
        Some(s) => unsafe { (s.0.malloc)(s.0.ctx, size) },
        // SAFETY: plain libc malloc.
        None => unsafe { libc::malloc(size) },
    }
}

fn small_calloc(nelem: usize, elsize: usize) -> *mut c_void {
    match SMALL.get() {
        // SAFETY: as in `small_malloc`.
        Some(s) => unsafe { (s.0.calloc)(s.0.ctx, nelem, elsize) },
        // SAFETY: plain libc calloc.
        None => unsafe { libc::calloc(nelem, elsize) },
    }
}

/// # Safety
/// `ptr` was returned by the small allocator (or is null) and not freed.
unsafe fn small_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    match SMALL.get() {
        // SAFETY: `ptr` came from this same allocator (caller's promise).
        Some(s) => unsafe { (s.0.realloc)(s.0.ctx, ptr, size) },
        // SAFETY: `ptr` came from libc malloc (caller's promise).
        None => unsafe { libc::realloc(ptr, size) },
    }
}

/// # Safety
/// `ptr` was returned by the small allocator (or is null) and not freed.
unsafe fn small_free(ptr: *mut c_void, size: usize) {
    match SMALL.get() {
        // SAFETY: `ptr` came from this same allocator (caller's promise).
        Some(s) => unsafe { (s.0.free)(s.0.ctx, ptr, size) },
        // SAFETY: `ptr` came from libc malloc (caller's promise).
        None => unsafe { libc::free(ptr) },
    }
}

/// # Safety
/// `ctx` is the `HandlerBox` whose handler numpy is calling.
unsafe fn threshold_of(ctx: *mut c_void) -> usize {
    if ctx.is_null() {
        return usize::MAX;
    }
    // SAFETY: numpy passes back the ctx we stored: a live HandlerBox (the
    // capsule owning it is referenced by every array it allocated).
    unsafe { (*ctx.cast::<HandlerBox>()).threshold }
}

unsafe extern "C" fn hook_malloc(ctx: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: called by numpy with our ctx.
    if size >= unsafe { threshold_of(ctx) } {
        if let Some(p) = arena_alloc(size) {
            return p;
        }
    }
    small_malloc(size)
}

unsafe extern "C" fn hook_calloc(ctx: *mut c_void, nelem: usize, elsize: usize) -> *mut c_void {
    let Some(size) = nelem.checked_mul(elsize) else {
        return std::ptr::null_mut();
    };
    // SAFETY: called by numpy with our ctx.
    if size >= unsafe { threshold_of(ctx) } {
        if let Some(p) = arena_alloc(size) {
            // Recycled arena blocks hold old data: zero them.
            // SAFETY: `p` is a fresh block of at least `size` writable bytes.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, size) };
            return p;
        }
    }
    small_calloc(nelem, elsize)
}

unsafe extern "C" fn hook_realloc(ctx: *mut c_void, ptr: *mut c_void, size: usize) -> *mut c_void {
    if ptr.is_null() {
        // SAFETY: forwarded from numpy with the same ctx.
        return unsafe { hook_malloc(ctx, size) };
    }
    let Some(old_len) = live_len(ptr) else {
        // A small-allocator pointer stays with the small allocator.
        // SAFETY: not one of ours, so it came from the small allocator.
        return unsafe { small_realloc(ptr, size) };
    };
    // SAFETY: called by numpy with our ctx.
    let threshold = unsafe { threshold_of(ctx) };
    if size <= old_len && size >= threshold {
        return ptr; // shrink in place: the block keeps its capacity
    }
    // SAFETY: forwarded from numpy with the same ctx.
    let new = unsafe { hook_malloc(ctx, size) };
    if new.is_null() {
        return new; // numpy keeps the old pointer on failure
    }
    // SAFETY: both regions are live, distinct allocations of at least
    // min(old_len, size) bytes.
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), new.cast::<u8>(), old_len.min(size)) };
    if take_live(ptr).is_some() {
        arena_release(ptr);
    }
    new
}

unsafe extern "C" fn hook_free(_ctx: *mut c_void, ptr: *mut c_void, size: usize) {
    if ptr.is_null() {
        return;
    }
    if take_live(ptr).is_some() {
        arena_release(ptr);
    } else {
        // SAFETY: not one of ours, so it came from the small allocator.
        unsafe { small_free(ptr, size) }
    }
}

fn new_handler_box(threshold: usize) -> Box<HandlerBox> {
    let mut name = [0 as c_char; 127];
    for (dst, src) in name.iter_mut().zip(b"memshare") {
        *dst = *src as c_char;
    }
    let mut b = Box::new(HandlerBox {
        handler: PyDataMemHandler {
            name,
            version: 1,
            allocator: PyDataMemAllocator {
                ctx: std::ptr::null_mut(),
                malloc: hook_malloc,
                calloc: hook_calloc,
                realloc: hook_realloc,
                free: hook_free,
            },
        },
        threshold: threshold.max(1),
    });
    let ctx: *mut HandlerBox = &mut *b;
    b.handler.allocator.ctx = ctx.cast();
    b
}

/// Capsule destructor: frees the HandlerBox once no array references it.
unsafe extern "C" fn destroy_capsule(capsule: *mut ffi::PyObject) {
    // SAFETY: CPython calls this with our capsule, whose pointer is a leaked
    // Box<HandlerBox>; numpy holds a reference to the capsule for every array
    // it allocated, so no allocation of this handler is left.
    unsafe {
        let p = ffi::PyCapsule_GetPointer(capsule, CAPSULE_NAME.as_ptr());
        if !p.is_null() {
            drop(Box::from_raw(p.cast::<HandlerBox>()));
        } else {
            ffi::PyErr_Clear();
        }
    }
}

/// numpy's C-API table (`_ARRAY_API`), checked for handler support.
fn numpy_api(py: Python<'_>) -> PyResult<*const *const c_void> {
    static API: OnceLock<usize> = OnceLock::new();
    if let Some(p) = API.get() {
        return Ok(*p as *const *const c_void);
    }
    let module = py
        .import("numpy._core._multiarray_umath")
        .or_else(|_| py.import("numpy.core.multiarray"))?;
    let capsule = module.getattr("_ARRAY_API")?;
    // SAFETY: `_ARRAY_API` is a capsule (checked by PyCapsule_GetName/GetPointer,
    // which set an exception otherwise) whose pointer is numpy's static table.
    let table = unsafe {
        let name = ffi::PyCapsule_GetName(capsule.as_ptr());
        if name.is_null() && !ffi::PyErr_Occurred().is_null() {
            return Err(PyErr::fetch(py));
        }
        let p = ffi::PyCapsule_GetPointer(capsule.as_ptr(), name);
        if p.is_null() {
            return Err(PyErr::fetch(py));
        }
        p as *const *const c_void
    };
    // SAFETY: slot 211 has been PyArray_GetNDArrayCFeatureVersion since numpy 1.4.
    let version = unsafe {
        let f: unsafe extern "C" fn() -> c_uint =
            std::mem::transmute(*table.add(SLOT_FEATURE_VERSION));
        f()
    };
    if version < MIN_FEATURE_VERSION {
        return Err(PyRuntimeError::new_err(format!(
            "numpy's C API feature version is {version:#x}; the shared-memory allocator \
             needs numpy >= 1.22 (version 0x0f)"
        )));
    }
    // SAFETY: the table has slot 306 from feature version 0x0f; it holds a
    // pointer to the `PyObject *` of numpy's default handler capsule.
    unsafe {
        let default = *(*table.add(SLOT_DEFAULT_HANDLER) as *const *mut ffi::PyObject);
        if !default.is_null() {
            let h = ffi::PyCapsule_GetPointer(default, CAPSULE_NAME.as_ptr());
            if h.is_null() {
                ffi::PyErr_Clear();
            } else {
                let _ = SMALL.set(SmallAllocator((*h.cast::<PyDataMemHandler>()).allocator));
            }
        }
    }
    let _ = API.set(table as usize);
    Ok(table)
}

/// A new "memshare" allocator capsule for `numpy_set_allocator`: data of at
/// least `threshold` bytes goes to shared memory.
#[pyfunction]
fn numpy_allocator(py: Python<'_>, threshold: usize) -> PyResult<Py<PyAny>> {
    if threshold == 0 {
        return Err(PyValueError::new_err("threshold must be at least 1 byte"));
    }
    numpy_api(py)?; // learn numpy's default handler before any allocation
                    // Choose (and export) the arena now, under the GIL, not inside malloc;
                    // if that fails, allocations fall back to private memory as usual.
    let _ = crate::home(py);
    let ptr = Box::into_raw(new_handler_box(threshold));
    // SAFETY: `ptr` is a valid HandlerBox whose first field is the handler;
    // the capsule owns it and frees it in `destroy_capsule`.
    let cap =
        unsafe { ffi::PyCapsule_New(ptr.cast(), CAPSULE_NAME.as_ptr(), Some(destroy_capsule)) };
    if cap.is_null() {
        // SAFETY: the capsule was not created, so we still own the box.
        drop(unsafe { Box::from_raw(ptr) });
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `cap` is a new reference.
    Ok(unsafe { Py::from_owned_ptr(py, cap) })
}

/// Sets numpy's allocator for this context (None: numpy's default) and returns
/// the previous one.
#[pyfunction]
#[pyo3(signature = (handler))]
fn numpy_set_allocator(py: Python<'_>, handler: Option<Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
    let table = numpy_api(py)?;
    let arg = handler
        .as_ref()
        .map_or(std::ptr::null_mut(), |h| h.as_ptr());
    // SAFETY: slot 304 is PyDataMem_SetHandler (feature version checked); it
    // takes a borrowed capsule or NULL and returns a new reference or NULL
    // with an exception set.
    let old = unsafe {
        let f: unsafe extern "C" fn(*mut ffi::PyObject) -> *mut ffi::PyObject =
            std::mem::transmute(*table.add(SLOT_SET_HANDLER));
        f(arg)
    };
    if old.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `old` is a new reference.
    Ok(unsafe { Py::from_owned_ptr(py, old) })
}

/// numpy's allocator capsule for this context.
#[pyfunction]
fn numpy_get_allocator(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let table = numpy_api(py)?;
    // SAFETY: slot 305 is PyDataMem_GetHandler; it returns a new reference or
    // NULL with an exception set.
    let h = unsafe {
        let f: unsafe extern "C" fn() -> *mut ffi::PyObject =
            std::mem::transmute(*table.add(SLOT_GET_HANDLER));
        f()
    };
    if h.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `h` is a new reference.
    Ok(unsafe { Py::from_owned_ptr(py, h) })
}

/// The threshold of a memshare allocator capsule, or None for another handler.
#[pyfunction]
fn numpy_allocator_threshold(handler: &Bound<'_, PyAny>) -> Option<usize> {
    // SAFETY: PyCapsule_IsValid accepts any object and only reads it.
    let valid = unsafe { ffi::PyCapsule_IsValid(handler.as_ptr(), CAPSULE_NAME.as_ptr()) };
    if valid == 0 {
        return None;
    }
    // SAFETY: a valid "mem_handler" capsule points to a PyDataMemHandler.
    let h = unsafe { ffi::PyCapsule_GetPointer(handler.as_ptr(), CAPSULE_NAME.as_ptr()) };
    // SAFETY: every handler is at least a PyDataMemHandler; ours are recognised
    // by their malloc function before the HandlerBox field is read.
    unsafe {
        let handler = &*h.cast::<PyDataMemHandler>();
        if handler.allocator.malloc as *const () != hook_malloc as MallocFn as *const () {
            return None;
        }
        Some((*h.cast::<HandlerBox>()).threshold)
    }
}

/// Counters of the allocator hook in this process.
#[pyfunction]
fn numpy_allocator_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("arena_allocations", ARENA_ALLOCS.load(Ordering::Relaxed))?;
    d.set_item("arena_fallbacks", ARENA_FALLBACKS.load(Ordering::Relaxed))?;
    d.set_item("populated_ahead", POPULATED_AHEAD.load(Ordering::Relaxed))?;
    d.set_item("live_blocks", LIVE_COUNT.load(Ordering::Acquire))?;
    d.set_item("live_bytes", LIVE_BYTES.load(Ordering::Acquire))?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(numpy_allocator, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_set_allocator, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_get_allocator, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_allocator_threshold, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_allocator_stats, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(b: &HandlerBox) -> *mut c_void {
        b.handler.allocator.ctx
    }

    #[test]
    fn routes_by_size_and_frees_back() {
        let dir = std::env::temp_dir().join(format!("memshare-hooktest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::env::set_var("MEMSHARE_DIR", &dir);
        let b = new_handler_box(4096);
        // SAFETY: the hook functions are called as numpy would, with our ctx.
        unsafe {
            let small = hook_malloc(ctx(&b), 100);
            assert!(!small.is_null());
            assert!(live_len(small).is_none());
            let big = hook_calloc(ctx(&b), 1000, 8);
            assert_eq!(live_len(big), Some(8000));
            assert!(std::slice::from_raw_parts(big.cast::<u8>(), 8000)
                .iter()
                .all(|&x| x == 0));
            let arena = memshare::home().unwrap();
            assert!(arena.contains(big as usize));
            let before = arena.stats().unwrap().live_blocks;
            // Growing an arena block moves it to a new block and copies.
            *big.cast::<u8>() = 7;
            let bigger = hook_realloc(ctx(&b), big, 16000);
            assert_eq!(*bigger.cast::<u8>(), 7);
            assert!(live_len(big).is_none() || big == bigger);
            assert_eq!(arena.stats().unwrap().live_blocks, before);
            // Shrinking below the threshold moves it to the small allocator.
            let shrunk = hook_realloc(ctx(&b), bigger, 10);
            assert!(live_len(shrunk).is_none());
            assert_eq!(*shrunk.cast::<u8>(), 7);
            assert_eq!(arena.stats().unwrap().live_blocks, before - 1);
            hook_free(ctx(&b), shrunk, 10);
            hook_free(ctx(&b), small, 100);
            hook_free(ctx(&b), std::ptr::null_mut(), 0);
        }
        let _ = memshare::home().unwrap().detach();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
