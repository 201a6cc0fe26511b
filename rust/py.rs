//! PyO3 edges of the matcher: `str` objects in, the caller's own `str` objects out.
//!
//! Keys are read through `PyUnicode_AsUTF8AndSize`, which hands out the string's own UTF-8
//! buffer (for ASCII strings, its data; otherwise a cache kept by the string), so no key text is
//! copied. Strings holding lone surrogates have no UTF-8 form; they are encoded once with
//! `surrogatepass` and matched on those bytes, which gives the fallback's answer.

use std::borrow::Cow;
use std::collections::HashMap;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::matcher::{wtf8_lossy, BuildError, Matcher, Verdict};
use crate::rename::{self, Renames};

/// The compiled engine behind `fastkeys.KeyMatcher`. Arguments arrive validated by the Python
/// layer (`fastkeys._validate`); the core checks them again and never panics on bad ones.
#[pyclass(module = "fastkeys._native", name = "KeyMatcher", subclass, frozen)]
pub struct PyKeyMatcher {
    matcher: Matcher,
    renames: Renames,
    /// The adapter names as given, reused as the keys of `group`'s dict.
    adapter_names: Option<Vec<Py<PyString>>>,
}

/// A key's bytes: borrowed from the string when it has a UTF-8 form, else WTF-8 in a bytes
/// object we own for the duration of the check.
enum KeyBytes<'a, 'py> {
    Utf8(&'a str),
    Wtf8(Bound<'py, PyBytes>),
}

impl<'a, 'py> KeyBytes<'a, 'py> {
    fn of(key: &'a Bound<'py, PyString>) -> PyResult<Self> {
        match key.to_str() {
            Ok(text) => Ok(KeyBytes::Utf8(text)),
            Err(_) => {
                // `str.encode`, not the key's own method: a subclass cannot intervene.
                let encode = key.py().get_type::<PyString>().getattr("encode")?;
                let encoded = encode.call1((key, "utf-8", "surrogatepass"))?;
                Ok(KeyBytes::Wtf8(encoded.cast_into::<PyBytes>()?))
            }
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            KeyBytes::Utf8(text) => text.as_bytes(),
            KeyBytes::Wtf8(bytes) => bytes.as_bytes(),
        }
    }

    fn text(&self) -> Cow<'_, str> {
        match self {
            KeyBytes::Utf8(text) => Cow::Borrowed(text),
            KeyBytes::Wtf8(bytes) => Cow::Owned(wtf8_lossy(bytes.as_bytes())),
        }
    }
}

/// A str from UTF-8, or from WTF-8 when it carries lone surrogates.
fn string_from_wtf8<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(PyString::new(py, text).into_any()),
        Err(_) => PyBytes::new(py, bytes).call_method1("decode", ("utf-8", "surrogatepass")),
    }
}

fn name_bytes<'a, 'py>(
    what: &str,
    names: &'a [Bound<'py, PyString>],
) -> PyResult<Vec<KeyBytes<'a, 'py>>> {
    names
        .iter()
        .map(KeyBytes::of)
        .collect::<PyResult<Vec<_>>>()
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

/// Calls `visit` with each key of `keys` (a list, a tuple or any iterable of str) and its index;
/// a non-str element is a TypeError naming its index and type. Errors raised by the iterable
/// itself propagate unchanged.
fn for_each_key<'py>(
    keys: &Bound<'py, PyAny>,
    mut visit: impl FnMut(&Bound<'py, PyString>) -> PyResult<()>,
) -> PyResult<()> {
    let mut check = |index: usize, item: Bound<'py, PyAny>| -> PyResult<()> {
        // The exact-type test is a pointer comparison; the general one an FFI call per key.
        match item
            .cast_exact::<PyString>()
            .or_else(|_| item.cast::<PyString>())
        {
            Ok(key) => visit(key),
            Err(_) => Err(PyTypeError::new_err(format!(
                "keys[{index}] must be str, not {}",
                item.get_type().name()?
            ))),
        }
    };
    if let Ok(list) = keys.cast::<PyList>() {
        // Index-based: a list cannot change under us while we hold the GIL and run no Python
        // code, and `get_item` re-checks the length anyway.
        let mut index = 0;
        while let Ok(item) = list.get_item(index) {
            check(index, item)?;
            index += 1;
        }
        Ok(())
    } else if let Ok(tuple) = keys.cast::<PyTuple>() {
        for (index, item) in tuple.iter().enumerate() {
            check(index, item)?;
        }
        Ok(())
    } else if keys.is_instance_of::<PyString>() || keys.is_instance_of::<PyBytes>() {
        Err(PyTypeError::new_err(format!(
            "keys must be an iterable of str, not a single {}",
            keys.get_type().name()?
        )))
    } else {
        let iterator = keys.try_iter().map_err(|_| {
            PyTypeError::new_err(match keys.get_type().name() {
                Ok(name) => format!("keys must be an iterable of str, not {name}"),
                Err(_) => "keys must be an iterable of str".to_owned(),
            })
        })?;
        for (index, item) in iterator.enumerate() {
            check(index, item?)?;
        }
        Ok(())
    }
}

