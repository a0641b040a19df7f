//! Client requests after the handshake: join, leave, publish, presence, direct, pong, and
//! the answers to bad frames.

use axum::extract::ws::Message;
use ringcast_shared::cluster::{ClusterError, Replay, RoomPosition};
use ringcast_shared::protocol::{
    ClientFrame, ClientInfo, Epoch, ErrorCode, Offset, PresenceMember, ResumeStatus, ServerFrame,
    close, validate_room_name,
};
use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use super::{Connection, Step, Stop};
use crate::limits::BadFrame;

type SocketItem = Option<Result<Message, axum::Error>>;

impl Connection {
    /// Handles whatever the socket produced.
    pub(super) async fn on_socket(&mut self, item: SocketItem) -> Step {
        let message = match item {
            None => return Err(Stop::Gone),
            Some(Err(err)) => return Err(read_error(&err)),
            Some(Ok(message)) => message,
        };
        self.last_seen = Instant::now();
        self.node.metrics.frames_in.inc();
        match message {
            Message::Text(text) => self.on_text(text.as_str()).await,
            Message::Binary(_) => {
                let reason = "binary frames are not supported";
                self.bad_frame(BadFrame::Misuse, None, reason).await
            }
            Message::Close(_) => Err(Stop::Gone),
            Message::Ping(_) | Message::Pong(_) => Ok(()),
        }
    }

    async fn on_text(&mut self, text: &str) -> Step {
        match serde_json::from_str::<ClientFrame>(text) {
            Ok(frame) => self.on_frame(frame).await,
            Err(err) => {
                let kind = match serde_json::from_str::<Value>(text) {
                    Ok(_) => BadFrame::Misuse,
                    Err(_) => BadFrame::Malformed,
                };
                let id = serde_json::from_str::<Value>(text)
                    .ok()
                    .and_then(|value| value.get("id").and_then(Value::as_u64));
                self.bad_frame(kind, id, &format!("bad frame: {err}")).await
            }
        }
    }

    async fn on_frame(&mut self, frame: ClientFrame) -> Step {
        match frame {
            ClientFrame::Hello { .. } => {
                self.bad_frame(BadFrame::Misuse, None, "hello was already sent")
                    .await
            }
            ClientFrame::Join {
                id,
                room,
                offset,
                epoch,
            } => self.join(id, room, offset, epoch).await,
            ClientFrame::Leave { id, room } => self.leave(id, room).await,
            ClientFrame::Publish { id, room, data } => self.publish(id, room, data).await,
            ClientFrame::Presence { id, room } => self.presence(id, room).await,
            ClientFrame::Direct { id, user, data } => self.direct(id, user, data).await,
            ClientFrame::Pong => Ok(()),
        }
    }

    /// Answers a bad frame with an error, or closes once too many were sent.
    async fn bad_frame(&mut self, kind: BadFrame, id: Option<u64>, reason: &str) -> Step {
        let code = match kind {
            BadFrame::Malformed => close::INVALID_PAYLOAD,
            BadFrame::Misuse => close::POLICY,
        };
        if self.bad_frames.record() {
            return Err(Stop::Close(code, "too many bad frames".into()));
        }
        let error = match kind {
            BadFrame::Misuse if reason.starts_with("hello") => ErrorCode::BadSequence,
            _ => ErrorCode::BadRequest,
        };
        self.send_error(id, error, reason).await
    }

    /// Joins `room` (or re-synchronises it when already joined): subscribe, answer
    /// `joined`, replay history after `offset` when asked, then live messages follow.
    pub(super) async fn join(
        &mut self,
        id: Option<u64>,
        room: String,
        offset: Option<Offset>,
        epoch: Option<Epoch>,
    ) -> Step {
        if let Err(reason) = self.check_join(&room, offset.is_some() && epoch.is_none()) {
            return self.send_error(id, reason.0, reason.1).await;
        }
        let already = self.cursors.contains(&room);
        if !already {
            let joined = self
                .node
                .registry
                .join(&self.node, &room, &self.handle)
                .await;
            if let Err(err) = joined {
                return self.cluster_failed(id, &err).await;
            }
        }
        let result = match (offset, epoch) {
            (Some(offset), Some(epoch)) => self.resume(id, &room, offset, epoch).await,
            _ => self.join_at_current(id, &room).await,
        };
        if let Err(Some(err)) = result {
            if !already {
                self.node
                    .registry
                    .leave(&self.node, &room, &self.conn)
                    .await;
            }
            return self.cluster_failed(id, &err).await;
        }
        result.map_err(|_| Stop::Gone)?;
        if !already {
            self.announce_join(&room).await;
        }
        Ok(())
    }

