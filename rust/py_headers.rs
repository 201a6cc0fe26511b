//! PyO3 edge of the safetensors header reader: paths in, plain Python data out.

use std::collections::HashMap;
use std::path::PathBuf;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::safetensors::{self, Dtype, Header, HeaderError};

pub(crate) fn header_error(path: &std::path::Path, error: HeaderError) -> PyErr {
    let shown = path.display().to_string();
    match error {
        // OSError(errno, strerror, filename) becomes FileNotFoundError, PermissionError, ...
        HeaderError::Io(error) => match error.raw_os_error() {
            Some(code) => {
                // Rust appends " (os error N)" to strerror; Python shows the errno already.
                let text = error.to_string();
                let strerror = text.split(" (os error").next().unwrap_or(&text).to_owned();
                PyOSError::new_err((code, strerror, shown))
            }
            None => PyOSError::new_err(format!("{shown}: {error}")),
        },
        HeaderError::Invalid(message) => PyValueError::new_err(format!("{shown}: {message}")),
    }
}

/// One file's header as (names, dtypes, shapes, byte sizes, metadata or None, file size).
fn header_to_python<'py>(
    py: Python<'py>,
    header: &Header,
    dtypes: &mut HashMap<Dtype, Bound<'py, PyString>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let count = header.tensors.len();
    let mut names = Vec::with_capacity(count);
    let mut kinds = Vec::with_capacity(count);
    let mut shapes = Vec::with_capacity(count);
    let mut sizes = Vec::with_capacity(count);
    for tensor in &header.tensors {
        names.push(PyString::new(py, &tensor.name));
        let kind = dtypes
            .entry(tensor.dtype)
            .or_insert_with(|| PyString::intern(py, tensor.dtype.name()));
        kinds.push(kind.clone());
        shapes.push(PyTuple::new(py, &tensor.shape)?);
        sizes.push(tensor.end - tensor.begin);
    }
    let metadata = match &header.metadata {
        Some(pairs) => {
            let dict = PyDict::new(py);
            for (key, value) in pairs {
                dict.set_item(key, value)?;
            }
            dict.into_any()
        }
        None => py.None().into_bound(py),
    };
    PyTuple::new(
        py,
        [
            PyList::new(py, names)?.into_any(),
            PyList::new(py, kinds)?.into_any(),
            PyList::new(py, shapes)?.into_any(),
            PyList::new(py, sizes)?.into_any(),
            metadata,
            header.file_len.into_pyobject(py)?.into_any(),
        ],
    )
}

/// The thread count asked for, else one per core; at least one.
pub(crate) fn threads_or_cores(threads: Option<usize>) -> usize {
    threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
        .max(1)
}

/// Reads the headers of `paths` (never the tensor data) on `threads` threads (default: one
/// per core) with the GIL released. Returns one tuple per path, in order:
/// (names in file order, dtypes, shapes, byte sizes, metadata dict or None, file size).
/// Raises OSError (FileNotFoundError, ...) for a file that cannot be read and ValueError for a
/// malformed one, naming the file; the first failing path in `paths` wins.
#[pyfunction]
#[pyo3(signature = (paths, threads=None))]
pub fn read_headers<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyList>> {
    let threads = threads_or_cores(threads);
    let mut dtypes = HashMap::new();
    let out = PyList::empty(py);
    // A few files per thread at a time, then back to Python to see a pending Ctrl-C: a scan of
    // thousands of shards stays interruptible (each read is bounded: regular files only, at most
    // 8 + 100,000,000 bytes).
    for chunk in paths.chunks(threads * 4) {
        let results = py.detach(|| safetensors::read_headers(chunk, threads));
        for (path, result) in chunk.iter().zip(results) {
            let header = result.map_err(|error| header_error(path, error))?;
            out.append(header_to_python(py, &header, &mut dtypes)?)?;
        }
        py.check_signals()?;
    }
    Ok(out)
}