/// The message for a root that is not one segment, the fallback's (`engine/pure/matcher.py`).
fn root_error(root: &Bound<'_, PyString>) -> PyResult<String> {
    // The repr of the string value: a subclass's own `__repr__` is not asked, as for keys.
    let plain = string_from_wtf8(root.py(), KeyBytes::of(root)?.bytes())?;
    Ok(format!(
        "root must be one segment, non-empty and without a dot, not {}",
        plain.repr()?
    ))
}

impl PyKeyMatcher {
    fn rename<'py>(
        &self,
        keys: &Bound<'py, PyAny>,
        renamed: impl Fn(&[u8], &mut Vec<u8>) -> bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let py = keys.py();
        let out = PyList::empty(py);
        let mut buffer = Vec::with_capacity(256);
        for_each_key(keys, |key| {
            let bytes = KeyBytes::of(key)?;
            if renamed(bytes.bytes(), &mut buffer) {
                out.append(string_from_wtf8(py, &buffer)?)
            } else {
                out.append(key)
            }
        })?;
        Ok(out)
    }

    fn classify<'k>(&self, key: &'k KeyBytes<'_, '_>) -> Verdict<'k> {
        self.matcher.classify(key.bytes(), || Some(key.text()))
    }
}

#[pymethods]
impl PyKeyMatcher {
    #[new]
    #[pyo3(signature = (prefixes, adapter_names, exact, shared, root, ignore, wrappers, suffixes))]
    #[allow(clippy::too_many_arguments)] // the Python constructor's arguments, one by one
    fn new(
        prefixes: Vec<Bound<'_, PyString>>,
        adapter_names: Option<Vec<Bound<'_, PyString>>>,
        exact: Vec<Bound<'_, PyString>>,
        shared: Vec<Bound<'_, PyString>>,
        root: Bound<'_, PyAny>,
        ignore: Vec<String>,
        wrappers: Vec<Bound<'_, PyString>>,
        suffixes: Vec<(Bound<'_, PyString>, Bound<'_, PyString>)>,
    ) -> PyResult<Self> {
        // Checked by hand, for the fallback's message: not str is a TypeError, and a bad value
        // (the core's check) a ValueError showing it as Python's repr does.
        let root = match root.cast_into::<PyString>() {
            Ok(root) => root,
            Err(error) => {
                let kind = error.into_inner().get_type().name()?;
                return Err(PyTypeError::new_err(format!(
                    "root must be str, not {kind}"
                )));
            }
        };
        let root_bytes = KeyBytes::of(&root)?;
        let prefix_bytes = name_bytes("prefixes", &prefixes)?;
        let exact_bytes = name_bytes("exact", &exact)?;
        let shared_bytes = name_bytes("shared", &shared)?;
        let adapter_bytes = adapter_names
            .as_deref()
            .map(|n| name_bytes("adapter_names", n))
            .transpose()?;
        let ignore: Vec<&str> = ignore.iter().map(String::as_str).collect();
        let matcher = Matcher::new(
            prefix_bytes.iter().map(KeyBytes::bytes),
            exact_bytes.iter().map(KeyBytes::bytes),
            adapter_bytes
                .as_ref()
                .map(|names| names.iter().map(KeyBytes::bytes).collect()),
            shared_bytes.iter().map(KeyBytes::bytes),
            root_bytes.bytes(),
            &ignore,
        )
        .map_err(|e| match e {
            BuildError::BadName { what: "root", .. } => match root_error(&root) {
                Ok(message) => PyValueError::new_err(message),
                Err(error) => error,
            },
            e => PyValueError::new_err(e.to_string()),
        })?;
        let wrapper_bytes = name_bytes("wrappers", &wrappers)?;
        let (segments, parameters): (Vec<_>, Vec<_>) = suffixes.into_iter().unzip();
        let segment_bytes = name_bytes("suffixes", &segments)?;
        let parameter_bytes = name_bytes("suffixes", &parameters)?;
        let renames = Renames::new(
            wrapper_bytes.iter().map(KeyBytes::bytes),
            segment_bytes
                .iter()
                .map(KeyBytes::bytes)
                .zip(parameter_bytes.iter().map(KeyBytes::bytes)),
        )
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let adapter_names =
            adapter_names.map(|names| names.into_iter().map(Bound::unbind).collect());
        Ok(PyKeyMatcher {
            matcher,
            renames,
            adapter_names,
        })
    }

