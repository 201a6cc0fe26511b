//! safetensors headers, read and validated without touching tensor data. No Python types here.
//!
//! A file is an 8-byte little-endian header length N, N bytes of JSON, then the data buffer.
//! The checks are those of the reference implementation (the `safetensors` crate), so that a file
//! accepted here is one `safetensors` loads: N at most 100,000,000 and inside the file; a JSON
//! object; each tensor with a known dtype, a shape of non-negative integers and `data_offsets`
//! whose length matches dtype x shape; the tensors, in offset order, cover the data buffer
//! exactly; `__metadata__`, if present, maps strings to strings. Duplicate names are refused (the
//! reference keeps the last one silently).
//!
//! Files are untrusted: only regular files are read (a FIFO or a device is refused before a
//! byte is read, and opening one never blocks), at most 8 + 100,000,000 bytes of each, and no
//! error message quotes the file's bytes (a header length that is refused is not shown: it would
//! be the first 8 bytes of whatever file a path pointed at).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// The reference implementation's limit on the JSON header.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

macro_rules! dtypes {
    ($($name:ident = $bits:expr),* $(,)?) => {
        /// Element types, as the reference implementation names them.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
        pub enum Dtype { $($name),* }

        impl Dtype {
            pub fn bits(self) -> u64 {
                match self { $(Dtype::$name => $bits),* }
            }
            pub fn name(self) -> &'static str {
                match self { $(Dtype::$name => stringify!($name)),* }
            }
            pub const ALL: &'static [Dtype] = &[$(Dtype::$name),*];
        }
    };
}

dtypes! {
    BOOL = 8, F4 = 4, F6_E2M3 = 6, F6_E3M2 = 6, U8 = 8, I8 = 8, F8_E5M2 = 8, F8_E4M3 = 8,
    F8_E8M0 = 8, F8_E4M3FNUZ = 8, F8_E5M2FNUZ = 8, I16 = 16, U16 = 16, F16 = 16, BF16 = 16,
    I32 = 32, U32 = 32, F32 = 32, C64 = 64, F64 = 64, I64 = 64, U64 = 64,
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

/// `__metadata__`, sorted by key.
pub type Metadata = Vec<(String, String)>;

/// A validated header: tensors in file (offset) order and the optional metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub tensors: Vec<Tensor>,
    pub metadata: Option<Metadata>,
    pub header_len: u64,
    pub file_len: u64,
}

/// Why a file's header could not be read.
#[derive(Debug)]
pub enum HeaderError {
    /// The file could not be opened or read.
    Io(io::Error),
    /// The content is not a valid safetensors header: the message says what is wrong.
    Invalid(String),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Io(error) => write!(f, "{error}"),
            HeaderError::Invalid(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for HeaderError {}

impl From<io::Error> for HeaderError {
    fn from(error: io::Error) -> Self {
        HeaderError::Io(error)
    }
}

fn invalid(message: impl Into<String>) -> HeaderError {
    HeaderError::Invalid(message.into())
}

/// Unknown fields are ignored, as the reference ignores them.
#[derive(Deserialize)]
struct Entry {
    dtype: Dtype,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

struct Parsed {
    tensors: Vec<Tensor>,
    metadata: Option<Metadata>,
}

/// Reads the top-level object in order, refusing duplicate names, with errors that name the
/// entry they concern.
struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = Parsed;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object mapping tensor names to their dtype, shape and data_offsets")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        let mut tensors = Vec::with_capacity(map.size_hint().unwrap_or(0));
        let mut metadata = None;
        let mut seen: HashSet<String> = HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if !seen.insert(name.clone()) {
                return Err(de::Error::custom(format!("duplicate entry {name:?}")));
            }
            if name == "__metadata__" {
                // `null` is no metadata, as the reference reads it (an `Option`).
                let values: Option<HashMap<String, String>> = map.next_value().map_err(|e| {
                    de::Error::custom(format!("__metadata__ must map strings to strings ({e})"))
                })?;
                metadata = values.map(|values| {
                    let mut values: Vec<(String, String)> = values.into_iter().collect();
                    values.sort();
                    values
                });
                continue;
            }
            let entry: Entry = map
                .next_value()
                .map_err(|e| de::Error::custom(format!("tensor {name:?}: {e}")))?;
            tensors.push(Tensor {
                name,
                dtype: entry.dtype,
                shape: entry.shape,
                begin: entry.data_offsets.0,
                end: entry.data_offsets.1,
            });
        }
        Ok(Parsed { tensors, metadata })
    }
}

impl<'de> Deserialize<'de> for Parsed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(HeaderVisitor)
    }
}