    fn check_join(
        &self,
        room: &str,
        offset_without_epoch: bool,
    ) -> Result<(), (ErrorCode, &'static str)> {
        validate_room_name(room).map_err(|reason| (ErrorCode::BadRoomName, reason))?;
        if offset_without_epoch {
            return Err((ErrorCode::BadRequest, "offset needs an epoch"));
        }
        if !self.identity.may_join(room) {
            return Err((ErrorCode::Forbidden, "the token does not allow this room"));
        }
        let full = self.cursors.len() >= self.node.config.limits.max_rooms_per_connection;
        if full && !self.cursors.contains(room) {
            return Err((ErrorCode::TooManyRooms, "too many rooms on this connection"));
        }
        Ok(())
    }

    /// `Err(Some)` is a cluster failure to report, `Err(None)` a dead socket.
    async fn join_at_current(
        &mut self,
        id: Option<u64>,
        room: &str,
    ) -> Result<(), Option<ClusterError>> {
        if let Some(cursor) = self.cursors.get(room) {
            // Already in the room: confirm where the connection stands, skip nothing.
            let position = RoomPosition {
                epoch: cursor.epoch.clone(),
                offset: cursor.last,
            };
            let frame = joined(id, room, &position, None);
            return self.send(&frame).await.map_err(|_| None);
        }
        let position = self.node.cluster.position(room).await.map_err(Some)?;
        self.cursors.set(room, &position);
        self.send(&joined(id, room, &position, None))
            .await
            .map_err(|_| None)
    }

    async fn resume(
        &mut self,
        id: Option<u64>,
        room: &str,
        offset: Offset,
        epoch: Epoch,
    ) -> Result<(), Option<ClusterError>> {
        let replay = self.node.cluster.history(room, offset, &epoch).await;
        match replay.map_err(Some)? {
            Replay::Complete(publications) => {
                self.count_resume("recovered");
                // A history carried over into a newer epoch (a Redis master change) is
                // reported in that epoch; the client's offset stays valid in it.
                let reported = publications.last().map_or_else(
                    || RoomPosition {
                        epoch: epoch.clone(),
                        offset,
                    },
                    |newest| RoomPosition {
                        epoch: newest.epoch.clone(),
                        offset: newest.offset,
                    },
                );
                let position = RoomPosition { epoch, offset };
                self.cursors.set(room, &position);
                let frame = joined(id, room, &reported, Some(ResumeStatus::Recovered));
                self.send(&frame).await.map_err(|_| None)?;
                self.replay(room, &publications).await.map_err(|_| None)
            }
            Replay::NotRecoverable(position) => {
                self.count_resume("not_recovered");
                self.cursors.set(room, &position);
                let frame = joined(id, room, &position, Some(ResumeStatus::NotRecovered));
                self.send(&frame).await.map_err(|_| None)
            }
        }
    }

    fn count_resume(&self, outcome: &str) {
        self.node
            .metrics
            .resumes
            .with_label_values(&[outcome])
            .inc();
    }

    async fn announce_join(&mut self, room: &str) {
        let member = PresenceMember {
            user: self.identity.user.clone(),
            conn: self.conn.clone(),
            node: self.node.id.clone(),
            joined_at_ms: unix_millis(),
        };
        if let Err(err) = self.node.cluster.presence_join(room, member).await {
            self.node.metrics.cluster_errors.inc();
            tracing::warn!(conn_id = %self.conn, room, error = %err, "presence join failed");
        }
    }

    async fn leave(&mut self, id: Option<u64>, room: String) -> Step {
        if !self.cursors.remove(&room) {
            return self
                .send_error(id, ErrorCode::NotJoined, "not in this room")
                .await;
        }
        self.leave_room(&room).await;
        self.send(&ServerFrame::Left { id, room }).await
    }

