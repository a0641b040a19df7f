//! Room history and publishing: the capped stream, offsets and epochs, in one script per
//! operation on the room's slot.
//!
//! A room's `meta` hash holds its epoch and newest offset; its `log` stream holds the last
//! `stream_length` messages with entry ids `0-<offset>` (`XADD MAXLEN` is exact, so the
//! first kept id tells whether a gap can still be filled). When `meta` is missing (never
//! written, expired after `history_ttl` without a publish, or flushed) the next script to
//! touch the room starts a new epoch with the candidate the caller passes and drops any
//! stray stream. Publishing appends, refreshes both TTLs and, for `leader` acks,
//! `SPUBLISH`es the publication in the same script, so a delivered message always exists
//! in history. For `replicated` acks the script only stores; the caller then runs `WAIT`
//! on the same master and publishes once a replica has the entry.

use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Script, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::sync::LazyLock;

use super::Shared;
use super::error::corrupt;
use crate::cluster::{ClusterError, ClusterResult, Publication, Replay, RoomPosition, new_epoch};
use crate::config::AckMode;
use crate::protocol::{ClientInfo, Offset};

/// Lua helper: the room's epoch and offset, starting a new epoch when `meta` is missing.
const ENSURE_META: &str = r"
local function ensure_meta(meta, log, candidate, ttl)
  local m = redis.call('HMGET', meta, 'epoch', 'offset')
  if m[1] then return m[1], tonumber(m[2]) end
  redis.call('DEL', log)
  redis.call('HSET', meta, 'epoch', candidate, 'offset', 0)
  redis.call('PEXPIRE', meta, ttl)
  return candidate, 0
end
";

/// Lua helper: the replication id of the master running the script. It changes when a
/// replica is promoted (or a master restarts), which is how a publish notices that
/// another master wrote the room's history before.
const WRITER_ID: &str = r"
local function writer_id()
  local info = redis.call('INFO', 'replication')
  return string.match(info, 'master_replid:(%w+)') or ''
end
";

/// KEYS: meta, log, channel. ARGV: candidate epoch, ttl ms, max length, body, announce.
///
/// When another master wrote the room before (failover, restart, slot move), messages it
/// acknowledged after its last replicated write may be gone and their offsets would be
/// handed out again. The history therefore continues under a new epoch that remembers
/// the previous one and the offset up to which it is intact (`prev_epoch`, `prev_upto`).
const PUBLISH: &str = r"
local epoch, offset = ensure_meta(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
local me = writer_id()
local writer = redis.call('HGET', KEYS[1], 'writer')
if writer and writer ~= me then
  redis.call('HSET', KEYS[1], 'prev_epoch', epoch, 'prev_upto', offset, 'epoch', ARGV[1])
  epoch = ARGV[1]
end
offset = offset + 1
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '0-' .. offset, 'm', ARGV[4])
redis.call('HSET', KEYS[1], 'offset', offset, 'writer', me)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if ARGV[5] == '1' then
  redis.call('SPUBLISH', KEYS[3], 'P ' .. offset .. ' ' .. epoch .. ' ' .. ARGV[4])
end
return {epoch, tostring(offset)}
";

/// KEYS: meta, log. ARGV: candidate epoch, ttl ms.
const POSITION: &str = r"
local epoch, offset = ensure_meta(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return {epoch, tostring(offset)}
";

/// KEYS: meta, log. ARGV: candidate epoch, ttl ms, after, epoch.
/// Returns {epoch, offset, '1', bodies...} or {epoch, offset, '0'} when not recoverable.
/// A position in the previous epoch is still recoverable up to where that epoch is
/// intact; the replayed messages then carry the current epoch.
const HISTORY: &str = r"
local epoch, offset = ensure_meta(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
local after = tonumber(ARGV[3])
local lost = {epoch, tostring(offset), '0'}
local prev = redis.call('HMGET', KEYS[1], 'prev_epoch', 'prev_upto')
local continues = ARGV[4] == epoch
  or (prev[1] and ARGV[4] == prev[1] and after <= tonumber(prev[2]))
if not continues or after > offset then return lost end
local out = {epoch, tostring(offset), '1'}
if after == offset then return out end
local first = '0-' .. (after + 1)
local entries = redis.call('XRANGE', KEYS[2], first, '+')
if #entries == 0 or entries[1][1] ~= first then return lost end
for _, entry in ipairs(entries) do out[#out + 1] = entry[2][2] end
return out
";

static PUBLISH_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_meta(&format!("{WRITER_ID}{PUBLISH}")));
static POSITION_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_meta(POSITION));
static HISTORY_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_meta(HISTORY));

fn with_meta(body: &str) -> Script {
    Script::new(&format!("{ENSURE_META}{body}"))
}

/// What the stream and the channel carry besides offset and epoch.
#[derive(Serialize, Deserialize)]
struct Body {
    from: ClientInfo,
    data: Json,
}

/// The channel message of a publication: `P <offset> <epoch> <body JSON>`.
pub(crate) fn decode_message(room: &str, payload: &str) -> Option<Publication> {
    let rest = payload.strip_prefix("P ")?;
    let (offset, rest) = rest.split_once(' ')?;
    let (epoch, body) = rest.split_once(' ')?;
    let body: Body = serde_json::from_str(body).ok()?;
    Some(Publication {
        room: room.to_owned(),
        offset: offset.parse().ok()?,
        epoch: epoch.to_owned(),
        from: body.from,
        data: body.data,
    })
}