/// Parses and validates a header's JSON, given the length of the data buffer after it.
pub fn parse_header(
    json: &[u8],
    data_len: u64,
) -> Result<(Vec<Tensor>, Option<Metadata>), HeaderError> {
    let text =
        std::str::from_utf8(json).map_err(|e| invalid(format!("the header is not UTF-8 ({e})")))?;
    let parsed: Parsed =
        serde_json::from_str(text).map_err(|e| invalid(format!("invalid header JSON: {e}")))?;
    let mut tensors = parsed.tensors;
    tensors.sort_by_key(|tensor| (tensor.begin, tensor.end));
    let mut expected_begin = 0u64;
    for tensor in &tensors {
        let name = &tensor.name;
        if tensor.end < tensor.begin {
            return Err(invalid(format!(
                "tensor {name:?}: data_offsets [{}, {}] end before they begin",
                tensor.begin, tensor.end
            )));
        }
        if tensor.end > data_len {
            return Err(invalid(format!(
                "tensor {name:?}: data_offsets [{}, {}] lie outside the data buffer of {data_len} bytes",
                tensor.begin, tensor.end
            )));
        }
        if tensor.begin != expected_begin {
            return Err(invalid(format!(
                "tensor {name:?}: data_offsets [{}, {}] leave a gap or overlap (the previous tensor ends at {expected_begin})",
                tensor.begin, tensor.end
            )));
        }
        let bits = tensor
            .shape
            .iter()
            .try_fold(tensor.dtype.bits(), |acc, &dim| acc.checked_mul(dim))
            .ok_or_else(|| {
                invalid(format!(
                    "tensor {name:?}: shape {:?} overflows",
                    tensor.shape
                ))
            })?;
        if bits % 8 != 0 {
            return Err(invalid(format!(
                "tensor {name:?}: {} x {:?} does not fill whole bytes",
                tensor.dtype.name(),
                tensor.shape
            )));
        }
        if tensor.end - tensor.begin != bits / 8 {
            return Err(invalid(format!(
                "tensor {name:?}: data_offsets [{}, {}] hold {} bytes but {} x {:?} needs {}",
                tensor.begin,
                tensor.end,
                tensor.end - tensor.begin,
                tensor.dtype.name(),
                tensor.shape,
                bits / 8
            )));
        }
        expected_begin = tensor.end;
    }
    if expected_begin != data_len {
        return Err(invalid(format!(
            "the tensors cover {expected_begin} bytes of a data buffer of {data_len} bytes"
        )));
    }
    Ok((tensors, parsed.metadata))
}

/// Opens `path` for reading only if it is a regular file. The open itself never blocks: with
/// O_NONBLOCK a FIFO opens at once (and is then refused by its type), so a hostile path cannot
/// hang the reader where Ctrl-C cannot reach it; reads from a regular file ignore the flag.
pub fn open_regular(path: &Path) -> Result<File, HeaderError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    options.custom_flags(libc::O_NONBLOCK);
    let file = options.open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_dir() {
        #[cfg(unix)]
        return Err(HeaderError::Io(io::Error::from_raw_os_error(libc::EISDIR)));
        #[cfg(not(unix))]
        return Err(invalid("a directory, not a file"));
    }
    if !kind.is_file() {
        return Err(invalid(
            "not a regular file (a FIFO, socket or device); only regular files are read",
        ));
    }
    Ok(file)
}

/// Reads exactly `buffer.len()` bytes; a file that ends sooner changed after its size was taken.
fn read_all(file: &mut File, buffer: &mut [u8]) -> Result<(), HeaderError> {
    file.read_exact(buffer).map_err(|error| {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            invalid("the file ended inside its header: it changed while being read")
        } else {
            HeaderError::Io(error)
        }
    })
}

/// Reads and validates the header of one file, reading nothing past it.
pub fn read_header(path: &Path) -> Result<Header, HeaderError> {
    let mut file = open_regular(path)?;
    let file_len = file.metadata()?.len();
    let mut length = [0u8; 8];
    if file_len < 8 {
        return Err(invalid(format!(
            "the file has {file_len} bytes, fewer than the 8 of the header length"
        )));
    }
    read_all(&mut file, &mut length)?;
    // The length is never shown: it is the file's first 8 bytes, whatever the file is.
    let header_len = u64::from_le_bytes(length);
    if header_len > MAX_HEADER_LEN {
        return Err(invalid(format!(
            "the header length exceeds the limit of {MAX_HEADER_LEN} bytes"
        )));
    }
    if header_len > file_len - 8 {
        return Err(invalid(format!(
            "the header length runs past the end of the file ({file_len} bytes)"
        )));
    }
    let mut json =
        vec![0u8; usize::try_from(header_len).map_err(|_| invalid("header length too large"))?];
    read_all(&mut file, &mut json)?;
    let (tensors, metadata) = parse_header(&json, file_len - 8 - header_len)?;
    Ok(Header {
        tensors,
        metadata,
        header_len,
        file_len,
    })
}

