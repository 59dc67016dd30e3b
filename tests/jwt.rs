//! JWT identity, end to end: a real flashgate in front of a real backend, stock in a real
//! `redis-server`, keys made by the test (RSA and P-256), served from a JWKS file, from a
//! JWKS URL (a local server that counts its requests) or an HMAC secret.
//!
//! What an operator relies on: a valid token admits its subject (the backend sees the claim as
//! `X-Flashgate-User`); every other token is a `401` with the reason in the body and a
//! `WWW-Authenticate: Bearer` challenge, and never reaches the backend; keys rotate without a
//! restart; and a flood of made-up key ids costs the key server at most one fetch per
//! `min_refresh`.
mod support;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::StatusCode;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::shop::{StoreFixture, bounded, redis};
use support::*;

const ISSUER: &str = "https://auth.test";
const AUDIENCE: &str = "shop";
const BUY: &str = "/api/flash/{sku}/buy";

// ---------------------------------------------------------------------------
// Keys and tokens, made here

/// A signing key and its public JWK (with a `kid`).
struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Jwk,
    /// The public key as PEM (RSA only): what an attacker "signs" an HS256 token with.
    public_pem: Option<String>,
}

fn rsa_signer(kid: &str) -> Signer {
    use rsa::Generate;
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    let private = rsa::PrivateKey::generate();
    let der = private.to_pkcs1_der().expect("pkcs1");
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("pem");
    signer(
        kid,
        Algorithm::RS256,
        EncodingKey::from_rsa_der(der.as_bytes()),
        Some(public_pem),
    )
}

fn ec_signer(kid: &str) -> Signer {
    use p256::elliptic_curve::Generate;
    use p256::pkcs8::EncodePrivateKey;
    let der = p256::SecretKey::generate().to_pkcs8_der().expect("pkcs8");
    signer(
        kid,
        Algorithm::ES256,
        EncodingKey::from_ec_der(der.as_bytes()),
        None,
    )
}

fn signer(kid: &str, alg: Algorithm, key: EncodingKey, public_pem: Option<String>) -> Signer {
    let mut jwk = Jwk::from_encoding_key(&key, alg).expect("public jwk");
    jwk.common.key_id = Some(kid.to_owned());
    Signer {
        kid: kid.to_owned(),
        alg,
        key,
        jwk,
        public_pem,
    }
}

/// RSA key generation takes a moment: each key is made once per test binary.
fn keys() -> &'static [Signer; 4] {
    static KEYS: OnceLock<[Signer; 4]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| rsa_signer("rsa-a"));
            let b = s.spawn(|| rsa_signer("rsa-b"));
            (a.join().unwrap(), b.join().unwrap())
        });
        // `rsa-evil` is a different key that claims rsa-a's kid.
        let mut evil = rsa_signer("rsa-a");
        evil.kid = "rsa-a".into();
        [a, b, ec_signer("ec-a"), evil]
    })
}
fn rsa_a() -> &'static Signer {
    &keys()[0]
}
fn rsa_b() -> &'static Signer {
    &keys()[1]
}
fn ec_a() -> &'static Signer {
    &keys()[2]
}
fn rsa_evil() -> &'static Signer {
    &keys()[3]
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims that pass every check of the test routes.
fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 600 })
}

fn sign_as(signer: &Signer, kid: Option<&str>, alg: Algorithm, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &signer.key).expect("sign")
}

fn token(signer: &Signer, claims: &Value) -> String {
    sign_as(signer, Some(&signer.kid), signer.alg, claims)
}

