//! Waiting rooms on Redis: one `lua/room.lua` call per decision, on the Redis clock, with the
//! room's four keys (one hash tag, so one Cluster slot). See [`crate::store::room`] for the
//! model. Unlike reserves, room calls are not batched: a visitor asks at most once per poll,
//! and an admitted visitor passes with no call at all.

use redis::Value;

use super::Shared;
use super::reply::{non_negative, split_reply, text, unexpected};
use crate::store::StoreError;
use crate::store::room::{
    RoomCall, RoomMode, RoomReply, RoomRules, RoomStatus, room_key, validate,
};

impl Shared {
    pub(super) async fn room_inner(
        &self,
        rules: &RoomRules,
        call: &RoomCall,
    ) -> Result<RoomReply, StoreError> {
        validate(rules)?;
        let keys =
            ["queue", "seen", "active", "state"].map(|p| room_key(&self.prefix, &rules.room, p));
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (from, start) = match rules.prequeue {
            Some((f, s)) => (f.to_string(), s.to_string()),
            None => (String::new(), String::new()),
        };
        let mut args: Vec<String> = vec![
            String::new(),
            rules.total_active.to_string(),
            rules.new_per_minute.to_string(),
            rules.session_ms.to_string(),
            if rules.random { "1" } else { "0" }.into(),
            from,
            start,
        ];
        match call {
            RoomCall::Visit {
                place,
                new_id,
                draw,
                seed,
            } => {
                args[0] = "visit".into();
                args.extend([
                    place.clone().unwrap_or_default(),
                    new_id.clone(),
                    (draw % crate::store::room::RANDOM_SPAN).to_string(),
                    seed.clone(),
                ]);
            }
            RoomCall::Refresh { id } => {
                args[0] = "refresh".into();
                args.push(id.clone());
            }
            RoomCall::Status => args[0] = "status".into(),
            RoomCall::SetMode(m) => {
                args[0] = "mode".into();
                args.push(m.as_str().into());
            }
        }
        let arg_refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let reply = self
            .run_script_keys(&self.room, &key_refs, &arg_refs)
            .await?;
        parse(reply)
    }
}

fn parse(reply: Value) -> Result<RoomReply, StoreError> {
    let (status, rest) = split_reply(reply, "room")?;
    let n = |v: &Value| non_negative(v, "room count");
    let counts = |r: &[Value]| -> Result<RoomStatus, StoreError> {
        let [q, a, adm, last, mode, now] = r else {
            return Err(unexpected("room", &status, r));
        };
        Ok(RoomStatus {
            queued: n(q)?,
            active: n(a)?,
            admitted_total: n(adm)?,
            admitted_last_minute: n(last)?,
            mode: text(mode)
                .and_then(|m| RoomMode::parse(&m))
                .ok_or_else(|| unexpected("room", &status, r))?,
            now_ms: n(now)?,
        })
    };
    let id = |v: &Value| text(v).ok_or_else(|| unexpected("room", &status, &rest));
    match (status.as_str(), rest.as_slice()) {
        ("admitted", [i, e]) => Ok(RoomReply::Admitted {
            id: id(i)?,
            expires_ms: n(e)?,
        }),
        ("queued", [i, new, pos, tail @ ..]) => Ok(RoomReply::Queued {
            id: id(i)?,
            new: n(new)? == 1,
            position: n(pos)?,
            status: counts(tail)?,
        }),
        ("refreshed", [Value::Int(-1)]) => Ok(RoomReply::Refreshed { expires_ms: None }),
        ("refreshed", [e]) => Ok(RoomReply::Refreshed {
            expires_ms: Some(n(e)?),
        }),
        ("status", tail) => Ok(RoomReply::Status(counts(tail)?)),
        _ => Err(unexpected("room", &status, &rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_become_decisions() {
        let admitted = Value::Array(vec![bulk("admitted"), bulk("ab"), Value::Int(9)]);
        assert_eq!(
            parse(admitted).unwrap(),
            RoomReply::Admitted {
                id: "ab".into(),
                expires_ms: 9
            }
        );
        let queued = Value::Array(vec![
            bulk("queued"),
            bulk("ab"),
            Value::Int(1),
            Value::Int(3),
            Value::Int(4),
            Value::Int(5),
            Value::Int(6),
            Value::Int(7),
            bulk("paused"),
            Value::Int(8),
        ]);
        let RoomReply::Queued {
            new,
            position,
            status,
            ..
        } = parse(queued).unwrap()
        else {
            panic!("queued");
        };
        assert!(new);
        assert_eq!(position, 3);
        assert_eq!((status.queued, status.mode), (4, RoomMode::Paused));
        let gone = Value::Array(vec![bulk("refreshed"), Value::Int(-1)]);
        assert_eq!(
            parse(gone).unwrap(),
            RoomReply::Refreshed { expires_ms: None }
        );
        let odd = Value::Array(vec![bulk("status"), Value::Int(1)]);
        assert!(matches!(parse(odd), Err(StoreError::Protocol(_))));
    }
}
