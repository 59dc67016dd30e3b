//! The fleet in `deploy/` — the Docker Compose file with its flashgate config and nginx
//! config, and the Kubernetes manifests — checked the way each tool would read it, and checked
//! to fit together:
//!
//! - every flashgate config in `deploy/` (the compose one, the one inside the ConfigMap) passes
//!   flashgate's own `check`, run as the real binary;
//! - `docker compose config` accepts the compose file (Debian's `docker-compose` 1.29 when the
//!   compose plugin is absent) and refuses it without an admin token; `nginx -t` accepts
//!   nginx.conf; `kubernetes-validate --strict` accepts every manifest against real Kubernetes
//!   schemas, offline;
//! - the parts agree: nginx's upstream lists the compose services that run `serve`, on the
//!   config's port; the one trusted proxy is nginx's fixed address; health checks and probes ask
//!   the port and path flashgate answers itself; the Secret provides every variable the
//!   ConfigMap's config reads; grace periods outlast the drain; the uid is the Dockerfile's;
//! - the README's fleet section names only metrics a real registry exports.
//!
//! A missing tool (docker compose, nginx, kubernetes-validate) skips its check with the reason
//! printed; under CI (`CI=true`, where `.ci/run` installs them) it fails instead.
mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use flashgate::config::{self, Config, IdentitySource, JwtKeys};
use http::HeaderMap;
use serde_json::Value;
use support::run_cli;

const COMPOSE: &str = "deploy/docker-compose.yml";
const COMPOSE_CONFIG: &str = "deploy/flashgate.yaml";
const NGINX_CONF: &str = "deploy/nginx.conf";
const K8S: &str = "deploy/k8s";
/// The oldest and the newest Kubernetes the manifests are validated against (both bundled
/// with the kubernetes-validate `.ci/run` installs).
const K8S_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];
/// A token long enough for a non-loopback admin address, for the compose file's variable.
const TEST_TOKEN: &str = "0123456789abcdef0123456789abcdef-test-only";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every YAML document in a file, as JSON values (anchors and merge keys resolved).
fn yaml_docs(rel: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: one YAML document");
    docs.remove(0)
}

/// `v[k0][k1]…`, or a panic naming the missing key.
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for (i, k) in path.iter().enumerate() {
        cur = match (cur, k.parse::<usize>()) {
            (Value::Array(a), Ok(n)) => a.get(n),
            (Value::Object(o), _) => o.get(*k),
            _ => None,
        }
        .unwrap_or_else(|| panic!("no `{}` in {v}", path[..=i].join(".")));
    }
    cur
}

fn text<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{}` is not a string: {v}", path.join(".")))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("not a string: {s}"))
                .to_owned()
        })
        .collect()
}

/// The value after `flag` in a command line.
fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args.get(i + 1)
        .unwrap_or_else(|| panic!("{flag} without a value in {args:?}"))
}

fn duration(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("duration {s:?}: {e}"))
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Skips a tool's check, or fails it under CI, where `.ci/run` installs the tool.
fn missing_tool(what: &str) {
    assert!(
        !under_ci(),
        "{what}; .ci/run installs it, so under CI this is a failure"
    );
    eprintln!("SKIPPED: {what}");
}

/// Runs a program, bounded in time; `None` when it cannot be started at all.
async fn run_tool(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    env_remove: &[&str],
) -> Option<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in env_remove {
        cmd.env_remove(k);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 120 s"));
    out.ok()
}

fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A config file as `flashgate check` sees it: the real binary, exit 0.
async fn check_passes(path: &Path) -> Config {
    let (code, stdout, stderr) = run_cli(&["check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(
        code,
        0,
        "flashgate check {}: {stderr}{stdout}",
        path.display()
    );
    config::load(path).unwrap_or_else(|e| panic!("{e}"))
}

/// The ConfigMap's embedded config, written where `check` can read it.
fn configmap_config() -> (String, String) {
    let cm = yaml(&format!("{K8S}/configmap.yaml"));
    assert_eq!(text(&cm, &["kind"]), "ConfigMap");
    let data = at(&cm, &["data"]).as_object().expect("data");
    assert_eq!(data.len(), 1, "one file in the ConfigMap: {data:?}");
    let (key, body) = data.iter().next().unwrap();
    (key.clone(), body.as_str().expect("a string").to_owned())
}

/// `host:port` of a URL such as `redis://redis:6379` or `http://backend:3000/x`.
fn authority(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap();
    let hostport = hostport.rsplit('@').next().unwrap();
    let (host, port) = hostport
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no port in {url}"));
    (host.to_owned(), port.parse().expect("a port"))
}

