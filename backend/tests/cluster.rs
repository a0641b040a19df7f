//! Several nodes sharing a real Redis Cluster (the testbed fixture): rooms, presence and
//! direct messages across nodes; kill -9 and SIGTERM of a node with clients resuming on
//! another without gap or duplicate; presence of a crashed node expiring; a Redis master
//! failover in the middle of a stream.

mod common;

use common::{NodeProcess, Raw, Spec, message_offset};
use ringcast_shared::client::{Client, ClientConfig, Event, Events};
use ringcast_shared::protocol::{PresenceChange, ResumeStatus, ServerFrame, close};
use ringcast_testbed::redis_cluster::{RedisCluster, unique_prefix};
use serde_json::json;
use std::time::Duration;
use tokio::time::{Instant, timeout};

const STEP: Duration = Duration::from_secs(20);

async fn nodes(
    cluster: &RedisCluster,
    count: usize,
    tune: impl Fn(Spec) -> Spec,
) -> Vec<NodeProcess> {
    let prefix = unique_prefix();
    let mut started = Vec::new();
    for index in 1..=count {
        let spec = Spec::new(&format!("n{index}")).redis(
            &cluster.seed_urls(),
            &prefix,
            "presence_ttl = \"2s\"\nack = \"replicated\"",
        );
        let spec = tune(spec.node("session_save_interval = \"200ms\""));
        started.push(NodeProcess::start(&spec).await);
    }
    started
}

async fn client(urls: &[String], user: &str) -> (Client, Events) {
    let mut config = ClientConfig::new(urls.iter().cloned()).token(user);
    config.backoff_min = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    Client::connect(config).await.unwrap()
}

/// What a subscriber saw: message offsets in order, and whether it was told of a loss.
#[derive(Debug, Default)]
struct Seen {
    offsets: Vec<u64>,
    not_recovered: bool,
    resumed_sessions: usize,
    close_codes: Vec<u16>,
}

/// Reads events until offset `last` arrived (or `within` passed).
async fn collect(events: &mut Events, last: u64, within: Duration) -> Seen {
    let mut seen = Seen::default();
    let deadline = Instant::now() + within;
    while seen.offsets.last() != Some(&last) {
        let Ok(Some(event)) = timeout(deadline - Instant::now(), events.recv()).await else {
            break;
        };
        match event {
            Event::Message { offset, .. } => seen.offsets.push(offset),
            Event::Resumed {
                status: ResumeStatus::NotRecovered,
                ..
            } => seen.not_recovered = true,
            Event::Connected { resumed: true, .. } => seen.resumed_sessions += 1,
            Event::Disconnected {
                code: Some(code), ..
            } => seen.close_codes.push(code),
            _ => {}
        }
    }
    seen
}

/// Publishes `count` messages through `publisher`, retrying retryable failures; returns
/// the acked offsets.
async fn publish_all(
    publisher: Client,
    room: &'static str,
    count: u64,
    pace: Duration,
) -> Vec<u64> {
    let mut acked = Vec::new();
    for n in 1..=count {
        loop {
            match publisher.publish(room, json!(n)).await {
                Ok(ack) => {
                    acked.push(ack.offset);
                    break;
                }
                Err(err) if err.is_retryable() => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(err) => panic!("publish {n}: {err}"),
            }
        }
        tokio::time::sleep(pace).await;
    }
    acked
}

