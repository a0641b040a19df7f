//! Room fan-out over sharded pub/sub, with per-room ordering and gap filling.
//!
//! One task (the pump) reads every push message of the cluster connection and is the only
//! emitter of publication events, so each room's events leave in offset order. It tracks
//! the last offset delivered per subscribed room: duplicates are dropped, a jump is filled
//! from the room's stream, and when the stream no longer covers it (trimmed, expired,
//! flushed, new epoch) a [`ClusterEvent::Gap`] is emitted before delivery continues.
//!
//! redis-rs re-sends subscriptions after a reconnect or a slot move and reports them with
//! `ssubscribe` pushes; messages published while the subscription was away never arrive,
//! so such rooms (and every room after a disconnection) are marked for a check against
//! history, done once a second by a separate task that reads the rooms' positions and
//! hands back only the rooms that are behind. Every room is also checked once per `presence_ttl` so that
//! a missed message in a room that went quiet is delivered within that bound.

use futures_util::StreamExt;
use redis::{PushInfo, PushKind, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Shared;
use super::history::{self, decode_message};
use super::presence::decode_event;
use super::registry::DirectMessage;
use crate::cluster::{ClusterEvent, Publication, Replay, RoomPosition};

/// How often rooms marked for a check are compared with history.
const CHECK_PERIOD: Duration = Duration::from_secs(1);

/// Requests from the API side to the pump.
#[derive(Debug)]
pub(crate) enum Control {
    /// A subscription is being set up: buffer the room's messages.
    Want(String),
    /// The subscription is live and history stood at this position.
    Activate(String, RoomPosition),
    /// The node left the room.
    Forget(String),
    /// A check found the room's history ahead of (or different from) what was delivered.
    Behind(String),
    /// A check could not read the room's position; check again later.
    Recheck(String),
    /// A check round finished.
    Checked,
    /// Check every room against history (after the node subscribed again).
    CheckAll,
}

/// Rooms whose position a check round reads at once.
const CHECK_CONCURRENCY: usize = 32;

/// Delivery state of one room.
enum Track {
    /// Subscribed, position not known yet: messages wait here.
    Pending(Vec<Publication>),
    /// Everything up to this position was delivered (or reported as a gap).
    Active(RoomPosition),
}

pub(crate) struct Pump {
    shared: Arc<Shared>,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    control: mpsc::UnboundedReceiver<Control>,
    rooms: HashMap<String, Track>,
    to_check: HashSet<String>,
    checking: bool,
    direct_channel: String,
}

impl Pump {
    pub fn new(
        shared: Arc<Shared>,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        control: mpsc::UnboundedReceiver<Control>,
    ) -> Self {
        let direct_channel = shared.keys.direct_channel(&shared.node.id);
        Self {
            shared,
            pushes,
            control,
            rooms: HashMap::new(),
            to_check: HashSet::new(),
            checking: false,
            direct_channel,
        }
    }

    /// Runs until the instance is dropped (the task is aborted then).
    pub async fn run(mut self) {
        let mut check = tokio::time::interval(CHECK_PERIOD);
        let mut full_check = tokio::time::interval(self.shared.config.presence_ttl);
        loop {
            tokio::select! {
                biased;
                Some(control) = self.control.recv() => self.on_control(control).await,
                Some(push) = self.pushes.recv() => self.on_push(push).await,
                _ = check.tick() => self.start_check(),
                _ = full_check.tick() => self.mark_all(),
                else => return,
            }
        }
    }

    async fn on_control(&mut self, control: Control) {
        match control {
            Control::Want(room) => {
                self.rooms.entry(room).or_insert(Track::Pending(Vec::new()));
            }
            Control::Activate(room, position) => {
                let Some(Track::Pending(buffer)) = self.rooms.remove(&room) else {
                    return;
                };
                self.rooms.insert(room, Track::Active(position));
                let mut buffer = buffer;
                buffer.sort_by_key(|p| p.offset);
                for publication in buffer {
                    self.on_publication(publication).await;
                }
            }
            Control::Forget(room) => {
                self.rooms.remove(&room);
                self.to_check.remove(&room);
            }
            Control::Behind(room) => self.catch_up(&room, None).await,
            Control::Recheck(room) => {
                self.to_check.insert(room);
            }
            Control::Checked => self.checking = false,
            Control::CheckAll => self.mark_all(),
        }
    }

    async fn on_push(&mut self, push: PushInfo) {
        match push.kind {
            PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                    return;
                };
                if let (Some(channel), Some(payload)) = (text(channel), text(payload)) {
                    self.on_message(&channel, &payload).await;
                }
            }
            PushKind::SSubscribe => {
                let channel = push.data.into_iter().next().and_then(text);
                let room = channel
                    .as_deref()
                    .and_then(|c| self.shared.keys.room_of_channel(c));
                if let Some(room) = room.filter(|r| self.is_active(r)) {
                    debug!(room, "room channel resubscribed; checking history");
                    self.to_check.insert(room.to_owned());
                }
            }
            PushKind::Disconnection => {
                info!(node = %self.shared.node.id, "a Redis connection dropped; rechecking rooms");
                self.mark_all();
            }
            _ => {}
        }
    }

    fn is_active(&self, room: &str) -> bool {
        matches!(self.rooms.get(room), Some(Track::Active(_)))
    }

    fn mark_all(&mut self) {
        let active = self
            .rooms
            .iter()
            .filter(|(_, t)| matches!(t, Track::Active(_)));
        let rooms: Vec<String> = active.map(|(room, _)| room.clone()).collect();
        self.to_check.extend(rooms);
    }

    async fn on_message(&mut self, channel: &str, payload: &str) {
        if channel == self.direct_channel {
            match serde_json::from_str::<DirectMessage>(payload) {
                Ok(message) => self.emit(direct_event(message)).await,
                Err(err) => warn!(channel, %err, "undecodable direct message"),
            }
            return;
        }
        let Some(room) = self.shared.keys.room_of_channel(channel) else {
            return;
        };
        if !self.rooms.contains_key(room) {
            return;
        }
        if let Some(publication) = decode_message(room, payload) {
            self.on_publication(publication).await;
        } else if let Some((change, member)) = decode_event(payload) {
            let room = room.to_owned();
            self.emit(ClusterEvent::Presence {
                room,
                change,
                member,
            })
            .await;
        } else {
            warn!(channel, "undecodable room message");
        }
    }

    async fn on_publication(&mut self, publication: Publication) {
        let position = match self.rooms.get_mut(&publication.room) {
            Some(Track::Pending(buffer)) => return buffer.push(publication),
            Some(Track::Active(position)) => position,
            None => return,
        };
        let same_epoch = publication.epoch == position.epoch;
        if same_epoch && publication.offset <= position.offset {
            return;
        }
        if same_epoch && publication.offset == position.offset + 1 {
            position.offset = publication.offset;
            return self
                .emit(ClusterEvent::Publication(Arc::new(publication)))
                .await;
        }
        let room = publication.room.clone();
        self.catch_up(&room, Some(publication)).await;
    }

    /// Delivers what history holds after the room's position; reports a gap when it
    /// cannot. `incoming` is a live message that arrived ahead of the position.
    async fn catch_up(&mut self, room: &str, incoming: Option<Publication>) {
        let Some(Track::Active(position)) = self.rooms.get(room) else {
            return;
        };
        let position = position.clone();
        match history::history(&self.shared, room, position.offset, &position.epoch).await {
            Ok(Replay::Complete(missed)) => {
                self.to_check.remove(room);
                // History vouched that these continue from our position, even where
                // the epoch changed after a failover.
                for publication in missed {
                    self.deliver_continuing(publication).await;
                }
                if let Some(publication) = incoming {
                    self.deliver_next(publication).await;
                }
            }
            Ok(Replay::NotRecoverable(now)) => {
                self.to_check.remove(room);
                self.restart(room, now, &position.epoch, incoming.as_ref())
                    .await;
                if let Some(publication) = incoming {
                    self.deliver_next(publication).await;
                }
            }
            Err(err) => {
                warn!(room, %err, "cannot read history to fill a gap; will retry");
                self.to_check.insert(room.to_owned());
            }
        }
    }

    /// History lost continuity: report the gap and continue from the new epoch's start
    /// when it is still complete, else just before the live message that revealed the
    /// gap (so that it is still delivered), else from where the room stands now.
    async fn restart(
        &mut self,
        room: &str,
        now: RoomPosition,
        old_epoch: &str,
        incoming: Option<&Publication>,
    ) {
        let fresh = if now.epoch == old_epoch {
            None
        } else {
            history::history(&self.shared, room, 0, &now.epoch)
                .await
                .ok()
        };
        let (position, replay) = match fresh {
            Some(Replay::Complete(all)) => {
                let start = RoomPosition {
                    epoch: now.epoch,
                    offset: 0,
                };
                (start, all)
            }
            _ => match incoming {
                Some(live) if live.epoch == now.epoch && live.offset <= now.offset => {
                    let before = RoomPosition {
                        epoch: now.epoch,
                        offset: live.offset - 1,
                    };
                    (before, Vec::new())
                }
                _ => (now, Vec::new()),
            },
        };
        warn!(room, epoch = %position.epoch, offset = position.offset, "room history gap");
        self.rooms
            .insert(room.to_owned(), Track::Active(position.clone()));
        let room_name = room.to_owned();
        self.emit(ClusterEvent::Gap {
            room: room_name,
            position,
        })
        .await;
        for publication in replay {
            self.deliver_next(publication).await;
        }
    }

    /// Emits `publication` when it is exactly the next one of its room.
    async fn deliver_next(&mut self, publication: Publication) {
        let Some(Track::Active(position)) = self.rooms.get_mut(&publication.room) else {
            return;
        };
        let next = publication.epoch == position.epoch && publication.offset == position.offset + 1;
        if next {
            position.offset = publication.offset;
            self.emit(ClusterEvent::Publication(Arc::new(publication)))
                .await;
        }
    }

    /// Emits `publication` when its offset is the next one, adopting its epoch.
    async fn deliver_continuing(&mut self, publication: Publication) {
        let Some(Track::Active(position)) = self.rooms.get_mut(&publication.room) else {
            return;
        };
        if publication.offset == position.offset + 1 {
            position.offset = publication.offset;
            position.epoch.clone_from(&publication.epoch);
            self.emit(ClusterEvent::Publication(Arc::new(publication)))
                .await;
        }
    }

    /// Starts a check round of the marked rooms off the pump, so that reading many
    /// positions never delays delivery; only rooms found behind come back to the pump.
    fn start_check(&mut self) {
        if self.checking || self.to_check.is_empty() {
            return;
        }
        let marked: Vec<String> = self.to_check.drain().collect();
        let rooms: Vec<(String, RoomPosition)> = marked
            .into_iter()
            .filter_map(|room| match self.rooms.get(&room) {
                Some(Track::Active(position)) => Some((room, position.clone())),
                _ => None,
            })
            .collect();
        self.checking = true;
        tokio::spawn(check_rooms(self.shared.clone(), rooms));
    }

    async fn emit(&self, event: ClusterEvent) {
        // A closed receiver means the node stopped listening; nothing to do then.
        let _ = self.shared.events.send(event).await;
    }
}

/// Compares each room's delivered position with its history and tells the pump which
/// rooms are behind.
async fn check_rooms(shared: Arc<Shared>, rooms: Vec<(String, RoomPosition)>) {
    let reads = rooms.into_iter().map(|(room, delivered)| {
        let shared = shared.clone();
        async move {
            let now = history::position(&shared, &room).await;
            match now {
                Ok(now) if now == delivered => None,
                Ok(_) => Some(Control::Behind(room)),
                Err(_) => Some(Control::Recheck(room)),
            }
        }
    });
    let mut results = futures_util::stream::iter(reads).buffer_unordered(CHECK_CONCURRENCY);
    while let Some(result) = results.next().await {
        if let Some(control) = result {
            let _ = shared.control.send(control);
        }
    }
    let _ = shared.control.send(Control::Checked);
}

fn direct_event(message: DirectMessage) -> ClusterEvent {
    ClusterEvent::Direct {
        user: message.user,
        conn: message.conn,
        from: message.from,
        data: message.data,
    }
}

fn text(value: Value) -> Option<String> {
    redis::from_redis_value::<String>(value).ok()
}