/// A token assembled by hand (for headers the library will not write, such as `alg: none`).
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!(
        "{}.{}.{}",
        part(header),
        part(claims),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

fn jwks(signers: &[&Signer]) -> String {
    serde_json::to_string(&JwkSet {
        keys: signers.iter().map(|s| s.jwk.clone()).collect(),
    })
    .unwrap()
}

// ---------------------------------------------------------------------------
// flashgate, backend, store

/// A sale route whose identity is `identity.jwt = {jwt}` (a YAML flow mapping's inside).
fn jwt_config(backend: &Backend, store: &StoreFixture, jwt: &str) -> String {
    config(
        backend,
        &format!(
            "{}routes:\n\
             \x20 - name: flash-buy\n\
             \x20   match: {{ method: POST, path: \"{BUY}\" }}\n\
             \x20   identity: {{ jwt: {{ {jwt} }} }}\n\
             \x20   sale: {{ sku: {{ path_param: sku }} }}\n",
            store.yaml
        ),
    )
}

/// The usual JWT settings: RS256 and ES256 keys from `file`, issuer and audience checked.
fn file_jwt(file: &std::path::Path) -> String {
    format!(
        "jwks_file: \"{}\", algorithms: [RS256, ES256], issuer: \"{ISSUER}\", audience: {AUDIENCE}",
        file.display()
    )
}

/// `jwks.json` in `dir`: the public keys of `signers`, as a key file.
fn write_jwks(dir: &std::path::Path, signers: &[&Signer]) -> std::path::PathBuf {
    let file = dir.join("jwks.json");
    std::fs::write(&file, jwks(signers)).unwrap();
    file
}

/// flashgate on `yaml` with 10 `tee` in stock (set in the store itself).
async fn start_with_stock(yaml: &str) -> Flashgate {
    let fg = Flashgate::start(yaml).await;
    fg.app.store.set_stock(&sku("tee"), 10).await.unwrap();
    fg
}

/// The usual file-keyed sale: `rsa-a` and `ec-a` in a key file in `dir`, flashgate on `store`
/// in front of `backend` with [`file_jwt`], 10 `tee` in stock. The key file and the instance.
async fn file_keyed_sale(
    store: &StoreFixture,
    backend: &Backend,
    dir: &std::path::Path,
) -> (std::path::PathBuf, Flashgate) {
    let file = write_jwks(dir, &[rsa_a(), ec_a()]);
    let fg = start_with_stock(&jwt_config(backend, store, &file_jwt(&file))).await;
    (file, fg)
}

async fn buy_with(fg: &Flashgate, sku: &str, headers: &[(&str, &str)]) -> Answer {
    let url = fg.url(&BUY.replace("{sku}", sku));
    send(&client(), "POST", &url, headers, Bytes::new()).await
}

async fn buy_bearer(fg: &Flashgate, sku: &str, token: &str) -> Answer {
    buy_with(fg, sku, &[("authorization", &format!("Bearer {token}"))]).await
}

/// A 401 with this reason, the JSON shape and the RFC 6750 challenge.
fn assert_refused(a: &Answer, reason: &str, case: &str) {
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{case}: {}", a.text());
    let body = a.json();
    assert_eq!(body["error"], "unauthenticated", "{case}");
    assert_eq!(body["reason"], reason, "{case}: {body}");
    let challenge = a.headers["www-authenticate"].to_str().unwrap();
    if reason == "missing_token" {
        assert_eq!(challenge, "Bearer", "{case}");
    } else {
        assert!(
            challenge.starts_with("Bearer error=\"invalid_token\", error_description=\""),
            "{case}: {challenge}"
        );
    }
}

fn user_seen(backend: &Backend) -> Vec<String> {
    backend
        .seen()
        .iter()
        .filter_map(|s| s.headers.get("x-flashgate-user"))
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------

/// RS256 and ES256 tokens admit their subject; the backend sees the claim as the user; the
/// per-user limit counts the claim (a second buy with the same token, now from the cache, is a
/// 409); a numeric `sub` is the user in decimal; `claim:` picks another claim.
#[tokio::test]
async fn a_valid_token_admits_its_subject() {
    bounded(async {
        let store = redis();
        let backend = Backend::start_echo().await;
        let dir = tempfile::tempdir().unwrap();
        let (file, fg) = file_keyed_sale(&store, &backend, dir.path()).await;

        let alice = token(rsa_a(), &claims("alice"));
        let a = buy_bearer(&fg, "tee", &alice).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let a = buy_bearer(&fg, "tee", &ec_a_token("bob")).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let mut numeric = claims("x");
        numeric["sub"] = json!(12345);
        let a = buy_bearer(&fg, "tee", &token(rsa_a(), &numeric)).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(user_seen(&backend), ["alice", "bob", "12345"]);

        // The same token again: verified from the cache, still alice, already served.
        let a = buy_bearer(&fg, "tee", &alice).await;
        assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text());
        assert_eq!(a.json()["error"], "already_purchased");
        // "Bearer" in any case (RFC 7235: the scheme is case-insensitive).
        let carol = token(rsa_a(), &claims("carol"));
        let a = buy_with(&fg, "tee", &[("authorization", &format!("bearer {carol}"))]).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let status = fg.app.store.status(&sku("tee")).await.unwrap();
        assert_eq!((status.buyers, status.stock), (4, Some(6)));
        drop(fg);

        // Another claim as the user id, lower-cased by the route's `normalize`.
        let yaml = jwt_config(
            &backend,
            &store,
            &format!("{}, claim: email", file_jwt(&file)),
        )
        .replace("identity: { jwt:", "identity: { normalize: lowercase, jwt:");
        let fg = Flashgate::start(&yaml).await;
        let mut c = claims("dave");
        c["email"] = json!("Dave@Example.com");
        let a = buy_bearer(&fg, "tee", &token(rsa_a(), &c)).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(user_seen(&backend).last().unwrap(), "dave@example.com");
    })
    .await;
}

fn ec_a_token(sub: &str) -> String {
    token(ec_a(), &claims(sub))
}

/// Every way a token can be wrong: 401 with its reason, nothing reaches the backend, no stock
/// moves.
#[tokio::test]
async fn refused_tokens_answer_401_with_their_reason() {
    bounded(async {
        let store = redis();
        let backend = Backend::start_echo().await;
        let dir = tempfile::tempdir().unwrap();
        let (_, fg) = file_keyed_sale(&store, &backend, dir.path()).await;

        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = claims("mallory");
            f(&mut c);
            c
        };
        let t = now();
        let public_pem = rsa_a().public_pem.clone().unwrap();
        let cases: Vec<(&str, String, &str)> = vec![
            // Past `exp` by more than the 30 s leeway; `exp` within the leeway passes (below).
            (
                "expired",
                token(rsa_a(), &with(&|c| c["exp"] = json!(t - 120))),
                "expired",
            ),
            (
                "nbf ahead",
                token(rsa_a(), &with(&|c| c["nbf"] = json!(t + 600))),
                "not_yet_valid",
            ),
            (
                "other issuer",
                token(rsa_a(), &with(&|c| c["iss"] = json!("https://evil"))),
                "wrong_issuer",
            ),
            (
                "no issuer",
                token(rsa_a(), &with(&|c| remove(c, "iss"))),
                "wrong_issuer",
            ),
            (
                "other audience",
                token(rsa_a(), &with(&|c| c["aud"] = json!(["ads", "mail"]))),
                "wrong_audience",
            ),
            (
                "no audience",
                token(rsa_a(), &with(&|c| remove(c, "aud"))),
                "wrong_audience",
            ),
            (
                "no exp",
                token(rsa_a(), &with(&|c| remove(c, "exp"))),
                "claim_missing",
            ),
            (
                "no sub",
                token(rsa_a(), &with(&|c| remove(c, "sub"))),
                "claim_missing",
            ),
            (
                "empty sub",
                token(rsa_a(), &with(&|c| c["sub"] = json!(""))),
                "claim_missing",
            ),
            (
                "boolean sub",
                token(rsa_a(), &with(&|c| c["sub"] = json!(true))),
                "claim_invalid",
            ),
            // `jsonwebtoken` itself refuses a registered claim of a structured type.
            (
                "object sub",
                token(rsa_a(), &with(&|c| c["sub"] = json!({"id": 1}))),
                "malformed",
            ),
            // Signed by another key that claims rsa-a's kid.
            (
                "wrong key",
                token(rsa_evil(), &claims("mallory")),
                "bad_signature",
            ),
            (
                "tampered",
                tamper(&token(rsa_a(), &claims("mallory"))),
                "bad_signature",
            ),
            (
                "unknown kid",
                sign_as(
                    rsa_a(),
                    Some("nobody"),
                    Algorithm::RS256,
                    &claims("mallory"),
                ),
                "unknown_key",
            ),
            // An ES256 alg with the RSA key's kid: no key of that id fits the alg.
            (
                "kid of another family",
                sign_as(ec_a(), Some("rsa-a"), Algorithm::ES256, &claims("mallory")),
                "unknown_key",
            ),
            (
                "alg none",
                raw_token(
                    &json!({"alg": "none", "typ": "JWT"}),
                    &claims("mallory"),
                    b"",
                ),
                "algorithm_not_allowed",
            ),
            (
                "alg None, signed",
                raw_token(
                    &json!({"alg": "None", "kid": "rsa-a"}),
                    &claims("mallory"),
                    b"sig",
                ),
                "algorithm_not_allowed",
            ),
            // A real RS384 signature with a listed key, but RS384 is not listed.
            (
                "alg not listed",
                sign_as(rsa_a(), Some("rsa-a"), Algorithm::RS384, &claims("mallory")),
                "algorithm_not_allowed",
            ),
            // Algorithm confusion: HS256 "signed" with the RSA public key as the HMAC secret.
            (
                "HS256 with the public key",
                jsonwebtoken::encode(
                    &{
                        let mut h = Header::new(Algorithm::HS256);
                        h.kid = Some("rsa-a".into());
                        h
                    },
                    &claims("mallory"),
                    &EncodingKey::from_secret(public_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
                "algorithm_not_allowed",
            ),
            ("garbage", "not-a-token".into(), "malformed"),
            ("four parts", "a.b.c.d".into(), "malformed"),
            ("bad base64", "!!!.@@@.###".into(), "malformed"),
            (
                "header not json",
                format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode("{oops")),
                "malformed",
            ),
            (
                "oversized",
                format!("{}.{}.sig", "a".repeat(5000), "b".repeat(5000)),
                "token_too_large",
            ),
        ];
        for (case, token, reason) in &cases {
            let a = buy_bearer(&fg, "tee", token).await;
            assert_refused(&a, reason, case);
        }
        // No credentials at all, or another scheme: the bare challenge.
        for (case, headers) in [
            ("no header", vec![]),
            ("basic", vec![("authorization", "Basic YWxpY2U6cHc=")]),
        ] {
            let a = buy_with(&fg, "tee", &headers).await;
            assert_refused(&a, "missing_token", case);
        }
        // Two Authorization headers: which one counts would be a guess.
        let good = token(rsa_a(), &claims("mallory"));
        let bearer = format!("Bearer {good}");
        let a = buy_with(
            &fg,
            "tee",
            &[("authorization", &bearer), ("authorization", &bearer)],
        )
        .await;
        assert_refused(&a, "malformed", "two authorization headers");
        assert_eq!(backend.count(), 0, "a refused token reached the backend");
        let status = fg.app.store.status(&sku("tee")).await.unwrap();
        assert_eq!((status.buyers, status.stock), (0, Some(10)));

        // Within the leeway: still accepted (and this proves the cases above could pass).
        let late = token(rsa_a(), &with(&|c| c["exp"] = json!(t - 5)));
        let a = buy_bearer(&fg, "tee", &late).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(backend.count(), 1);
    })
    .await;
}

fn remove(claims: &mut Value, name: &str) {
    claims.as_object_mut().unwrap().remove(name);
}

/// The same token with one claim changed and the signature kept.
fn tamper(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut c: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    c["sub"] = json!("admin");
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
    format!("{}.{body}.{}", parts[0], parts[2])
}

/// The token from a cookie, or from a header of the operator's choosing (its whole value).
#[tokio::test]
async fn a_token_from_a_cookie_or_another_header() {
    bounded(async {
        let store = redis();
        let backend = Backend::start_echo().await;
        let dir = tempfile::tempdir().unwrap();
        let file = write_jwks(dir.path(), &[rsa_a()]);
        let yaml = jwt_config(
            &backend,
            &store,
            &format!("from: {{ cookie: session }}, {}", file_jwt(&file)),
        );
        let fg = start_with_stock(&yaml).await;
        let erin = token(rsa_a(), &claims("erin"));
        let a = buy_with(
            &fg,
            "tee",
            &[("cookie", &format!("theme=dark; session={erin}"))],
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let bearer = format!("Bearer {}", token(rsa_a(), &claims("frank")));
        let a = buy_with(&fg, "tee", &[("authorization", &bearer)]).await;
        assert_refused(&a, "missing_token", "bearer on a cookie route");
        drop(fg);

        let yaml = jwt_config(
            &backend,
            &store,
            &format!("from: {{ header: X-Access-Token }}, {}", file_jwt(&file)),
        );
        let fg = Flashgate::start(&yaml).await;
        let gina = token(rsa_a(), &claims("gina"));
        let a = buy_with(&fg, "tee", &[("x-access-token", &gina)]).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let a = buy_with(&fg, "tee", &[("x-access-token", "junk")]).await;
        assert_refused(&a, "malformed", "junk in the header");
        assert_eq!(user_seen(&backend), ["erin", "gina"]);
    })
    .await;
}

const SECRET_VAR: &str = "FG_TEST_JWT_SECRET";
const SECRET: &str = "a-test-hmac-secret-of-at-least-32-bytes!";

/// HS256 with a secret from the environment; another secret's signature fails, and an RS256
/// token is refused for its algorithm.
#[tokio::test]
async fn an_hmac_secret_from_the_environment() {
    // Only this test reads this variable, and it is set before flashgate starts.
    unsafe { std::env::set_var(SECRET_VAR, SECRET) };
    bounded(async {
        let store = redis();
        let backend = Backend::start_echo().await;
        let yaml = jwt_config(
            &backend,
            &store,
            &format!("secret_env: {SECRET_VAR}, algorithms: [HS256], issuer: \"{ISSUER}\""),
        );
        let fg = start_with_stock(&yaml).await;
        let hs = |secret: &str, sub: &str| {
            let mut c = claims(sub);
            remove(&mut c, "aud");
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &c,
                &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
            )
            .unwrap()
        };
        let a = buy_bearer(&fg, "tee", &hs(SECRET, "hana")).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let a = buy_bearer(
            &fg,
            "tee",
            &hs("another-secret-another-secret-xxxxxxxx", "ivan"),
        )
        .await;
        assert_refused(&a, "bad_signature", "other secret");
        let a = buy_bearer(&fg, "tee", &token(rsa_a(), &claims("ivan"))).await;
        assert_refused(&a, "algorithm_not_allowed", "RS256 on an HS256 route");
        assert_eq!(user_seen(&backend), ["hana"]);
    })
    .await;
}

/// Rotating a `jwks_file`: rewrite it, reload (what SIGHUP does), and the new key works at
/// once, the removed one no longer does — not even for a token verified (and cached) before.
#[tokio::test]
async fn a_rewritten_jwks_file_takes_effect_on_reload() {
    bounded(async {
        let store = redis();
        let backend = Backend::start_echo().await;
        let dir = tempfile::tempdir().unwrap();
        let file = write_jwks(dir.path(), &[rsa_a()]);
        let path = dir.path().join("flashgate.yaml");
        let yaml = jwt_config(&backend, &store, &file_jwt(&file));
        std::fs::write(&path, &yaml).unwrap();
        let fg = start_with_stock(&yaml).await;

        let old = token(rsa_a(), &claims("jack"));
        let new = token(rsa_b(), &claims("kate"));
        assert_eq!(buy_bearer(&fg, "tee", &old).await.status, StatusCode::OK);
        assert_refused(&buy_bearer(&fg, "tee", &new).await, "unknown_key", "before");

        std::fs::write(&file, jwks(&[rsa_b()])).unwrap();
        assert!(flashgate::reload::reload(&fg.app, &path), "reload");
        let a = buy_bearer(&fg, "tee", &new).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_refused(&buy_bearer(&fg, "tee", &old).await, "unknown_key", "after");

        // A key file that no longer parses is refused by the reload; the running keys stay.
        std::fs::write(&file, "{ not json").unwrap();
        assert!(
            !flashgate::reload::reload(&fg.app, &path),
            "a broken key file"
        );
        let a = buy_bearer(&fg, "tee", &token(rsa_b(), &claims("liam"))).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(user_seen(&backend), ["jack", "kate", "liam"]);
    })
    .await;
}

/// A key server on 127.0.0.1 that serves whatever key set it is given and counts requests.
struct KeyServer {
    backend: Backend,
    jwks: Arc<Mutex<String>>,
}

impl KeyServer {
    async fn start(jwks: String) -> KeyServer {
        let body = Arc::new(Mutex::new(jwks));
        let serve = body.clone();
        let backend = Backend::start(move |_req| {
            let body = serve.lock().unwrap().clone();
            async move { json_response(StatusCode::OK, &body) }
        })
        .await;
        KeyServer {
            backend,
            jwks: body,
        }
    }

    fn url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.backend.url())
    }

    fn set(&self, jwks: String) {
        *self.jwks.lock().unwrap() = jwks;
    }

    fn fetches(&self) -> usize {
        self.backend.count()
    }
}

