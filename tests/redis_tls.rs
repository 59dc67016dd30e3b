//! Redis over TLS (`rediss://`): a TLS-only `redis-server` that also demands a client
//! certificate, with a CA and certificates the test makes with `openssl`. With the right CA and
//! client certificate a sale runs; without the CA (the server's certificate is not trusted) the
//! store is unavailable and buyers get 503, never a unit.
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::shop::*;
use support::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed for this test");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=flashgate test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}

/// A TLS-only redis-server on 127.0.0.1 (plain port off), killed on drop.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_tls_redis(dir: &Path) -> TlsRedis {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-port", &port.to_string()])
        .args([
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "yes"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let up = eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(up, "TLS redis-server did not start");
    TlsRedis { child, port }
}

fn store_yaml(port: u16, dir: &Path, ca: bool) -> String {
    let ca = if ca {
        format!("ca_file: \"{}\", ", dir.join("ca.pem").display())
    } else {
        String::new()
    };
    format!(
        "store: {{ redis: \"rediss://127.0.0.1:{port}\", connect_timeout: 2s, response_timeout: 2s, \
         tls: {{ {ca}cert_file: \"{}\", key_file: \"{}\" }} }}\n",
        dir.join("client.pem").display(),
        dir.join("client.key").display()
    )
}

#[tokio::test]
async fn a_sale_runs_on_a_tls_only_redis() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let redis = start_tls_redis(dir.path()).await;
    let backend = shop().await;
    let fg = Flashgate::start(&sale_config(
        &backend.url(),
        &store_yaml(redis.port, dir.path(), true),
        "5s",
        BUY_PATH,
        PATH_SALE,
    ))
    .await;
    set_stock(&fg, "tee", 2).await;
    let c = client();
    let statuses: Vec<u16> = [
        buy(&c, &fg, "tee", "a").await.status.as_u16(),
        buy(&c, &fg, "tee", "b").await.status.as_u16(),
        buy(&c, &fg, "tee", "c").await.status.as_u16(),
    ]
    .to_vec();
    assert_eq!(statuses, [200, 200, 410]);
    status_until(&fg, "tee", |s| s["units"]["sold"] == 2).await;

    // The server's certificate is not trusted without the test CA: no store, no unit.
    let fg = Flashgate::start(&sale_config(
        &backend.url(),
        &store_yaml(redis.port, dir.path(), false),
        "5s",
        BUY_PATH,
        PATH_SALE,
    ))
    .await;
    assert_rejected(&buy(&c, &fg, "tee", "d").await, 503, "unavailable");
}

#[test]
fn tls_settings_are_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    for (store, key, says) in [
        (
            "{ redis: \"redis://127.0.0.1:6379\", tls: {} }".to_owned(),
            "store.tls",
            "rediss://",
        ),
        (
            format!(
                "{{ redis: \"rediss://127.0.0.1:6379\", tls: {{ ca_file: \"{}\" }} }}",
                not_pem.display()
            ),
            "store.tls.ca_file",
            "not a PEM file",
        ),
        (
            "{ redis: \"rediss://127.0.0.1:6379\", tls: { ca_file: \"/nonexistent/ca.pem\" } }"
                .to_owned(),
            "store.tls.ca_file",
            "cannot read",
        ),
        (
            format!(
                "{{ redis: \"rediss://127.0.0.1:6379\", tls: {{ cert_file: \"{}\" }} }}",
                not_pem.display()
            ),
            "store.tls",
            "go together",
        ),
    ] {
        let yaml = format!("upstream: {{ url: \"http://127.0.0.1:1\" }}\nstore: {store}\n");
        let e = flashgate::config::parse(&yaml, "t.yaml").expect_err(&store);
        assert_eq!(e.key, key, "{store}: {e}");
        assert!(e.message.contains(says), "{store}: {e}");
    }
    let yaml = "upstream: { url: \"http://127.0.0.1:1\" }\nstore: { redis: \"rediss://127.0.0.1:6379\" }\n";
    assert!(flashgate::config::parse(yaml, "t.yaml").is_ok());
}
