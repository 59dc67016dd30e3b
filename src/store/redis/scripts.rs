//! Our Lua scripts and how they are run: `lua/*.lua` are embedded at build time
//! ([`LuaScript`]) and sent as `EVALSHA` in one buffer ([`script_cmd`]). On `NOSCRIPT`
//! (Redis restarted, `SCRIPT FLUSH`, a failover) the script is loaded and the call
//! run again ([`Shared::run_script_tracked`]).

use std::sync::atomic::{AtomicBool, Ordering};

use redis::{ErrorKind, Script, ServerErrorKind, Value};

use super::Shared;
use crate::store::{SaleKeys, StoreError};

/// Script runs that may meet NOSCRIPT (each loads the script again) before a call fails. A
/// NOSCRIPT means the script did not run, so trying again is always safe; the whole call is
/// bounded by `response_timeout` anyway. 3 was not enough on a loaded machine with SCRIPT FLUSH
/// repeated mid-sale (a buyer got 503 in CI); a flush storm that outlasts 20 loads is a
/// store that is not really there.
const NOSCRIPT_TRIES: u32 = 20;

impl Shared {
    /// Run one of our scripts with the sale's four keys and `args`.
    pub(super) async fn run_script(
        &self,
        script: &LuaScript,
        keys: &SaleKeys,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let mut cmd = script_cmd(script, keys, args.len(), args.iter().map(|a| a.len()).sum());
        cmd.arg(args);
        self.run_script_tracked(script, cmd, &AtomicBool::new(false))
            .await
    }

    /// Run `cmd` (from [`script_cmd`], arguments added), setting `sent` once the script may
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
            // NOSCRIPT (Redis restarted, `SCRIPT FLUSH`, a failover): load the script and run
            // it again. Another NOSCRIPT means the cache was flushed again in between: the
            // store is there, so try again rather than fail the buyer.
            let mut tries = 1;
            loop {
                match cmd.query_async::<Value>(&mut c).await {
                    Err(e)
                        if tries < NOSCRIPT_TRIES
                            && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
                    {
                        tries += 1;
                        redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(script.code)
                            .query_async::<Value>(&mut c)
                            .await?;
                    }
                    reply => return reply,
                }
            }
        })
        .await
    }
}

/// `EVALSHA <script> 4 <the sale's keys>`, with room for `args` more arguments of `bytes`
/// bytes in all. The command is built in one buffer (redis-rs' `ScriptInvocation` allocates
/// a vector per argument, and a reserve batch has four per buyer).
pub(super) fn script_cmd(
    script: &LuaScript,
    keys: &SaleKeys,
    args: usize,
    bytes: usize,
) -> redis::Cmd {
    let keys = keys.script_keys();
    let mut cmd = redis::Cmd::with_capacity(
        3 + keys.len() + args,
        64 + keys.iter().map(|k| k.len()).sum::<usize>() + bytes,
    );
    cmd.arg("EVALSHA")
        .arg(&script.hash)
        .arg(keys.len())
        .arg(&keys[..]);
    cmd
}

/// One of `lua/*.lua`: its source (for `SCRIPT LOAD`) and its SHA1 (for `EVALSHA`).
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
