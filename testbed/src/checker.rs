//! The loss checker: turns the event log of a run into the numbers the report must prove.
//!
//! Every publish carries a [`MsgId`] (publisher id, sequence number). The checker does not
//! trust any node counter: the set of messages that *had* to arrive is derived from the
//! publishers' acks, and the set that *did* arrive from what each simulated client saw on the
//! wire (before any de-duplication).
//!
//! # Membership
//! A subscriber is a member of a room in *segments*. A segment starts at a join ack
//! (`joined` at epoch `E`, offset `o`) and continues through every resume reported as
//! recovered in the same epoch. Within a segment the subscriber must receive every acked
//! message of epoch `E` with an offset above `o` (except its own publishes). A segment ends:
//! - at the end of the run: everything acked in the epoch after `o` is expected;
//! - on a resume reported *not recovered*, a leave, a live epoch change, or the client being
//!   lost: the tail after the last message it received is excused (the client was told, or
//!   is counted as lost), holes before that are still losses.
//!
//! Deliveries the client dropped by offset (a replay that overlaps what it already had,
//! e.g. after a node was killed between two session saves) are counted as *redelivered*;
//! *duplicates* are messages the application would see twice: the same message id under
//! a new offset, or a repeated offset that slipped past the client.
//!
//! Losses are attributed to the phase in which the message was acked, duplicates to the
//! phase of the second delivery, every other count to the phase of its event.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use ringcast_shared::protocol::ResumeStatus;
use serde::Serialize;

/// A simulated client, numbered from 0.
pub type ClientId = u32;
/// A room, numbered from 0 (its name is `room-<n>`).
pub type RoomId = u32;

/// A delivery later than this after its ack counts as late.
pub const LATE_DELIVERY: Duration = Duration::from_secs(1);

/// How many individual losses and duplicates the verdict lists by example.
const SAMPLE_LIMIT: usize = 20;

/// The identity of one published message, carried in its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct MsgId {
    /// The publishing client.
    pub publisher: ClientId,
    /// The publisher's sequence number, from 1.
    pub seq: u64,
}

/// One thing a simulated client observed, at `at` since the start of the run.
#[derive(Debug, Clone)]
pub struct Event {
    /// When it was observed, since the start of the run.
    pub at: Duration,
    /// Which client observed it.
    pub client: ClientId,
    /// What happened.
    pub kind: EventKind,
}

/// What a simulated client observed.
#[derive(Debug, Clone)]
pub enum EventKind {
    /// A join (or resumed join) took effect at `offset` of `epoch`.
    Joined {
        /// The room.
        room: RoomId,
        /// The room's epoch.
        epoch: Arc<str>,
        /// Newest offset when the join took effect.
        offset: u64,
        /// The resume outcome when the join asked to resume.
        resume: Option<ResumeStatus>,
    },
    /// A leave took effect.
    Left {
        /// The room.
        room: RoomId,
    },
    /// A publish of this client was acked.
    Acked {
        /// The room.
        room: RoomId,
        /// The room's epoch.
        epoch: Arc<str>,
        /// The message's offset.
        offset: u64,
        /// The publisher's sequence number of the message.
        seq: u64,
    },
    /// A publish got no ack (the connection went away first).
    Unacked,
    /// A message was delivered.
    Delivered {
        /// The room.
        room: RoomId,
        /// The room's epoch.
        epoch: Arc<str>,
        /// The message's offset.
        offset: u64,
        /// The message's identity; `None` when its data carried none.
        msg: Option<MsgId>,
    },
    /// A message at or below the client's last offset in the same epoch arrived again (a
    /// replay overlap after a resume) and was dropped by offset, as the client library does.
    Redelivered,
    /// The client saw a gap (or an epoch change) and re-joined from its own position.
    Resync,
    /// The connection went away unexpectedly.
    Disconnected,
    /// The client is back: welcome received and every room re-joined.
    Reconnected {
        /// From the disconnect to the last room re-joined.
        took: Duration,
    },
    /// A connection attempt failed (TCP, HTTP upgrade or hello).
    HandshakeFailed,
    /// The client could not get back within the resume window and gave up.
    Lost,
    /// The run ended while the client was still trying to get back.
    Unfinished,
}

