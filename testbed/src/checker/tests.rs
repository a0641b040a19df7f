//! Unit tests of the loss checker: hand-written runs with known faults.

use super::*;

/// Builds an event log in order; time advances 10 ms per event.
struct Run {
    events: Vec<Event>,
    now: Duration,
    epoch: Arc<str>,
}

impl Run {
    fn new() -> Self {
        Self {
            events: Vec::new(),
            now: Duration::ZERO,
            epoch: Arc::from("e1"),
        }
    }

    fn push(&mut self, client: ClientId, kind: EventKind) {
        self.now += Duration::from_millis(10);
        self.events.push(Event {
            at: self.now,
            client,
            kind,
        });
    }

    fn at(&mut self, secs: u64) {
        self.now = Duration::from_secs(secs);
    }

    fn join(&mut self, client: ClientId, offset: u64, resume: Option<ResumeStatus>) {
        let epoch = self.epoch.clone();
        self.push(
            client,
            EventKind::Joined {
                room: 0,
                epoch,
                offset,
                resume,
            },
        );
    }

    fn ack(&mut self, publisher: ClientId, seq: u64, offset: u64) {
        let epoch = self.epoch.clone();
        self.push(
            publisher,
            EventKind::Acked {
                room: 0,
                epoch,
                offset,
                seq,
            },
        );
    }

    fn deliver(&mut self, client: ClientId, publisher: ClientId, seq: u64, offset: u64) {
        let epoch = self.epoch.clone();
        let msg = Some(MsgId { publisher, seq });
        self.push(
            client,
            EventKind::Delivered {
                room: 0,
                epoch,
                offset,
                msg,
            },
        );
    }

    /// Publisher 0 publishes `seq` at `offset`; every listed subscriber receives it.
    fn publish(&mut self, seq: u64, offset: u64, to: &[ClientId]) {
        self.ack(0, seq, offset);
        for client in to {
            self.deliver(*client, 0, seq, offset);
        }
    }

    fn check(&self, phases: &[Phase]) -> Verdict {
        check(&self.events, phases)
    }
}

fn phases(names: &[(&str, u64)]) -> Vec<Phase> {
    names
        .iter()
        .map(|(name, start)| Phase {
            name: (*name).to_owned(),
            start: Duration::from_secs(*start),
        })
        .collect()
}

#[test]
fn a_clean_run_passes_with_every_delivery_expected() {
    let mut run = Run::new();
    for client in 0..3 {
        run.join(client, 0, None);
    }
    for seq in 1..=5 {
        run.publish(seq, seq, &[1, 2]);
    }
    let verdict = run.check(&phases(&[("steady", 0)]));
    assert!(verdict.passed());
    assert_eq!(verdict.total.acked, 5);
    assert_eq!(verdict.total.expected, 10);
    assert_eq!(verdict.total.delivered, 10);
    assert_eq!(verdict.total.lost_messages, 0);
    assert_eq!(verdict.total.duplicates, 0);
}

#[test]
fn a_dropped_message_and_a_duplicate_are_reported_exactly() {
    let mut run = Run::new();
    for client in 0..3 {
        run.join(client, 0, None);
    }
    run.at(5);
    run.publish(1, 1, &[1, 2]);
    // Client 2 never gets message 2.
    run.publish(2, 2, &[1]);
    // Client 1 gets message 3 twice.
    run.publish(3, 3, &[1, 2, 1]);
    run.publish(4, 4, &[1, 2]);
    let verdict = run.check(&phases(&[("warmup", 0), ("fault", 5)]));

    assert!(!verdict.passed());
    assert_eq!(verdict.total.lost_messages, 1);
    assert_eq!(verdict.total.duplicates, 1);
    let lost = Finding {
        client: 2,
        room: 0,
        msg: MsgId {
            publisher: 0,
            seq: 2,
        },
        phase: "fault".into(),
    };
    assert_eq!(verdict.lost_examples, vec![lost]);
    let duplicate = Finding {
        client: 1,
        room: 0,
        msg: MsgId {
            publisher: 0,
            seq: 3,
        },
        phase: "fault".into(),
    };
    assert_eq!(verdict.duplicate_examples, vec![duplicate]);
    assert_eq!(verdict.phases[0].1.lost_messages, 0);
    assert_eq!(verdict.phases[1].1.lost_messages, 1);
    assert_eq!(verdict.phases[1].1.duplicates, 1);
}

#[test]
fn messages_before_the_join_and_own_publishes_are_not_required() {
    let mut run = Run::new();
    run.join(0, 0, None);
    run.publish(1, 1, &[]);
    run.publish(2, 2, &[]);
    // Client 1 joins after offset 2: it needs offsets 3 and up only.
    run.join(1, 2, None);
    run.publish(3, 3, &[1]);
    let verdict = run.check(&[]);
    assert!(verdict.passed());
    assert_eq!(verdict.total.expected, 1);
}

