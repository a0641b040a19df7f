//! Names of every key and channel Ringcast owns in Redis.
//!
//! All keys of one room carry the hash tag `{<prefix>:<room>}`, so they live in one slot
//! and one script can touch them atomically; rooms spread over all slots, hence over all
//! masters. Room names cannot contain braces (see `protocol::validate_room_name`), so the
//! tag always ends where the room name ends.
//!
//! | key / channel                     | type         | holds                              |
//! |-----------------------------------|--------------|------------------------------------|
//! | `{P:room}:meta`                   | hash         | `epoch`, `offset` of the newest    |
//! | `{P:room}:log`                    | stream       | history, entry id `0-<offset>`     |
//! | `{P:room}:chan`                   | shard channel| publications and presence events   |
//! | `{P:room}:pres`                   | sorted set   | connection id, scored by expiry ms |
//! | `{P:room}:members`                | hash         | connection id → member JSON        |
//! | `P:session:<id>`                  | string       | session JSON, TTL `session_ttl`    |
//! | `P:user:<user>`                   | sorted set   | `[node, conn]` JSON by expiry ms   |
//! | `{P:nodes}:live`                  | sorted set   | node id, scored by expiry ms       |
//! | `{P:nodes}:info`                  | hash         | node id → node JSON                |
//! | `P:direct:{<node>}`               | shard channel| direct messages for one node       |

/// The keys and channel of one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomKeys {
    /// Epoch and newest offset.
    pub meta: String,
    /// The capped history stream.
    pub log: String,
    /// The sharded pub/sub channel.
    pub channel: String,
    /// Presence expiry scores.
    pub presence: String,
    /// Presence member data.
    pub members: String,
}

/// Key naming for one key prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

const CHANNEL_SUFFIX: &str = "}:chan";

impl Keys {
    /// Key naming under `prefix` (the configured `key_prefix`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The keys and channel of `room`.
    pub fn room(&self, room: &str) -> RoomKeys {
        let tag = format!("{{{}:{room}", self.prefix);
        RoomKeys {
            meta: format!("{tag}}}:meta"),
            log: format!("{tag}}}:log"),
            channel: format!("{tag}{CHANNEL_SUFFIX}"),
            presence: format!("{tag}}}:pres"),
            members: format!("{tag}}}:members"),
        }
    }

    /// The room whose channel is `channel`, if it is one of ours.
    pub fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let rest = channel
            .strip_prefix('{')?
            .strip_prefix(self.prefix.as_str())?;
        rest.strip_prefix(':')?.strip_suffix(CHANNEL_SUFFIX)
    }

    /// The key of session `id`.
    pub fn session(&self, id: &str) -> String {
        format!("{}:session:{id}", self.prefix)
    }

    /// The connection registry key of `user`.
    pub fn user(&self, user: &str) -> String {
        format!("{}:user:{user}", self.prefix)
    }

    /// The node registry: (expiry scores, node data).
    pub fn nodes(&self) -> (String, String) {
        let tag = format!("{{{}:nodes}}", self.prefix);
        (format!("{tag}:live"), format!("{tag}:info"))
    }

    /// The channel of direct messages for `node`.
    pub fn direct_channel(&self, node: &str) -> String {
        format!("{}:direct:{{{node}}}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_keys_share_the_hash_tag() {
        let keys = Keys::new("rc").room("lobby");
        for key in [
            &keys.meta,
            &keys.log,
            &keys.channel,
            &keys.presence,
            &keys.members,
        ] {
            assert!(key.starts_with("{rc:lobby}:"), "{key}");
        }
    }

    #[test]
    fn channel_maps_back_to_its_room() {
        let keys = Keys::new("rc");
        let channel = keys.room("a:b/c").channel;
        assert_eq!(keys.room_of_channel(&channel), Some("a:b/c"));
        assert_eq!(keys.room_of_channel("{other:x}:chan"), None);
        assert_eq!(keys.room_of_channel(&keys.direct_channel("n1")), None);
    }
}
