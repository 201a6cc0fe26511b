//! Between checkpoint keys and model keys: inserting and removing the adapter name. No Python
//! types here.
//!
//! A checkpoint key (`L.lora_A.weight`) is the model key (`L.lora_A.default.weight`) without the
//! adapter name. Both directions use the matcher's segment rule, so a module whose name contains
//! a prefix, a tensor name or the adapter name is never touched by accident.

use crate::matcher::{check_names, BuildError, Matcher};

/// A name within one segment, owned.
type Name = Box<[u8]>;

/// The key rewrites a PEFT method's save and load perform beyond the adapter name, as data
/// (`fastkeys.tuners` owns them; see each method's record there).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Renames {
    /// Segments that wrap a whole module copy: `M.modules_to_save.<name>.weight` in the model is
    /// saved as `M.weight`, so the segment goes together with the name.
    wrappers: Vec<Name>,
    /// (segment, parameter): the model holds `L.<segment>.<name>.<parameter>` where the
    /// checkpoint holds `L.<segment>` (DoRA's `lora_magnitude_vector` and `weight`).
    suffixes: Vec<(Name, Name)>,
}

impl Renames {
    pub fn new<'a>(
        wrappers: impl IntoIterator<Item = &'a [u8]>,
        suffixes: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, BuildError> {
        let (segments, parameters): (Vec<&[u8]>, Vec<&[u8]>) = suffixes.into_iter().unzip();
        Ok(Renames {
            wrappers: check_names("wrappers", wrappers)?,
            suffixes: check_names("suffixes", segments)?
                .into_iter()
                .zip(check_names("suffixes", parameters)?)
                .collect(),
        })
    }

    fn is_wrapper(&self, segment: &[u8]) -> bool {
        self.wrappers.iter().any(|wrapper| **wrapper == *segment)
    }

    fn suffix_of(&self, segment: &[u8]) -> Option<&[u8]> {
        self.suffixes
            .iter()
            .find(|(name, _)| **name == *segment)
            .map(|(_, parameter)| &**parameter)
    }
}

/// The model key of a checkpoint key, written into `out` (a buffer the caller reuses): the
/// adapter name goes after the segment that holds the adapter tensor, which is the last or the
/// second-to-last one (`L.lora_embedding_A`, `L.lora_A.weight`, `base_model.tinylora_v.0`).
/// False, with `out` untouched, when no such segment qualifies: the key is not an adapter tensor
/// and stays as it is. A wrapper segment never takes the name: its checkpoint keys do not show it.
pub fn insert_adapter_name(
    matcher: &Matcher,
    renames: &Renames,
    key: &[u8],
    name: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    let Some((start, end)) = tensor_segment(matcher, renames, key) else {
        return false;
    };
    out.clear();
    out.extend_from_slice(&key[..end]);
    out.push(b'.');
    out.extend_from_slice(name);
    if end == key.len() {
        if let Some(parameter) = renames.suffix_of(&key[start..end]) {
            out.push(b'.');
            out.extend_from_slice(parameter);
        }
    }
    out.extend_from_slice(&key[end..]);
    true
}

/// The byte span of the segment a checkpoint key's adapter name goes after (the segment that holds
/// the adapter tensor: the last or the second-to-last one), or None when the key is not an
/// adapter tensor. A wrapper segment never qualifies: its checkpoint keys do not show it.
pub fn tensor_segment(matcher: &Matcher, renames: &Renames, key: &[u8]) -> Option<(usize, usize)> {
    let last_dot = memchr::memrchr(b'.', key);
    let last = (last_dot.map_or(0, |dot| dot + 1), key.len());
    let second = last_dot.map(|dot| (memchr::memrchr(b'.', &key[..dot]).map_or(0, |p| p + 1), dot));
    std::iter::once(last).chain(second).find(|&(start, end)| {
        matcher.segment_qualifies(key, start, end) && !renames.is_wrapper(&key[start..end])
    })
}

