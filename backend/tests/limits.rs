//! Bad input and limits against one standalone node: each gets its documented answer,
//! is counted, and never hurts other clients.

mod common;

use common::{Incoming, NodeProcess, Raw, Spec, message_offset};
use ringcast_shared::protocol::{ErrorCode, ServerFrame, close};
use serde_json::json;
use std::time::Duration;

fn error_code(frame: &ServerFrame) -> ErrorCode {
    match frame {
        ServerFrame::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn frames_up_to_the_limit_arrive_intact_and_larger_ones_close_with_1009() {
    let node = NodeProcess::start(&Spec::new("n1").limits("max_message_bytes = 16384")).await;
    let (mut reader, _) = Raw::hello(&node.url(), None, None).await;
    reader.join("big").await;
    let (mut writer, _) = Raw::hello(&node.url(), None, None).await;

    let payload: String = (0..15_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let ack = writer.publish("big", json!(payload)).await;
    assert!(matches!(ack, ServerFrame::Ack { offset: 1, .. }), "{ack:?}");
    let ServerFrame::Message { data, .. } = reader.frame().await else {
        panic!()
    };
    assert_eq!(data, json!(payload), "payload arrives byte for byte");

    let too_big = json!({"type": "publish", "room": "big", "data": "x".repeat(17_000)});
    writer.send(&too_big).await;
    assert_eq!(writer.close_code().await, close::TOO_BIG);
    assert_eq!(
        node.metric("ringcast_node_closes_total{code=\"1009\"}")
            .await,
        1.0
    );

    // The reader is unaffected.
    let (mut third, _) = Raw::hello(&node.url(), None, None).await;
    third.publish("big", json!("after")).await;
    assert_eq!(message_offset(&reader.frame().await), 2);
}

#[tokio::test]
async fn malformed_json_gets_errors_then_1007_and_unknown_ops_then_1008() {
    let node = NodeProcess::start(&Spec::new("n1").limits("max_bad_frames = 3")).await;
    let (mut broken, _) = Raw::hello(&node.url(), None, None).await;
    for _ in 0..3 {
        broken.send_text("{not json").await;
        assert_eq!(error_code(&broken.frame().await), ErrorCode::BadRequest);
    }
    broken.send_text("{not json").await;
    assert_eq!(broken.close_code().await, close::INVALID_PAYLOAD);

    let (mut confused, _) = Raw::hello(&node.url(), None, None).await;
    confused.send(&json!({"type": "shout", "id": 9})).await;
    let reply = confused.frame().await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                id: Some(9),
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{reply:?}"
    );
    confused.send(&json!({"type": "hello"})).await;
    assert_eq!(error_code(&confused.frame().await), ErrorCode::BadSequence);
    confused.send(&json!({"type": "shout"})).await;
    confused.frame().await;
    confused.send(&json!({"type": "shout"})).await;
    assert_eq!(confused.close_code().await, close::POLICY);

    let mut rude = Raw::connect(&node.url()).await;
    rude.send(&json!({"type": "join", "room": "r"})).await;
    assert_eq!(
        rude.close_code().await,
        close::POLICY,
        "the first frame must be hello"
    );
}

#[tokio::test]
async fn publish_flood_is_rate_limited_and_room_limits_answer_errors() {
    let limits = "publish_rate_per_sec = 5.0\npublish_burst = 5\nmax_rooms_per_connection = 2";
    let node = NodeProcess::start(&Spec::new("n1").limits(limits)).await;
    let (mut flooder, _) = Raw::hello(&node.url(), None, None).await;
    for n in 0..20 {
        flooder
            .send(&json!({"type": "publish", "id": n, "room": "r", "data": n}))
            .await;
    }
    let mut acks = 0;
    let mut limited = 0;
    for _ in 0..20 {
        match flooder.frame().await {
            ServerFrame::Ack { .. } => acks += 1,
            frame => {
                assert_eq!(error_code(&frame), ErrorCode::RateLimited);
                limited += 1;
            }
        }
    }
    assert!((5..=7).contains(&acks), "{acks} acks");
    assert_eq!(acks + limited, 20);

    assert!(matches!(
        flooder.join("a").await,
        ServerFrame::Joined { .. }
    ));
    assert!(matches!(
        flooder.join("b").await,
        ServerFrame::Joined { .. }
    ));
    assert_eq!(
        error_code(&flooder.join("c").await),
        ErrorCode::TooManyRooms
    );
    assert_eq!(
        error_code(&flooder.join("bad name!").await),
        ErrorCode::BadRoomName
    );
    assert_eq!(
        error_code(&flooder.join(&"x".repeat(200)).await),
        ErrorCode::BadRoomName
    );
    assert!(
        node.metric("ringcast_node_request_errors_total{code=\"301\"}")
            .await
            >= 13.0
    );
}

/// A member that stops reading is closed with 4000 once its bounded queue overflows,
/// while 99 others in the same room receive every message in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_while_the_others_receive_everything() {
    const MESSAGES: u64 = 600;
    let limits = "send_queue_messages = 128\nsend_queue_bytes = 262144\n\
                  publish_rate_per_sec = 100000.0\npublish_burst = 100000\n\
                  socket_send_buffer_bytes = 16384";
    let node = NodeProcess::start(&Spec::new("n1").limits(limits)).await;

    let mut slow = Raw::connect_small_buffer(&node.addr).await;
    slow.send(&json!({"type": "hello"})).await;
    slow.frame().await;
    slow.join("wide").await;

    let mut readers = Vec::new();
    for _ in 0..99 {
        let (mut reader, _) = Raw::hello(&node.url(), None, None).await;
        reader.join("wide").await;
        readers.push(tokio::spawn(async move {
            let mut next = 1;
            while next <= MESSAGES {
                if let Some(offset) = reader.next_message_offset().await {
                    assert_eq!(offset, next);
                    next += 1;
                }
            }
            next - 1
        }));
    }

    let (mut publisher, _) = Raw::hello(&node.url(), None, None).await;
    let publishing = tokio::spawn(async move {
        let body = "y".repeat(1000);
        for n in 1..=MESSAGES {
            let ack = publisher
                .publish("wide", json!({"n": n, "body": body}))
                .await;
            assert!(matches!(ack, ServerFrame::Ack { .. }), "{ack:?}");
        }
    });

    // Once the node gave up on the slow member, it reads again and finds the close code
    // after what was already buffered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while node
        .metric("ringcast_node_slow_consumers_closed_total")
        .await
        < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slow consumer never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed = loop {
        match slow.recv().await {
            Incoming::Frame(_) => {}
            Incoming::Close(code, _) => break code,
            Incoming::Ended => panic!("no close frame"),
        }
    };
    assert_eq!(closed, close::SLOW_CONSUMER);

    publishing.await.unwrap();
    for reader in readers {
        let got = tokio::time::timeout(Duration::from_secs(60), reader).await;
        assert_eq!(got.unwrap().unwrap(), MESSAGES);
    }
    assert_eq!(
        node.metric("ringcast_node_slow_consumers_closed_total")
            .await,
        1.0
    );
}
