//! Per-connection room cursors: the last offset delivered to the client in each room, and
//! the decision for each incoming publication (deliver, drop as duplicate, or fill a gap).

use ringcast_shared::cluster::{RoomPosition, SessionRoom};
use ringcast_shared::protocol::{Epoch, Offset};
use std::collections::HashMap;

/// Where one room stands for this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Epoch of `last`.
    pub epoch: Epoch,
    /// Last offset delivered (or skipped after a `not_recovered`).
    pub last: Offset,
}

/// What to do with a publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It is the next one: write it.
    Deliver,
    /// Already delivered: drop it.
    Duplicate,
    /// Messages are missing before it (or the epoch changed): fetch history first.
    Gap,
    /// The connection is not in this room.
    NotJoined,
}

/// The cursors of one connection, by room.
#[derive(Debug, Default)]
pub struct Cursors {
    rooms: HashMap<String, Cursor>,
    dirty: bool,
}

impl Cursors {
    /// Decides what to do with the publication at `offset` of `epoch` in `room`.
    pub fn classify(&self, room: &str, epoch: &str, offset: Offset) -> Verdict {
        let Some(cursor) = self.rooms.get(room) else {
            return Verdict::NotJoined;
        };
        if cursor.epoch != epoch {
            Verdict::Gap
        } else if offset <= cursor.last {
            Verdict::Duplicate
        } else if offset == cursor.last + 1 {
            Verdict::Deliver
        } else {
            Verdict::Gap
        }
    }

    /// The cursor of `room`.
    pub fn get(&self, room: &str) -> Option<&Cursor> {
        self.rooms.get(room)
    }

    /// Sets `room`'s cursor (join, resume, or a `not_recovered` jump).
    pub fn set(&mut self, room: &str, position: &RoomPosition) {
        let cursor = Cursor {
            epoch: position.epoch.clone(),
            last: position.offset,
        };
        self.rooms.insert(room.to_owned(), cursor);
        self.dirty = true;
    }

    /// Records that `offset` was delivered in `room`.
    pub fn advance(&mut self, room: &str, offset: Offset) {
        if let Some(cursor) = self.rooms.get_mut(room) {
            cursor.last = offset;
            self.dirty = true;
        }
    }

    /// Forgets `room`; returns whether it was joined.
    pub fn remove(&mut self, room: &str) -> bool {
        self.dirty = true;
        self.rooms.remove(room).is_some()
    }

    /// Whether the connection is in `room`.
    pub fn contains(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// Number of rooms joined.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// Room names.
    pub fn rooms(&self) -> Vec<String> {
        self.rooms.keys().cloned().collect()
    }

    /// The rooms as a session record would save them; clears the dirty mark.
    pub fn snapshot(&mut self) -> Vec<SessionRoom> {
        self.dirty = false;
        let mut rooms: Vec<SessionRoom> = self
            .rooms
            .iter()
            .map(|(room, cursor)| SessionRoom {
                room: room.clone(),
                offset: cursor.last,
                epoch: cursor.epoch.clone(),
            })
            .collect();
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        rooms
    }

    /// Whether anything changed since the last snapshot.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: &str, offset: Offset) -> RoomPosition {
        RoomPosition {
            epoch: epoch.into(),
            offset,
        }
    }

    #[test]
    fn next_offset_is_delivered_older_ones_are_duplicates() {
        let mut cursors = Cursors::default();
        cursors.set("r", &at("e", 5));
        assert_eq!(cursors.classify("r", "e", 6), Verdict::Deliver);
        assert_eq!(cursors.classify("r", "e", 5), Verdict::Duplicate);
        assert_eq!(cursors.classify("r", "e", 1), Verdict::Duplicate);
    }

    #[test]
    fn skipped_offset_or_new_epoch_is_a_gap() {
        let mut cursors = Cursors::default();
        cursors.set("r", &at("e", 5));
        assert_eq!(cursors.classify("r", "e", 7), Verdict::Gap);
        assert_eq!(cursors.classify("r", "f", 1), Verdict::Gap);
        assert_eq!(cursors.classify("other", "e", 6), Verdict::NotJoined);
    }

    #[test]
    fn snapshot_lists_rooms_with_last_offsets_and_clears_dirty() {
        let mut cursors = Cursors::default();
        cursors.set("b", &at("e", 1));
        cursors.set("a", &at("e", 0));
        cursors.advance("b", 2);
        assert!(cursors.is_dirty());
        let rooms = cursors.snapshot();
        assert_eq!(rooms[0].room, "a");
        assert_eq!((rooms[1].room.as_str(), rooms[1].offset), ("b", 2));
        assert!(!cursors.is_dirty());
    }
}
