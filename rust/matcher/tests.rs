//! The matcher's unit tests, case by case (the proptest sweep is in fuzz.rs).

use super::*;

fn matcher(prefixes: &[&str], adapters: Option<&[&str]>) -> Matcher {
    build(prefixes, &[], adapters, &[], &[])
}

fn build(
    prefixes: &[&str],
    exact: &[&str],
    adapters: Option<&[&str]>,
    shared: &[&str],
    ignore: &[&str],
) -> Matcher {
    rooted("base_model", prefixes, exact, adapters, shared, ignore)
}

fn rooted(
    root: &str,
    prefixes: &[&str],
    exact: &[&str],
    adapters: Option<&[&str]>,
    shared: &[&str],
    ignore: &[&str],
) -> Matcher {
    Matcher::new(
        prefixes.iter().map(|p| p.as_bytes()),
        exact.iter().map(|p| p.as_bytes()),
        adapters.map(|names| names.iter().map(|n| n.as_bytes()).collect()),
        shared.iter().map(|p| p.as_bytes()),
        root.as_bytes(),
        ignore,
    )
    .expect("valid matcher")
}

fn hits(m: &Matcher, key: &str) -> bool {
    m.classify(key.as_bytes(), || Some(key.into())) != Verdict::Miss
}

#[test]
fn adapter_name_must_be_the_whole_next_segment() {
    let m = matcher(&["lora_"], Some(&["foo"]));
    assert!(hits(&m, "base_model.model.q.lora_A.foo.weight"));
    assert!(hits(&m, "q.lora_embedding_A.foo"));
    assert!(!hits(&m, "base_model.model.q.lora_A.foobar.weight"));
    assert!(!hits(&m, "base_model.model.q.lora_A.fo.weight"));
    assert!(!hits(&m, "q.lora_A"));
}

#[test]
fn prefix_must_start_a_segment() {
    let m = matcher(&["lora_", "oft_"], None);
    assert!(!hits(&m, "q.randlora_lambda.default"));
    assert!(!hits(&m, "q.poly_lora_A.default"));
    assert!(!hits(&m, "q.boft_R.default"));
    assert!(hits(&m, "q.oft_R.default.weight"));
    assert!(hits(&m, "lora_A.default"));
}

#[test]
fn a_foreign_occurrence_does_not_hide_a_real_one() {
    // `oft_` occurs inside `boft_` first, then at a real segment start.
    let m = matcher(&["oft_"], Some(&["a"]));
    assert!(hits(&m, "x.boft_R.a.oft_R.a"));
    assert!(!hits(&m, "x.boft_R.a.y"));
}

#[test]
fn exact_names_fill_their_segment() {
    let m = build(&[], &["vera_A"], Some(&["default"]), &[], &[]);
    assert!(hits(&m, "base_model.vera_A.default"));
    assert!(!hits(&m, "base_model.vera_AB.default"));
}

#[test]
fn shared_segments_below_the_model_level_are_copies() {
    let m = build(
        &["vblora_"],
        &["vera_A"],
        Some(&["default"]),
        &["vera_A", "vblora_vector_bank"],
        &[],
    );
    assert!(hits(&m, "base_model.vera_A.default"));
    assert!(hits(&m, "vera_A.default"));
    assert!(!hits(&m, "base_model.model.q.vera_A.default"));
    assert!(!hits(&m, "model.vera_A.default"));
    assert!(hits(&m, "base_model.vblora_vector_bank.default"));
    assert!(!hits(&m, "base_model.model.q.vblora_vector_bank.default"));
    assert!(hits(&m, "base_model.model.q.vblora_logits_A.default"));
}

#[test]
fn the_model_level_follows_the_root_given() {
    for adapters in [
        &["default"][..],
        &["default", "a", "b", "c", "d", "e", "f", "g", "h"],
    ] {
        let m = rooted(
            "tuner",
            &["vblora_"],
            &["vera_A"],
            Some(adapters),
            &["vera_A", "vblora_vector_bank"],
            &[],
        );
        assert!(hits(&m, "tuner.vera_A.default"));
        assert!(hits(&m, "vera_A.default"));
        assert!(!hits(&m, "tuner.model.q.vera_A.default"));
        assert!(hits(&m, "tuner.vblora_vector_bank.default"));
        assert!(hits(&m, "tuner.model.q.vblora_logits_A.default"));
        // `base_model` is nothing special under another root.
        assert!(!hits(&m, "base_model.vera_A.default"));
        assert!(!hits(&m, "base_model.vblora_vector_bank.default"));
        // The root is a whole segment: neither a longer nor a shorter first segment is it.
        assert!(!hits(&m, "tuners.vera_A.default"));
        assert!(!hits(&m, "tune.vera_A.default"));
        assert!(!hits(&m, "x.tuner.vera_A.default"));
    }
    // Not shared, a segment qualifies at any depth, under any root.
    let m = rooted("tuner", &["lora_"], &[], Some(&["default"]), &[], &[]);
    assert!(hits(&m, "tuner.model.q.lora_A.default.weight"));
    assert!(hits(&m, "base_model.model.q.lora_A.default.weight"));
}

#[test]
fn the_root_is_one_segment() {
    let err = |root: &[u8]| {
        Matcher::new(
            [b"lora_".as_slice()],
            std::iter::empty(),
            None,
            std::iter::empty(),
            root,
            &[],
        )
        .err()
    };
    for bad in [&b""[..], b"base_model.model", b"."] {
        assert!(
            matches!(err(bad), Some(BuildError::BadName { what: "root", .. })),
            "{bad:?}"
        );
    }
    assert_eq!(
        err(b"").map(|e| e.to_string()).as_deref(),
        Some("root: names must not be empty")
    );
    assert!(err("ä\u{1F600}".as_bytes()).is_none());
    // Checked before everything else.
    let both = Matcher::new(
        [b"".as_slice()],
        std::iter::empty(),
        None,
        std::iter::empty(),
        b"a.b",
        &[],
    );
    assert!(matches!(
        both.err(),
        Some(BuildError::BadName { what: "root", .. })
    ));
}

