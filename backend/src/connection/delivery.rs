//! Writing room messages to the client in offset order, with no duplicate and no silent
//! gap: the next offset is written, an older one dropped, and a skipped one makes the
//! connection fetch the missing messages from history first. When history cannot supply
//! them the client gets a `joined` frame with `resume: "not_recovered"` and continues from
//! the room's current position.

use axum::extract::ws::Utf8Bytes;
use ringcast_shared::cluster::{Publication, Replay, RoomPosition};
use ringcast_shared::protocol::{Offset, ResumeStatus};
use std::sync::Arc;

use super::cursor::Verdict;
use super::requests::joined;
use super::{Connection, Step};
use crate::fanout::{Delivery, Outbound, encode, message_frame};

impl Connection {
    /// Handles one item taken from the send queue.
    pub(super) async fn deliver_item(&mut self, item: Outbound) -> Step {
        match item {
            Outbound::Publication(delivery) => self.deliver_live(delivery).await,
            Outbound::Frame(text) => self.write(text).await,
            Outbound::Gap { room, position } => self.on_gap(&room, &position).await,
        }
    }

    async fn deliver_live(&mut self, delivery: Arc<Delivery>) -> Step {
        let room = delivery.room.as_str();
        match self
            .cursors
            .classify(room, &delivery.epoch, delivery.offset)
        {
            Verdict::Deliver => {
                self.write_next(room, delivery.text.clone(), delivery.offset)
                    .await
            }
            Verdict::Duplicate | Verdict::NotJoined => Ok(()),
            // Rare, and it awaits history from the cluster: boxed, so its state is not
            // carried by every connection's task.
            Verdict::Gap => Box::pin(self.fill_gap(room, Some(&delivery))).await,
        }
    }

    /// The cluster reported lost live messages: catch up from history if this client is
    /// behind `position`.
    async fn on_gap(&mut self, room: &str, position: &RoomPosition) -> Step {
        let behind = self
            .cursors
            .get(room)
            .is_some_and(|c| c.epoch != position.epoch || c.last < position.offset);
        if behind {
            Box::pin(self.fill_gap(room, None)).await?;
        }
        Ok(())
    }

    /// Replays history after the room's cursor, then delivers `pending` if it is next.
    async fn fill_gap(&mut self, room: &str, pending: Option<&Delivery>) -> Step {
        let Some(cursor) = self.cursors.get(room).cloned() else {
            return Ok(());
        };
        let history = self
            .node
            .cluster
            .history(room, cursor.last, &cursor.epoch)
            .await;
        match history {
            Ok(Replay::Complete(publications)) => self.replay(room, &publications).await?,
            Ok(Replay::NotRecoverable(position)) => self.not_recovered(room, &position).await?,
            Err(err) => {
                self.node.metrics.cluster_errors.inc();
                tracing::warn!(conn_id = %self.conn, room, error = %err, "gap fill failed");
            }
        }
        let Some(pending) = pending else {
            return Ok(());
        };
        match self.cursors.classify(room, &pending.epoch, pending.offset) {
            Verdict::Deliver => {
                self.write_next(room, pending.text.clone(), pending.offset)
                    .await
            }
            Verdict::Duplicate | Verdict::NotJoined => Ok(()),
            Verdict::Gap => {
                // History could not reach this message: say so, then go on from it.
                let before = RoomPosition {
                    epoch: pending.epoch.clone(),
                    offset: pending.offset - 1,
                };
                self.not_recovered(room, &before).await?;
                self.write(pending.text.clone()).await?;
                self.cursors.advance(room, pending.offset);
                Ok(())
            }
        }
    }

    /// Writes replayed publications that follow the cursor, in order.
    ///
    /// `publications` answer a complete `history` call from the cursor, so they continue
    /// it even when they carry a newer epoch: after a Redis master change the cluster
    /// carries an intact history over into a new epoch. The cursor takes that epoch on.
    pub(super) async fn replay(&mut self, room: &str, publications: &[Publication]) -> Step {
        for publication in publications {
            let Some(cursor) = self.cursors.get(room) else {
                return Ok(());
            };
            if publication.offset != cursor.last + 1 {
                continue;
            }
            if publication.epoch != cursor.epoch {
                let carried_over = RoomPosition {
                    epoch: publication.epoch.clone(),
                    offset: cursor.last,
                };
                self.cursors.set(room, &carried_over);
            }
            let text = encode(&message_frame(publication));
            self.write_next(room, text, publication.offset).await?;
        }
        Ok(())
    }

    /// Writes the room's next message and moves the cursor past it.
    async fn write_next(&mut self, room: &str, text: Utf8Bytes, offset: Offset) -> Step {
        self.write(text).await?;
        self.node.metrics.deliveries.inc();
        self.cursors.advance(room, offset);
        Ok(())
    }

    /// Tells the client it missed messages of `room` and moves its cursor to `position`.
    async fn not_recovered(&mut self, room: &str, position: &RoomPosition) -> Step {
        self.node.metrics.gaps.inc();
        self.cursors.set(room, position);
        let frame = joined(None, room, position, Some(ResumeStatus::NotRecovered));
        self.send(&frame).await
    }
}
