//! `is_plain`: whether a value can hold shared memory, the test on the hot
//! path of every pool task and queue message (a Python loop over a batch of
//! 100 ints takes about 4 µs; this takes a fraction of one).

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyComplex, PyFloat, PyInt, PyList, PyString, PyTuple};

/// Exact atomic types (not subclasses: a subclass may carry anything).
fn atomic(v: &Bound<'_, PyAny>) -> bool {
    v.is_exact_instance_of::<PyInt>()
        || v.is_exact_instance_of::<PyFloat>()
        || v.is_exact_instance_of::<PyString>()
        || v.is_none()
        || v.is_exact_instance_of::<PyBool>()
        || v.is_exact_instance_of::<PyBytes>()
        || v.is_exact_instance_of::<PyComplex>()
}

/// True if `value` is atomic (int, float, bool, str, bytes, complex, None),
/// or, while `depth` allows, an exact tuple or list of plain values.
#[pyfunction]
#[pyo3(signature = (value, depth=1))]
pub fn is_plain(value: &Bound<'_, PyAny>, depth: u32) -> bool {
    if atomic(value) {
        return true;
    }
    if depth == 0 {
        return false;
    }
    if let Ok(t) = value.cast_exact::<PyTuple>() {
        return t.iter().all(|x| is_plain(&x, depth - 1));
    }
    if let Ok(l) = value.cast_exact::<PyList>() {
        return l.iter().all(|x| is_plain(&x, depth - 1));
    }
    false
}