#[test]
fn group_returns_the_adapter_index() {
    let m = matcher(&["lora_"], Some(&["a", "b"]));
    assert_eq!(m.classify(b"q.lora_A.b.weight", || None), Verdict::Named(1));
    assert_eq!(m.classify(b"q.lora_A.a.weight", || None), Verdict::Named(0));
    let any = matcher(&["lora_"], None);
    assert_eq!(
        any.classify(b"q.lora_A.zz.weight", || None),
        Verdict::Any(b"zz")
    );
}

#[test]
fn ignore_drops_matching_keys_only_after_a_match() {
    let m = build(
        &["lora_"],
        &[],
        Some(&["default"]),
        &[],
        &["embed_tokens", r"^x\."],
    );
    assert!(!hits(&m, "m.embed_tokens.lora_A.default"));
    assert!(!hits(&m, "x.lora_A.default"));
    assert!(hits(&m, "m.q.lora_A.default"));
    let mut asked = false;
    m.classify(b"m.q.weight", || {
        asked = true;
        None
    });
    assert!(!asked, "text is only needed for matched keys");
}

#[test]
fn bad_names_are_errors() {
    let err = |prefixes: &[&str], adapters: &[&str]| {
        Matcher::new(
            prefixes.iter().map(|p| p.as_bytes()),
            std::iter::empty(),
            Some(adapters.iter().map(|a| a.as_bytes()).collect()),
            std::iter::empty(),
            b"base_model",
            &[],
        )
        .err()
    };
    assert!(matches!(
        err(&[""], &["a"]),
        Some(BuildError::BadName {
            what: "prefixes",
            ..
        })
    ));
    assert!(matches!(
        err(&["a.b"], &["a"]),
        Some(BuildError::BadName {
            what: "prefixes",
            ..
        })
    ));
    assert!(matches!(
        err(&["a"], &["x.y"]),
        Some(BuildError::BadName {
            what: "adapter_names",
            ..
        })
    ));
    let bad = Matcher::new(
        std::iter::empty(),
        std::iter::empty(),
        None,
        std::iter::empty(),
        b"base_model",
        &["(?=x)"],
    );
    assert!(matches!(bad.err(), Some(BuildError::BadIgnore { .. })));
}

#[test]
fn both_strategies_agree() {
    let few = ["default", "default_1", "model"];
    let many: Vec<String> = few
        .iter()
        .map(|s| s.to_string())
        .chain((0..20).map(|i| format!("pad{i}")))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(many.len() > NAME_FIRST_LIMIT);
    let keys = [
        "base_model.model.q.lora_A.default.weight",
        "base_model.model.q.lora_A.default_10.weight",
        "base_model.model.q.lora_A.default_1.weight",
        "lora_A.model",
        "x.boft_R.default.lora_B.model",
        "base_model.vera_A.default",
        "base_model.model.q.vera_A.default",
        "base_model.model.vera_AB.default",
        "vera_A.default_1.lora_A.default",
        ".default",
        "lora_.default.",
    ];
    let prefixes = ["lora_", "vera_lambda_"];
    let exact = ["vera_A", "vera_AB"];
    let shared = ["vera_A"];
    let name_first = build(&prefixes, &exact, Some(&few), &shared, &[]);
    let prefix_first = build(&prefixes, &exact, Some(&many), &shared, &[]);
    assert!(matches!(name_first.strategy, Strategy::NameFirst { .. }));
    assert!(matches!(
        prefix_first.strategy,
        Strategy::PrefixFirst { .. }
    ));
    for key in keys {
        assert_eq!(
            name_first.classify(key.as_bytes(), || None),
            prefix_first.classify(key.as_bytes(), || None),
            "{key}"
        );
    }
    assert_eq!(
        prefix_first.classify(b"base_model.model.vera_AB.default", || None),
        Verdict::Named(0)
    );
    // Two matches: the last one (`lora_A.default`) decides, under both strategies.
    assert_eq!(
        name_first.classify(b"vera_A.default_1.lora_A.default", || None),
        Verdict::Named(0)
    );
}

#[test]
fn wtf8_surrogates_become_one_replacement_each() {
    // "a\ud800b" encoded with surrogatepass.
    assert_eq!(wtf8_lossy(b"a\xed\xa0\x80b"), "a\u{FFFD}b");
    assert_eq!(wtf8_lossy(b"plain"), "plain");
    // Truncated input never comes from Python; it must still decode without panicking.
    assert!(wtf8_lossy(b"\xed\xa0").starts_with(char::REPLACEMENT_CHARACTER));
}

#[test]
fn surrogate_bytes_compare_as_bytes() {
    let name = b"a\xed\xa0\x80";
    let m = Matcher::new(
        [b"lora_".as_slice()],
        std::iter::empty(),
        Some(vec![name.as_slice()]),
        std::iter::empty(),
        b"base_model",
        &[],
    )
    .expect("valid");
    assert_eq!(
        m.classify(b"q.lora_A.a\xed\xa0\x80.w", || None),
        Verdict::Named(0)
    );
    assert_eq!(
        m.classify(b"q.lora_A.a\xed\xa0\x81.w", || None),
        Verdict::Miss
    );
}
