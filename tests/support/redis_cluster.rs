//! A real Redis Cluster for integration tests: `redis-server --cluster-enabled yes` processes on
//! private loopback ports, joined by `redis-cli --cluster create`, in one temp dir; killed on
//! drop. Masters only, or masters with one replica each (for failover).
//!
//! Tests use it to play the operator's story: buy on a cluster, flush every node's script
//! cache, kill and restart a node, kill a master and watch its replica take over.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the cluster may take to form (every node `cluster_state:ok`).
const FORM_DEADLINE: Duration = Duration::from_secs(30);
const CLI_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    /// Replicas per master, as started.
    replicas: usize,
}

struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisCluster {
    /// `masters` masters, each with `replicas` replicas, formed and answering.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::Builder::new()
            .prefix("flashgate-cluster-")
            .tempdir()
            .expect("create temp dir for the cluster");
        let ports = free_ports(masters * (1 + replicas));
        let mut cluster = RedisCluster {
            nodes: ports
                .iter()
                .map(|&port| {
                    let node_dir = dir.path().join(port.to_string());
                    std::fs::create_dir_all(&node_dir).expect("node dir");
                    Node {
                        port,
                        dir: node_dir,
                        child: None,
                    }
                })
                .collect(),
            dir,
            replicas,
        };
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create (apt-get install -y redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_formed();
        if replicas > 0 {
            cluster.wait_replicas_synced();
        }
        cluster
    }

    /// The seed URLs for `store.cluster`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// `store.cluster` as a YAML flow sequence.
    pub fn yaml_seeds(&self) -> String {
        let quoted: Vec<String> = self.seeds().iter().map(|s| format!("\"{s}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The port of the master that serves `key`'s slot now.
    pub fn master_for(&self, key: &str) -> u16 {
        let slot: i64 = self.cli_any(&["CLUSTER", "KEYSLOT", key]);
        let slots: ::redis::Value = self.cli_any(&["CLUSTER", "SLOTS"]);
        let ::redis::Value::Array(ranges) = slots else {
            panic!("CLUSTER SLOTS: {slots:?}")
        };
        for range in ranges {
            let ::redis::Value::Array(parts) = range else {
                continue;
            };
            let lo: i64 = ::redis::from_redis_value(parts[0].clone()).unwrap();
            let hi: i64 = ::redis::from_redis_value(parts[1].clone()).unwrap();
            if (lo..=hi).contains(&slot) {
                let ::redis::Value::Array(master) = &parts[2] else {
                    panic!("CLUSTER SLOTS master entry: {:?}", parts[2])
                };
                let port: i64 = ::redis::from_redis_value(master[1].clone()).unwrap();
                return u16::try_from(port).unwrap();
            }
        }
        panic!("no master for slot {slot}")
    }

    /// Run a command on the node at `port`.
    pub fn cli<T: ::redis::FromRedisValue>(&self, port: u16, args: &[&str]) -> T {
        let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut con = client
            .get_connection_with_timeout(CLI_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to node {port}: {e}"));
        con.set_read_timeout(Some(CLI_TIMEOUT)).unwrap();
        let (name, rest) = args.split_first().expect("a command");
        let mut cmd = ::redis::cmd(name);
        for a in rest {
            cmd.arg(*a);
        }
        cmd.query(&mut con)
            .unwrap_or_else(|e| panic!("node {port}: {args:?}: {e}"))
    }

    /// Run a command on any live node.
    fn cli_any<T: ::redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let port = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a live node")
            .port;
        self.cli(port, args)
    }

    /// A command on every live node (e.g. `SCRIPT FLUSH`).
    pub fn on_every_node(&self, args: &[&str]) {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let _: ::redis::Value = self.cli(n.port, args);
        }
    }

    /// `GET key` through the node owning it.
    pub fn get(&self, key: &str) -> Option<String> {
        self.cli(self.master_for(key), &["GET", key])
    }

    /// `HGET key field` through the node owning it.
    pub fn hget(&self, key: &str, field: &str) -> Option<String> {
        self.cli(self.master_for(key), &["HGET", key, field])
    }

    /// The port of a replica of the master at `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let nodes: String = self.cli(port, &["CLUSTER", "NODES"]);
        let id = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .and_then(|l| l.split(' ').next())
            .expect("the master's own line");
        let line = nodes
            .lines()
            .find(|l| l.split(' ').nth(3) == Some(id))
            .unwrap_or_else(|| panic!("no replica of {port}: {nodes}"));
        let addr = line.split(' ').nth(1).expect("an address");
        let port = addr.split(['@', ':']).nth(1).expect("a port");
        port.parse().expect("a port number")
    }

    /// Freeze (SIGSTOP) or thaw (SIGCONT) the node at `port`.
    pub fn freeze(&self, port: u16, frozen: bool) {
        let node = self.nodes.iter().find(|n| n.port == port).expect("a node");
        let pid = node.child.as_ref().expect("a live node").id();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGKILL the node at `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self.node_mut(port);
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the node at `port` again (its `nodes.conf` brings it back into the cluster).
    pub fn restart(&mut self, port: u16) {
        self.kill(port);
        let i = self.nodes.iter().position(|n| n.port == port).unwrap();
        self.spawn(i);
    }

    /// Wait until every master has its replicas attached and synced, and says so in its own
    /// `CLUSTER NODES` (a replica that never synced cannot take over; `replica_of` reads the
    /// master's view). `redis-cli --cluster create` returns while replicas still join.
    pub fn wait_replicas_synced(&self) {
        let deadline = Instant::now() + FORM_DEADLINE;
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let info: String = self.cli(n.port, &["INFO", "replication"]);
                let nodes: String = self.cli(n.port, &["CLUSTER", "NODES"]);
                let ready = if info.contains("role:slave") {
                    info.contains("master_link_status:up")
                } else {
                    let me = nodes.lines().find(|l| l.contains("myself"));
                    let id = me.and_then(|l| l.split(' ').next()).unwrap_or("?");
                    let serves_slots = me.is_some_and(|l| l.split(' ').count() > 8);
                    let attached = nodes
                        .lines()
                        .filter(|l| l.split(' ').nth(3) == Some(id))
                        .count();
                    let synced = info
                        .lines()
                        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                        .count();
                    !serves_slots || (attached >= self.replicas && synced >= self.replicas)
                };
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} has not all its replicas synced: {info}\n{nodes}",
                    n.port
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Wait until the replica of the master at `port` has applied everything the master has
    /// written so far (replication is asynchronous: a test that is not about lost writes
    /// calls this before it kills a master).
    pub fn wait_replica_caught_up(&self, port: u16) {
        let offset = |p: u16, field: &str| -> u64 {
            let info: String = self.cli(p, &["INFO", "replication"]);
            info.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let target = offset(port, "master_repl_offset:");
        let replica = self.replica_of(port);
        let deadline = Instant::now() + FORM_DEADLINE;
        while offset(replica, "slave_repl_offset:") < target {
            assert!(
                Instant::now() < deadline,
                "replica {replica} never caught up with {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until another node than `old` serves `key`'s slot and every live node says
    /// `cluster_state:ok` (a replica was promoted).
    pub fn wait_promoted(&self, key: &str, old: u16) {
        let deadline = Instant::now() + FORM_DEADLINE;
        while self.master_for(key) == old {
            assert!(Instant::now() < deadline, "no replica took over from {old}");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_formed();
    }

    /// Wait until every live node says `cluster_state:ok`.
    pub fn wait_formed(&self) {
        let deadline = Instant::now() + FORM_DEADLINE;
        loop {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let info: Option<String> = cluster_info(n.port);
                info.is_some_and(|i| i.contains("cluster_state:ok"))
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not form in {FORM_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Calls of the commands named by `stats` (`cmdstat_evalsha`, …) summed over live nodes.
    pub fn command_calls(&self, stats: &[&str]) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| {
                let info: String = self.cli(n.port, &["INFO", "commandstats"]);
                info.lines()
                    .filter(|l| {
                        stats
                            .iter()
                            .any(|s| l.strip_prefix(s).is_some_and(|r| r.starts_with(':')))
                    })
                    .filter_map(|l| l.split([':', ',']).find_map(|f| f.strip_prefix("calls=")))
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let child = Command::new("redis-server")
            .args(["--port", &node.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "1000"])
            // A replica's first sync at once (the default waits 5 s for more replicas).
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&node.dir)
            .arg("--logfile")
            .arg(node.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (apt-get install -y redis-server)");
        node.child = Some(child);
        let port = node.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster_info(port).is_none() {
            assert!(Instant::now() < deadline, "node {port} never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `CLUSTER INFO` of one node, `None` while it does not answer.
fn cluster_info(port: u16) -> Option<String> {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    con.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    ::redis::cmd("CLUSTER").arg("INFO").query(&mut con).ok()
}

/// `n` loopback ports that are free, each with its cluster bus port (+10000) free too.
fn free_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(n);
    let mut held = Vec::new();
    while ports.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = l.local_addr().unwrap().port();
        if port < 55_000
            && let Ok(bus) = TcpListener::bind(("127.0.0.1", port + 10_000))
        {
            ports.push(port);
            held.push(bus);
        }
        held.push(l);
    }
    ports
}