#[test]
fn a_recovered_resume_continues_membership_and_needs_the_replay() {
    let mut run = Run::new();
    run.join(0, 0, None);
    run.join(1, 0, None);
    run.publish(1, 1, &[1]);
    run.push(1, EventKind::Disconnected);
    run.publish(2, 2, &[]);
    run.publish(3, 3, &[]);
    run.join(1, 3, Some(ResumeStatus::Recovered));
    // Only message 2 is replayed: message 3 is lost.
    run.deliver(1, 0, 2, 2);
    let took = Duration::from_millis(40);
    run.push(1, EventKind::Reconnected { took });
    run.publish(4, 4, &[1]);

    let verdict = run.check(&[]);
    assert_eq!(verdict.total.lost_messages, 1);
    assert_eq!(verdict.lost_examples[0].msg.seq, 3);
    assert_eq!(verdict.total.disconnects, 1);
    assert_eq!(verdict.total.reconnects, 1);
    assert_eq!(verdict.total.reconnect.max_ms, 40.0);
}

#[test]
fn not_recovered_excuses_the_tail_but_not_a_hole() {
    let mut run = Run::new();
    run.join(0, 0, None);
    run.join(1, 0, None);
    run.publish(1, 1, &[]);
    run.publish(2, 2, &[1]);
    run.push(1, EventKind::Disconnected);
    run.publish(3, 3, &[]);
    run.join(1, 3, Some(ResumeStatus::NotRecovered));
    run.publish(4, 4, &[1]);

    let verdict = run.check(&[]);
    assert_eq!(verdict.total.not_recovered, 1);
    // Offset 1 is a hole before the last received offset; offset 3 is the excused tail.
    assert_eq!(verdict.total.lost_messages, 1);
    assert_eq!(verdict.lost_examples[0].msg.seq, 1);
}

#[test]
fn a_lost_client_is_counted_and_its_tail_is_not_a_message_loss() {
    let mut run = Run::new();
    run.join(0, 0, None);
    run.join(1, 0, None);
    run.publish(1, 1, &[1]);
    run.push(1, EventKind::Disconnected);
    run.push(1, EventKind::HandshakeFailed);
    run.push(1, EventKind::Lost);
    run.publish(2, 2, &[]);

    let verdict = run.check(&[]);
    assert!(!verdict.passed());
    assert_eq!(verdict.total.clients_lost, 1);
    assert_eq!(verdict.total.failed_handshakes, 1);
    assert_eq!(verdict.total.lost_messages, 0);
}

#[test]
fn a_client_still_away_at_the_end_fails_the_run_without_message_losses() {
    let mut run = Run::new();
    run.join(0, 0, None);
    run.join(1, 0, None);
    run.publish(1, 1, &[1]);
    run.push(1, EventKind::Disconnected);
    run.publish(2, 2, &[]);
    run.push(1, EventKind::Unfinished);
    let verdict = run.check(&[]);
    assert!(!verdict.passed());
    assert_eq!(verdict.total.clients_unfinished, 1);
    assert_eq!(verdict.total.lost_messages, 0);
}

#[test]
fn deliveries_are_timed_from_their_ack() {
    let mut run = Run::new();
    run.join(0, 0, None);
    run.join(1, 0, None);
    run.publish(1, 1, &[1]);
    run.ack(0, 2, 2);
    run.now += Duration::from_secs(3);
    run.deliver(1, 0, 2, 2);
    let verdict = run.check(&[]);
    assert!(verdict.passed());
    assert_eq!(verdict.total.late_deliveries, 1);
    assert!((verdict.total.delivery.max_ms - 3010.0).abs() < 5.0);
    assert!((verdict.total.delivery.p50_ms - 10.0).abs() < 1.0);
}

#[test]
fn offsets_of_another_epoch_are_not_confused() {
    let mut run = Run::new();
    run.join(0, 0, None);
    run.join(1, 0, None);
    run.publish(1, 1, &[1]);
    run.epoch = Arc::from("e2");
    run.publish(2, 1, &[1]);
    run.publish(3, 2, &[1]);
    let verdict = run.check(&[]);
    assert!(verdict.passed());
    assert_eq!(verdict.total.expected, 3);
}

#[test]
fn reconnects_are_timed_per_phase_with_the_busiest_second() {
    let mut run = Run::new();
    run.at(10);
    for millis in [10, 20, 30] {
        let took = Duration::from_millis(millis);
        run.push(1, EventKind::Reconnected { took });
    }
    run.at(12);
    let took = Duration::from_millis(400);
    run.push(2, EventKind::Reconnected { took });

    let verdict = run.check(&phases(&[("warmup", 0), ("restart", 10)]));
    let restart = &verdict.phases[1].1;
    assert_eq!(restart.reconnects, 4);
    assert_eq!(restart.busiest_second_share, 0.75);
    assert_eq!(restart.reconnect.p50_ms, 20.0);
    assert!((restart.reconnect.max_ms - 400.0).abs() < 1.0);
    assert_eq!(verdict.phases[0].1.reconnects, 0);
    assert_eq!(verdict.reconnect_ms.len(), 4);
}