/// The environment variables a config reads its secrets from.
fn secret_envs(cfg: &Config) -> BTreeSet<String> {
    let mut envs = BTreeSet::new();
    if let Some(a) = &cfg.admin {
        envs.insert(a.token_env.clone());
        envs.extend(a.read_token_env.clone());
    }
    if let Some(s) = &cfg.signing {
        envs.insert(s.key_env.clone());
    }
    for r in &cfg.routes {
        if let Some(IdentitySource::Jwt(jwt)) = r.identity.as_ref().map(|i| &i.source)
            && let JwtKeys::Secret { env, .. } = &jwt.keys
        {
            envs.insert(env.clone());
        }
    }
    envs
}

// ---------------------------------------------------------------------------------------
// flashgate's own validation

#[tokio::test]
async fn every_flashgate_config_in_deploy_passes_check() {
    let compose_cfg = check_passes(&repo(COMPOSE_CONFIG)).await;
    assert!(
        compose_cfg.store.is_some(),
        "the fleet shares a Redis: the compose config needs `store`"
    );

    let (key, body) = configmap_config();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(&key);
    std::fs::write(&path, &body).unwrap();
    let k8s_cfg = check_passes(&path).await;
    assert!(
        k8s_cfg.store.is_some(),
        "the pods share a Redis: the ConfigMap's config needs `store`"
    );
    // The library call `check` makes, on the text itself.
    config::parse(&body, "configmap.yaml").unwrap_or_else(|e| panic!("{e}"));
}

// ---------------------------------------------------------------------------------------
// Docker Compose

/// The compose command here: the plugin (`docker compose`), else the standalone
/// `docker-compose`; `None` when neither runs.
async fn compose_command() -> Option<(&'static str, Vec<&'static str>)> {
    if let Some(out) = run_tool("docker", &["compose", "version"], &[], &[]).await
        && out.status.success()
    {
        return Some(("docker", vec!["compose"]));
    }
    if let Some(out) = run_tool("docker-compose", &["version"], &[], &[]).await
        && out.status.success()
    {
        return Some(("docker-compose", vec![]));
    }
    None
}

/// `docker compose config -q`: the file is valid with a token, and refused without one (the
/// repository holds no default for it). An empty `--env-file`, so a local `deploy/.env`
/// cannot change the verdict. Needs no Docker daemon.
#[tokio::test]
async fn compose_file_is_valid_for_docker_compose() {
    let Some((program, base)) = compose_command().await else {
        missing_tool("neither `docker compose` nor `docker-compose` runs here");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("empty.env");
    std::fs::write(&env_file, "").unwrap();
    let mut args = base.clone();
    args.extend(["--env-file", env_file.to_str().unwrap(), "-f", COMPOSE]);
    args.extend(["config", "-q"]);
    let secrets = ["FLASHGATE_ADMIN_TOKEN", "FLASHGATE_READ_TOKEN"];

    let out = run_tool(
        program,
        &args,
        &[("FLASHGATE_ADMIN_TOKEN", TEST_TOKEN)],
        &secrets[1..],
    )
    .await
    .expect("compose runs");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        printed(&out)
    );

    let out = run_tool(program, &args, &[], &secrets)
        .await
        .expect("compose runs");
    assert!(
        !out.status.success(),
        "without FLASHGATE_ADMIN_TOKEN the compose file must be refused: {}",
        printed(&out)
    );
    assert!(
        printed(&out).contains("FLASHGATE_ADMIN_TOKEN"),
        "the refusal names the variable: {}",
        printed(&out)
    );
}

