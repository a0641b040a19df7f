//! Room presence: who is in a room on every node, with crash cleanup.
//!
//! Redis 7.0 has no per-field TTL, so a room's presence is a sorted set of connection ids
//! scored by their expiry time (server clock, ms) plus a hash of member data. The owner
//! refreshes its entries every third of `presence_ttl`; listing ignores and removes
//! expired entries and announces their leave, and every node subscribed to a room sweeps
//! it on the same schedule, so a crashed node's members vanish from listings within
//! `presence_ttl` and their leave is announced within about 4/3 of it. Joins and leaves
//! are published on the room's channel as `J <member JSON>` and `L <member JSON>`.

use redis::Script;
use std::sync::LazyLock;

use super::Shared;
use super::error::corrupt;
use crate::cluster::ClusterResult;
use crate::protocol::{PresenceChange, PresenceMember};

/// Lua helper: the server clock in milliseconds.
const NOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS: pres, members, channel. ARGV: ttl ms, then conn id and member JSON pairs.
/// Extends each entry; re-adds and announces entries that were swept meanwhile.
const REFRESH: &str = r"
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  if redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('SPUBLISH', KEYS[3], 'J ' .. ARGV[i + 1])
  end
end
redis.call('PEXPIRE', KEYS[1], 3 * ttl)
redis.call('PEXPIRE', KEYS[2], 3 * ttl)
return 1
";

/// KEYS: pres, members, channel. ARGV: ttl ms, conn id, member JSON.
const JOIN: &str = r"
local ttl = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], 3 * ttl)
redis.call('PEXPIRE', KEYS[2], 3 * ttl)
redis.call('SPUBLISH', KEYS[3], 'J ' .. ARGV[3])
return 1
";

/// KEYS: pres, members, channel. ARGV: conn id.
const LEAVE: &str = r"
local member = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if member then redis.call('SPUBLISH', KEYS[3], 'L ' .. member) end
return 1
";

/// Lua helper, KEYS: pres, members, channel. Removes and announces expired entries.
const REMOVE_EXPIRED: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, conn in ipairs(expired) do
  local member = redis.call('HGET', KEYS[2], conn)
  redis.call('ZREM', KEYS[1], conn)
  redis.call('HDEL', KEYS[2], conn)
  if member then redis.call('SPUBLISH', KEYS[3], 'L ' .. member) end
end
";

/// Lua helper, KEYS: pres, members. Returns the member data of every entry (run after
/// `REMOVE_EXPIRED`, so only live ones are left).
const LIST: &str = r"
local out = {}
for _, conn in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local member = redis.call('HGET', KEYS[2], conn)
  if member then out[#out + 1] = member end
end
return out
";

static JOIN_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_now(JOIN));
static LEAVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LEAVE));
/// KEYS: pres, members, channel. Removes and announces expired entries, returns the rest.
static LIST_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_now(&format!("{REMOVE_EXPIRED}{LIST}")));
/// KEYS: pres, members, channel. Removes and announces expired entries, returns how many.
static SWEEP_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_now(&format!("{REMOVE_EXPIRED}return #expired")));
static REFRESH_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_now(REFRESH));

/// A script that starts with `now` set to the server clock in ms.
pub(crate) fn with_now(body: &str) -> Script {
    Script::new(&format!("{NOW}{body}"))
}

/// The presence TTL in milliseconds.
pub(crate) fn presence_ttl_ms(shared: &Shared) -> u64 {
    u64::try_from(shared.config.presence_ttl.as_millis()).unwrap_or(u64::MAX)
}

/// A presence event as carried on the room channel.
pub(crate) fn decode_event(payload: &str) -> Option<(PresenceChange, PresenceMember)> {
    let (change, json) = match payload.split_at_checked(2)? {
        ("J ", json) => (PresenceChange::Join, json),
        ("L ", json) => (PresenceChange::Leave, json),
        _ => return None,
    };
    Some((change, serde_json::from_str(json).ok()?))
}

pub(crate) async fn join(
    shared: &Shared,
    room: &str,
    member: &PresenceMember,
) -> ClusterResult<()> {
    let keys = shared.keys.room(room);
    let json = serde_json::to_string(member).map_err(|e| corrupt(&keys.members, e))?;
    let mut invocation = JOIN_SCRIPT.prepare_invoke();
    invocation
        .key(&keys.presence)
        .key(&keys.members)
        .key(&keys.channel);
    invocation
        .arg(presence_ttl_ms(shared))
        .arg(&member.conn)
        .arg(&json);
    let mut conn = shared.conn();
    let _: i64 = shared
        .call(&keys.presence, invocation.invoke_async(&mut conn))
        .await?;
    shared
        .owned()
        .presence
        .entry(room.to_owned())
        .or_default()
        .insert(member.conn.clone(), json);
    Ok(())
}

