//! One standalone node (memory state): rooms, acks, ordering, session resume, auth, the
//! HTTP endpoints, config checking, heartbeats and the SIGTERM drain.

mod common;

use common::{Incoming, NodeProcess, Raw, Spec, message_offset, token};
use ringcast_shared::protocol::{ErrorCode, ResumeStatus, ServerFrame, close};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn members_get_every_message_in_order_and_publisher_gets_acks() {
    let node = NodeProcess::start(&Spec::new("n1")).await;
    let (mut alice, _) = Raw::hello(&node.url(), Some("alice"), None).await;
    let (mut bob, _) = Raw::hello(&node.url(), Some("bob"), None).await;
    assert!(matches!(
        alice.join("chat").await,
        ServerFrame::Joined { offset: 0, .. }
    ));
    // Bob publishes without joining: he gets acks only.
    for n in 1..=20u64 {
        let ack = bob.publish("chat", json!({ "n": n })).await;
        assert!(
            matches!(ack, ServerFrame::Ack { offset, .. } if offset == n),
            "{ack:?}"
        );
    }
    for n in 1..=20u64 {
        let frame = alice.frame().await;
        assert_eq!(message_offset(&frame), n);
        let ServerFrame::Message { data, from, .. } = frame else {
            unreachable!()
        };
        assert_eq!(data, json!({ "n": n }));
        assert_eq!(from.user, "bob");
    }
}

#[tokio::test]
async fn session_resume_replays_missed_messages_then_live() {
    let node = NodeProcess::start(&Spec::new("n1")).await;
    let (mut alice, welcome) = Raw::hello(&node.url(), Some("alice"), None).await;
    let ServerFrame::Welcome {
        session,
        resumed: false,
        ..
    } = welcome
    else {
        panic!("{welcome:?}")
    };
    alice.join("room").await;
    let (mut bob, _) = Raw::hello(&node.url(), Some("bob"), None).await;
    bob.publish("room", json!(1)).await;
    assert_eq!(message_offset(&alice.frame().await), 1);
    drop(alice);
    tokio::time::sleep(Duration::from_millis(200)).await;

    for n in 2..=6 {
        bob.publish("room", json!(n)).await;
    }
    let (mut again, welcome) = Raw::hello(&node.url(), Some("alice"), Some(&session)).await;
    assert!(
        matches!(&welcome, ServerFrame::Welcome { resumed: true, rooms, .. } if rooms == &["room"]),
        "{welcome:?}"
    );
    let joined = again.frame().await;
    assert!(
        matches!(
            joined,
            ServerFrame::Joined {
                resume: Some(ResumeStatus::Recovered),
                ..
            }
        ),
        "{joined:?}"
    );
    let replayed: Vec<u64> = futures_collect(&mut again, 5).await;
    assert_eq!(replayed, [2, 3, 4, 5, 6]);
    bob.publish("room", json!(7)).await;
    assert_eq!(message_offset(&again.frame().await), 7);
}

async fn futures_collect(raw: &mut Raw, count: usize) -> Vec<u64> {
    let mut offsets = Vec::new();
    while offsets.len() < count {
        match raw.frame().await {
            ServerFrame::PresenceEvent { .. } => {}
            frame => offsets.push(message_offset(&frame)),
        }
    }
    offsets
}

#[tokio::test]
async fn resume_beyond_kept_history_is_reported_not_recovered() {
    let spec = Spec::new("n1");
    let spec = Spec {
        cluster: "stream_length = 3".into(),
        ..spec
    };
    let node = NodeProcess::start(&spec).await;
    let (mut bob, _) = Raw::hello(&node.url(), Some("bob"), None).await;
    let ServerFrame::Ack { epoch, .. } = bob.publish("r", json!(1)).await else {
        panic!()
    };
    for n in 2..=10 {
        bob.publish("r", json!(n)).await;
    }
    let (mut alice, _) = Raw::hello(&node.url(), Some("alice"), None).await;
    alice
        .send(&json!({"type": "join", "id": 5, "room": "r", "offset": 1, "epoch": epoch}))
        .await;
    let joined = alice.frame().await;
    assert!(
        matches!(
            joined,
            ServerFrame::Joined {
                offset: 10,
                resume: Some(ResumeStatus::NotRecovered),
                ..
            }
        ),
        "{joined:?}"
    );
    bob.publish("r", json!(11)).await;
    assert_eq!(message_offset(&alice.frame().await), 11);
}

