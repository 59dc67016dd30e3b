//! `flashgate room status|list|pause|resume|drain`: the waiting rooms through the admin API
//! (`admin/rooms.rs`), printed like `sale` (tables for people, `--json` as it came).

use std::process::ExitCode;

use clap::Subcommand;
use http::Method;

use super::{AdminArgs, ask, client, print_answer, run};
use crate::admin::render;

#[derive(Subcommand)]
pub enum RoomAction {
    /// Queued, active, admitted per minute and the estimated wait of a room (the route's
    /// name).
    Status { name: String },
    /// Every room of the running config.
    List,
    /// Admit no one new from the queue; active visitors keep going.
    Pause { name: String },
    /// Admit from the queue again (after pause or drain).
    Resume { name: String },
    /// Admit no one new and extend no session: every active visitor's session ends within
    /// `session_duration`; new visitors queue. `resume` undoes it.
    Drain { name: String },
}

/// `flashgate room …`.
pub fn room(admin: &AdminArgs, action: RoomAction) -> ExitCode {
    let segment = |n: &str| {
        percent_encoding::utf8_percent_encode(n, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let (method, path, name, verb) = match &action {
        RoomAction::List => {
            return run(admin, async |token| {
                let reply = ask(
                    admin,
                    token,
                    Method::GET,
                    "/v1/rooms",
                    None,
                    client::CALL_TIMEOUT,
                )
                .await?;
                Ok(print_answer(admin, &reply, "rooms", render::rooms))
            });
        }
        RoomAction::Status { name } => (
            Method::GET,
            format!("/v1/rooms/{}", segment(name)),
            name,
            None,
        ),
        RoomAction::Pause { name } => (
            Method::POST,
            format!("/v1/rooms/{}/pause", segment(name)),
            name,
            Some("paused: no one new is let in; active visitors keep going"),
        ),
        RoomAction::Resume { name } => (
            Method::POST,
            format!("/v1/rooms/{}/resume", segment(name)),
            name,
            Some("open: letting visitors in from the queue"),
        ),
        RoomAction::Drain { name } => (
            Method::POST,
            format!("/v1/rooms/{}/drain", segment(name)),
            name,
            Some("draining: no one new is let in and sessions are not extended"),
        ),
    };
    run(admin, async |token| {
        let reply = ask(admin, token, method, &path, None, client::CALL_TIMEOUT).await?;
        Ok(print_answer(admin, &reply, name, |v| {
            let status = render::room_status(v);
            match verb {
                Some(verb) => format!("room {name}: {verb}\n{status}"),
                None => status,
            }
        }))
    })
}