/// A named stretch of the run, from `start` until the next phase starts.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// Name shown in the report, e.g. `rolling-restart`.
    pub name: String,
    /// Start, since the start of the run.
    #[serde(serialize_with = "as_secs")]
    pub start: Duration,
}

pub(crate) fn as_secs<S: serde::Serializer>(value: &Duration, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_f64(value.as_secs_f64())
}

/// Reconnect time percentiles, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// The counts of one phase, or of the whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Publishes acked.
    pub acked: u64,
    /// Publishes that got no ack.
    pub unacked: u64,
    /// Messages delivered (every copy).
    pub delivered: u64,
    /// Deliveries the checker required.
    pub expected: u64,
    /// Required deliveries that never happened.
    pub lost_messages: u64,
    /// Messages delivered twice (or more) to the same client in the same room, after the
    /// client's de-duplication by offset.
    pub duplicates: u64,
    /// Deliveries dropped by the client: already had (replay overlap) or out of order
    /// while re-synchronising.
    pub redelivered: u64,
    /// Gaps the client noticed and filled with a re-synchronising join.
    pub resyncs: u64,
    /// Deliveries with an offset below one already seen in the same epoch.
    pub out_of_order: u64,
    /// Rooms reported "not recovered" on resume.
    pub not_recovered: u64,
    /// Clients that could not get back within the resume window.
    pub clients_lost: u64,
    /// Clients still trying to get back when the run ended (after the cooldown waited up
    /// to the resume window for them).
    pub clients_unfinished: u64,
    /// Connection attempts that failed.
    pub failed_handshakes: u64,
    /// Unexpected disconnects.
    pub disconnects: u64,
    /// Completed reconnects.
    pub reconnects: u64,
    /// Reconnect time, disconnect to every room re-joined.
    pub reconnect: Latency,
    /// Delivery time: from the publisher's ack to the subscriber's delivery (deliveries of
    /// acked messages only; replays after a resume included).
    pub delivery: Latency,
    /// Deliveries later than [`LATE_DELIVERY`] after their ack.
    pub late_deliveries: u64,
    /// Share of this phase's reconnects that completed in its busiest second (0 to 1).
    pub busiest_second_share: f64,
}

/// One lost or duplicated delivery, as an example for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The client that missed (or twice received) the message.
    pub client: ClientId,
    /// The room.
    pub room: RoomId,
    /// The message.
    pub msg: MsgId,
    /// The phase it is attributed to.
    pub phase: String,
}

/// The checker's result.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Per phase, in run order.
    pub phases: Vec<(String, Tally)>,
    /// The whole run.
    pub total: Tally,
    /// Up to 20 lost deliveries.
    pub lost_examples: Vec<Finding>,
    /// Up to 20 duplicated deliveries.
    pub duplicate_examples: Vec<Finding>,
    /// Every reconnect time, in milliseconds (for the histogram chart).
    pub reconnect_ms: Vec<f64>,
}

impl Verdict {
    /// True when no client, no acked message was lost and nothing was duplicated (a client
    /// still disconnected at the end counts as lost).
    pub fn passed(&self) -> bool {
        self.total.clients_lost == 0
            && self.total.clients_unfinished == 0
            && self.total.lost_messages == 0
            && self.total.duplicates == 0
    }
}

/// Where an acked message sits in its room's history.
struct AckedMsg {
    msg: MsgId,
    at: Duration,
}

/// Acked messages by room, epoch and offset.
type AckIndex = HashMap<(RoomId, Arc<str>), BTreeMap<u64, AckedMsg>>;

/// A span of continuous membership: offsets `(start, end]` of `epoch` are required.
struct Segment {
    client: ClientId,
    room: RoomId,
    epoch: Arc<str>,
    start: u64,
    /// `None` while open; at the end of the run open segments require everything.
    end: Option<u64>,
    /// Highest offset received in this segment.
    last: u64,
}

