//! `memshare._native.Queue`: the shared-memory queue of the core crate, with
//! byte messages. `memshare._queue` pickles objects into those messages.

use std::time::{Duration, Instant};

use memshare::arena::with_deadline;
use memshare::queue::Queue;
use memshare::{ArrayMeta, Block, Error, Handle};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::message::{entry_out, layout_of, EntryIn, PyEntry};
use crate::to_pyerr;

/// Converts a Python timeout in seconds: None waits forever, <= 0 does not wait.
fn timeout_of(t: Option<f64>) -> PyResult<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(s) if s.is_nan() => Err(PyValueError::new_err("timeout must be a number, not NaN")),
        Some(s) if s <= 0.0 => Ok(Some(Duration::ZERO)),
        Some(s) if s >= 1e12 => Ok(None),
        Some(s) => Ok(Some(Duration::from_secs_f64(s))),
    }
}

/// How long a call with a timeout shorter than this (`put_nowait`,
/// `get_nowait`) still waits for the arena's lock, without the GIL: long
/// enough that a moment's contention does not fail it, short enough that a
/// stopped peer holding the lock costs it only that.
const LOCK_GRACE: Duration = Duration::from_millis(10);

/// The deadline of the arena-lock waits of a call with timeout `t`.
fn lock_deadline(t: Option<Duration>) -> Option<Instant> {
    t.and_then(|t| Instant::now().checked_add(t.max(LOCK_GRACE)))
}

/// A bounded multi-producer multi-consumer queue of messages (see
/// `encode_message`) in shared memory. The blocks a message's handle table
/// lists are owned by the queue while it waits, and by the consumer once
/// `get` returns.
#[pyclass(frozen, module = "memshare._native", name = "Queue")]
pub struct PyQueue {
    q: Queue,
}

#[pymethods]
impl PyQueue {
    /// A new queue of `capacity` messages in this process's arena; messages
    /// up to `inline_size` bytes are stored in the slots.
    #[new]
    #[pyo3(signature = (capacity, inline_size=240, joinable=false))]
    fn new(py: Python<'_>, capacity: usize, inline_size: usize, joinable: bool) -> PyResult<Self> {
        let arena = crate::home(py)?; // exported for children, without the GIL
        let q = py
            .detach(|| Queue::with_options(&arena, capacity, inline_size, joinable))
            .map_err(to_pyerr)?;
        Ok(PyQueue { q })
    }

    /// Opens a queue from the handle made by `handle()` in any process.
    #[staticmethod]
    fn from_handle(py: Python<'_>, handle: &[u8]) -> PyResult<Self> {
        let h = Handle::from_bytes(handle).map_err(to_pyerr)?;
        let q = py.detach(|| Queue::from_handle(&h)).map_err(to_pyerr)?;
        Ok(PyQueue { q })
    }

