//! The connection registry (user → live connections), direct messages, and the node
//! registry.
//!
//! Both registries are sorted sets scored by expiry time (server clock, ms), refreshed by
//! their owner every third of `presence_ttl`, so a crashed node's entries stop being
//! listed within `presence_ttl`. A user's entries are `["node","conn"]` JSON members of
//! `P:user:<user>`. Nodes are ids in `{P:nodes}:live` with their data in `{P:nodes}:info`.
//! A direct message is sent to the channel of each node that holds a connection of the
//! user; every node subscribes to its own channel at start.

use redis::Script;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::HashSet;
use std::sync::LazyLock;

use super::Shared;
use super::error::corrupt;
use super::presence::{presence_ttl_ms, with_now};
use crate::cluster::{ClusterResult, ConnectionRef, NodeInfo, unix_ms};
use crate::protocol::ClientInfo;

/// KEYS: user. ARGV: ttl ms, members.
const REGISTER: &str = r"
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], 3 * ttl)
return 1
";

/// KEYS: user.
const CONNECTIONS: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// Lua helper: drops expired nodes from KEYS[1] (live) and KEYS[2] (info).
const SWEEP_NODES: &str = r"
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
";

/// KEYS: live, info. ARGV: id, node JSON, ttl ms.
const HEARTBEAT: &str = r"
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
";

/// KEYS: live, info.
const NODES: &str = r"
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local node = redis.call('HGET', KEYS[2], id)
  if node then out[#out + 1] = node end
end
return out
";

static REGISTER_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_now(REGISTER));
static CONNECTIONS_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_now(CONNECTIONS));
static HEARTBEAT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_now(&format!("{SWEEP_NODES}{HEARTBEAT}")));
static NODES_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_now(&format!("{SWEEP_NODES}{NODES}")));

/// A direct message on a node channel.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct DirectMessage {
    pub user: String,
    pub conn: String,
    pub from: ClientInfo,
    pub data: Json,
}

fn entry(node: &str, conn: &str) -> String {
    serde_json::json!([node, conn]).to_string()
}

/// Registers (or refreshes) connections of `user` on this node.
pub(crate) async fn register(shared: &Shared, user: &str, conns: &[String]) -> ClusterResult<()> {
    let key = shared.keys.user(user);
    let mut invocation = REGISTER_SCRIPT.prepare_invoke();
    invocation.key(&key).arg(presence_ttl_ms(shared));
    for conn in conns {
        invocation.arg(entry(&shared.node.id, conn));
    }
    let mut conn = shared.conn();
    let _: i64 = shared
        .call(&key, invocation.invoke_async(&mut conn))
        .await?;
    Ok(())
}

pub(crate) async fn unregister(shared: &Shared, user: &str, conn_id: &str) -> ClusterResult<()> {
    let key = shared.keys.user(user);
    let mut zrem = redis::cmd("ZREM");
    zrem.arg(&key).arg(entry(&shared.node.id, conn_id));
    let mut conn = shared.conn();
    let _: i64 = shared.call(&key, zrem.query_async(&mut conn)).await?;
    Ok(())
}

pub(crate) async fn connections(shared: &Shared, user: &str) -> ClusterResult<Vec<ConnectionRef>> {
    let key = shared.keys.user(user);
    let mut invocation = CONNECTIONS_SCRIPT.prepare_invoke();
    invocation.key(&key);
    let mut conn = shared.conn();
    let texts: Vec<String> = shared
        .call(&key, invocation.invoke_async(&mut conn))
        .await?;
    let mut refs = Vec::with_capacity(texts.len());
    for text in texts {
        let (node, conn): (String, String) =
            serde_json::from_str(&text).map_err(|e| corrupt(&key, e))?;
        refs.push(ConnectionRef { node, conn });
    }
    refs.sort_by(|a, b| (&a.node, &a.conn).cmp(&(&b.node, &b.conn)));
    Ok(refs)
}

/// Sends to every live connection of `user`; counts those whose node is listening.
pub(crate) async fn send_direct(
    shared: &Shared,
    user: &str,
    from: ClientInfo,
    data: Json,
) -> ClusterResult<u64> {
    let targets = connections(shared, user).await?;
    let mut delivered = 0;
    let mut conn = shared.conn();
    for target in targets {
        let channel = shared.keys.direct_channel(&target.node);
        let message = DirectMessage {
            user: user.to_owned(),
            conn: target.conn,
            from: from.clone(),
            data: data.clone(),
        };
        let text = serde_json::to_string(&message).map_err(|e| corrupt(&channel, e))?;
        let mut publish = redis::cmd("SPUBLISH");
        publish.arg(&channel).arg(text);
        let receivers: i64 = shared
            .call(&channel, publish.query_async(&mut conn))
            .await?;
        delivered += u64::from(receivers > 0);
    }
    Ok(delivered)
}

/// Registers this node or refreshes its heartbeat.
pub(crate) async fn heartbeat(shared: &Shared) -> ClusterResult<()> {
    let (live, info) = shared.keys.nodes();
    let node = NodeInfo {
        heartbeat_ms: unix_ms(),
        ..shared.node.clone()
    };
    let json = serde_json::to_string(&node).map_err(|e| corrupt(&info, e))?;
    let mut invocation = HEARTBEAT_SCRIPT.prepare_invoke();
    invocation.key(&live).key(&info);
    invocation
        .arg(&node.id)
        .arg(json)
        .arg(presence_ttl_ms(shared));
    let mut conn = shared.conn();
    let _: i64 = shared
        .call(&live, invocation.invoke_async(&mut conn))
        .await?;
    Ok(())
}

pub(crate) async fn nodes(shared: &Shared) -> ClusterResult<Vec<NodeInfo>> {
    let (live, info) = shared.keys.nodes();
    let mut invocation = NODES_SCRIPT.prepare_invoke();
    invocation.key(&live).key(&info);
    let mut conn = shared.conn();
    let texts: Vec<String> = shared
        .call(&live, invocation.invoke_async(&mut conn))
        .await?;
    let mut nodes = texts
        .iter()
        .map(|text| serde_json::from_str(text).map_err(|e| corrupt(&info, e)))
        .collect::<ClusterResult<Vec<NodeInfo>>>()?;
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(nodes)
}

/// Removes this node's registration and its connection entries.
pub(crate) async fn leave(shared: &Shared, users: HashSet<(String, String)>) -> ClusterResult<()> {
    for (user, conn_id) in users {
        unregister(shared, &user, &conn_id).await?;
    }
    let (live, info) = shared.keys.nodes();
    let mut pipe = redis::pipe();
    pipe.cmd("ZREM").arg(&live).arg(&shared.node.id);
    pipe.cmd("HDEL").arg(&info).arg(&shared.node.id);
    let mut conn = shared.conn();
    let _: (i64, i64) = shared.call(&live, pipe.query_async(&mut conn)).await?;
    Ok(())
}