fn url_jwt(server: &KeyServer, min_refresh: &str) -> String {
    format!(
        "jwks_url: \"{}\", refresh: 10m, min_refresh: {min_refresh}, algorithms: [RS256], \
         issuer: \"{ISSUER}\", audience: {AUDIENCE}",
        server.url()
    )
}

/// Rotating keys at a `jwks_url`: a token with a new `kid` makes flashgate fetch the set
/// again (once the floor has passed) and is admitted, with no restart and no reload.
#[tokio::test]
async fn a_new_kid_at_the_jwks_url_is_fetched() {
    bounded(async {
        let store = redis();
        let backend = Backend::start_echo().await;
        let keys = KeyServer::start(jwks(&[rsa_a()])).await;
        let fg = start_with_stock(&jwt_config(&backend, &store, &url_jwt(&keys, "1s"))).await;

        let a = buy_bearer(&fg, "tee", &token(rsa_a(), &claims("mia"))).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(keys.fetches(), 1, "the start-up fetch");

        keys.set(jwks(&[rsa_b()]));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let a = buy_bearer(&fg, "tee", &token(rsa_b(), &claims("noah"))).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(keys.fetches(), 2, "one fetch for the new kid");
        // The old key left the set: its tokens no longer pass (the cache was emptied too).
        let a = buy_bearer(&fg, "tee", &token(rsa_a(), &claims("mia"))).await;
        assert_refused(&a, "unknown_key", "a token of the removed key");
        assert_eq!(user_seen(&backend), ["mia", "noah"]);
    })
    .await;
}

