//! The client wire protocol, version 1: JSON text frames, one object per frame, tagged by
//! `"type"`.
//!
//! A connection opens with [`ClientFrame::Hello`] and is answered with
//! [`ServerFrame::Welcome`]. Requests may carry a client-chosen `id` that the matching reply
//! repeats. `docs/protocol.md` is the user-facing description with examples.
//!
//! # Close codes
//! Besides the RFC 6455 codes (1000 normal, 1001 going away, 1007 invalid payload, 1008
//! policy, 1009 too big, 1011 internal error, 1012 service restart, 1013 try again later),
//! Ringcast uses the private range in two halves that tell a client what to do:
//! - `4000..=4499`: reconnect (with backoff) and resume;
//! - `4500..=4999`: do not reconnect with the same credentials.
//!
//! # Error codes
//! Error replies ([`ServerFrame::Error`]) carry an [`ErrorCode`]; the connection stays open.
//! `1xx` are request problems, `2xx` permission problems, `3xx` limits, `5xx` server-side
//! and retryable.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME_LEN: usize = 128;

/// A message position in a room's history. Offsets start at 1 and grow by one per publish
/// within an epoch.
pub type Offset = u64;

/// Identifies one continuous history of a room. It changes when the history is lost (expired,
/// flushed), and offsets of different epochs are not comparable.
pub type Epoch = String;

/// Checks a room name: 1 to [`MAX_ROOM_NAME_LEN`] bytes of ASCII letters, digits and
/// `-_.:@/`. Braces are excluded because room names become part of Redis hash tags.
///
/// # Errors
/// A reason suitable for an error reply.
pub fn validate_room_name(room: &str) -> Result<(), &'static str> {
    if room.is_empty() {
        return Err("room name is empty");
    }
    if room.len() > MAX_ROOM_NAME_LEN {
        return Err("room name is longer than 128 bytes");
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_.:@/".contains(&b);
    if !room.bytes().all(allowed) {
        return Err("room name may only contain ASCII letters, digits and -_.:@/");
    }
    Ok(())
}

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// First frame of a connection: credentials and, to resume, the previous session id.
    Hello {
        /// Protocol version the client speaks; must be [`PROTOCOL_VERSION`].
        #[serde(default = "default_version")]
        version: u32,
        /// A JWT (when the node requires one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// The session to resume, from an earlier [`ServerFrame::Welcome`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
    },
    /// Join a room. With `offset` and `epoch`, every message after `offset` is replayed first.
    Join {
        /// Request id echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Last offset the client has seen in this room.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<Offset>,
        /// Epoch that `offset` belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
    },
    /// Leave a room.
    Leave {
        /// Request id echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
    },
    /// Publish to a room; answered with [`ServerFrame::Ack`] once stored.
    Publish {
        /// Request id echoed in the ack.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Any JSON value.
        data: Value,
    },
    /// Ask who is in a room, across all nodes.
    Presence {
        /// Request id echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
    },
    /// Send a message to every live connection of a user, wherever it is connected.
    Direct {
        /// Request id echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Target user id.
        user: String,
        /// Any JSON value.
        data: Value,
    },
    /// Answer to [`ServerFrame::Ping`].
    Pong,
}

fn default_version() -> u32 {
    PROTOCOL_VERSION
}

/// Who published a message or is present in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// User id from the token (or the anonymous id given when auth is off).
    pub user: String,
    /// Connection id, unique across the cluster.
    pub conn: String,
}

/// One member of a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceMember {
    /// User id.
    pub user: String,
    /// Connection id.
    pub conn: String,
    /// Node the connection is on.
    pub node: String,
    /// When the member joined, in milliseconds since the Unix epoch.
    pub joined_at_ms: u64,
}

/// Whether a presence event is a join or a leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceChange {
    /// The member joined the room.
    Join,
    /// The member left (or its connection or node went away).
    Leave,
}

/// What happened to one room when a client asked to resume it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeStatus {
    /// Every missed message was (or is about to be) replayed.
    Recovered,
    /// History no longer covers the gap (trimmed, expired, or a new epoch): the client missed
    /// messages and must resynchronise by other means.
    NotRecovered,
}