/// Walks the events and keeps the per-client state the verdict needs.
struct Walker<'a> {
    phases: &'a [Phase],
    index: &'a AckIndex,
    delivery: Vec<Vec<Duration>>,
    open: HashMap<(ClientId, RoomId), Segment>,
    closed: Vec<Segment>,
    received: HashMap<(ClientId, RoomId), HashSet<MsgId>>,
    tallies: Vec<Tally>,
    reconnects: Vec<Vec<Duration>>,
    reconnect_at: Vec<Vec<u64>>,
    duplicate_examples: Vec<Finding>,
}

/// Checks a run's events against its phases; see the module docs for the rules.
pub fn check(events: &[Event], phases: &[Phase]) -> Verdict {
    let index = index_acks(events);
    let mut walker = Walker::new(phases, &index);
    for event in events {
        walker.step(event);
    }
    walker.finish()
}

fn index_acks(events: &[Event]) -> AckIndex {
    let mut index = AckIndex::new();
    for event in events {
        if let EventKind::Acked {
            room,
            epoch,
            offset,
            seq,
        } = &event.kind
        {
            let msg = MsgId {
                publisher: event.client,
                seq: *seq,
            };
            let at = event.at;
            index
                .entry((*room, epoch.clone()))
                .or_default()
                .insert(*offset, AckedMsg { msg, at });
        }
    }
    index
}

/// The index of the phase that contains `at` (phases are sorted by start).
fn phase_of(phases: &[Phase], at: Duration) -> usize {
    phases
        .iter()
        .rposition(|phase| phase.start <= at)
        .unwrap_or(0)
}

impl<'a> Walker<'a> {
    fn new(phases: &'a [Phase], index: &'a AckIndex) -> Self {
        let count = phases.len().max(1);
        Self {
            phases,
            index,
            delivery: vec![Vec::new(); count],
            open: HashMap::new(),
            closed: Vec::new(),
            received: HashMap::new(),
            tallies: vec![Tally::default(); count],
            reconnects: vec![Vec::new(); count],
            reconnect_at: vec![Vec::new(); count],
            duplicate_examples: Vec::new(),
        }
    }

    fn step(&mut self, event: &Event) {
        let phase = phase_of(self.phases, event.at);
        let client = event.client;
        match &event.kind {
            EventKind::Joined {
                room,
                epoch,
                offset,
                resume,
            } => self.joined(phase, client, *room, epoch, *offset, resume.clone()),
            EventKind::Left { room } => self.close(client, *room),
            EventKind::Acked { .. } => self.tallies[phase].acked += 1,
            EventKind::Unacked => self.tallies[phase].unacked += 1,
            EventKind::Delivered {
                room,
                epoch,
                offset,
                msg,
            } => {
                self.time_delivery(phase, event.at, *room, epoch, *offset, *msg);
                self.delivered(phase, client, *room, epoch, *offset, *msg);
            }
            EventKind::Redelivered => self.tallies[phase].redelivered += 1,
            EventKind::Resync => self.tallies[phase].resyncs += 1,
            EventKind::Disconnected => self.tallies[phase].disconnects += 1,
            EventKind::Reconnected { took } => {
                self.tallies[phase].reconnects += 1;
                self.reconnects[phase].push(*took);
                self.reconnect_at[phase].push(event.at.as_secs());
            }
            EventKind::HandshakeFailed => self.tallies[phase].failed_handshakes += 1,
            EventKind::Lost => {
                self.tallies[phase].clients_lost += 1;
                self.close_all(client);
            }
            EventKind::Unfinished => {
                self.tallies[phase].clients_unfinished += 1;
                self.close_all(client);
            }
        }
    }

    fn joined(
        &mut self,
        phase: usize,
        client: ClientId,
        room: RoomId,
        epoch: &Arc<str>,
        offset: u64,
        resume: Option<ResumeStatus>,
    ) {
        if resume == Some(ResumeStatus::NotRecovered) {
            self.tallies[phase].not_recovered += 1;
        }
        let continues = resume == Some(ResumeStatus::Recovered)
            && self
                .open
                .get(&(client, room))
                .is_some_and(|segment| &segment.epoch == epoch);
        if continues {
            return;
        }
        self.close(client, room);
        self.start(client, room, epoch.clone(), offset);
    }