/// Reads many headers on up to `threads` threads; results in the order of `paths`.
pub fn read_headers(paths: &[PathBuf], threads: usize) -> Vec<Result<Header, HeaderError>> {
    for_each_file(paths, threads, read_header)
}

/// `read` applied to each of `paths` on up to `threads` scoped threads (contiguous chunks);
/// results in the order of `paths`. Shared by the header and the value readers.
pub fn for_each_file<T: Send>(
    paths: &[PathBuf],
    threads: usize,
    read: fn(&Path) -> Result<T, HeaderError>,
) -> Vec<Result<T, HeaderError>> {
    let threads = threads.clamp(1, paths.len().max(1));
    if threads == 1 {
        return paths.iter().map(|path| read(path)).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = paths
            .chunks(chunk)
            .map(|part| {
                (
                    part,
                    scope.spawn(move || part.iter().map(|path| read(path)).collect::<Vec<_>>()),
                )
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|(part, worker)| {
                // A panicking worker would be a bug here; its files are reported, not lost.
                worker.join().unwrap_or_else(|_| {
                    part.iter()
                        .map(|_| Err(invalid("internal error while reading the file")))
                        .collect()
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> Vec<u8> {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        bytes
    }

    fn parse(json: &str, data: u64) -> Result<Vec<Tensor>, String> {
        parse_header(json.as_bytes(), data)
            .map(|(t, _)| t)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn reads_tensors_in_offset_order_with_metadata() {
        let json = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let (tensors, metadata) = parse_header(json.as_bytes(), 8).expect("valid");
        let names: Vec<_> = tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(metadata, Some(vec![("format".into(), "pt".into())]));
        assert_eq!(tensors[1].dtype, Dtype::F16);
    }

    #[test]
    fn malformed_headers_are_errors_naming_the_problem() {
        let cases = [
            ("[1, 2]", "invalid header JSON"),
            ("{", "invalid header JSON"),
            (
                r#"{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}"#,
                "unknown variant",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                "tensor \"a\"",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                "needs 8",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}"#,
                "outside the data buffer",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                "end before they begin",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                "duplicate entry",
            ),
            (
                r#"{"__metadata__":{"a":1}}"#,
                "__metadata__ must map strings to strings",
            ),
            (
                r#"{"a":{"dtype":"F4","shape":[1],"data_offsets":[0,0]}}"#,
                "whole bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
                "overflows",
            ),
        ];
        for (json, expected) in cases {
            let error = parse(json, 4).expect_err(json);
            assert!(error.contains(expected), "{json}: {error}");
        }
        // As the reference: unknown fields ignored, an entry may be the array of its fields,
        // `__metadata__` may be null.
        for json in [
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":[1]}}"#,
            r#"{"a":["F32",[1],[0,4]],"__metadata__":null}"#,
        ] {
            assert_eq!(parse(json, 4).expect(json).len(), 1);
        }
        assert!(parse(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            8
        )
        .expect_err("gap at the end")
        .contains("cover 4 bytes"));
    }

    #[test]
    fn reads_files_and_refuses_bad_lengths() {
        let dir = std::env::temp_dir().join(format!("fastkeys-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("good.safetensors");
        std::fs::write(
            &good,
            file(
                r#"{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#,
                3,
            ),
        )
        .expect("write");
        let header = read_header(&good).expect("valid file");
        assert_eq!(header.tensors.len(), 1);
        let huge = dir.join("huge.safetensors");
        std::fs::write(&huge, u64::MAX.to_le_bytes()).expect("write");
        assert!(read_header(&huge)
            .expect_err("huge")
            .to_string()
            .contains("exceeds the limit"));
        let past = dir.join("past.safetensors");
        std::fs::write(&past, 1000u64.to_le_bytes()).expect("write");
        assert!(read_header(&past)
            .expect_err("past")
            .to_string()
            .contains("runs past the end"));
        let short = dir.join("short.safetensors");
        std::fs::write(&short, b"abc").expect("write");
        assert!(read_header(&short)
            .expect_err("short")
            .to_string()
            .contains("fewer than the 8"));
        assert!(matches!(
            read_header(&dir.join("absent")),
            Err(HeaderError::Io(_))
        ));
        let all = read_headers(&[good.clone(), huge, good], 2);
        assert_eq!(all.len(), 3);
        assert!(all[0].is_ok() && all[1].is_err() && all[2].is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }
}
