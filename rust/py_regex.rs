//! `fastkeys._native.Regex`: Rust's `regex` crate for expressions from users and files
//! (`target_modules`, `layers_pattern`), matched in time linear in the text whatever the
//! expression. Expressions arrive checked and written for this crate by
//! `fastkeys._patterns` (which refuses what `re` and `regex` would read differently); the
//! pure-Python mirror is `fastkeys._linear.Regex`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::matcher::wtf8_lossy;

/// Above the default (10 MB): `_patterns.MAX_SIZE` atoms of Unicode `.` must always compile,
/// so that the two implementations refuse the same expressions (by size, in Python, first).
const SIZE_LIMIT: usize = 64 << 20;

#[pyclass(module = "fastkeys._native", name = "Regex", frozen)]
pub struct PyRegex {
    regex: regex::Regex,
}

/// The text as the regex sees it: a lone surrogate (no UTF-8 form) reads as one U+FFFD, as in
/// the matcher's ignore expressions; `_patterns` refuses both in expressions.
fn text_of(text: &Bound<'_, PyString>) -> PyResult<String> {
    match text.to_str() {
        Ok(valid) => Ok(valid.to_owned()),
        Err(_) => {
            let encode = text.py().get_type::<PyString>().getattr("encode")?;
            let bytes: Vec<u8> = encode.call1((text, "utf-8", "surrogatepass"))?.extract()?;
            Ok(wtf8_lossy(&bytes))
        }
    }
}

#[pymethods]
impl PyRegex {
    #[new]
    fn new(pattern: &str) -> PyResult<Self> {
        let regex = regex::RegexBuilder::new(pattern)
            .size_limit(SIZE_LIMIT)
            .build()
            .map_err(|e| PyValueError::new_err(format!("{pattern:?}: {e}")))?;
        Ok(PyRegex { regex })
    }

    /// Whether the expression matches anywhere in `text` (`re.search`).
    fn search(&self, py: Python<'_>, text: &Bound<'_, PyString>) -> PyResult<bool> {
        let text = text_of(text)?;
        Ok(py.detach(|| self.regex.is_match(&text)))
    }

    /// Group 1 of the leftmost-first match, or None.
    fn group(&self, py: Python<'_>, text: &Bound<'_, PyString>) -> PyResult<Option<String>> {
        let text = text_of(text)?;
        Ok(py.detach(|| {
            self.regex
                .captures(&text)
                .and_then(|found| found.get(1))
                .map(|group| group.as_str().to_owned())
        }))
    }

    fn __repr__(&self) -> String {
        format!("Regex({:?})", self.regex.as_str())
    }
}