    fn start(&mut self, client: ClientId, room: RoomId, epoch: Arc<str>, offset: u64) {
        let segment = Segment {
            client,
            room,
            epoch,
            start: offset,
            end: None,
            last: offset,
        };
        self.open.insert((client, room), segment);
    }

    /// Ends a segment, excusing the tail after the last message received.
    fn close(&mut self, client: ClientId, room: RoomId) {
        if let Some(mut segment) = self.open.remove(&(client, room)) {
            segment.end = Some(segment.last);
            self.closed.push(segment);
        }
    }

    /// Ends every segment of `client`, excusing the tails.
    fn close_all(&mut self, client: ClientId) {
        let rooms: Vec<RoomId> = self
            .open
            .keys()
            .filter(|(owner, _)| *owner == client)
            .map(|(_, room)| *room)
            .collect();
        for room in rooms {
            self.close(client, room);
        }
    }

    fn delivered(
        &mut self,
        phase: usize,
        client: ClientId,
        room: RoomId,
        epoch: &Arc<str>,
        offset: u64,
        msg: Option<MsgId>,
    ) {
        self.tallies[phase].delivered += 1;
        let epoch_changed = self
            .open
            .get(&(client, room))
            .is_some_and(|segment| &segment.epoch != epoch);
        if epoch_changed {
            self.close(client, room);
            self.start(client, room, epoch.clone(), 0);
        }
        let first =
            msg.is_none_or(|msg| self.received.entry((client, room)).or_default().insert(msg));
        if let Some(segment) = self.open.get_mut(&(client, room)) {
            if first && offset <= segment.last && offset > segment.start {
                self.tallies[phase].out_of_order += 1;
            }
            segment.last = segment.last.max(offset);
        }
        if let (false, Some(msg)) = (first, msg) {
            self.tallies[phase].duplicates += 1;
            if self.duplicate_examples.len() < SAMPLE_LIMIT {
                let phase = self.phase_name(phase);
                self.duplicate_examples.push(Finding {
                    client,
                    room,
                    msg,
                    phase,
                });
            }
        }
    }

    /// Records how long after its ack an acked message was delivered.
    fn time_delivery(
        &mut self,
        phase: usize,
        at: Duration,
        room: RoomId,
        epoch: &Arc<str>,
        offset: u64,
        msg: Option<MsgId>,
    ) {
        let acked = self
            .index
            .get(&(room, epoch.clone()))
            .and_then(|history| history.get(&offset));
        let Some(acked) = acked.filter(|acked| Some(acked.msg) == msg) else {
            return;
        };
        let took = at.saturating_sub(acked.at);
        if took > LATE_DELIVERY {
            self.tallies[phase].late_deliveries += 1;
        }
        self.delivery[phase].push(took);
    }

    fn phase_name(&self, phase: usize) -> String {
        self.phases
            .get(phase)
            .map_or_else(|| "run".to_owned(), |p| p.name.clone())
    }

    fn finish(mut self) -> Verdict {
        let open: Vec<Segment> = self.open.drain().map(|(_, segment)| segment).collect();
        self.closed.extend(open);
        let lost_examples = self.count_losses();
        let reconnect_ms = self
            .reconnects
            .iter()
            .flatten()
            .map(|took| took.as_secs_f64() * 1000.0)
            .collect();
        let phases = self.phase_tallies();
        let total = self.total_tally();
        Verdict {
            phases,
            total,
            lost_examples,
            duplicate_examples: self.duplicate_examples,
            reconnect_ms,
        }
    }

