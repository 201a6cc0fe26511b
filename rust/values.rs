//! Tensor values, read only to answer two questions per tensor: is every element exactly zero,
//! and does any element hold NaN or infinity? No Python types here.
//!
//! The data buffer is streamed with plain buffered reads in fixed-size chunks (memory stays
//! bounded whatever the file size; `mmap` would need `unsafe`). The header is read and validated
//! first by `safetensors::read_header`, so offsets are known to tile the buffer exactly and every
//! tensor's byte length is a whole number of elements.

use std::io::{self, BufReader, ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::safetensors::{self, Dtype, HeaderError};

/// Bytes read at a time; a multiple of every element width (1, 2, 4, 8).
const CHUNK: usize = 1 << 20;

/// What the values of one tensor are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueFlags {
    pub name: String,
    /// Every element is zero (+0 or -0 for floating types). False for an empty tensor: it holds
    /// nothing to be zero, and `degenerate` reports it from the header.
    pub all_zero: bool,
    /// Some element is NaN or infinite (never for integer, bool, F4 and F6 types: they cannot).
    pub non_finite: bool,
}

/// How one element width of a dtype is tested, on little-endian lanes of `width` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Lanes {
    pub width: usize,
    /// Bits that must be zero for the element to be zero (the sign bit is left out of floats).
    pub value_mask: u64,
    /// The element is non-finite when `lane & nonfinite_mask == nonfinite_value`; a mask of 0
    /// means the dtype has no non-finite values.
    pub nonfinite_mask: u64,
    pub nonfinite_value: u64,
}

impl Lanes {
    const fn new(width: usize, value_mask: u64, nonfinite_mask: u64, nonfinite_value: u64) -> Self {
        Lanes {
            width,
            value_mask,
            nonfinite_mask,
            nonfinite_value,
        }
    }
}

/// The lane rule of each dtype. The float8 variants differ: E4M3 (the "fn" variant) has only NaN
/// (S.1111.111), E5M2 is IEEE-like (exponent all ones), the FNUZ variants have a single NaN 0x80
/// and no negative zero, E8M0 is an exponent alone (no zero; 0xFF is NaN). F4 (E2M1, two per
/// byte) and F6 have neither; F6 packs four elements into three bytes, so only all-zero bytes
/// count as zero there (a -0 reads as non-zero: `untrained` may be missed, never invented).
/// Complex64 is two F32 lanes.
pub fn lanes(dtype: Dtype) -> Lanes {
    match dtype {
        Dtype::F64 => Lanes::new(8, !(1 << 63), 0x7FF0 << 48, 0x7FF0 << 48),
        Dtype::F32 | Dtype::C64 => Lanes::new(4, 0x7FFF_FFFF, 0x7F80_0000, 0x7F80_0000),
        Dtype::F16 => Lanes::new(2, 0x7FFF, 0x7C00, 0x7C00),
        Dtype::BF16 => Lanes::new(2, 0x7FFF, 0x7F80, 0x7F80),
        Dtype::F8_E5M2 => Lanes::new(1, 0x7F, 0x7C, 0x7C),
        Dtype::F8_E4M3 => Lanes::new(1, 0x7F, 0x7F, 0x7F),
        Dtype::F8_E4M3FNUZ | Dtype::F8_E5M2FNUZ => Lanes::new(1, 0xFF, 0xFF, 0x80),
        Dtype::F8_E8M0 => Lanes::new(1, 0, 0xFF, 0xFF),
        Dtype::F4 => Lanes::new(1, 0x77, 0, 0),
        Dtype::BOOL
        | Dtype::U8
        | Dtype::I8
        | Dtype::F6_E2M3
        | Dtype::F6_E3M2
        | Dtype::I16
        | Dtype::U16
        | Dtype::I32
        | Dtype::U32
        | Dtype::I64
        | Dtype::U64 => Lanes::new(1, 0xFF, 0, 0),
    }
}

