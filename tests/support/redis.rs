//! A real `redis-server` for integration tests: one process per test, on a
//! unix socket in its own temp dir, no persistence (or, from
//! [`RedisServer::start_persistent`], an AOF fsynced on every write). Killed on drop.
//!
//! Tests use it to play the operator's story: start Redis, kill it, restart
//! it (empty data, or the data kept in its AOF; the script cache is always
//! empty), freeze it (SIGSTOP), flush scripts.
//!
//! Set `REDIS_SERVER_BIN` to use a binary other than `redis-server` on PATH.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh server may take to answer PING before the test fails.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Bound on one raw command from [`RedisServer::cli`].
const CLI_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisServer {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
    /// `appendonly yes` + `appendfsync always`: every acknowledged write survives a SIGKILL.
    persistent: bool,
}

impl RedisServer {
    /// Spawn a server and wait until it answers PING.
    pub fn start() -> RedisServer {
        RedisServer::start_with(false)
    }

    /// Like [`RedisServer::start`], but with an append-only file fsynced before every reply
    /// (`appendonly yes`, `appendfsync always`) in the server's own dir, which outlives
    /// [`RedisServer::restart`]: after a SIGKILL and a restart every acknowledged write is
    /// back, and only the script cache is empty (as after a crash of a production Redis run
    /// the way the README recommends).
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_with(true)
    }

    fn start_with(persistent: bool) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("flashgate-redis-")
            .tempdir()
            .expect("create temp dir for redis-server");
        let socket = dir.path().join("redis.sock");
        let mut server = RedisServer {
            dir,
            socket,
            child: None,
            persistent,
        };
        server.spawn();
        server
    }

    /// URL for redis-rs (`unix:///…/redis.sock`).
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Process id of the running server, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL the server (no shutdown, nothing saved) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill the server if running and start it again on the same socket path.
    /// The script cache is always gone; the keys are gone too, as after a crash
    /// of a Redis without persistence, unless the server was started with
    /// [`RedisServer::start_persistent`] (then its AOF brings them back).
    pub fn restart(&mut self) {
        self.kill();
        // redis-server refuses to bind if a stale socket file is left over.
        let _ = std::fs::remove_file(&self.socket);
        self.spawn();
    }

    /// Freeze the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaw a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// `SCRIPT FLUSH`: the next EVALSHA gets NOSCRIPT.
    pub fn script_flush(&self) {
        self.cli(&["SCRIPT", "FLUSH"]);
    }

    /// Run one raw command and return the reply. Panics if the server does
    /// not answer within a few seconds or replies with an error.
    pub fn cli(&self, args: &[&str]) -> ::redis::Value {
        let (name, rest) = args.split_first().expect("cli needs a command");
        let mut con = self
            .sync_connection()
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()));
        let mut cmd = ::redis::cmd(name);
        for arg in rest {
            cmd.arg(*arg);
        }
        cmd.query::<::redis::Value>(&mut con)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// `GET key` as a string (`None` when the key is missing).
    pub fn get(&self, key: &str) -> Option<String> {
        match self.cli(&["GET", key]) {
            ::redis::Value::Nil => None,
            ::redis::Value::BulkString(b) => Some(String::from_utf8(b).expect("utf-8 value")),
            other => panic!("GET {key}: unexpected reply {other:?}"),
        }
    }

    /// `HGET key field` as a string.
    pub fn hget(&self, key: &str, field: &str) -> Option<String> {
        match self.cli(&["HGET", key, field]) {
            ::redis::Value::Nil => None,
            ::redis::Value::BulkString(b) => Some(String::from_utf8(b).expect("utf-8 value")),
            other => panic!("HGET {key} {field}: unexpected reply {other:?}"),
        }
    }

    /// Calls the server has run so far of the commands named by `stats` (`INFO commandstats`
    /// entry names, e.g. `cmdstat_evalsha`).
    pub fn command_calls(&self, stats: &[&str]) -> u64 {
        let info: String = ::redis::from_redis_value(self.cli(&["INFO", "commandstats"])).unwrap();
        info.lines()
            .filter(|l| {
                stats
                    .iter()
                    .any(|s| l.strip_prefix(s).is_some_and(|r| r.starts_with(':')))
            })
            .map(|l| {
                let calls = l.split([':', ',']).find_map(|f| f.strip_prefix("calls="));
                calls
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("{l}"))
            })
            .sum()
    }

    /// `EVALSHA` + `EVAL` calls the server has run so far.
    pub fn script_calls(&self) -> u64 {
        self.command_calls(&["cmdstat_evalsha", "cmdstat_eval"])
    }

    /// The server's log file (useful in assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn sync_connection(&self) -> ::redis::RedisResult<::redis::Connection> {
        let client = ::redis::Client::open(self.url())?;
        let con = client.get_connection_with_timeout(CLI_TIMEOUT)?;
        con.set_read_timeout(Some(CLI_TIMEOUT))?;
        con.set_write_timeout(Some(CLI_TIMEOUT))?;
        Ok(con)
    }

    fn spawn(&mut self) {
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&self.socket)
            .arg("--unixsocketperm")
            .arg("700")
            .args(["--save", "", "--daemonize", "no"])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!(
                    "redis-server not found on PATH: install it (apt-get install -y redis-server)"
                )
            }
            Err(e) => panic!("spawn {bin}: {e}"),
        };
        self.child = Some(child);
        self.wait_ready();
    }

    /// Poll PING until it answers; fail with the server log past the deadline.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("redis-server exited early ({status}):\n{}", self.log());
            }
            if self.socket.exists() && self.ping() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "redis-server did not answer PING within {START_DEADLINE:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut con) = self.sync_connection() else {
            return false;
        };
        ::redis::cmd("PING").query::<String>(&mut con).is_ok()
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("redis-server is not running");
        let status = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL also ends a paused (SIGSTOPped) process.
        self.kill();
    }
}