    /// Compares every segment's required messages with what its client received.
    fn count_losses(&mut self) -> Vec<Finding> {
        let index = self.index;
        let mut examples = Vec::new();
        let empty = HashSet::new();
        for segment in &self.closed {
            let Some(history) = index.get(&(segment.room, segment.epoch.clone())) else {
                continue;
            };
            let received = self
                .received
                .get(&(segment.client, segment.room))
                .unwrap_or(&empty);
            let upper = segment.end.unwrap_or(u64::MAX);
            for acked in history
                .range(segment.start + 1..=upper.max(segment.start))
                .map(|e| e.1)
            {
                if acked.msg.publisher == segment.client {
                    continue;
                }
                let phase = phase_of(self.phases, acked.at);
                self.tallies[phase].expected += 1;
                if received.contains(&acked.msg) {
                    continue;
                }
                self.tallies[phase].lost_messages += 1;
                if examples.len() < SAMPLE_LIMIT {
                    examples.push(Finding {
                        client: segment.client,
                        room: segment.room,
                        msg: acked.msg,
                        phase: self.phases.get(phase).map_or("run", |p| &p.name).to_owned(),
                    });
                }
            }
        }
        examples
    }

    fn phase_tallies(&mut self) -> Vec<(String, Tally)> {
        let mut out = Vec::new();
        for (i, tally) in self.tallies.iter_mut().enumerate() {
            tally.reconnect = latency(&self.reconnects[i]);
            tally.delivery = latency(&self.delivery[i]);
            tally.busiest_second_share = busiest_share(&self.reconnect_at[i]);
            out.push((
                self.phases.get(i).map_or("run", |p| &p.name).to_owned(),
                tally.clone(),
            ));
        }
        out
    }

    fn total_tally(&self) -> Tally {
        let mut total = Tally::default();
        for tally in &self.tallies {
            add_counts(&mut total, tally);
        }
        let all: Vec<Duration> = self.reconnects.iter().flatten().copied().collect();
        total.reconnect = latency(&all);
        let delivery: Vec<Duration> = self.delivery.iter().flatten().copied().collect();
        total.delivery = latency(&delivery);
        let seconds: Vec<u64> = self.reconnect_at.iter().flatten().copied().collect();
        total.busiest_second_share = busiest_share(&seconds);
        total
    }
}

fn add_counts(total: &mut Tally, tally: &Tally) {
    total.acked += tally.acked;
    total.unacked += tally.unacked;
    total.delivered += tally.delivered;
    total.expected += tally.expected;
    total.lost_messages += tally.lost_messages;
    total.duplicates += tally.duplicates;
    total.redelivered += tally.redelivered;
    total.resyncs += tally.resyncs;
    total.out_of_order += tally.out_of_order;
    total.not_recovered += tally.not_recovered;
    total.clients_lost += tally.clients_lost;
    total.clients_unfinished += tally.clients_unfinished;
    total.failed_handshakes += tally.failed_handshakes;
    total.disconnects += tally.disconnects;
    total.reconnects += tally.reconnects;
    total.late_deliveries += tally.late_deliveries;
}

/// p50/p99/max of `samples`, recorded in microseconds.
fn latency(samples: &[Duration]) -> Latency {
    let Ok(mut histogram) = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3) else {
        return Latency::default();
    };
    for sample in samples {
        let micros = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX);
        histogram.saturating_record(micros.max(1));
    }
    if histogram.is_empty() {
        return Latency::default();
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    Latency {
        p50_ms: ms(histogram.lowest_equivalent(histogram.value_at_quantile(0.5))),
        p99_ms: ms(histogram.lowest_equivalent(histogram.value_at_quantile(0.99))),
        max_ms: ms(histogram.lowest_equivalent(histogram.max())),
    }
}

/// The largest share of `seconds` that fall in one whole second.
fn busiest_share(seconds: &[u64]) -> f64 {
    if seconds.is_empty() {
        return 0.0;
    }
    let mut per_second: HashMap<u64, u64> = HashMap::new();
    for second in seconds {
        *per_second.entry(*second).or_default() += 1;
    }
    let busiest = per_second.values().copied().max().unwrap_or(0);
    busiest as f64 / seconds.len() as f64
}

#[cfg(test)]
mod tests;