/// The checkpoint key of a model key, written into `out`: the (last) match of the rule loses its
/// adapter-name segment (a wrapper segment with it; a suffixed segment's parameter too). False
/// when nothing matches.
pub fn remove_adapter_name(
    matcher: &Matcher,
    renames: &Renames,
    key: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    let Some(hit) = matcher.find(key) else {
        return false;
    };
    let segment = &key[hit.segment.clone()];
    let tail = &key[hit.adapter.end..];
    let (cut_from, cut_to) = if renames.is_wrapper(segment) && hit.adapter.end < key.len() {
        (hit.segment.start, hit.adapter.end + 1)
    } else if renames.is_wrapper(segment) {
        (hit.segment.start.saturating_sub(1), key.len())
    } else if renames.suffix_of(segment).is_some_and(|parameter| {
        tail.len() == parameter.len() + 1 && tail.ends_with(parameter) && tail[0] == b'.'
    }) {
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
            b"base_model",
            &[],
        )
        .expect("valid")
    }

    fn renames() -> Renames {
        Renames::new(
            [b"modules_to_save".as_slice()],
            [(b"lora_magnitude_vector".as_slice(), b"weight".as_slice())],
        )
        .expect("valid")
    }

    fn insert(key: &str, name: &str) -> String {
        let mut out = Vec::new();
        let changed = insert_adapter_name(
            &matcher(name),
            &renames(),
            key.as_bytes(),
            name.as_bytes(),
            &mut out,
        );
        if changed {
            String::from_utf8(out).expect("utf8")
        } else {
            key.to_owned()
        }
    }

    fn remove(key: &str, name: &str) -> String {
        let mut out = Vec::new();
        let changed = remove_adapter_name(&matcher(name), &renames(), key.as_bytes(), &mut out);
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
    fn the_tensor_segment_is_where_the_name_goes() {
        let (m, r) = (matcher("default"), renames());
        let span = |key: &str| tensor_segment(&m, &r, key.as_bytes());
        assert_eq!(span("model.q_proj.lora_A.weight"), Some((13, 19)));
        assert_eq!(span("model.q_proj.lora_embedding_A"), Some((13, 29)));
        assert_eq!(span("model.q_proj.weight"), None);
        assert_eq!(span("lm_head.modules_to_save.weight"), None);
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

    #[test]
    fn renames_are_data() {
        let key = b"m.q.lora_magnitude_vector";
        let mut out = Vec::new();
        // Without the suffix rule the magnitude is an ordinary tensor segment.
        assert!(insert_adapter_name(
            &matcher("x"),
            &Renames::default(),
            key,
            b"x",
            &mut out
        ));
        assert_eq!(out, b"m.q.lora_magnitude_vector.x");
        // Without the wrapper rule only the name goes.
        let wrapped = b"m.score.modules_to_save.x.weight";
        assert!(remove_adapter_name(
            &matcher("x"),
            &Renames::default(),
            wrapped,
            &mut out
        ));
        assert_eq!(out, b"m.score.modules_to_save.weight");
        // A suffix whose parameter is not the key's tail leaves the tail alone.
        assert_eq!(
            remove("m.q.lora_magnitude_vector.default.bias", "default"),
            "m.q.lora_magnitude_vector.bias"
        );
        assert_eq!(
            remove("m.q.lora_magnitude_vector.default.xweight", "default"),
            "m.q.lora_magnitude_vector.xweight"
        );
    }

    #[test]
    fn bad_rename_names_are_errors() {
        let dotted = Renames::new([b"a.b".as_slice()], []).unwrap_err();
        assert_eq!(
            dotted.to_string(),
            "wrappers: \"a.b\" contains a dot; a name must lie within one segment"
        );
        let empty = Renames::new([], [(b"magnitude".as_slice(), b"".as_slice())]).unwrap_err();
        assert_eq!(empty.to_string(), "suffixes: names must not be empty");
    }
}
