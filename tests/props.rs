//! Property tests (proptest) for everything that reads untrusted text: the config parser, and
//! the SKU, quantity, user id and path extraction on the request path. None may panic, and
//! each accepts exactly what it documents. Case counts are bounded so `cargo test` stays fast;
//! raise them with `PROPTEST_CASES=100000 cargo test --release --test props`.

use std::time::Duration;

use flashgate::canonical::{PathPolicy, canonicalize, fold, match_form};
use flashgate::config::{Identity, IdentitySource, Normalize};
use flashgate::ids::{MAX_SKU_LEN, Sku};
use flashgate::reject::Reject;
use flashgate::sale::parse_quantity;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

/// The documented example config: every mutation starts from it.
const EXAMPLE: &str = include_str!("../config/flashgate.yaml");
const FILE: &str = "props.yaml";

/// 256 cases per property, or `PROPTEST_CASES`.
fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    ProptestConfig::with_cases(n)
}

/// Parses `text`; an error must name the file first (`props.yaml:line:col: …` or
/// `props.yaml: …`), and a config that parses must also compile into a runnable snapshot.
fn check_config(text: &str) -> Result<(), TestCaseError> {
    match flashgate::config::parse(text, FILE) {
        Ok(cfg) => {
            let snapshot =
                flashgate::state::Snapshot::build(cfg, None, &flashgate::metrics::Metrics::new());
            prop_assert!(snapshot.routes.len() <= 1 + text.matches("name:").count());
        }
        Err(e) => {
            let shown = e.to_string();
            prop_assert!(
                shown.starts_with(&format!("{FILE}:")),
                "error does not start with the file: {shown:?}"
            );
            prop_assert!(!e.message.is_empty(), "empty message: {shown:?}");
        }
    }
    Ok(())
}

/// Values that stress a YAML scalar: numbers out of range, negative, zero, durations and sizes
/// written wrong, YAML tags and anchors, flow collections, unicode, nothing at all.
fn odd_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("~".to_owned()),
        Just("0".to_owned()),
        Just("-1".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("4294967296".to_owned()),
        Just("1e309".to_owned()),
        Just(".nan".to_owned()),
        Just("0ms".to_owned()),
        Just("5 years".to_owned()),
        Just("-3s".to_owned()),
        Just("1KiB".to_owned()),
        Just("16EiB".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("[1, [2, {3: 4}]]".to_owned()),
        Just("!!binary aGVsbG8=".to_owned()),
        Just("&a 1".to_owned()),
        Just("*a".to_owned()),
        Just("'unterminated".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        Just("\"/{sku}/{sku}\"".to_owned()),
        Just("\"/{*rest}/x\"".to_owned()),
        Just("\"\"".to_owned()),
        Just("\u{1F600}".to_owned()),
        Just("300.0.0.1:99999".to_owned()),
        Just("http://".to_owned()),
        Just("[connect_error, 99999]".to_owned()),
        "[ -~]{0,24}",
    ]
}

proptest! {
    #![proptest_config(cases())]

    /// Random bytes overwritten anywhere in the example config.
    #[test]
    fn config_with_flipped_bytes_never_panics(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
    ) {
        let mut bytes = EXAMPLE.as_bytes().to_vec();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        check_config(&String::from_utf8_lossy(&bytes))?;
    }

    /// The example config cut off anywhere (a half-written file).
    #[test]
    fn truncated_config_never_panics(at in any::<prop::sample::Index>()) {
        let mut end = at.index(EXAMPLE.len() + 1);
        while !EXAMPLE.is_char_boundary(end) {
            end -= 1;
        }
        check_config(&EXAMPLE[..end])?;
    }

    /// The value of some `key: value` line replaced by an odd value.
    #[test]
    fn config_with_odd_values_never_panics(
        picks in prop::collection::vec((any::<prop::sample::Index>(), odd_value()), 1..4)
    ) {
        let mut lines: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
        let keyed: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.trim_start().starts_with('#') && l.contains(": "))
            .map(|(i, _)| i)
            .collect();
        for (at, value) in picks {
            let i = keyed[at.index(keyed.len())];
            let key = lines[i].split(": ").next().unwrap().to_owned();
            lines[i] = format!("{key}: {value}");
        }
        check_config(&lines.join("\n"))?;
    }

    /// Lines of the example config dropped or repeated (missing or duplicate keys).
    #[test]
    fn config_with_lines_dropped_or_repeated_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 1..4)
    ) {
        let mut lines: Vec<&str> = EXAMPLE.lines().collect();
        for (at, repeat) in edits {
            let i = at.index(lines.len());
            if repeat {
                lines.insert(i, lines[i]);
            } else if lines.len() > 1 {
                lines.remove(i);
            }
        }
        check_config(&lines.join("\n"))?;
    }

    /// Any text at all.
    #[test]
    fn arbitrary_text_as_config_never_panics(text in "\\PC{0,200}") {
        check_config(&text)?;
    }
}