pub(crate) async fn leave(shared: &Shared, room: &str, conn_id: &str) -> ClusterResult<()> {
    {
        let mut owned = shared.owned();
        if let Some(members) = owned.presence.get_mut(room) {
            members.remove(conn_id);
            if members.is_empty() {
                owned.presence.remove(room);
            }
        }
    }
    remove(shared, room, conn_id).await
}

/// Removes an entry and announces the leave (when the entry existed).
async fn remove(shared: &Shared, room: &str, conn_id: &str) -> ClusterResult<()> {
    let keys = shared.keys.room(room);
    let mut invocation = LEAVE_SCRIPT.prepare_invoke();
    invocation
        .key(&keys.presence)
        .key(&keys.members)
        .key(&keys.channel);
    invocation.arg(conn_id);
    let mut conn = shared.conn();
    let _: i64 = shared
        .call(&keys.presence, invocation.invoke_async(&mut conn))
        .await?;
    Ok(())
}

/// Live members of `room` (and removal, with announcement, of expired ones).
pub(crate) async fn list(shared: &Shared, room: &str) -> ClusterResult<Vec<PresenceMember>> {
    let keys = shared.keys.room(room);
    let mut invocation = LIST_SCRIPT.prepare_invoke();
    invocation
        .key(&keys.presence)
        .key(&keys.members)
        .key(&keys.channel);
    let mut conn = shared.conn();
    let texts: Vec<String> = shared
        .call(&keys.presence, invocation.invoke_async(&mut conn))
        .await?;
    let mut members = texts
        .iter()
        .map(|text| serde_json::from_str(text).map_err(|e| corrupt(&keys.members, e)))
        .collect::<ClusterResult<Vec<PresenceMember>>>()?;
    members.sort_by(|a, b| (a.joined_at_ms, &a.conn).cmp(&(b.joined_at_ms, &b.conn)));
    Ok(members)
}

/// Removes and announces the expired entries of `room`. Unlike [`list`] it reads no live
/// member, so the periodic sweep of a large room costs Redis only its expired entries.
pub(crate) async fn sweep(shared: &Shared, room: &str) -> ClusterResult<()> {
    let keys = shared.keys.room(room);
    let mut invocation = SWEEP_SCRIPT.prepare_invoke();
    invocation
        .key(&keys.presence)
        .key(&keys.members)
        .key(&keys.channel);
    let mut conn = shared.conn();
    let _: i64 = shared
        .call(&keys.presence, invocation.invoke_async(&mut conn))
        .await?;
    Ok(())
}

/// Extends every entry this instance owns in `room`. An entry that left while the
/// refresh ran (and was re-added by it) is removed again.
pub(crate) async fn refresh(
    shared: &Shared,
    room: &str,
    members: Vec<(String, String)>,
) -> ClusterResult<()> {
    let keys = shared.keys.room(room);
    let conn_ids: Vec<String> = members.iter().map(|(conn_id, _)| conn_id.clone()).collect();
    let mut invocation = REFRESH_SCRIPT.prepare_invoke();
    invocation
        .key(&keys.presence)
        .key(&keys.members)
        .key(&keys.channel);
    invocation.arg(presence_ttl_ms(shared));
    for (conn_id, json) in members {
        invocation.arg(conn_id).arg(json);
    }
    let mut conn = shared.conn();
    let _: i64 = shared
        .call(&keys.presence, invocation.invoke_async(&mut conn))
        .await?;

    let left: Vec<String> = {
        let owned = shared.owned();
        let still = |c: &String| owned.presence.get(room).is_some_and(|m| m.contains_key(c));
        conn_ids.into_iter().filter(|c| !still(c)).collect()
    };
    for conn_id in left {
        remove(shared, room, &conn_id).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_events_decode() {
        let json = r#"{"user":"u","conn":"c","node":"n","joined_at_ms":5}"#;
        let (change, member) = decode_event(&format!("J {json}")).expect("join");
        assert_eq!((change, member.conn.as_str()), (PresenceChange::Join, "c"));
        let (change, _) = decode_event(&format!("L {json}")).expect("leave");
        assert_eq!(change, PresenceChange::Leave);
        assert!(decode_event("X {}").is_none());
        assert!(decode_event("J not json").is_none());
    }
}