/// Running state of one tensor's test, fed chunk by chunk.
struct Accumulator {
    lanes: Lanes,
    /// E8M0 has no zero: its tensors are never all zero.
    zero: bool,
    non_finite: bool,
}

impl Accumulator {
    fn new(dtype: Dtype) -> Self {
        let lanes = lanes(dtype);
        Accumulator {
            lanes,
            zero: lanes.value_mask != 0,
            non_finite: false,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        if !self.zero && (self.non_finite || self.lanes.nonfinite_mask == 0) {
            return; // the answer cannot change any more
        }
        let (nonzero, non_finite) = match self.lanes.width {
            1 => scan::<1>(bytes, self.lanes),
            2 => scan::<2>(bytes, self.lanes),
            4 => scan::<4>(bytes, self.lanes),
            _ => scan::<8>(bytes, self.lanes),
        };
        self.zero &= !nonzero;
        self.non_finite |= non_finite;
    }
}

/// (some element is non-zero, some element is non-finite) over whole lanes of `N` bytes. The
/// width is a constant so that the loop is branch-free and vectorised (a per-lane `memcpy` of a
/// run-time width made it 20x slower).
fn scan<const N: usize>(bytes: &[u8], lanes: Lanes) -> (bool, bool) {
    let mut nonzero = 0u64;
    let mut non_finite = false;
    for lane in bytes.chunks_exact(N) {
        let mut word = [0u8; 8];
        word[..N].copy_from_slice(lane);
        let value = u64::from_le_bytes(word);
        nonzero |= value & lanes.value_mask;
        non_finite |= value & lanes.nonfinite_mask == lanes.nonfinite_value;
    }
    (nonzero != 0, non_finite && lanes.nonfinite_mask != 0)
}

/// The value flags of every tensor of one file, in file (offset) order, as `read_header` lists
/// them.
pub fn read_values(path: &Path) -> Result<Vec<ValueFlags>, HeaderError> {
    let header = safetensors::read_header(path)?;
    // Opened again as the header was: a path swapped for a FIFO since then is refused, not read.
    let mut file = safetensors::open_regular(path)?;
    // The file may have changed since the header was read: the reads below fail cleanly
    // (UnexpectedEof) rather than reading past what the header promised.
    file.seek(SeekFrom::Start(8 + header.header_len))?;
    let mut reader = BufReader::with_capacity(CHUNK, file);
    let mut buffer = vec![0u8; CHUNK];
    let mut flags = Vec::with_capacity(header.tensors.len());
    for tensor in &header.tensors {
        let mut accumulator = Accumulator::new(tensor.dtype);
        let mut left = tensor.end - tensor.begin;
        let empty = left == 0;
        while left > 0 {
            let take = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = &mut buffer[..take];
            reader
                .read_exact(chunk)
                .map_err(|error| match error.kind() {
                    ErrorKind::UnexpectedEof => HeaderError::Io(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the file ended before its tensor data",
                    )),
                    _ => HeaderError::Io(error),
                })?;
            accumulator.feed(chunk);
            left -= take as u64;
        }
        flags.push(ValueFlags {
            name: tensor.name.clone(),
            all_zero: accumulator.zero && !empty,
            non_finite: accumulator.non_finite,
        });
    }
    Ok(flags)
}