fn ttl_ms(shared: &Shared) -> u64 {
    u64::try_from(shared.config.history_ttl.as_millis()).unwrap_or(u64::MAX)
}

fn parse_position(key: &str, epoch: &str, offset: &str) -> ClusterResult<RoomPosition> {
    let offset = offset.parse().map_err(|e| corrupt(key, e))?;
    Ok(RoomPosition {
        epoch: epoch.to_owned(),
        offset,
    })
}

/// Appends to history and fans out, honouring the configured ack mode.
pub(crate) async fn publish(
    shared: &Shared,
    room: &str,
    from: ClientInfo,
    data: Json,
) -> ClusterResult<Publication> {
    let keys = shared.keys.room(room);
    let body = Body { from, data };
    let body_text = serde_json::to_string(&body).map_err(|e| corrupt(&keys.log, e))?;
    let replicated = shared.config.ack == AckMode::Replicated;

    let mut invocation = PUBLISH_SCRIPT.prepare_invoke();
    invocation.key(&keys.meta).key(&keys.log).key(&keys.channel);
    invocation.arg(new_epoch()).arg(ttl_ms(shared));
    invocation.arg(shared.config.stream_length).arg(&body_text);
    invocation.arg(if replicated { "0" } else { "1" });
    let mut conn = shared.conn();
    let (epoch, offset): (String, String) = shared
        .call(&keys.log, invocation.invoke_async(&mut conn))
        .await?;
    let position = parse_position(&keys.meta, &epoch, &offset)?;

    if replicated {
        wait_for_replica(shared, room, &keys.meta, position.offset).await?;
        let message = format!("P {} {} {body_text}", position.offset, position.epoch);
        let announce = redis::cmd("SPUBLISH")
            .arg(&keys.channel)
            .arg(message)
            .clone();
        let _: i64 = shared
            .call(&keys.channel, announce.query_async(&mut conn))
            .await?;
    }
    Ok(Publication {
        room: room.to_owned(),
        offset: position.offset,
        epoch: position.epoch,
        from: body.from,
        data: body.data,
    })
}

/// `WAIT 1 <timeout>` on the master of the room's slot, which ran the write on this
/// connection.
async fn wait_for_replica(
    shared: &Shared,
    room: &str,
    key: &str,
    offset: Offset,
) -> ClusterResult<()> {
    let timeout_ms = u64::try_from(shared.config.replica_ack_timeout.as_millis()).unwrap_or(1000);
    let mut wait = redis::cmd("WAIT");
    wait.arg(1).arg(timeout_ms);
    let route = Route::with_key(key, SlotAddr::Master);
    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
    let mut conn = shared.conn();
    let acked = shared.call(key, conn.route_command(wait, routing)).await?;
    match acked {
        Value::Int(n) if n >= 1 => Ok(()),
        Value::Int(_) => Err(ClusterError::NotReplicated {
            room: room.to_owned(),
            offset,
        }),
        other => Err(corrupt(key, format!("WAIT answered {other:?}"))),
    }
}

/// Where the room's history stands (starting a new epoch when it has none).
pub(crate) async fn position(shared: &Shared, room: &str) -> ClusterResult<RoomPosition> {
    let keys = shared.keys.room(room);
    let mut invocation = POSITION_SCRIPT.prepare_invoke();
    invocation.key(&keys.meta).key(&keys.log);
    invocation.arg(new_epoch()).arg(ttl_ms(shared));
    let mut conn = shared.conn();
    let (epoch, offset): (String, String) = shared
        .call(&keys.meta, invocation.invoke_async(&mut conn))
        .await?;
    parse_position(&keys.meta, &epoch, &offset)
}

/// Every message after `after` in `epoch`, or not recoverable.
pub(crate) async fn history(
    shared: &Shared,
    room: &str,
    after: Offset,
    epoch: &str,
) -> ClusterResult<Replay> {
    let keys = shared.keys.room(room);
    let mut invocation = HISTORY_SCRIPT.prepare_invoke();
    invocation.key(&keys.meta).key(&keys.log);
    invocation
        .arg(new_epoch())
        .arg(ttl_ms(shared))
        .arg(after)
        .arg(epoch);
    let mut conn = shared.conn();
    let answer: Vec<String> = shared
        .call(&keys.log, invocation.invoke_async(&mut conn))
        .await?;

    let [current, offset, complete, bodies @ ..] = answer.as_slice() else {
        return Err(corrupt(&keys.log, "short history answer"));
    };
    let position = parse_position(&keys.meta, current, offset)?;
    if complete != "1" {
        return Ok(Replay::NotRecoverable(position));
    }
    let mut publications = Vec::with_capacity(bodies.len());
    for (next, text) in (after + 1..).zip(bodies) {
        let body: Body = serde_json::from_str(text).map_err(|e| corrupt(&keys.log, e))?;
        publications.push(Publication {
            room: room.to_owned(),
            offset: next,
            epoch: position.epoch.clone(),
            from: body.from,
            data: body.data,
        });
    }
    Ok(Replay::Complete(publications))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn channel_message_decodes() {
        let text = r#"P 12 abc {"from":{"user":"u","conn":"c"},"data":{"x":1}}"#;
        let publication = decode_message("lobby", text).expect("decodes");
        assert_eq!(publication.offset, 12);
        assert_eq!(publication.epoch, "abc");
        assert_eq!(publication.from.user, "u");
        assert_eq!(publication.data, json!({"x": 1}));
        assert!(decode_message("lobby", "P x abc {}").is_none());
        assert!(decode_message("lobby", "J {}").is_none());
    }
}