#[tokio::test]
async fn tokens_are_checked_and_forbidden_requests_keep_the_connection() {
    let node = NodeProcess::start(&Spec::new("n1").jwt()).await;

    let mut anonymous = Raw::connect(&node.url()).await;
    anonymous.send(&json!({"type": "hello"})).await;
    assert_eq!(anonymous.close_code().await, close::UNAUTHORIZED);

    let mut forged = Raw::connect(&node.url()).await;
    forged
        .send(&json!({"type": "hello", "token": "a.b.c"}))
        .await;
    assert_eq!(forged.close_code().await, close::UNAUTHORIZED);

    let mut claims = ringcast_shared::auth::Claims::new("old", Duration::ZERO);
    claims.exp -= 3600;
    let expired = ringcast_shared::auth::mint_token(common::SECRET.as_bytes(), &claims).unwrap();
    let mut late = Raw::connect(&node.url()).await;
    late.send(&json!({"type": "hello", "token": expired})).await;
    assert_eq!(late.close_code().await, close::TOKEN_EXPIRED);
    assert!(!close::should_reconnect(close::TOKEN_EXPIRED));

    let token = token("ann", &["team/*"], &["team/a"]);
    let (mut ann, _) = Raw::hello(&node.url(), Some(&token), None).await;
    let refused = ann.join("other").await;
    assert!(
        matches!(
            refused,
            ServerFrame::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{refused:?}"
    );
    let refused = ann.publish("team/b", json!(1)).await;
    assert!(
        matches!(
            refused,
            ServerFrame::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(matches!(
        ann.join("team/a").await,
        ServerFrame::Joined { .. }
    ));
    assert!(matches!(
        ann.publish("team/a", json!(1)).await,
        ServerFrame::Message { .. } | ServerFrame::Ack { .. }
    ));
    assert_eq!(
        node.metric("ringcast_node_auth_failures_total{reason=\"expired\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn http_endpoints_and_config_check() {
    let node = NodeProcess::start(&Spec::new("n1")).await;
    assert_eq!(node.get("/healthz").await.0, 200);
    assert_eq!(node.get("/readyz").await.0, 200);
    let (status, body) = node.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("ringcast_node_connections 0"), "{body}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[auth]\nmode = \"none\"\n[limits]\nmax_message_bytes = 0\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast-node"))
        .args(["--check", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml: limits.max_message_bytes: must be at least 1"),
        "{stderr}"
    );

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/node.toml");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast-node"))
        .args(["--check", "-c", shipped])
        .output()
        .unwrap()
        .status;
    assert!(status.success());
}

#[tokio::test]
async fn silent_client_is_closed_for_missing_heartbeat() {
    let spec =
        Spec::new("n1").node("heartbeat_interval = \"200ms\"\nheartbeat_timeout = \"700ms\"");
    let node = NodeProcess::start(&spec).await;
    let (mut quiet, welcome) = Raw::hello(&node.url(), None, None).await;
    assert!(matches!(
        welcome,
        ServerFrame::Welcome {
            heartbeat_ms: 200,
            ..
        }
    ));
    // Read raw frames without answering pings.
    let code = loop {
        use futures_util::StreamExt;
        let next = tokio::time::timeout(Duration::from_secs(5), quiet.ws.next())
            .await
            .unwrap();
        match next {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
                break u16::from(frame.code);
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, close::HEARTBEAT_TIMEOUT);

    // A client that answers keeps its connection past the timeout.
    let (mut polite, _) = Raw::hello(&node.url(), None, None).await;
    polite.join("r").await;
    // Keep reading (which answers pings) for twice the timeout.
    let reading = async {
        loop {
            let _ = polite.recv().await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(1500), reading).await;
    let (mut other, _) = Raw::hello(&node.url(), None, None).await;
    other.publish("r", json!("still here")).await;
    loop {
        match polite.recv().await {
            Incoming::Frame(ServerFrame::Message { .. }) => break,
            Incoming::Frame(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn sigterm_drains_with_1012_and_exits_zero_in_time() {
    let spec = Spec::new("n1").drain("delay = \"300ms\"\nwindow = \"500ms\"\ndeadline = \"4s\"");
    let mut node = NodeProcess::start(&spec).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let (mut raw, _) = Raw::hello(&node.url(), None, None).await;
        raw.join("r").await;
        clients.push(raw);
    }
    let started = std::time::Instant::now();
    node.sigterm();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(node.get("/readyz").await.0, 503);
    for client in &mut clients {
        assert_eq!(client.close_code().await, close::SERVICE_RESTART);
    }
    let status = node
        .wait_exit(Duration::from_secs(6))
        .await
        .expect("node did not exit");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn client_library_gives_up_on_a_refused_token_and_resyncs_on_rejoin() {
    use ringcast_shared::client::{Client, ClientConfig, ClientError, Event};

    let node = NodeProcess::start(&Spec::new("n1").jwt()).await;
    let refused = Client::connect(ClientConfig::new([node.url()]).token("not a jwt")).await;
    assert!(
        matches!(refused, Err(ClientError::Connect(_))),
        "{refused:?}"
    );

    let token = token("carol", &["*"], &["*"]);
    let (carol, mut events) = Client::connect(ClientConfig::new([node.url()]).token(token))
        .await
        .unwrap();
    assert!(matches!(
        events.recv().await,
        Some(Event::Connected { resumed: false, .. })
    ));
    carol.join("notes").await.unwrap();
    for n in 1..=3 {
        assert_eq!(carol.publish("notes", json!(n)).await.unwrap().offset, n);
    }
    carol.join("notes").await.unwrap();
    let mut offsets = Vec::new();
    while offsets.len() < 3 {
        if let Some(Event::Message { offset, .. }) = events.recv().await {
            offsets.push(offset);
        }
    }
    assert_eq!(
        offsets,
        [1, 2, 3],
        "joining again neither skips nor repeats"
    );
    let err = carol.join("bad name").await.unwrap_err();
    assert!(matches!(
        err,
        ClientError::Node {
            code: ErrorCode::BadRoomName,
            ..
        }
    ));
}
