//! The client's rooms: the epoch and last offset handed to the application per room, and
//! what to do with each incoming message or `joined` frame.

use std::collections::HashMap;

use crate::protocol::{Epoch, Offset, ResumeStatus};

/// One joined room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct RoomCursor {
    /// Epoch of `last`; `None` until the first `joined`.
    pub epoch: Option<Epoch>,
    /// Last offset handed to the application.
    pub last: Offset,
    /// A re-synchronising join is on its way; skipped-ahead messages are dropped meanwhile.
    pub syncing: bool,
}

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MessageVerdict {
    /// Hand it to the application.
    Deliver,
    /// Drop it (duplicate, unknown room, or waiting for a re-sync).
    Drop,
    /// Drop it and join again from the last offset to get the missing ones.
    Resync,
}

/// The rooms the application wants to be in.
#[derive(Debug, Default)]
pub(super) struct Rooms {
    rooms: HashMap<String, RoomCursor>,
}

impl Rooms {
    pub fn insert(&mut self, room: &str) {
        self.rooms.entry(room.to_owned()).or_default();
    }

    pub fn remove(&mut self, room: &str) {
        self.rooms.remove(room);
    }

    pub fn contains(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &RoomCursor)> {
        self.rooms.iter()
    }

    pub fn mark_syncing(&mut self, room: &str) {
        if let Some(cursor) = self.rooms.get_mut(room) {
            cursor.syncing = true;
        }
    }

    /// Decides about the message at `offset` of `epoch`, advancing on delivery.
    pub fn on_message(&mut self, room: &str, epoch: &str, offset: Offset) -> MessageVerdict {
        let Some(cursor) = self.rooms.get_mut(room) else {
            return MessageVerdict::Drop;
        };
        let Some(current) = cursor.epoch.as_deref() else {
            return MessageVerdict::Drop;
        };
        if current == epoch && offset <= cursor.last {
            return MessageVerdict::Drop;
        }
        if current == epoch && offset == cursor.last + 1 {
            cursor.last = offset;
            return MessageVerdict::Deliver;
        }
        if cursor.syncing {
            MessageVerdict::Drop
        } else {
            cursor.syncing = true;
            MessageVerdict::Resync
        }
    }

    /// Applies a `joined` frame; returns true when the room needs a re-synchronising join
    /// (a restored room whose epoch differs from the client's).
    pub fn on_joined(
        &mut self,
        room: &str,
        epoch: &str,
        offset: Offset,
        resume: Option<&ResumeStatus>,
    ) -> bool {
        let Some(cursor) = self.rooms.get_mut(room) else {
            return false;
        };
        match resume {
            Some(ResumeStatus::Recovered) if cursor.epoch.is_some() => {
                if cursor.epoch.as_deref() == Some(epoch) {
                    cursor.syncing = false;
                } else if cursor.syncing {
                    // The answer to our own join from our own position: the node found our
                    // history complete, carried over into a newer epoch (a Redis master
                    // change). Our offset stays valid in it.
                    cursor.epoch = Some(epoch.to_owned());
                    cursor.syncing = false;
                } else {
                    // A room restored from a session saved in another epoch: join again
                    // from our own position to find out.
                    cursor.syncing = true;
                    return true;
                }
            }
            _ => {
                cursor.epoch = Some(epoch.to_owned());
                cursor.last = offset;
                cursor.syncing = false;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined_at(epoch: &str, offset: Offset) -> Rooms {
        let mut rooms = Rooms::default();
        rooms.insert("r");
        rooms.on_joined("r", epoch, offset, None);
        rooms
    }

    #[test]
    fn in_order_messages_are_delivered_once() {
        let mut rooms = joined_at("e", 3);
        assert_eq!(rooms.on_message("r", "e", 4), MessageVerdict::Deliver);
        assert_eq!(rooms.on_message("r", "e", 4), MessageVerdict::Drop);
        assert_eq!(rooms.on_message("r", "e", 2), MessageVerdict::Drop);
        assert_eq!(rooms.on_message("r", "e", 5), MessageVerdict::Deliver);
    }

    #[test]
    fn a_skip_asks_for_one_resync_then_recovered_replay_continues() {
        let mut rooms = joined_at("e", 3);
        assert_eq!(rooms.on_message("r", "e", 6), MessageVerdict::Resync);
        assert_eq!(rooms.on_message("r", "e", 7), MessageVerdict::Drop);
        assert!(!rooms.on_joined("r", "e", 7, Some(&ResumeStatus::Recovered)));
        assert_eq!(rooms.on_message("r", "e", 4), MessageVerdict::Deliver);
    }

    #[test]
    fn not_recovered_moves_the_cursor() {
        let mut rooms = joined_at("e", 3);
        rooms.on_joined("r", "f", 10, Some(&ResumeStatus::NotRecovered));
        assert_eq!(rooms.on_message("r", "f", 11), MessageVerdict::Deliver);
    }

    #[test]
    fn messages_of_unknown_rooms_are_dropped() {
        let mut rooms = joined_at("e", 0);
        assert_eq!(rooms.on_message("other", "e", 1), MessageVerdict::Drop);
    }

    #[test]
    fn a_recovered_answer_to_our_resync_carries_the_cursor_into_the_new_epoch() {
        let mut rooms = joined_at("e", 3);
        assert_eq!(rooms.on_message("r", "f", 4), MessageVerdict::Resync);
        assert!(!rooms.on_joined("r", "f", 9, Some(&ResumeStatus::Recovered)));
        assert_eq!(rooms.on_message("r", "f", 4), MessageVerdict::Deliver);
        assert_eq!(rooms.on_message("r", "e", 5), MessageVerdict::Resync);
    }

    #[test]
    fn a_restored_room_in_another_epoch_asks_for_a_resync() {
        let mut rooms = joined_at("e", 3);
        assert!(rooms.on_joined("r", "f", 9, Some(&ResumeStatus::Recovered)));
        assert_eq!(rooms.on_message("r", "f", 4), MessageVerdict::Drop);
    }
}