/// `read_values` for many files on up to `threads` threads; results in the order of `paths`.
pub fn read_many_values(
    paths: &[PathBuf],
    threads: usize,
) -> Vec<Result<Vec<ValueFlags>, HeaderError>> {
    safetensors::for_each_file(paths, threads, read_values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(dtype: Dtype, bytes: &[u8]) -> (bool, bool) {
        let mut accumulator = Accumulator::new(dtype);
        accumulator.feed(bytes);
        (accumulator.zero, accumulator.non_finite)
    }

    #[test]
    fn floats_zero_ignores_the_sign_and_finds_nan_and_inf() {
        let f32s = |values: &[f32]| {
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        };
        assert_eq!(flags(Dtype::F32, &f32s(&[0.0, -0.0])), (true, false));
        assert_eq!(flags(Dtype::F32, &f32s(&[0.0, 1e-40])), (false, false));
        assert_eq!(flags(Dtype::F32, &f32s(&[0.0, f32::NAN])), (false, true));
        assert_eq!(
            flags(Dtype::F32, &f32s(&[f32::NEG_INFINITY])),
            (false, true)
        );
        assert_eq!(flags(Dtype::F32, &f32s(&[f32::MAX])), (false, false));
        let f64s: Vec<u8> = [0.0f64, -f64::INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(flags(Dtype::F64, &f64s), (false, true));
        assert_eq!(flags(Dtype::F16, &[0x00, 0x80, 0x00, 0x7C]), (false, true)); // -0, +inf
        assert_eq!(flags(Dtype::F16, &[0x00, 0x80, 0xFF, 0x7B]), (false, false)); // -0, max
        assert_eq!(flags(Dtype::BF16, &[0xC0, 0x7F]), (false, true)); // NaN
        assert_eq!(flags(Dtype::BF16, &[0x00, 0x80]), (true, false)); // -0
    }

    #[test]
    fn float8_variants_follow_their_own_encodings() {
        assert_eq!(flags(Dtype::F8_E4M3, &[0x7E, 0x80]), (false, false)); // 448, -0
        assert_eq!(flags(Dtype::F8_E4M3, &[0xFF]), (false, true));
        assert_eq!(flags(Dtype::F8_E4M3, &[0x80, 0x00]), (true, false));
        assert_eq!(flags(Dtype::F8_E5M2, &[0x7C]), (false, true)); // inf
        assert_eq!(flags(Dtype::F8_E5M2, &[0x7B]), (false, false));
        assert_eq!(flags(Dtype::F8_E4M3FNUZ, &[0x80]), (false, true)); // the one NaN
        assert_eq!(flags(Dtype::F8_E5M2FNUZ, &[0x7F, 0xFF]), (false, false));
        assert_eq!(flags(Dtype::F8_E8M0, &[0x00]), (false, false)); // 2^-127, not zero
        assert_eq!(flags(Dtype::F8_E8M0, &[0xFF]), (false, true));
        assert_eq!(flags(Dtype::F4, &[0x88]), (true, false)); // two -0
        assert_eq!(flags(Dtype::F4, &[0x0F]), (false, false));
        assert_eq!(flags(Dtype::I32, &[0, 0, 0, 0x80]), (false, false));
        assert_eq!(flags(Dtype::BOOL, &[0, 0]), (true, false));
    }

    #[test]
    fn reads_a_file_streaming_across_chunks() {
        let dir = std::env::temp_dir().join(format!("fastkeys-values-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let big = CHUNK + 4; // crosses a chunk boundary
        let json = format!(
            r#"{{"a":{{"dtype":"U8","shape":[{big}],"data_offsets":[0,{big}]}},"b":{{"dtype":"F32","shape":[0],"data_offsets":[{big},{big}]}},"c":{{"dtype":"F16","shape":[1],"data_offsets":[{big},{}]}}}}"#,
            big + 2
        );
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, big));
        bytes.extend_from_slice(&[0x00, 0x7E]); // F16 NaN
        let path = dir.join("v.safetensors");
        std::fs::write(&path, &bytes).expect("write");
        let found = read_values(&path).expect("valid");
        let summary: Vec<_> = found
            .iter()
            .map(|f| (f.name.as_str(), f.all_zero, f.non_finite))
            .collect();
        assert_eq!(
            summary,
            [("a", true, false), ("b", false, false), ("c", false, true)]
        );
        bytes[8 + json.len() + big - 1] = 1;
        std::fs::write(&path, &bytes).expect("write");
        assert!(!read_values(&path).expect("valid")[0].all_zero);
        let many = read_many_values(&[path.clone(), dir.join("absent"), path], 2);
        assert!(many[0].is_ok() && many[1].is_err() && many[2].is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }
}