/// A frame sent by a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerFrame {
    /// Answer to [`ClientFrame::Hello`].
    Welcome {
        /// Session id to present when reconnecting.
        session: String,
        /// The node that serves this connection.
        node: String,
        /// This connection's id.
        conn: String,
        /// The authenticated user id.
        user: String,
        /// The node sends [`ServerFrame::Ping`] this often; a client that sees nothing for
        /// twice as long should reconnect.
        heartbeat_ms: u64,
        /// True when an earlier session was found and its rooms are being restored; each
        /// restored room is then reported with [`ServerFrame::Joined`].
        resumed: bool,
        /// The rooms being restored from the session (empty when not resumed). A client that
        /// was in other rooms joins them again itself.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rooms: Vec<String>,
    },
    /// A join (or a room restored from a session) took effect.
    Joined {
        /// Request id of the join, absent for rooms restored from a session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Current epoch of the room.
        epoch: Epoch,
        /// Offset of the newest message in the room when the join took effect; replayed
        /// messages (if any) come after this frame, live ones after those.
        offset: Offset,
        /// Present when the join asked to resume from an offset.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<ResumeStatus>,
    },
    /// A leave took effect.
    Left {
        /// Request id of the leave.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
    },
    /// A publish was stored in history at `offset`.
    Ack {
        /// Request id of the publish.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// The message's offset.
        offset: Offset,
        /// The room's epoch.
        epoch: Epoch,
    },
    /// A message published to a room the client is in.
    Message {
        /// Room name.
        room: String,
        /// Position in the room's history.
        offset: Offset,
        /// The room's epoch.
        epoch: Epoch,
        /// Who published it.
        from: ClientInfo,
        /// The published value.
        data: Value,
    },
    /// Answer to [`ClientFrame::Presence`].
    Presence {
        /// Request id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Every member, on every node.
        members: Vec<PresenceMember>,
    },
    /// Someone joined or left a room the client is in.
    PresenceEvent {
        /// Room name.
        room: String,
        /// Join or leave.
        change: PresenceChange,
        /// The member.
        member: PresenceMember,
    },
    /// A direct message to this client's user.
    Direct {
        /// Sender.
        from: ClientInfo,
        /// The value sent.
        data: Value,
    },
    /// Answer to [`ClientFrame::Direct`]: how many connections it was handed to.
    Sent {
        /// Request id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Number of live connections of the target user.
        delivered: u64,
    },
    /// Heartbeat; answer with [`ClientFrame::Pong`].
    Ping,
    /// A request failed; the connection stays open.
    Error {
        /// Request id of the failed request, if it had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// What kind of failure.
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
}

/// Error codes of [`ServerFrame::Error`], serialised as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u16", try_from = "u16")]
pub enum ErrorCode {
    /// 100: the frame is not valid JSON or not a known frame.
    BadRequest,
    /// 101: the room name is not allowed.
    BadRoomName,
    /// 102: the request needs the room to be joined first.
    NotJoined,
    /// 103: `hello` was sent twice, or something else came before it.
    BadSequence,
    /// 200: the token does not allow this room or operation.
    Forbidden,
    /// 300: too many rooms on this connection.
    TooManyRooms,
    /// 301: publishing faster than the connection's rate limit.
    RateLimited,
    /// 302: the message is larger than allowed.
    TooLarge,
    /// 500: the shared state is unreachable; retry later.
    Unavailable,
    /// 501: an unexpected server-side failure; retry later.
    Internal,
}

impl ErrorCode {
    /// The numeric code.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::BadRequest => 100,
            Self::BadRoomName => 101,
            Self::NotJoined => 102,
            Self::BadSequence => 103,
            Self::Forbidden => 200,
            Self::TooManyRooms => 300,
            Self::RateLimited => 301,
            Self::TooLarge => 302,
            Self::Unavailable => 500,
            Self::Internal => 501,
        }
    }

    /// Whether repeating the same request later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::RateLimited | Self::Unavailable | Self::Internal)
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> Self {
        code.as_u16()
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = String;

    fn try_from(value: u16) -> Result<Self, Self::Error> {
        let all = [
            Self::BadRequest,
            Self::BadRoomName,
            Self::NotJoined,
            Self::BadSequence,
            Self::Forbidden,
            Self::TooManyRooms,
            Self::RateLimited,
            Self::TooLarge,
            Self::Unavailable,
            Self::Internal,
        ];
        all.into_iter()
            .find(|code| code.as_u16() == value)
            .ok_or_else(|| format!("unknown error code {value}"))
    }
}

