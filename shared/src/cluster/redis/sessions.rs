//! Sessions: one JSON string per session id, expiring after `session_ttl`.

use super::Shared;
use super::error::corrupt;
use crate::cluster::{ClusterResult, SessionRecord};

pub(crate) async fn save(shared: &Shared, session: &SessionRecord) -> ClusterResult<()> {
    let key = shared.keys.session(&session.id);
    let json = serde_json::to_string(session).map_err(|e| corrupt(&key, e))?;
    let ttl_ms = u64::try_from(shared.config.session_ttl.as_millis()).unwrap_or(u64::MAX);
    let mut set = redis::cmd("SET");
    set.arg(&key).arg(json).arg("PX").arg(ttl_ms);
    let mut conn = shared.conn();
    let _: () = shared.call(&key, set.query_async(&mut conn)).await?;
    Ok(())
}

pub(crate) async fn load(shared: &Shared, id: &str) -> ClusterResult<Option<SessionRecord>> {
    let key = shared.keys.session(id);
    let mut get = redis::cmd("GET");
    get.arg(&key);
    let mut conn = shared.conn();
    let text: Option<String> = shared.call(&key, get.query_async(&mut conn)).await?;
    text.map(|text| serde_json::from_str(&text).map_err(|e| corrupt(&key, e)))
        .transpose()
}
