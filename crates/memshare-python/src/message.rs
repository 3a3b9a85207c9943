//! Messages for Python: `encode_message`/`decode_message` over the core's
//! handle table (`memshare::message`), and `Lease`, the owner of the pins of
//! one transport call. `memshare._sharing` builds pickles on these.

use memshare::message::{self, Encoder, Entry};
use memshare::{ArrayMeta, Block, Handle, Lease};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::{to_pyerr, PyBlock};

/// An entry as Python sees it: (block, dtype, itemsize, shape, strides, offset).
pub type PyEntry = (PyBlock, String, usize, Vec<usize>, Vec<isize>, usize);
pub type EntryIn<'py> = (
    PyRef<'py, PyBlock>,
    String,
    usize,
    Vec<usize>,
    Vec<isize>,
    usize,
);

/// The array layout an entry describes.
pub fn layout_of(entry: &EntryIn<'_>) -> ArrayMeta {
    let (_, dtype, itemsize, shape, strides, offset) = entry;
    ArrayMeta {
        dtype: dtype.clone(),
        itemsize: *itemsize,
        shape: shape.clone(),
        strides: strides.clone(),
        offset: *offset,
    }
}

/// The owner of the pins of one transport call (a pool's `map`, `submit`):
/// its pins are released when the lease is dropped (or when its process
/// dies), whether or not the messages were received.
#[pyclass(frozen, module = "memshare._native", name = "Lease")]
pub struct PyLease {
    lease: Lease,
}

#[pymethods]
impl PyLease {
    /// A new lease in this process's arena.
    #[new]
    fn new(py: Python<'_>) -> PyResult<Self> {
        let arena = memshare::home().map_err(to_pyerr)?;
        let lease = py.detach(|| arena.lease()).map_err(to_pyerr)?;
        Ok(PyLease { lease })
    }

    fn __repr__(&self) -> String {
        "<memshare Lease>".to_string()
    }
}

/// A handle of `block` pinned by `lease` (kept on open with `kept`), or by
/// this process; with `foreign_by_process`, a block of an arena other than
/// the lease's (which cannot own its pin) is pinned by this process too.
fn pinned(
    block: &Block,
    lease: Option<&PyLease>,
    kept: bool,
    foreign_by_process: bool,
) -> memshare::Result<Handle> {
    match lease {
        Some(l) if foreign_by_process && l.lease.arena().token() != block.arena().token() => {
            block.handle()
        }
        Some(l) if kept => block.handle_leased_kept(&l.lease),
        Some(l) => block.handle_leased(&l.lease),
        None => block.handle(),
    }
}

/// Encodes a message: a handle table of `entries` (each block pinned for
/// the receiver, by `lease` or by this process) followed by `payload`.
/// With `kept` (and a lease), opening the message leaves its pins in place:
/// it opens any number of times until the lease ends.
/// With `foreign_by_process`, blocks of an arena other than the lease's are
/// pinned by this process (else they are an error: a lease owns pins in its
/// own arena only).
/// Layouts are checked against their blocks before anything is pinned.
#[pyfunction]
#[pyo3(signature = (entries, payload, lease=None, kept=false, foreign_by_process=false))]
pub fn encode_message<'py>(
    py: Python<'py>,
    entries: Vec<EntryIn<'py>>,
    payload: &[u8],
    lease: Option<&PyLease>,
    kept: bool,
    foreign_by_process: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    if kept && lease.is_none() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "memshare: kept=True needs a lease (its pins end with it)",
        ));
    }
    let mut layouts = Vec::with_capacity(entries.len());
    for entry in &entries {
        let layout = layout_of(entry);
        message::check_layout(&layout, entry.0.block.len()).map_err(to_pyerr)?;
        layouts.push(layout);
    }
    let mut enc = Encoder::new();
    let mut made: Vec<(Handle, &Block)> = Vec::with_capacity(entries.len());
    for ((block, ..), layout) in entries.iter().zip(layouts) {
        let b = &block.block;
        let handle = match pinned(b, lease, kept, foreign_by_process) {
            Ok(h) => h,
            Err(e) => {
                // Release the pins made so far: nobody will receive them.
                for (h, b) in made {
                    drop(b.arena().open(&h));
                }
                return Err(to_pyerr(e));
            }
        };
        enc.push(
            &Entry {
                handle: handle.clone(),
                layout,
            },
            &message::key_of(b.arena()),
        )
        .map_err(to_pyerr)?;
        made.push((handle, b));
    }
    Ok(PyBytes::new(py, &enc.finish(payload)))
}

/// Opens the entries of a decoded table (adopting their pins).
pub fn open_entries(py: Python<'_>, entries: Vec<Entry>) -> PyResult<Vec<PyEntry>> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let block = py.detach(|| memshare::open(&e.handle)).map_err(to_pyerr)?;
        out.push(entry_out(block, e.layout));
    }
    Ok(out)
}

pub fn entry_out(block: Block, m: ArrayMeta) -> PyEntry {
    (
        PyBlock::new(block),
        m.dtype,
        m.itemsize,
        m.shape,
        m.strides,
        m.offset,
    )
}

/// Decodes a message from any process of this user: `(entries, payload)`,
/// each entry opened (its pin adopted) with its bounds-checked layout.
/// Malformed bytes raise HandleError; data already freed, StaleHandleError.
#[pyfunction]
pub fn decode_message<'py>(
    py: Python<'py>,
    data: &[u8],
) -> PyResult<(Vec<PyEntry>, Bound<'py, PyBytes>)> {
    let decoded = message::decode_any(data).map_err(to_pyerr)?;
    let payload = PyBytes::new(py, decoded.payload);
    Ok((open_entries(py, decoded.entries)?, payload))
}

/// True if `data` starts like a message.
#[pyfunction]
fn is_message(data: &[u8]) -> bool {
    message::is_message(data)
}

/// Adds the message functions and `Lease` to `memshare._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLease>()?;
    m.add_function(wrap_pyfunction!(encode_message, m)?)?;
    m.add_function(wrap_pyfunction!(decode_message, m)?)?;
    m.add_function(wrap_pyfunction!(is_message, m)?)?;
    Ok(())
}
