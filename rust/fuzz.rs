//! Property tests (proptest): the header parser and the matcher never panic on any input, and
//! the matcher agrees with a direct reading of the rule. `cargo test` runs a short round;
//! `make fuzz` runs many more cases (PROPTEST_CASES).

use proptest::collection::vec;
use proptest::prelude::*;

use crate::matcher::{Matcher, Verdict};
use crate::rename;
use crate::safetensors::{parse_header, read_header, Dtype};

/// The rule as the fallback reads it: split on dots, walk the segments (from the right: the
/// last match wins).
fn reference(
    key: &[u8],
    prefixes: &[Vec<u8>],
    exact: &[Vec<u8>],
    names: &[Vec<u8>],
    shared: &[Vec<u8>],
    root: &[u8],
) -> Option<usize> {
    let segments: Vec<&[u8]> = key.split(|&b| b == b'.').collect();
    for i in (0..segments.len().saturating_sub(1)).rev() {
        let segment = segments[i];
        let qualifies =
            prefixes.iter().any(|p| segment.starts_with(p)) || exact.iter().any(|e| e == segment);
        if !qualifies {
            continue;
        }
        let model_level = i == 0 || (i == 1 && segments[0] == root);
        if !model_level && shared.iter().any(|s| s == segment) {
            continue;
        }
        if let Some(index) = names.iter().position(|n| n == segments[i + 1]) {
            return Some(index);
        }
    }
    None
}

fn word() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"lora_".to_vec()),
        Just(b"lora_A".to_vec()),
        Just(b"default".to_vec()),
        Just(b"default_1".to_vec()),
        Just(b"vera_A".to_vec()),
        Just(b"base_model".to_vec()),
        Just("ä".as_bytes().to_vec()),
        vec(prop::sample::select(b"alo_rdA1".to_vec()), 0..6),
    ]
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    word().prop_filter("names are non-empty", |w| !w.is_empty())
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    vec(word(), 1..8).prop_map(|parts| parts.join(&b'.'))
}

fn build(
    prefixes: &[Vec<u8>],
    exact: &[Vec<u8>],
    names: &[Vec<u8>],
    shared: &[Vec<u8>],
    root: &[u8],
) -> Matcher {
    let built = Matcher::new(
        prefixes.iter().map(Vec::as_slice),
        exact.iter().map(Vec::as_slice),
        Some(names.iter().map(Vec::as_slice).collect()),
        shared.iter().map(Vec::as_slice),
        root,
        &[],
    );
    match built {
        Ok(matcher) => matcher,
        Err(error) => panic!("valid names were refused: {error}"),
    }
}

proptest! {
    #[test]
    fn header_parser_never_panics(bytes in vec(any::<u8>(), 0..600), data_len in 0u64..1 << 20) {
        let _ = parse_header(&bytes, data_len);
    }

    #[test]
    fn structured_headers_are_accepted_only_when_consistent(
        entries in vec((
            "[a-z.]{0,6}",
            prop::sample::select(vec!["F32", "F16", "U8", "F4", "BOOL", "X9"]),
            vec(0u64..5, 0..3),
            (0u64..64, 0u64..64),
        ), 0..6),
        data_len in 0u64..64,
    ) {
        let mut json = String::from("{");
        for (i, (name, dtype, shape, (begin, end))) in entries.iter().enumerate() {
            if i > 0 { json.push(','); }
            json.push_str(&format!("\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{begin},{end}]}}"));
        }
        json.push('}');
        if let Ok((tensors, _)) = parse_header(json.as_bytes(), data_len) {
            let mut at = 0;
            for tensor in &tensors {
                prop_assert_eq!(tensor.begin, at);
                let bits: u64 = tensor.shape.iter().product::<u64>() * tensor.dtype.bits();
                prop_assert_eq!((tensor.end - tensor.begin) * 8, bits);
                at = tensor.end;
            }
            prop_assert_eq!(at, data_len);
            prop_assert!(Dtype::ALL.contains(&tensors.first().map_or(Dtype::F32, |t| t.dtype)));
        }
    }

    #[test]
    fn files_with_any_bytes_never_panic(bytes in vec(any::<u8>(), 0..64), length in any::<u64>()) {
        let dir = std::env::temp_dir().join(format!("fastkeys-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let path = dir.join("x.safetensors");
        let mut content = length.to_le_bytes().to_vec();
        content.extend_from_slice(&bytes);
        if std::fs::write(&path, &content).is_ok() {
            let _ = read_header(&path);
        }
    }

    #[test]
    fn matcher_agrees_with_the_rule_under_both_strategies(
        keys in vec(key(), 0..20),
        prefixes in vec(name(), 0..3),
        exact in vec(name(), 0..2),
        names in vec(name(), 1..4),
        shared in vec(name(), 0..2),
        root in name(),
    ) {
        let clean = |v: &[Vec<u8>]| -> Vec<Vec<u8>> { v.iter().filter(|w| !w.contains(&b'.')).cloned().collect() };
        let (prefixes, exact, names, shared) = (clean(&prefixes), clean(&exact), clean(&names), clean(&shared));
        prop_assume!(!names.is_empty());
        let mut padded = names.clone();
        padded.extend((0..10).map(|i| format!("pad{i}.x").replace('.', "_").into_bytes()));
        // The root is drawn from the keys' words (`base_model` among them), so keys start with it.
        let name_first = build(&prefixes, &exact, &names, &shared, &root);
        let prefix_first = build(&prefixes, &exact, &padded, &shared, &root);
        for key in &keys {
            let expected = reference(key, &prefixes, &exact, &names, &shared, &root);
            // Repeated names keep the index of their first occurrence.
            let expected = expected.map(|i| names.iter().position(|n| *n == names[i]).unwrap_or(i));
            let got = match name_first.classify(key, || None) { Verdict::Named(i) => Some(i), _ => None };
            prop_assert_eq!(got, expected, "name-first on {:?}", String::from_utf8_lossy(key));
            let got = match prefix_first.classify(key, || None) { Verdict::Named(i) => Some(i), _ => None };
            prop_assert_eq!(got.map(|i| padded.iter().position(|n| *n == padded[i]).unwrap_or(i)), expected);
            let mut out = Vec::new();
            let renames = rename::Renames::new(
                [b"modules_to_save".as_slice()],
                [(b"lora_magnitude_vector".as_slice(), b"weight".as_slice())],
            ).expect("valid");
            rename::insert_adapter_name(&name_first, &renames, key, &names[0], &mut out);
            if rename::remove_adapter_name(&name_first, &renames, key, &mut out) {
                prop_assert!(out.len() < key.len());
            }
        }
    }
}