/// A YAML alias bomb ("billion laughs") is refused quickly instead of expanded.
#[test]
fn yaml_alias_bomb_is_refused_quickly() {
    let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        doc.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(
            flashgate::config::parse(&doc, FILE)
                .map(drop)
                .map_err(|e| e.to_string()),
        );
    });
    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the parser is still expanding an alias bomb after 10 s");
    let err = result.expect_err("an alias bomb is not a config");
    assert!(err.starts_with(&format!("{FILE}:")), "{err}");
}

// ---------------------------------------------------------------------------
// SKU and quantity

/// What `Sku::parse` documents: 1 to 128 letters, digits, '.', '_' or '-'.
fn sku_is_valid(s: &str) -> bool {
    (1..=MAX_SKU_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn sku_validation_accepts_exactly_the_documented_alphabet(
        sku in prop_oneof![
            "[A-Za-z0-9._-]{0,140}",
            "[A-Za-z0-9._-]{1,8}[^A-Za-z0-9._-][A-Za-z0-9._-]{0,8}",
            "\\PC{0,40}",
            any::<String>(),
        ]
    ) {
        let parsed = Sku::parse(&sku);
        prop_assert_eq!(parsed.is_ok(), sku_is_valid(&sku), "{:?}", sku);
        match parsed {
            Ok(parsed) => prop_assert_eq!(parsed.as_str(), sku.as_str()),
            Err(e) => prop_assert_eq!(Reject::from(e).reason(), "bad_request"),
        }
    }

    /// Every whole number from 1 to the limit is accepted (surrounding spaces allowed), and
    /// nothing else: not 0, not negatives, not past the limit, not decimals or words.
    #[test]
    fn quantity_accepts_exactly_1_to_the_limit(
        n in any::<i64>(),
        limit in 0u32..=1000,
        pad in "[ \t]{0,2}",
    ) {
        let raw = format!("{pad}{n}{pad}");
        let got = parse_quantity(&raw, limit);
        if (1..=i64::from(limit)).contains(&n) {
            prop_assert_eq!(got.unwrap(), n as u32);
        } else {
            prop_assert_eq!(got.unwrap_err().reason(), "bad_request");
        }
    }

    #[test]
    fn quantity_in_range_always_parses(limit in 1u32..=u32::MAX, pick in any::<prop::sample::Index>()) {
        let n = 1 + pick.index(limit as usize) as u32;
        prop_assert_eq!(parse_quantity(&n.to_string(), limit).unwrap(), n);
    }

    /// Arbitrary text: never a panic; accepted only if it is a whole number in range.
    #[test]
    fn quantity_from_arbitrary_text(raw in prop_oneof!["[-+0-9 .eEx]{0,24}", any::<String>()], limit in any::<u32>()) {
        if let Ok(q) = parse_quantity(&raw, limit) {
            prop_assert!(q >= 1 && q <= limit);
            let digits = raw.trim().trim_start_matches('+').trim_start_matches('0');
            prop_assert_eq!(digits, q.to_string(), "{:?}", raw);
        }
    }
}

// ---------------------------------------------------------------------------
// User id

fn identity(source: IdentitySource, max_length: usize) -> Identity {
    Identity {
        source,
        max_length,
        normalize: Normalize::None,
    }
}

/// Header value bytes a client can put on the wire: visible ASCII, space, tab and obs-text.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(
            prop_oneof![Just(b' '), Just(b'\t'), 0x21u8..=0x7e, 0x80u8..=0xff],
            0..40
        ),
        "[ -~]{0,40}".prop_map(String::into_bytes),
        "\\PC{0,20}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(cases())]

    /// A header user id is accepted exactly when it is UTF-8, not blank, at most `max_length`
    /// bytes once trimmed, and free of control characters; blank is 401, the rest 400.
    #[test]
    fn header_user_id_accepts_exactly_what_it_documents(
        raw in header_bytes(),
        max_length in 1usize..48,
    ) {
        let Ok(value) = HeaderValue::from_bytes(&raw) else {
            return Ok(());
        };
        let id = identity(IdentitySource::Header(HeaderName::from_static("x-user-id")), max_length);
        let mut headers = HeaderMap::new();
        headers.insert("x-user-id", value);
        let got = flashgate::identity::user_id(&id, &headers);
        let expected: Result<&str, &str> = match std::str::from_utf8(&raw) {
            Err(_) => Err("bad_request"),
            Ok(s) if s.trim().is_empty() => Err("unauthenticated"),
            Ok(s) if s.trim() != s => Err("bad_request"),
            Ok(s) if s.trim().len() > max_length => Err("bad_request"),
            Ok(s) if s.trim().chars().any(char::is_control) => Err("bad_request"),
            Ok(s) => Ok(s.trim()),
        };
        match (got, expected) {
            (Ok(u), Ok(e)) => prop_assert_eq!(u, e),
            (Err(r), Err(e)) => prop_assert_eq!(r.reason(), e),
            (got, expected) => prop_assert!(false, "{:?}: got {:?}, expected {:?}", raw, got.map_err(|r| r.reason()), expected),
        }
    }

    /// No header at all is 401, whatever the other headers say.
    #[test]
    fn missing_user_id_is_401(other in "[a-z]{1,10}", value in "[ -~]{0,20}") {
        let id = identity(IdentitySource::Header(HeaderName::from_static("x-user-id")), 64);
        let mut headers = HeaderMap::new();
        if other != "x-user-id"
            && let (Ok(name), Ok(v)) = (HeaderName::from_bytes(other.as_bytes()), HeaderValue::from_str(&value))
        {
            headers.insert(name, v);
        }
        prop_assert_eq!(flashgate::identity::user_id(&id, &headers).unwrap_err().reason(), "unauthenticated");
    }

    /// A cookie user id: never a panic; when accepted it is the trimmed value of the one
    /// `uid=` pair, neither quoted nor percent-encoded, non-empty, within `max_length`, free of control characters.
    #[test]
    fn cookie_user_id_never_panics(raw in header_bytes(), uid in "[ -~&&[^;=]]{0,20}") {
        let id = identity(IdentitySource::Cookie("uid".into()), 16);
        for cookie in [raw.clone(), format!("a=b; uid={uid}; c=d").into_bytes()] {
            let Ok(value) = HeaderValue::from_bytes(&cookie) else { continue };
            let mut headers = HeaderMap::new();
            headers.insert(http::header::COOKIE, value);
            if let Ok(user) = flashgate::identity::user_id(&id, &headers) {
                let user = user.as_str();
                prop_assert!(!user.is_empty() && user.len() <= 16);
                prop_assert!(!user.chars().any(char::is_control));
                prop_assert_eq!(user, user.trim());
            }
        }
        let cookie = format!("a=b; uid={uid}; c=d");
        let mut headers = HeaderMap::new();
        headers.insert(http::header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        let want = uid.trim();
        match flashgate::identity::user_id(&id, &headers) {
            Ok(user) => prop_assert_eq!(user.as_str(), want),
            Err(r) if want.is_empty() => prop_assert_eq!(r.reason(), "unauthenticated"),
            Err(r) => {
                // Too long, or spelled in a way cookie parsers read differently.
                let ambiguous = want.starts_with('"') || want.contains('%');
                prop_assert!(want.len() > 16 || ambiguous, "{:?} refused: {}", want, r.reason());
                prop_assert_eq!(r.reason(), "bad_request");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Route path normalization

/// Clean paths: `/seg/seg…`, each segment of unreserved characters other than `.` segments.
fn clean_path() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,6}", 0..6)
        .prop_map(|segs| format!("/{}", segs.join("/")))
}

/// Rewrites `path` into a variant a backend would treat as the same resource: percent-encode
/// some unreserved characters, double some slashes, add `./` and `x/../` segments, a trailing
/// slash.
fn variant(path: &str, choices: &[u8]) -> String {
    let mut out = String::new();
    let mut c = choices.iter().cycle();
    for seg in path.split('/').skip(1) {
        out.push('/');
        match c.next().unwrap() % 4 {
            0 => out.push('/'),
            1 => out.push_str("./"),
            2 => out.push_str("zz/../"),
            _ => {}
        }
        for ch in seg.chars() {
            if c.next().unwrap().is_multiple_of(3) {
                out.push_str(&format!("%{:02X}", ch as u32));
            } else {
                out.push(ch);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    if c.next().unwrap().is_multiple_of(2) && !out.ends_with('/') {
        out.push('/');
    }
    out
}

/// The form a path is matched on, or `None` when it is refused.
fn normalize(path: &str) -> Option<String> {
    canonicalize(path, &PathPolicy::default())
        .ok()
        .map(|c| match_form(&c).to_owned())
}

/// What a normalized path looks like: rooted, no empty, `.` or `..` segment, no trailing
/// slash (except the root itself).
fn is_canonical(p: &str) -> bool {
    p.starts_with('/')
        && (p == "/"
            || p[1..]
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != ".."))
}

proptest! {
    #![proptest_config(cases())]

    /// Every variant of a path normalizes to that path: a sale route cannot be dodged by
    /// spelling its path another way.
    #[test]
    fn variants_of_a_path_normalize_to_it(
        path in clean_path(),
        choices in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let v = variant(&path, &choices);
        let (same, of_variant) = (normalize(&path), normalize(&v));
        prop_assert_eq!(same.as_deref(), Some(path.as_str()));
        prop_assert_eq!(of_variant.as_deref(), Some(path.as_str()), "variant {:?}", v);
    }

    /// Any path: never a panic, always canonical.
    #[test]
    fn any_path_normalizes_to_a_canonical_one(
        rest in prop_oneof!["[/.%a-zA-Z0-9]{0,40}", "[/.%2eEfF5]{0,30}", "\\PC{0,30}"]
    ) {
        let path = format!("/{rest}");
        if let Ok(c) = canonicalize(&path, &PathPolicy::default()) {
            prop_assert!(is_canonical(match_form(&c)), "{:?} -> {:?}", path, c);
            // The forwarded form is already canonical: a second pass changes nothing.
            let again = canonicalize(&c, &PathPolicy::default());
            prop_assert_eq!(again.as_deref().ok(), Some(c.as_ref()), "{:?}", path);
            // Folding is stable too: what the fence compares is a fixed point.
            let f = fold(&c);
            prop_assert_eq!(fold(&f), f.clone(), "{:?}", path);
        }
}
}