    /// Removes this connection from `room`'s local members and presence.
    pub(super) async fn leave_room(&mut self, room: &str) {
        self.node.registry.leave(&self.node, room, &self.conn).await;
        let member = PresenceMember {
            user: self.identity.user.clone(),
            conn: self.conn.clone(),
            node: self.node.id.clone(),
            joined_at_ms: 0,
        };
        if let Err(err) = self.node.cluster.presence_leave(room, &member).await {
            self.node.metrics.cluster_errors.inc();
            tracing::warn!(conn_id = %self.conn, room, error = %err, "presence leave failed");
        }
    }

    async fn publish(&mut self, id: Option<u64>, room: String, data: Value) -> Step {
        if let Err(reason) = validate_room_name(&room) {
            return self.send_error(id, ErrorCode::BadRoomName, reason).await;
        }
        if !self.identity.may_publish(&room) {
            let reason = "the token does not allow publishing here";
            return self.send_error(id, ErrorCode::Forbidden, reason).await;
        }
        if !self.bucket.try_take() {
            let reason = "publish rate limit exceeded";
            return self.send_error(id, ErrorCode::RateLimited, reason).await;
        }
        let from = self.client_info();
        match self.node.cluster.publish(&room, from, data).await {
            Ok(stored) => {
                self.node.metrics.publishes.inc();
                let ack = ServerFrame::Ack {
                    id,
                    room,
                    offset: stored.offset,
                    epoch: stored.epoch,
                };
                self.send(&ack).await
            }
            Err(err) => self.cluster_failed(id, &err).await,
        }
    }

    async fn presence(&mut self, id: Option<u64>, room: String) -> Step {
        if let Err(reason) = validate_room_name(&room) {
            return self.send_error(id, ErrorCode::BadRoomName, reason).await;
        }
        if !self.identity.may_join(&room) {
            let reason = "the token does not allow this room";
            return self.send_error(id, ErrorCode::Forbidden, reason).await;
        }
        match self.node.cluster.presence(&room).await {
            Ok(members) => {
                let frame = ServerFrame::Presence { id, room, members };
                self.send(&frame).await
            }
            Err(err) => self.cluster_failed(id, &err).await,
        }
    }

    async fn direct(&mut self, id: Option<u64>, user: String, data: Value) -> Step {
        let from = self.client_info();
        match self.node.cluster.send_direct(&user, from, data).await {
            Ok(delivered) => self.send(&ServerFrame::Sent { id, delivered }).await,
            Err(err) => self.cluster_failed(id, &err).await,
        }
    }

    fn client_info(&self) -> ClientInfo {
        ClientInfo {
            user: self.identity.user.clone(),
            conn: self.conn.clone(),
        }
    }

    /// Reports a shared-state failure as a retryable error frame.
    pub(super) async fn cluster_failed(&mut self, id: Option<u64>, err: &ClusterError) -> Step {
        self.node.metrics.cluster_errors.inc();
        tracing::warn!(conn_id = %self.conn, error = %err, "cluster call failed");
        let code = if err.is_retryable() {
            ErrorCode::Unavailable
        } else {
            ErrorCode::Internal
        };
        self.send_error(id, code, &err.to_string()).await
    }
}

/// A `joined` frame.
pub(super) fn joined(
    id: Option<u64>,
    room: &str,
    position: &RoomPosition,
    resume: Option<ResumeStatus>,
) -> ServerFrame {
    ServerFrame::Joined {
        id,
        room: room.to_owned(),
        epoch: position.epoch.clone(),
        offset: position.offset,
        resume,
    }
}

/// A read error: a frame over the size limit closes with 1009, anything else means the
/// socket is gone.
fn read_error(err: &axum::Error) -> Stop {
    let too_big = std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<tokio_tungstenite::tungstenite::Error>())
        .is_some_and(|inner| matches!(inner, tokio_tungstenite::tungstenite::Error::Capacity(_)));
    if too_big {
        Stop::Close(close::TOO_BIG, "message too big".into())
    } else {
        Stop::Gone
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
