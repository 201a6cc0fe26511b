//! Between checkpoint keys and model keys: inserting and removing the adapter name. No Python
//! types here.
//!
//! A checkpoint key (`L.lora_A.weight`) is the model key (`L.lora_A.default.weight`) without the
//! adapter name. Both directions use the matcher's segment rule, so a module whose name contains
//! a prefix, a tensor name or the adapter name is never touched by accident.

use crate::matcher::Matcher;

/// DoRA's magnitude is saved as `L.lora_magnitude_vector` but lives at
/// `L.lora_magnitude_vector.<name>.weight` in the model (PEFT's LoRA remaps it both ways).
const DORA_MAGNITUDE: &[u8] = b"lora_magnitude_vector";
/// `M.modules_to_save.<name>.weight` in the model is saved as `M.weight`.
const MODULES_TO_SAVE: &[u8] = b"modules_to_save";

/// The model key of a checkpoint key, written into `out` (a buffer the caller reuses): the
/// adapter name goes after the segment that holds the adapter tensor, which is the last or the
/// second-to-last one (`L.lora_embedding_A`, `L.lora_A.weight`, `base_model.tinylora_v.0`).
/// False, with `out` untouched, when no such segment qualifies: the key is not an adapter tensor
/// and stays as it is.
pub fn insert_adapter_name(matcher: &Matcher, key: &[u8], name: &[u8], out: &mut Vec<u8>) -> bool {
    let last_dot = memchr::memrchr(b'.', key);
    let last = (last_dot.map_or(0, |dot| dot + 1), key.len());
    let second = last_dot.map(|dot| (memchr::memrchr(b'.', &key[..dot]).map_or(0, |p| p + 1), dot));
    let Some((start, end)) = std::iter::once(last).chain(second).find(|&(start, end)| {
        matcher.segment_qualifies(key, start, end) && &key[start..end] != MODULES_TO_SAVE
    }) else {
        return false;
    };
    out.clear();
    out.extend_from_slice(&key[..end]);
    out.push(b'.');
    out.extend_from_slice(name);
    if end == key.len() && &key[start..end] == DORA_MAGNITUDE {
        out.extend_from_slice(b".weight");
    }
    out.extend_from_slice(&key[end..]);
    true
}

/// The checkpoint key of a model key, written into `out`: the (last) match of the rule loses its
/// adapter-name segment (and `modules_to_save` with it; DoRA's `.weight` too). False when
/// nothing matches.
pub fn remove_adapter_name(matcher: &Matcher, key: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(hit) = matcher.find(key) else {
        return false;
    };
    let segment = &key[hit.segment.clone()];
    let (cut_from, cut_to) = if segment == MODULES_TO_SAVE && hit.adapter.end < key.len() {
        (hit.segment.start, hit.adapter.end + 1)
    } else if segment == MODULES_TO_SAVE {
        (hit.segment.start.saturating_sub(1), key.len())
    } else if segment == DORA_MAGNITUDE && &key[hit.adapter.end..] == b".weight" {
        (hit.adapter.start - 1, key.len())
    } else {
        (hit.adapter.start - 1, hit.adapter.end)
    };
    out.clear();
    out.extend_from_slice(&key[..cut_from]);
    out.extend_from_slice(&key[cut_to..]);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(name: &str) -> Matcher {
        Matcher::new(
            [b"lora_".as_slice(), b"tinylora_", b"vera_lambda_"],
            [
                b"vera_A".as_slice(),
                b"modules_to_save",
                b"trainable_tokens_delta",
            ],
            Some(vec![name.as_bytes()]),
            std::iter::empty(),
            &[],
        )
        .expect("valid")
    }

    fn insert(key: &str, name: &str) -> String {
        let mut out = Vec::new();
        let changed =
            insert_adapter_name(&matcher(name), key.as_bytes(), name.as_bytes(), &mut out);
        if changed {
            String::from_utf8(out).expect("utf8")
        } else {
            key.to_owned()
        }
    }

    fn remove(key: &str, name: &str) -> String {
        let mut out = Vec::new();
        let changed = remove_adapter_name(&matcher(name), key.as_bytes(), &mut out);
        if changed {
            String::from_utf8(out).expect("utf8")
        } else {
            key.to_owned()
        }
    }

    #[test]
    fn insert_after_the_tensor_segment() {
        let cases = [
            ("m.q.lora_A.weight", "m.q.lora_A.default.weight"),
            ("m.q.lora_embedding_A", "m.q.lora_embedding_A.default"),
            (
                "m.q.lora_magnitude_vector",
                "m.q.lora_magnitude_vector.default.weight",
            ),
            ("base_model.tinylora_v.0", "base_model.tinylora_v.default.0"),
            ("base_model.vera_A", "base_model.vera_A.default"),
            (
                "m.embed.token_adapter.trainable_tokens_delta",
                "m.embed.token_adapter.trainable_tokens_delta.default",
            ),
            ("m.q.base_layer.weight", "m.q.base_layer.weight"),
            // Modules named like a prefix or like the adapter are left alone.
            (
                "m.lora_block.q.lora_A.weight",
                "m.lora_block.q.lora_A.default.weight",
            ),
            (
                "m.default.q.lora_B.weight",
                "m.default.q.lora_B.default.weight",
            ),
            ("lora_A", "lora_A.default"),
            ("weight", "weight"),
        ];
        for (key, expected) in cases {
            assert_eq!(insert(key, "default"), expected, "{key}");
        }
    }

    #[test]
    fn remove_is_the_inverse() {
        let cases = [
            ("m.q.lora_A.default.weight", "m.q.lora_A.weight"),
            ("m.q.lora_embedding_A.default", "m.q.lora_embedding_A"),
            (
                "m.q.lora_magnitude_vector.default.weight",
                "m.q.lora_magnitude_vector",
            ),
            ("base_model.tinylora_v.default.0", "base_model.tinylora_v.0"),
            ("m.score.modules_to_save.default.weight", "m.score.weight"),
            ("m.score.modules_to_save.default", "m.score"),
            (
                "m.default.q.lora_A.default.weight",
                "m.default.q.lora_A.weight",
            ),
            ("m.q.lora_A.other.weight", "m.q.lora_A.other.weight"),
            ("m.q.base_layer.weight", "m.q.base_layer.weight"),
        ];
        for (key, expected) in cases {
            assert_eq!(remove(key, "default"), expected, "{key}");
            if !key.contains("modules_to_save") && key != expected {
                assert_eq!(insert(expected, "default"), key, "round trip of {key}");
            }
        }
    }
}