    /// A 64-byte handle of the queue (pinned until opened).
    fn handle<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let h = self.q.handle().map_err(to_pyerr)?;
        Ok(PyBytes::new(py, &h.to_bytes()))
    }

    /// Puts a message made by `encode_message`, waiting up to `timeout`
    /// seconds (None: forever) for room; raises `queue.Full` on timeout,
    /// ValueError if the queue was shut down, HandleError if `data` is not a
    /// message. The entries' pins move to the queue.
    #[pyo3(signature = (data, timeout=None))]
    fn put(&self, py: Python<'_>, data: &[u8], timeout: Option<f64>) -> PyResult<()> {
        let t = timeout_of(timeout)?;
        // The timeout bounds the wait for the arena's lock too (a stopped
        // peer may hold it): past it, the put is Full like any other.
        let deadline = lock_deadline(t);
        let bounded = |f: &dyn Fn() -> Result<(), Error>| match with_deadline(deadline, f) {
            Err(Error::Busy(_)) => Err(Error::Full),
            r => r,
        };
        // Small plain messages are tried once without releasing the GIL (no
        // wait, no lock, no bulk copy); anything else releases it.
        if data.len() > self.q.inline_size() {
            return py
                .detach(|| bounded(&|| self.q.put_message(data, t, true)))
                .map_err(to_pyerr);
        }
        let prepare = || with_deadline(deadline, || self.q.prepare(data, true));
        // A message that lists no blocks is prepared without a lock or a wait.
        let prepared = if memshare::message::entry_count(data) == 0 {
            prepare()
        } else {
            py.detach(prepare)
        }
        .map_err(|e| match e {
            Error::Busy(_) => to_pyerr(Error::Full),
            e => to_pyerr(e),
        })?;
        if !prepared.needs_lock() {
            match self.q.put_prepared(data, &prepared, Some(Duration::ZERO)) {
                Err(Error::Full) if t != Some(Duration::ZERO) => {}
                r => return r.map_err(to_pyerr),
            }
        }
        py.detach(|| bounded(&|| self.q.put_prepared(data, &prepared, t)))
            .map_err(to_pyerr)
    }

    /// Takes a message: `(entries, payload)` as `decode_message` returns
    /// them, the entries opened (this process now holds their blocks).
    /// Raises `queue.Empty` on timeout.
    /// Puts a message listing `entries` (as `encode_message` takes them)
    /// before `payload`, each block pinned for the queue as the message is
    /// written (one arena transaction per block, none by the sender).
    #[pyo3(signature = (entries, payload, timeout=None))]
    fn put_entries(
        &self,
        py: Python<'_>,
        entries: Vec<EntryIn<'_>>,
        payload: &[u8],
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let t = timeout_of(timeout)?;
        let deadline = lock_deadline(t);
        let blocks: Vec<(&Block, ArrayMeta)> = entries
            .iter()
            .map(|entry| (&*entry.0.block, layout_of(entry)))
            .collect();
        // `entries` holds the blocks until the put returns.
        py.detach(
            || match with_deadline(deadline, || self.q.put_blocks(&blocks, payload, t)) {
                Err(Error::Busy(_)) => Err(Error::Full),
                r => r,
            },
        )
        .map_err(to_pyerr)
    }

    #[pyo3(signature = (timeout=None))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<(Vec<PyEntry>, Bound<'py, PyBytes>)> {
        let t = timeout_of(timeout)?;
        // The timeout bounds the wait for the arena's lock too (a message
        // with handles is claimed only once the lock is free): past it, the
        // get is Empty and the message stays in the queue.
        let bounded =
            |t: Option<Duration>, deadline: Option<Instant>| match with_deadline(deadline, || {
                self.q.get_message(t)
            }) {
                Err(Error::Busy(_)) => Err(Error::Empty),
                r => r,
            };
        // First a try that waits for nothing, not even the arena's lock, so
        // it may keep the GIL; then, if it found nothing or the lock taken, a
        // wait without the GIL.
        let first = with_deadline(Some(Instant::now()), || {
            self.q.get_message(Some(Duration::ZERO))
        });
        let msg = match first {
            Err(Error::Empty) if t == Some(Duration::ZERO) => return Err(to_pyerr(Error::Empty)),
            Err(Error::Empty | Error::Busy(_)) => py
                .detach(|| bounded(t, lock_deadline(t)))
                .map_err(to_pyerr)?,
            r => r.map_err(to_pyerr)?,
        };
        let payload = PyBytes::new(py, msg.payload());
        let entries = msg
            .into_entries()
            .into_iter()
            .map(|(b, m)| entry_out(b, m))
            .collect();
        Ok((entries, payload))
    }

    /// Messages in the queue (approximate while others put and get).
    fn qsize(&self) -> usize {
        self.q.len()
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.q.capacity()
    }

    #[getter]
    fn inline_size(&self) -> usize {
        self.q.inline_size()
    }

    #[getter]
    fn joinable(&self) -> bool {
        self.q.is_joinable()
    }

    /// Shuts the queue down for every process: puts fail, gets drain what is
    /// left and then fail, blocked callers wake up.
    fn shutdown(&self) {
        self.q.close();
    }

    #[getter]
    fn is_shutdown(&self) -> bool {
        self.q.is_closed()
    }

    /// Marks one message as processed (joinable queues).
    fn task_done(&self) -> PyResult<()> {
        self.q.task_done().map_err(to_pyerr)
    }

    /// Messages put but not yet marked done.
    fn unfinished(&self) -> u64 {
        self.q.unfinished()
    }

    /// Waits until every message put has been marked done; False on timeout.
    #[pyo3(signature = (timeout=None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let t = timeout_of(timeout)?;
        py.detach(|| self.q.join(t)).map_err(to_pyerr)
    }

    fn __repr__(&self) -> String {
        format!(
            "<memshare._native.Queue capacity={} len={}>",
            self.q.capacity(),
            self.q.len()
        )
    }
}

/// Adds the queue classes to `memshare._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyQueue>()?;
    Ok(())
}