struct Fleet {
    compose: Value,
    cfg: Config,
}

impl Fleet {
    fn load() -> Fleet {
        Fleet {
            compose: yaml(COMPOSE),
            cfg: config::load(&repo(COMPOSE_CONFIG)).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    fn service(&self, name: &str) -> &Value {
        at(&self.compose, &["services", name])
    }

    fn services(&self) -> Vec<(&String, &Value)> {
        at(&self.compose, &["services"])
            .as_object()
            .expect("services")
            .iter()
            .collect()
    }

    fn command(&self, name: &str) -> Vec<String> {
        strings(at(self.service(name), &["command"]))
    }

    /// The services that run the proxy (`flashgate serve`).
    fn flashgates(&self) -> Vec<&String> {
        self.services()
            .into_iter()
            .filter(|(_, s)| {
                s.get("command")
                    .and_then(Value::as_array)
                    .and_then(|c| c.first())
                    .and_then(Value::as_str)
                    == Some("serve")
            })
            .map(|(n, _)| n)
            .collect()
    }

    fn address(&self, service: &str) -> IpAddr {
        text(
            self.service(service),
            &["networks", "fleet", "ipv4_address"],
        )
        .parse()
        .expect("an IP address")
    }

    /// `flashgate health --url URL` of a service's health check.
    fn health_url(&self, service: &str) -> String {
        let test = strings(at(self.service(service), &["healthcheck", "test"]));
        assert_eq!(test[..3], ["CMD", "flashgate", "health"], "{service}");
        flag_value(&test, "--url").to_owned()
    }
}

/// The compose fleet's parts fit: two instances of one image and one config, sharing the
/// compose Redis, forwarding to the compose backend, reachable only through nginx, health
/// checked on the port and path flashgate answers, with no token in the file.
#[test]
fn compose_fleet_fits_together() {
    let fleet = Fleet::load();
    let cfg = &fleet.cfg;
    let flashgates = fleet.flashgates();
    assert_eq!(
        flashgates,
        ["flashgate-a", "flashgate-b"],
        "two proxy instances"
    );

    // Redis: the config's store is the compose service.
    let (host, port) = authority(node_url(&cfg.store.as_ref().expect("store").redis));
    assert_eq!(port, 6379);
    assert!(
        text(fleet.service(&host), &["image"]).starts_with("redis:"),
        "store.redis names the compose Redis service"
    );

    // The backend: the config's upstream is the compose service running the demo backend.
    let (host, port) = authority(&format!("http://{}", cfg.upstream.url.authority));
    let backend = fleet.command(&host);
    assert_eq!(backend[0], "demo-upstream", "{host}: {backend:?}");
    let listen: SocketAddr = flag_value(&backend, "--listen").parse().unwrap();
    assert_eq!(listen.port(), port, "upstream.url's port is the backend's");
    assert_eq!(
        fleet.health_url(&host),
        format!("http://127.0.0.1:{port}/healthz")
    );

    let health = cfg.health_path.as_deref().expect("health_path on");
    let admin = cfg.admin.as_ref().expect("admin API on");
    let drain = cfg.server.drain_timeout;
    let token_envs = secret_envs(cfg);
    for name in &flashgates {
        let s = fleet.service(name);
        // The config the service runs is deploy/flashgate.yaml.
        let cmd = fleet.command(name);
        let config_path = flag_value(&cmd, "--config");
        assert!(
            !cmd.iter().any(|a| a == "--listen"),
            "{name}: the config's `listen` is the one port (no --listen override)"
        );
        let mount = format!("./flashgate.yaml:{config_path}:ro");
        assert!(
            strings(at(s, &["volumes"])).contains(&mount),
            "{name} mounts {mount}"
        );
        assert_eq!(text(s, &["image"]), "flashgate:local");
        assert_eq!(text(s, &["build", "context"]), "..");

        // Health: flashgate's own /healthz on its proxy port.
        assert_eq!(
            fleet.health_url(name),
            format!("http://127.0.0.1:{}{health}", cfg.listen.port())
        );
        // A stop waits out the drain.
        let grace = duration(text(s, &["stop_grace_period"]));
        assert!(
            grace > drain,
            "{name}: stop_grace_period {grace:?} <= drain {drain:?}"
        );
        // flashgate writes no files: a read-only container is fine.
        assert_eq!(at(s, &["read_only"]), &Value::Bool(true));
        assert!(cfg.access_log.as_ref().is_none_or(|a| a.path.is_none()));

        // Tokens come from the environment, the write token required, none written here.
        let env = at(s, &["environment"]).as_object().expect("environment");
        for var in &token_envs {
            let v = env
                .get(var)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{name}: {var} not passed"));
            assert!(
                v.starts_with(&format!("${{{var}:")),
                "{name}: {var} must come from the environment, not the file: {v}"
            );
        }
        let write = env[&admin.token_env].as_str().unwrap();
        assert!(
            write.starts_with(&format!("${{{}:?", admin.token_env)),
            "{name}: the write token is required (`${{VAR:?message}}`), never defaulted: {write}"
        );

        // The admin API is published on loopback only; the proxy port not at all.
        let ports = strings(at(s, &["ports"]));
        assert_eq!(ports.len(), 1, "{name}: {ports:?}");
        assert!(
            ports[0].ends_with(&format!(":{}", admin.listen.port())),
            "{name}: {ports:?} publishes the admin port"
        );
    }
    // Every published port, of every service, is on 127.0.0.1.
    for (name, s) in fleet.services() {
        for p in s.get("ports").map(strings).unwrap_or_default() {
            assert!(p.starts_with("127.0.0.1:"), "{name} publishes {p}");
        }
    }

    // deploy/.env.example names every variable the compose file reads, and git ignores .env.
    let example = read("deploy/.env.example");
    let compose_text = read(COMPOSE);
    let mut rest = compose_text.as_str();
    let mut vars = BTreeSet::new();
    while let Some(i) = rest.find("${") {
        let tail = &rest[i + 2..];
        let end = tail.find([':', '}', '-', '?']).expect("a closed ${…}");
        vars.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    assert_eq!(
        vars, token_envs,
        "the compose file reads exactly the config's secret variables"
    );
    for var in &vars {
        assert!(
            example.lines().any(|l| l == format!("{var}=")),
            "deploy/.env.example lists {var} with no value"
        );
    }
    assert!(
        read("deploy/.gitignore")
            .lines()
            .any(|l| l.trim() == ".env")
    );
}

/// Only nginx's address is trusted: flashgate believes the X-Forwarded-For nginx sends and
/// nobody else's, the network's gateway (how clients on the Docker host arrive) included.
#[test]
fn only_nginx_is_a_trusted_proxy() {
    let fleet = Fleet::load();
    let trusted = &fleet.cfg.trusted_proxies;
    let subnet: ipnet::IpNet = text(
        &fleet.compose,
        &["networks", "fleet", "ipam", "config", "0", "subnet"],
    )
    .parse()
    .unwrap();
    let nginx = fleet.address("nginx");
    assert!(subnet.contains(&nginx));

    let client: IpAddr = "203.0.113.7".parse().unwrap();
    let mut xff = HeaderMap::new();
    // What nginx sends for a client that made up an address: $proxy_add_x_forwarded_for.
    xff.insert("x-forwarded-for", "6.6.6.6, 203.0.113.7".parse().unwrap());
    assert_eq!(
        flashgate::client_ip::client_ip(nginx, &xff, trusted),
        client,
        "flashgate must see the client nginx saw"
    );

    let gateway = subnet.hosts().next().unwrap();
    let mut others = vec![gateway];
    others.extend(fleet.flashgates().iter().map(|n| fleet.address(n)));
    for peer in others {
        assert_eq!(
            flashgate::client_ip::client_ip(peer, &xff, trusted),
            peer,
            "{peer} must not be able to pick its client IP"
        );
    }
}

/// The `upstream` block of nginx.conf: its name and `server` lines.
fn nginx_upstream(conf: &str) -> (String, Vec<String>, Vec<String>) {
    let start = conf
        .lines()
        .position(|l| l.trim_start().starts_with("upstream "))
        .expect("an upstream block");
    let lines: Vec<&str> = conf.lines().skip(start).collect();
    let name = lines[0]
        .split_whitespace()
        .nth(1)
        .expect("upstream NAME {")
        .to_owned();
    let end = lines.iter().position(|l| l.trim() == "}").expect("closed");
    let directives: Vec<String> = lines[1..end]
        .iter()
        .map(|l| l.split('#').next().unwrap().trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    let servers = directives
        .iter()
        .filter_map(|d| d.strip_prefix("server "))
        .map(|s| s.trim_end_matches(';').trim().to_owned())
        .collect();
    (name, servers, directives)
}

/// nginx balances over exactly the compose services that run flashgate, on the config's
/// port, with keep-alive and the client's address in X-Forwarded-For.
#[test]
fn nginx_upstream_is_the_compose_instances() {
    let fleet = Fleet::load();
    let conf = read(NGINX_CONF);
    let (name, servers, directives) = nginx_upstream(&conf);
    let want: Vec<String> = fleet
        .flashgates()
        .iter()
        .map(|n| format!("{n}:{}", fleet.cfg.listen.port()))
        .collect();
    assert_eq!(servers, want, "nginx's upstream servers");
    assert!(
        directives.iter().any(|d| d.starts_with("keepalive ")),
        "upstream keep-alive: {directives:?}"
    );

    let directives: Vec<String> = conf
        .lines()
        .map(|l| l.split('#').next().unwrap().trim().to_owned())
        .collect();
    let has = |d: &str| directives.iter().any(|l| l == d);
    assert!(has(&format!("proxy_pass http://{name};")));
    // Keep-alive to the upstream needs HTTP/1.1 and no `Connection: close` from the client.
    assert!(has("proxy_http_version 1.1;"));
    assert!(has("proxy_set_header Connection $connection_upgrade;"));
    assert!(
        conf.contains("''      '';"),
        "no upgrade → empty Connection"
    );
    assert!(has(
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"
    ));
    assert!(has("proxy_set_header Host $host;"));

    // The compose nginx runs this file and publishes the port it listens on.
    let nginx = fleet.service("nginx");
    assert!(
        strings(at(nginx, &["volumes"])).contains(&"./nginx.conf:/etc/nginx/nginx.conf:ro".into())
    );
    let listen = directives
        .iter()
        .find_map(|d| d.strip_prefix("listen "))
        .expect("listen")
        .trim_end_matches(';');
    let ports = strings(at(nginx, &["ports"]));
    assert!(
        ports.iter().any(|p| p.ends_with(&format!(":{listen}"))),
        "nginx publishes its listen port {listen}: {ports:?}"
    );
    // It starts once both instances are healthy.
    for n in fleet.flashgates() {
        assert_eq!(
            text(nginx, &["depends_on", n, "condition"]),
            "service_healthy"
        );
    }
}

/// `nginx -t` on nginx.conf, with the upstream's compose names replaced by 127.0.0.1 (nginx
/// resolves them while testing, and there is no compose network here).
#[tokio::test]
async fn nginx_accepts_its_config() {
    if run_tool("nginx", &["-v"], &[], &[]).await.is_none() {
        missing_tool("nginx is not installed");
        return;
    }
    let conf = read(NGINX_CONF);
    let (_, servers, _) = nginx_upstream(&conf);
    let mut local = conf.clone();
    for s in &servers {
        let (_, port) = s.rsplit_once(':').unwrap();
        local = local.replace(
            &format!("server {s};"),
            &format!("server 127.0.0.1:{port};"),
        );
    }
    assert_ne!(local, conf, "the upstream servers were rewritten");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, local).unwrap();
    let prefix = format!("{}/", dir.path().display());
    let pid = format!("pid {}/nginx.pid;", dir.path().display());
    let args = [
        "-t",
        "-p",
        &prefix,
        "-c",
        path.to_str().unwrap(),
        "-e",
        "stderr",
        "-g",
        &pid,
    ];
    let out = run_tool("nginx", &args, &[], &[]).await.unwrap();
    assert!(out.status.success(), "nginx -t: {}", printed(&out));
}

// ---------------------------------------------------------------------------------------
// Kubernetes

fn k8s_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo(K8S))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .map(|n| format!("{K8S}/{n}"))
        .collect();
    files.sort();
    files
}

/// Every manifest in deploy/k8s against the real Kubernetes schemas, strictly (unknown
/// fields are errors), offline: kubernetes-validate bundles the schemas.
#[tokio::test]
async fn kubernetes_manifests_match_the_schemas() {
    let probe = run_tool(
        "python3",
        &["-m", "kubernetes_validate", "--version"],
        &[],
        &[],
    )
    .await;
    if !probe.is_some_and(|o| o.status.success()) {
        missing_tool(
            "python3 -m kubernetes_validate does not run (pip install kubernetes-validate)",
        );
        return;
    }
    let files = k8s_files();
    let docs: usize = files.iter().map(|f| yaml_docs(f).len()).sum();
    assert!(docs >= 7, "{files:?} hold {docs} resources");
    for version in K8S_VERSIONS {
        let mut args = vec!["-m", "kubernetes_validate", "--strict", "-k", version];
        args.extend(files.iter().map(String::as_str));
        let out = run_tool("python3", &args, &[], &[]).await.unwrap();
        let said = printed(&out);
        assert!(out.status.success(), "kubernetes {version}: {said}");
        // Every resource was validated, none skipped.
        assert_eq!(said.matches(" passed ").count(), docs, "{said}");
    }
}

/// All manifests, by kind and name.
struct Manifests {
    docs: Vec<Value>,
}

impl Manifests {
    fn load() -> Manifests {
        Manifests {
            docs: k8s_files().iter().flat_map(|f| yaml_docs(f)).collect(),
        }
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    /// The one resource of `kind`.
    fn only(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self.docs.iter().filter(|d| d["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind}");
        found[0]
    }
}

/// A container port by name or number.
fn container_port(container: &Value, port: &Value) -> u64 {
    let ports = at(container, &["ports"]).as_array().unwrap();
    match port {
        Value::String(name) => ports
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port named {name}")),
        Value::Number(n) => n.as_u64().unwrap(),
        other => panic!("a port: {other}"),
    }
}

/// The manifests fit together and fit flashgate: the probes ask the path and port flashgate
/// answers itself, the config file is where `--config` says, the Secret provides every
/// variable the config reads, the Service and the PodDisruptionBudget select the pods, the
/// grace period outlasts preStop plus the drain, and the pods run as the Dockerfile's user.
#[test]
fn kubernetes_manifests_fit_together() {
    let m = Manifests::load();
    let deploy = m.get("Deployment", "flashgate");
    let (key, body) = configmap_config();
    let cfg = config::parse(&body, "configmap.yaml").unwrap_or_else(|e| panic!("{e}"));

    let replicas = at(deploy, &["spec", "replicas"]).as_u64().unwrap();
    assert!(replicas >= 2, "a fleet: {replicas} replicas");
    let pod = at(deploy, &["spec", "template"]);
    let labels = at(pod, &["metadata", "labels"]);
    assert_eq!(at(deploy, &["spec", "selector", "matchLabels"]), labels);
    let spec = at(pod, &["spec"]);
    let containers = at(spec, &["containers"]).as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    // The config: --config names a file the ConfigMap volume puts there.
    let args = strings(at(c, &["args"]));
    assert_eq!(args[0], "serve");
    assert!(!args.iter().any(|a| a == "--listen"));
    let config_path = Path::new(flag_value(&args, "--config"));
    let mount = at(c, &["volumeMounts"])
        .as_array()
        .unwrap()
        .iter()
        .find(|v| Path::new(v["mountPath"].as_str().unwrap()) == config_path.parent().unwrap())
        .expect("a volume on the config's directory");
    let volume = at(spec, &["volumes"])
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let cm = m.get("ConfigMap", text(volume, &["configMap", "name"]));
    assert_eq!(
        config_path.file_name().unwrap().to_str().unwrap(),
        key,
        "the ConfigMap's key is the file --config reads"
    );
    assert!(at(cm, &["data"]).get(&key).is_some());

    // Probes: flashgate's health path on its proxy port, no token.
    let health = cfg.health_path.as_deref().expect("health_path on");
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = at(c, &[probe, "httpGet"]);
        assert_eq!(text(get, &["path"]), health, "{probe}");
        assert_eq!(
            container_port(c, at(get, &["port"])),
            u64::from(cfg.listen.port()),
            "{probe} asks the proxy port"
        );
        assert!(
            get.get("httpHeaders").is_none(),
            "{probe}: /healthz needs no token"
        );
    }

    // The Secret provides every variable the config reads; the write token is not optional.
    let secret = m.only("Secret");
    let secret_name = text(secret, &["metadata", "name"]);
    let values = at(secret, &["stringData"]).as_object().unwrap();
    let env = at(c, &["env"]).as_array().unwrap();
    let admin = cfg.admin.as_ref().expect("admin on");
    for var in secret_envs(&cfg) {
        let e = env
            .iter()
            .find(|e| e["name"] == var.as_str())
            .unwrap_or_else(|| panic!("the container does not set {var}"));
        let r = at(e, &["valueFrom", "secretKeyRef"]);
        assert_eq!(text(r, &["name"]), secret_name, "{var}");
        assert!(
            values.contains_key(text(r, &["key"])),
            "the Secret has {var}"
        );
        if var == admin.token_env {
            assert!(r.get("optional").is_none_or(|o| o == false));
        }
    }
    // Its values are placeholders that flashgate itself refuses on this admin address, so
    // pods started with them exit instead of serving a guessable token.
    let value = |var: &str| values[var].as_str().unwrap().to_owned();
    for v in values.values() {
        assert!(
            v.as_str().unwrap().contains("REPLACE"),
            "a placeholder: {v}"
        );
    }
    let read_token = admin.read_token_env.as_deref().map(value);
    let tokens = flashgate::admin::auth::Tokens::new(value(&admin.token_env), read_token);
    assert!(
        tokens.check_for(admin.listen).is_err(),
        "flashgate must refuse the placeholder tokens on {}",
        admin.listen
    );

    // Shutdown: preStop pause + drain < grace period.
    let grace = at(spec, &["terminationGracePeriodSeconds"])
        .as_u64()
        .unwrap();
    let pause = strings(at(c, &["lifecycle", "preStop", "exec", "command"]));
    assert_eq!(pause[0], "sleep");
    let pause: u64 = pause[1].parse().unwrap();
    assert!(
        Duration::from_secs(grace) > Duration::from_secs(pause) + cfg.server.drain_timeout,
        "terminationGracePeriodSeconds {grace} <= preStop {pause}s + drain {:?}",
        cfg.server.drain_timeout
    );

    // The Dockerfile's user, never root; a read-only root filesystem, which flashgate allows.
    let dockerfile = read("Dockerfile");
    let uid: u64 = dockerfile
        .split("--uid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("Dockerfile: useradd --uid N");
    assert_eq!(
        at(spec, &["securityContext", "runAsUser"]).as_u64(),
        Some(uid)
    );
    assert_eq!(
        at(spec, &["securityContext", "runAsNonRoot"]),
        &Value::Bool(true)
    );
    let sc = at(c, &["securityContext"]);
    assert_eq!(at(sc, &["readOnlyRootFilesystem"]), &Value::Bool(true));
    assert_eq!(at(sc, &["allowPrivilegeEscalation"]), &Value::Bool(false));
    assert!(cfg.access_log.as_ref().is_none_or(|a| a.path.is_none()));
    for kind in ["requests", "limits"] {
        for what in ["cpu", "memory"] {
            assert!(
                at(c, &["resources", kind]).get(what).is_some(),
                "resources.{kind}.{what}"
            );
        }
    }

    // The Service sends to the proxy port of these pods.
    let svc = m.get("Service", "flashgate");
    assert_eq!(at(svc, &["spec", "selector"]), labels);
    let ports = at(svc, &["spec", "ports"]).as_array().unwrap();
    assert_eq!(ports.len(), 1, "the admin port stays out of the Service");
    assert_eq!(
        container_port(c, at(&ports[0], &["targetPort"])),
        u64::from(cfg.listen.port())
    );

    // The budget keeps one pod of these through voluntary disruptions.
    let pdb = m.only("PodDisruptionBudget");
    assert_eq!(at(pdb, &["spec", "minAvailable"]).as_u64(), Some(1));
    assert_eq!(at(pdb, &["spec", "selector", "matchLabels"]), labels);
    assert!(1 < replicas);

    // The try-it-out Redis is the config's store, and says it is for trying out only.
    let (host, port) = authority(node_url(&cfg.store.as_ref().expect("store").redis));
    let redis_svc = m.get("Service", &host);
    assert_eq!(
        at(&at(redis_svc, &["spec", "ports"])[0], &["port"]).as_u64(),
        Some(u64::from(port))
    );
    let redis_yaml = read(&format!("{K8S}/redis.yaml"));
    assert!(
        redis_yaml.starts_with("# FOR TRYING IT OUT ONLY; use a managed Redis in production."),
        "redis.yaml is marked for trying it out"
    );
    assert_eq!(
        redis_yaml.matches("FOR TRYING IT OUT ONLY").count(),
        yaml_docs(&format!("{K8S}/redis.yaml")).len(),
        "every resource in redis.yaml is marked"
    );
}

// ---------------------------------------------------------------------------------------
// README

/// The README's "Running several instances" section: every metric it names is one flashgate's
/// registry exports (every family given a sample, then encoded), and every file under
/// deploy/ it links exists.
#[test]
fn readme_fleet_section_names_real_metrics_and_files() {
    let readme = read("README.md");
    let start = readme
        .find("\n## Running several instances\n")
        .expect("the README section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];

    let m = flashgate::metrics::Metrics::new();
    let route = m.route("buy", true);
    route.answered(200, Duration::from_millis(1));
    route.admission("won");
    let _in_flight = route.enter();
    m.reservation_released();
    m.store_call("reserve", Duration::from_millis(1), Some("unavailable"));
    m.upstream_call(Duration::from_millis(1), Some("connect"));
    m.set_sku(
        &support::sku("tee"),
        &flashgate::store::SaleStatus {
            sku: support::sku("tee"),
            stock: Some(1),
            added: Some(1),
            closed: false,
            buyers: 0,
            reservations: Default::default(),
            units: Default::default(),
        },
    );
    let exposition = m.encode_text();
    let mut series = BTreeSet::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        series.insert(name.to_owned());
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(family) = name.strip_suffix(suffix) {
                series.insert(family.to_owned());
            }
        }
    }

    let mut named = BTreeSet::new();
    let mut rest = section;
    while let Some(i) = rest.find("flashgate_") {
        let tail = &rest[i..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        named.insert(tail[..len].to_owned());
        rest = &tail[len..];
    }
    assert!(
        named.len() >= 8,
        "the section names what to watch: {named:?}"
    );
    for name in &named {
        assert!(
            series.contains(name),
            "the README names {name}, which /metrics does not export ({series:?})"
        );
    }

    let mut rest = section;
    let mut linked = 0;
    while let Some(i) = rest.find("](deploy/") {
        let tail = &rest[i + 2..];
        let end = tail.find(')').unwrap();
        assert!(repo(&tail[..end]).exists(), "README links {}", &tail[..end]);
        linked += 1;
        rest = &tail[end..];
    }
    assert!(linked >= 4, "the section links the deploy files");
}

/// The one server's URL of a `store.redis` (the fleet's configs use one Redis).
fn node_url(target: &flashgate::config::RedisTarget) -> &str {
    match target {
        flashgate::config::RedisTarget::Node(url) => url,
        flashgate::config::RedisTarget::Cluster(seeds) => {
            panic!("expected one Redis, got {seeds:?}")
        }
    }
}