/// 200 tokens with made-up `kid`s, twice: each a 401 `unknown_key`, and the key server gets
/// at most one fetch per `min_refresh` (2 s) since start — not one per token.
#[tokio::test]
async fn a_flood_of_unknown_kids_fetches_at_most_once_per_floor() {
    bounded(async {
        const FLOOR: Duration = Duration::from_secs(2);
        let store = redis();
        let backend = Backend::start_echo().await;
        let keys = KeyServer::start(jwks(&[rsa_a()])).await;
        let started = Instant::now();
        let fg = Flashgate::start(&jwt_config(&backend, &store, &url_jwt(&keys, "2s"))).await;
        let a = buy_bearer(&fg, "tee", &token(rsa_a(), &claims("olga"))).await;
        assert_ne!(a.status, StatusCode::UNAUTHORIZED, "{}", a.text());
        assert_eq!(keys.fetches(), 1);
        // Past the floor, so the first unknown kid may fetch.
        tokio::time::sleep(FLOOR + Duration::from_millis(100)).await;

        // Most fetches the floor allows in `elapsed`: the start-up one, then one per floor.
        let allowed = |elapsed: Duration| 1 + (elapsed.as_millis() / FLOOR.as_millis()) as usize;
        for round in 0..2 {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..200 {
                // The kid is looked up before the signature is checked: any bytes will do.
                let head = json!({"alg": "RS256", "kid": format!("bogus-{round}-{i}")});
                let t = raw_token(&head, &claims("x"), b"not-checked");
                let url = fg.url(&BUY.replace("{sku}", "tee"));
                tasks.spawn(async move {
                    let bearer = format!("Bearer {t}");
                    send(
                        &client(),
                        "POST",
                        &url,
                        &[("authorization", &bearer)],
                        Bytes::new(),
                    )
                    .await
                });
            }
            while let Some(a) = tasks.join_next().await {
                assert_refused(&a.unwrap(), "unknown_key", "bogus kid");
            }
            let fetches = keys.fetches();
            eprintln!(
                "round {round}: {fetches} fetches at {:?}",
                started.elapsed()
            );
            assert!(fetches >= 2, "an unknown kid never asked for the key set");
            assert!(
                fetches <= allowed(started.elapsed()),
                "round {round}: {fetches} fetches in {:?}",
                started.elapsed()
            );
        }
        assert_eq!(backend.count(), 0);
    })
    .await;
}

