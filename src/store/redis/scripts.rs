//! Our Lua scripts and how they are run: `lua/*.lua` are embedded at build time
//! ([`LuaScript`]) and sent as `EVALSHA` in one buffer ([`keys_cmd`]). On `NOSCRIPT`
//! (Redis restarted, `SCRIPT FLUSH`, a failover) the call is sent again as `EVAL` with the
//! script's source, which runs it and caches it ([`Shared::run_script_tracked`]).

use std::sync::atomic::{AtomicBool, Ordering};

use redis::{ErrorKind, Script, ServerErrorKind, Value};

use super::Shared;
use crate::store::{SaleKeys, StoreError};

impl Shared {
    /// Run one of our scripts with the sale's four keys and `args`.
    pub(super) async fn run_script(
        &self,
        script: &LuaScript,
        keys: &SaleKeys,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        self.run_script_keys(script, &keys.script_keys(), args)
            .await
    }

    /// [`run_script`](Self::run_script) with any keys (one server, or one Cluster slot).
    pub(super) async fn run_script_keys(
        &self,
        script: &LuaScript,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let mut cmd = keys_cmd(script, keys, args.len(), args.iter().map(|a| a.len()).sum());
        cmd.arg(args);
        self.run_script_tracked(script, cmd, &AtomicBool::new(false))
            .await
    }

    /// Run `cmd` (from [`keys_cmd`], arguments added), setting `sent` once the script may
    /// have reached Redis (a connection was found and the call started): from then on a
    /// failure is ambiguous.
    pub(super) async fn run_script_tracked(
        &self,
        script: &LuaScript,
        cmd: redis::Cmd,
        sent: &AtomicBool,
    ) -> Result<Value, StoreError> {
        self.with_conn(|mut c| async move {
            sent.store(true, Ordering::Relaxed);
            match cmd.query_async::<Value>(&mut c).await {
                // NOSCRIPT (Redis restarted, `SCRIPT FLUSH`, a failover): the script did not
                // run. Send it whole with EVAL, which runs it and caches it again, on the node
                // that owns the sale's slot (a `SCRIPT LOAD` on a cluster goes to every master
                // and fails while any one of them is down).
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    eval_cmd(script, &cmd).query_async::<Value>(&mut c).await
                }
                reply => reply,
            }
        })
        .await
    }
}

impl Shared {
    /// Like [`Shared::run_script_tracked`], followed on the same connection (so on the same
    /// node) by `WAIT replicas timeout`: the script's reply, and how many replicas had
    /// acknowledged its writes when WAIT returned.
    pub(super) async fn run_script_replicated(
        &self,
        script: &LuaScript,
        cmd: redis::Cmd,
        sent: &AtomicBool,
        wait: Replication,
    ) -> Result<(Value, u64), StoreError> {
        let timeout_ms = u64::try_from(wait.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let pipe = |cmd: redis::Cmd| {
            let mut pipe = redis::pipe();
            pipe.add_command(cmd)
                .cmd("WAIT")
                .arg(wait.replicas)
                .arg(timeout_ms);
            pipe
        };
        self.with_conn(|mut c| async move {
            sent.store(true, Ordering::Relaxed);
            let replies = match pipe(cmd.clone()).query_async::<Vec<Value>>(&mut c).await {
                // NOSCRIPT: the script did not run (WAIT, with nothing new to wait for,
                // returned at once): again with its source.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    pipe(eval_cmd(script, &cmd))
                        .query_async::<Vec<Value>>(&mut c)
                        .await?
                }
                reply => reply?,
            };
            let mut replies = replies.into_iter();
            let (Some(reply), Some(Value::Int(acks))) = (replies.next(), replies.next()) else {
                return Err(redis::RedisError::from((
                    ErrorKind::Client,
                    "script + WAIT pipeline: unexpected replies",
                )));
            };
            Ok((reply, u64::try_from(acks).unwrap_or(0)))
        })
        .await
    }
}

/// `store.wait_replicas`: how many replicas must hold a reservation before its buyer is
/// forwarded, and how long to wait for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    pub replicas: u32,
    pub timeout: std::time::Duration,
}

/// `cmd` (an `EVALSHA <sha> ...` from [`keys_cmd`]) as `EVAL <source> ...`.
fn eval_cmd(script: &LuaScript, cmd: &redis::Cmd) -> redis::Cmd {
    let mut eval = redis::Cmd::with_capacity(cmd.args_iter().count(), script.code.len() + 256);
    eval.arg("EVAL").arg(script.code);
    for arg in cmd.args_iter().skip(2) {
        if let redis::Arg::Simple(bytes) = arg {
            eval.arg(bytes);
        }
    }
    eval
}

/// `EVALSHA <script> <n> <keys…>`, with room for `args` more arguments of `bytes` bytes in
/// all (keys on one server, or in one Cluster slot: the first key routes the call). The
/// command is built in one buffer (redis-rs' `ScriptInvocation` allocates a vector per
/// argument, and a reserve batch has four per buyer).
pub(super) fn keys_cmd(script: &LuaScript, keys: &[&str], args: usize, bytes: usize) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(
        3 + keys.len() + args,
        64 + keys.iter().map(|k| k.len()).sum::<usize>() + bytes,
    );
    cmd.arg("EVALSHA")
        .arg(&script.hash)
        .arg(keys.len())
        .arg(keys);
    cmd
}

/// One of `lua/*.lua`: its source (for `EVAL`) and its SHA1 (for `EVALSHA`).
pub(super) struct LuaScript {
    code: &'static str,
    hash: String,
}

impl LuaScript {
    pub(super) fn new(code: &'static str) -> Self {
        LuaScript {
            code,
            hash: Script::new(code).get_hash().to_owned(),
        }
    }
}