/// WebSocket close codes Ringcast sends, with what a client should do.
pub mod close {
    /// Normal closure requested by the client.
    pub const NORMAL: u16 = 1000;
    /// The node is going away without a restart hint.
    pub const GOING_AWAY: u16 = 1001;
    /// Repeated malformed frames (invalid payload). Do not resend the same frames.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Repeated protocol violations. Do not resend the same frames.
    pub const POLICY: u16 = 1008;
    /// A frame larger than the node's maximum message size.
    pub const TOO_BIG: u16 = 1009;
    /// Unexpected server failure: reconnect with backoff.
    pub const INTERNAL: u16 = 1011;
    /// The node is draining (restart or scale-in): reconnect now (to another node) and resume.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The node is overloaded: reconnect later with backoff.
    pub const TRY_AGAIN_LATER: u16 = 1013;

    /// Start of the "reconnect and resume" private range.
    pub const RECONNECT_MIN: u16 = 4000;
    /// The client read too slowly and its send queue overflowed: reconnect and resume.
    pub const SLOW_CONSUMER: u16 = 4000;
    /// No heartbeat answer in time: reconnect and resume.
    pub const HEARTBEAT_TIMEOUT: u16 = 4001;
    /// End of the "reconnect and resume" private range.
    pub const RECONNECT_MAX: u16 = 4499;

    /// Start of the "do not reconnect" private range.
    pub const NO_RECONNECT_MIN: u16 = 4500;
    /// The token is missing, malformed, badly signed or for another audience.
    pub const UNAUTHORIZED: u16 = 4500;
    /// The token has expired: get a new one before reconnecting.
    pub const TOKEN_EXPIRED: u16 = 4501;
    /// The client speaks a protocol version this node does not.
    pub const UNSUPPORTED_VERSION: u16 = 4502;
    /// End of the "do not reconnect" private range.
    pub const NO_RECONNECT_MAX: u16 = 4999;

    /// Whether a client that was closed with `code` should reconnect (and resume).
    pub fn should_reconnect(code: u16) -> bool {
        !matches!(code, NORMAL | INVALID_PAYLOAD | POLICY | TOO_BIG)
            && !(NO_RECONNECT_MIN..=NO_RECONNECT_MAX).contains(&code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_frames_read_from_documented_json() {
        let frame: ClientFrame = serde_json::from_str(
            r#"{"type":"join","id":7,"room":"chat","offset":41,"epoch":"e1"}"#,
        )
        .unwrap();
        assert_eq!(
            frame,
            ClientFrame::Join {
                id: Some(7),
                room: "chat".into(),
                offset: Some(41),
                epoch: Some("e1".into())
            }
        );
        let hello: ClientFrame = serde_json::from_str(r#"{"type":"hello"}"#).unwrap();
        assert_eq!(
            hello,
            ClientFrame::Hello {
                version: 1,
                token: None,
                session: None
            }
        );
    }

    #[test]
    fn unknown_type_and_unknown_field_are_rejected() {
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"shout"}"#).is_err());
        assert!(
            serde_json::from_str::<ClientFrame>(r#"{"type":"leave","room":"a","x":1}"#).is_err()
        );
    }

    #[test]
    fn error_codes_are_numbers_on_the_wire() {
        let frame = ServerFrame::Error {
            id: None,
            code: ErrorCode::Forbidden,
            reason: "no".into(),
        };
        let text = serde_json::to_value(&frame).unwrap();
        assert_eq!(text, json!({"type":"error","code":200,"reason":"no"}));
        let back: ServerFrame = serde_json::from_value(text).unwrap();
        assert_eq!(back, frame);
        assert!(
            serde_json::from_value::<ServerFrame>(json!({"type":"error","code":999,"reason":""}))
                .is_err()
        );
    }

    #[test]
    fn close_code_ranges_say_whether_to_reconnect() {
        assert!(close::should_reconnect(close::SERVICE_RESTART));
        assert!(close::should_reconnect(close::SLOW_CONSUMER));
        assert!(close::should_reconnect(close::GOING_AWAY));
        assert!(!close::should_reconnect(close::UNAUTHORIZED));
        assert!(!close::should_reconnect(close::TOKEN_EXPIRED));
        assert!(!close::should_reconnect(close::POLICY));
    }

    #[test]
    fn room_names_follow_the_documented_charset() {
        assert!(validate_room_name("chat/general:1").is_ok());
        assert!(validate_room_name("").is_err());
        assert!(validate_room_name("a{b}").is_err());
        assert!(validate_room_name(&"x".repeat(129)).is_err());
    }
}
