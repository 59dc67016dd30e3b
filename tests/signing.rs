//! Signed admissions, checked the way a backend checks them: flashgate signs a real winner, and
//! the shipped verifiers (`examples/verify/verify.py`, `examples/verify/verify.go`) accept
//! exactly that request and refuse it with any signed field changed, an old `t` or an unknown
//! key id. A spoofed signature header from a client never reaches the backend.
mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use bytes::Bytes;
use flashgate::signing::{self, Admission, Key};
use http::StatusCode;
use serde_json::{Value, json};
use support::*;

const KEY_VAR: &str = "FG_TEST_SIGNING_KEY";
const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A winner as the backend saw it: its method, target and headers.
struct Seen {
    method: String,
    path: String,
    headers: serde_json::Map<String, Value>,
}

async fn signed_winner() -> Seen {
    // Only this test binary reads this variable, and it is set before flashgate starts.
    unsafe { std::env::set_var(KEY_VAR, SECRET) };
    let backend = Backend::start_echo().await;
    // A path prefix on the upstream: the signature covers the path the backend receives.
    let yaml = format!(
        "upstream: {{ url: \"{}/shop\", connect_timeout: 1s, request_timeout: 5s }}\n\
         signing: {{ key_env: {KEY_VAR}, key_id: k1 }}\n\
         routes:\n\
         \x20 - name: flash-buy\n\
         \x20   match: {{ method: POST, path: \"/api/flash/{{sku}}/buy\" }}\n\
         \x20   identity: {{ header: X-User-Id }}\n\
         \x20   sale: {{ sku: {{ path_param: sku }} }}\n",
        backend.url()
    );
    let fg = Flashgate::start(&yaml).await;
    fg.app.store.set_stock(&sku("tee"), 5).await.unwrap();
    let a = send(
        &client(),
        "POST",
        &fg.url("/api/flash/tee/buy?ref=mail"),
        &[
            ("x-user-id", "alice"),
            ("x-flashgate-signature", "t=1,kid=k1,v1=forged"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let seen = backend
        .seen()
        .pop()
        .expect("the winner reached the backend");
    let signatures = seen.headers.get_all("x-flashgate-signature").iter().count();
    assert_eq!(signatures, 1, "the client's forged header was stripped");
    let headers = seen
        .headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-flashgate-"))
        .map(|(k, v)| (k.to_string(), Value::from(v.to_str().unwrap())))
        .collect();
    Seen {
        method: seen.method.to_string(),
        path: seen.uri.to_string(),
        headers,
    }
}

fn case(seen: &Seen, change: impl FnOnce(&mut Value)) -> Value {
    let t: u64 = seen.headers["x-flashgate-signature"].as_str().unwrap()[2..]
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut c = json!({
        "headers": seen.headers,
        "method": seen.method,
        "path": seen.path,
        "keys": { "k0": "an-old-key-that-is-32-bytes-long!", "k1": SECRET },
        "now": t + 5,
    });
    change(&mut c);
    c
}

/// Every case a verifier must decide: (what, the case, accepted?).
fn cases(seen: &Seen) -> Vec<(&'static str, Value, bool)> {
    let header = |name: &'static str, value: &'static str| {
        move |c: &mut Value| c["headers"][name] = json!(value)
    };
    vec![
        ("as flashgate signed it", case(seen, |_| {}), true),
        (
            "another SKU",
            case(seen, header("x-flashgate-sku", "gold")),
            false,
        ),
        (
            "another user",
            case(seen, header("x-flashgate-user", "mallory")),
            false,
        ),
        (
            "another quantity",
            case(seen, header("x-flashgate-quantity", "3")),
            false,
        ),
        (
            "another reservation",
            case(
                seen,
                header(
                    "x-flashgate-reservation",
                    "ffffffffffffffffffffffffffffffff",
                ),
            ),
            false,
        ),
        (
            "another method",
            case(seen, |c| c["method"] = json!("PUT")),
            false,
        ),
        (
            "another path",
            case(seen, |c| {
                c["path"] = json!("/shop/api/flash/gold/buy?ref=mail")
            }),
            false,
        ),
        (
            "an old t",
            case(seen, |c| {
                c["now"] = json!(c["now"].as_u64().unwrap() + 3600)
            }),
            false,
        ),
        (
            "an unknown kid",
            case(seen, |c| c["keys"] = json!({ "k0": SECRET })),
            false,
        ),
    ]
}

fn run_verifier(program: &Path, args: &[&str], input: &Value) -> bool {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!(
            "{} failed ({other:?}): {}",
            program.display(),
            String::from_utf8_lossy(&out.stdout)
        ),
    }
}

fn check_all(name: &str, seen: &Seen, verify: impl Fn(&Value) -> bool) {
    for (what, input, accepted) in cases(seen) {
        assert_eq!(verify(&input), accepted, "{name}: {what}");
    }
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/verify")
}

#[tokio::test]
async fn real_signatures_pass_the_shipped_verifiers_and_tampering_does_not() {
    let seen = signed_winner().await;
    assert_eq!(seen.path, "/shop/api/flash/tee/buy?ref=mail");

    // flashgate's own verification (what `flashgate verify` uses).
    let keys = [Key::new("k1", SECRET.as_bytes()).unwrap()];
    check_all("rust", &seen, |c| {
        let h = |n: &str| c["headers"][n].as_str().unwrap_or("").to_owned();
        let quantity = h("x-flashgate-quantity").parse().unwrap_or(0);
        let (reservation, sku, user) = (
            h("x-flashgate-reservation"),
            h("x-flashgate-sku"),
            h("x-flashgate-user"),
        );
        let admission = Admission {
            method: c["method"].as_str().unwrap(),
            path_and_query: c["path"].as_str().unwrap(),
            reservation: &reservation,
            sku: &sku,
            user: &user,
            quantity,
        };
        let ks: Vec<Key> = keys
            .iter()
            .filter(|k| c["keys"].get(&k.id).is_some_and(|v| v == SECRET))
            .cloned()
            .collect();
        signing::verify(
            &h("x-flashgate-signature"),
            &ks,
            &admission,
            c["now"].as_u64().unwrap(),
            60,
        )
        .is_ok()
    });

    // `flashgate verify`, the debugging aid, on the same request (real clock).
    let cli = |sku: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashgate"));
        cmd.args(["verify", "--key-env", KEY_VAR, "--key-id", "k1"])
            .args(["--method", &seen.method, "--path", &seen.path]);
        for (name, value) in &seen.headers {
            let value = if name == "x-flashgate-sku" {
                sku
            } else {
                value.as_str().unwrap()
            };
            cmd.args(["-H", &format!("{name}: {value}")]);
        }
        cmd.output().unwrap()
    };
    let ok = cli("tee");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let refused = cli("gold");
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stdout).contains("does not match"));

    // Python.
    let py = examples().join("verify.py");
    check_all("python", &seen, |c| {
        run_verifier(Path::new("python3"), &[py.to_str().unwrap()], c)
    });

    // Go: built once into a temporary directory.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("verify");
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(examples().join("verify.go"))
        .env("GOCACHE", dir.path().join("cache"))
        .env("GO111MODULE", "off")
        .status()
        .expect("go is needed for the Go verifier (installed by .ci/run)");
    assert!(built.success(), "go build examples/verify/verify.go");
    check_all("go", &seen, |c| run_verifier(&bin, &[], c));
}
