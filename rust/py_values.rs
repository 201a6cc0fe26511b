//! PyO3 edge of the tensor-value reader: paths in, (names, all-zero flags, non-finite flags) out.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::py_headers::{header_error, threads_or_cores};
use crate::values;

/// Reads the tensor data of `paths` on `threads` threads (default: one per core) with the GIL
/// released, streaming each file's data buffer once. Returns one tuple per path, in order:
/// (names in file order, all_zero flags, non_finite flags). Errors as `read_headers`.
#[pyfunction]
#[pyo3(signature = (paths, threads=None))]
pub fn read_values<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyList>> {
    let threads = threads_or_cores(threads);
    let out = PyList::empty(py);
    // As read_headers: a few files per thread at a time, then a look for a pending Ctrl-C.
    for chunk in paths.chunks(threads * 4) {
        let results = py.detach(|| values::read_many_values(chunk, threads));
        for (path, result) in chunk.iter().zip(results) {
            let flags = result.map_err(|error| header_error(path, error))?;
            let names = PyList::new(py, flags.iter().map(|f| f.name.as_str()))?;
            let zero = PyList::new(py, flags.iter().map(|f| f.all_zero))?;
            let non_finite = PyList::new(py, flags.iter().map(|f| f.non_finite))?;
            out.append(PyTuple::new(
                py,
                [names.into_any(), zero.into_any(), non_finite.into_any()],
            )?)?;
        }
        py.check_signals()?;
    }
    Ok(out)
}
