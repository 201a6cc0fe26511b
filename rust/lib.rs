//! fastkeys: which state-dict keys matter when PEFT adapters are loaded.
//!
//! `matcher` holds the segment rule over bytes and is usable (and tested) without Python; `py`
//! is the PyO3 edge, compiled only with the `python` feature that maturin turns on.

pub mod matcher;
pub mod rename;
pub mod safetensors;
pub mod values;

#[cfg(test)]
mod fuzz;

#[cfg(feature = "python")]
mod py;
#[cfg(feature = "python")]
mod py_headers;
#[cfg(feature = "python")]
mod py_regex;
#[cfg(feature = "python")]
mod py_values;

#[cfg(feature = "python")]
#[pyo3::pymodule(gil_used = false)]
mod _native {
    #[pymodule_export]
    use super::py::PyKeyMatcher;
    #[pymodule_export]
    use super::py_headers::read_headers;
    #[pymodule_export]
    use super::py_regex::PyRegex;
    #[pymodule_export]
    use super::py_values::read_values;
}