    /// The keys that name an adapter tensor, in input order, as the caller's own objects.
    fn filter<'py>(&self, keys: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(keys.py());
        for_each_key(keys, |key| {
            let bytes = KeyBytes::of(key)?;
            if self.classify(&bytes) != Verdict::Miss {
                out.append(key)?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The matching keys per adapter name. With named adapters every name is present, in the
    /// order given, with an empty list when nothing matched it.
    fn group<'py>(&self, keys: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let py = keys.py();
        let groups = PyDict::new(py);
        match &self.adapter_names {
            Some(names) => {
                let lists: Vec<Bound<'py, PyList>> =
                    names.iter().map(|_| PyList::empty(py)).collect();
                for (name, list) in names.iter().zip(&lists) {
                    // A repeated name keeps the list of its first occurrence.
                    if !groups.contains(name)? {
                        groups.set_item(name, list)?;
                    }
                }
                for_each_key(keys, |key| {
                    let bytes = KeyBytes::of(key)?;
                    if let Verdict::Named(index) = self.classify(&bytes) {
                        lists[index].append(key)?;
                    }
                    Ok(())
                })?;
            }
            None => {
                // One list per distinct name, found by the name's bytes so that a key costs no
                // allocation; a name is decoded once, when first seen.
                let mut lists: HashMap<Vec<u8>, Bound<'py, PyList>> = HashMap::new();
                for_each_key(keys, |key| {
                    let bytes = KeyBytes::of(key)?;
                    if let Verdict::Any(name) = self.classify(&bytes) {
                        if let Some(list) = lists.get(name) {
                            return list.append(key);
                        }
                        let list = PyList::new(py, [key])?;
                        groups.set_item(string_from_wtf8(py, name)?, &list)?;
                        lists.insert(name.to_vec(), list);
                    }
                    Ok(())
                })?;
            }
        }
        Ok(groups)
    }

    /// Checkpoint keys to model keys: `adapter_name` inserted after each adapter tensor's
    /// segment. Keys that are not adapter tensors come back as the caller's own objects.
    fn insert_adapter_name<'py>(
        &self,
        keys: &Bound<'py, PyAny>,
        adapter_name: &Bound<'py, PyString>,
    ) -> PyResult<Bound<'py, PyList>> {
        let name = KeyBytes::of(adapter_name)?;
        self.rename(keys, |key, out| {
            rename::insert_adapter_name(&self.matcher, &self.renames, key, name.bytes(), out)
        })
    }

    /// For each checkpoint key, the span (start, end), in characters, of the segment its adapter
    /// name would go after (`insert_adapter_name`), or None for a key that is not an adapter tensor.
    fn locate<'py>(&self, keys: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let py = keys.py();
        let out = PyList::empty(py);
        for_each_key(keys, |key| {
            let bytes = KeyBytes::of(key)?;
            let key = bytes.bytes();
            match rename::tensor_segment(&self.matcher, &self.renames, key) {
                Some((start, end)) => {
                    // characters, not bytes: count the bytes that start a (WTF-8) character
                    let chars =
                        |bytes: &[u8]| bytes.iter().filter(|&&b| (b & 0xC0) != 0x80).count();
                    let first = chars(&key[..start]);
                    out.append((first, first + chars(&key[start..end])))
                }
                None => out.append(py.None()),
            }
        })?;
        Ok(out)
    }

    /// Model keys to checkpoint keys: the adapter-name segment of each match removed.
    fn remove_adapter_name<'py>(&self, keys: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        self.rename(keys, |key, out| {
            rename::remove_adapter_name(&self.matcher, &self.renames, key, out)
        })
    }

    fn __repr__(&self) -> String {
        "KeyMatcher(<compiled>)".to_owned()
    }
}