fn assert_exactly(seen: &Seen, last: u64) {
    let expected: Vec<u64> = (1..=last).collect();
    assert_eq!(seen.offsets, expected, "every offset once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_presence_and_direct_messages_span_nodes() {
    let cluster = RedisCluster::start().await.unwrap();
    let nodes = nodes(&cluster, 2, |s| s).await;
    let (mut alice, _) = Raw::hello(&nodes[0].url(), Some("alice"), None).await;
    let (mut bob, _) = Raw::hello(&nodes[1].url(), Some("bob"), None).await;
    alice.join("lobby").await;
    bob.join("lobby").await;

    let change = loop {
        if let common::Incoming::Frame(ServerFrame::PresenceEvent { change, member, .. }) =
            alice.recv().await
            && member.user == "bob"
        {
            assert_eq!(member.node, "n2");
            break change;
        }
    };
    assert_eq!(change, PresenceChange::Join);
    alice
        .send(&json!({"type": "presence", "id": 3, "room": "lobby"}))
        .await;
    let ServerFrame::Presence { members, .. } = alice.frame().await else {
        panic!()
    };
    let mut where_: Vec<(String, String)> = members.into_iter().map(|m| (m.user, m.node)).collect();
    where_.sort();
    assert_eq!(
        where_,
        [("alice".into(), "n1".into()), ("bob".into(), "n2".into())]
    );

    for n in 1..=20 {
        alice
            .send(&json!({"type": "publish", "room": "lobby", "data": n}))
            .await;
    }
    for n in 1..=20 {
        assert_eq!(message_offset(&bob.frame().await), n);
    }

    bob.send(&json!({"type": "direct", "id": 4, "user": "alice", "data": "psst"}))
        .await;
    assert!(matches!(
        bob.frame().await,
        ServerFrame::Sent { delivered: 1, .. }
    ));
    loop {
        match alice.frame().await {
            ServerFrame::Direct { from, data } => {
                assert_eq!((from.user.as_str(), data), ("bob", json!("psst")));
                break;
            }
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_clients_resume_on_another_node_without_gap_or_duplicate() {
    const COUNT: u64 = 150;
    let cluster = RedisCluster::start().await.unwrap();
    let mut nodes = nodes(&cluster, 2, |s| s).await;
    let urls = [nodes[0].url(), nodes[1].url()];

    let mut subscribers = Vec::new();
    for index in 0..5 {
        let (sub, events) = client(&urls, &format!("sub{index}")).await;
        sub.join("feed").await.unwrap();
        subscribers.push((sub, events));
    }
    let (publisher, _publisher_events) = client(&[nodes[1].url()], "pub").await;
    let publishing = tokio::spawn(publish_all(
        publisher,
        "feed",
        COUNT,
        Duration::from_millis(10),
    ));

    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[0].kill9();

    let acked = publishing.await.unwrap();
    assert_eq!(acked, (1..=COUNT).collect::<Vec<_>>());
    for (_, events) in &mut subscribers {
        let seen = collect(events, COUNT, STEP).await;
        assert!(!seen.not_recovered);
        assert_exactly(&seen, COUNT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_moves_clients_to_another_node_with_1012_and_exits_zero() {
    const COUNT: u64 = 120;
    let cluster = RedisCluster::start().await.unwrap();
    let drain = "delay = \"200ms\"\nwindow = \"500ms\"\ndeadline = \"5s\"";
    let mut nodes = nodes(&cluster, 2, |s| s.drain(drain)).await;
    let urls = [nodes[0].url(), nodes[1].url()];

    let mut subscribers = Vec::new();
    for index in 0..5 {
        let (sub, events) = client(&urls, &format!("sub{index}")).await;
        sub.join("feed").await.unwrap();
        subscribers.push((sub, events));
    }
    let (publisher, _publisher_events) = client(&[nodes[1].url()], "pub").await;
    let publishing = tokio::spawn(publish_all(
        publisher,
        "feed",
        COUNT,
        Duration::from_millis(10),
    ));

    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    nodes[0].sigterm();
    let status = nodes[0]
        .wait_exit(Duration::from_secs(7))
        .await
        .expect("no exit");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    publishing.await.unwrap();
    for (_, events) in &mut subscribers {
        let seen = collect(events, COUNT, STEP).await;
        assert_eq!(seen.close_codes, [close::SERVICE_RESTART]);
        assert_eq!(seen.resumed_sessions, 1, "the saved session is found on n2");
        assert!(!seen.not_recovered);
        assert_exactly(&seen, COUNT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_a_killed_node_disappears_within_the_ttl() {
    let cluster = RedisCluster::start().await.unwrap();
    let mut nodes = nodes(&cluster, 2, |s| s).await;
    let (mut observer, _) = Raw::hello(&nodes[0].url(), Some("observer"), None).await;
    observer.join("hall").await;
    let mut doomed = Vec::new();
    for index in 0..10 {
        let (mut raw, _) = Raw::hello(&nodes[1].url(), Some(&format!("u{index}")), None).await;
        raw.join("hall").await;
        doomed.push(raw);
    }
    assert_eq!(presence_count(&mut observer).await, 11);

    nodes[1].kill9();
    let killed_at = Instant::now();
    while presence_count(&mut observer).await > 1 {
        assert!(
            killed_at.elapsed() < Duration::from_secs(8),
            "ghost members stayed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A client of the dead node reconnecting elsewhere appears exactly once.
    let (mut back, _) = Raw::hello(&nodes[0].url(), Some("u0"), None).await;
    back.join("hall").await;
    assert_eq!(presence_count(&mut observer).await, 2);
}

async fn presence_count(raw: &mut Raw) -> usize {
    raw.send(&json!({"type": "presence", "id": 77, "room": "hall"}))
        .await;
    loop {
        if let ServerFrame::Presence { members, .. } = raw.frame().await {
            return members.len();
        }
    }
}

/// A Redis master failover while X (node 1) publishes to a room Y (node 2) is in: the
/// nodes stay up and Y ends with every acked message once, in order, or is told
/// `not_recovered` — never a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_master_failover_mid_stream_leaves_no_silent_gap() {
    const COUNT: u64 = 200;
    let mut cluster = RedisCluster::start().await.unwrap();
    let prefix = unique_prefix();
    let mut spawned = Vec::new();
    for id in ["n1", "n2"] {
        let spec = Spec::new(id)
            // With `replicated`, writes after the failover would wait for a replica that
            // never comes back; `leader` acks are what the field case describes.
            .redis(&cluster.seed_urls(), &prefix, "ack = \"leader\"")
            .limits("publish_rate_per_sec = 1000.0\npublish_burst = 1000");
        spawned.push(NodeProcess::start(&spec).await);
    }
    let (x, _x_events) = client(&[spawned[0].url()], "x").await;
    let (y, mut y_events) = client(&[spawned[1].url()], "y").await;
    y.join("stream").await.unwrap();
    let publishing = tokio::spawn(publish_all(x, "stream", COUNT, Duration::from_millis(20)));

    tokio::time::sleep(Duration::from_secs(1)).await;
    let key = format!("{{{prefix}:stream}}:meta");
    cluster
        .fail_over_key(&key, Duration::from_secs(20))
        .await
        .unwrap();

    let acked = publishing.await.unwrap();
    let last = *acked.last().unwrap();
    let seen = collect(&mut y_events, last, Duration::from_secs(30)).await;
    for node in &spawned {
        assert_eq!(
            node.get("/healthz").await.0,
            200,
            "node {} stayed up",
            node.id
        );
    }
    let in_order = seen.offsets.windows(2).all(|w| w[1] == w[0] + 1);
    if !seen.not_recovered {
        assert!(in_order, "silent gap or duplicate: {:?}", seen.offsets);
        assert_eq!(seen.offsets.first(), Some(&1));
        for offset in &acked {
            assert!(
                seen.offsets.contains(offset),
                "acked {offset} never delivered"
            );
        }
    }
    assert_eq!(seen.offsets.last(), Some(&last));
}