/// A key server that never answers, or answers with too much: each fetch ends within its
/// bound, and with no key ever loaded the route answers 503 `unavailable` (+ Retry-After),
/// never admitting and never hanging.
#[tokio::test]
async fn a_key_set_that_never_arrives_answers_503() {
    bounded(async {
        let store = redis();
        let backend = Backend::start_echo().await;
        let silent = Backend::start(|_req| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            json_response(StatusCode::OK, "{}")
        })
        .await;
        let huge = format!("{{\"keys\": [], \"pad\": \"{}\"}}", "x".repeat(300 * 1024));
        let oversized = Backend::start(move |_req| {
            let huge = huge.clone();
            async move { json_response(StatusCode::OK, &huge) }
        })
        .await;
        for (server, case) in [(&silent, "silent"), (&oversized, "oversized")] {
            let jwt = format!(
                "jwks_url: \"{}/jwks\", algorithms: [RS256], min_refresh: 1s",
                server.url()
            );
            let fg = Flashgate::start(&jwt_config(&backend, &store, &jwt)).await;
            let pat = token(rsa_a(), &claims("pat"));
            let asked = Instant::now();
            let a = buy_bearer(&fg, "tee", &pat).await;
            assert_eq!(
                a.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{case}: {}",
                a.text()
            );
            assert_eq!(a.json()["error"], "unavailable", "{case}");
            assert!(a.headers.contains_key("retry-after"), "{case}");
            assert!(
                asked.elapsed() < Duration::from_secs(5),
                "{case}: {:?}",
                asked.elapsed()
            );
            assert!(server.count() >= 1, "{case}: never fetched");
        }
        assert_eq!(backend.count(), 0);
    })
    .await;
}
