//! WebSocket and HTTP proxying: hop-by-hop headers, forwarding headers, non-101 answers,
//! timeouts, large messages and close codes.

use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::{Echo, Edge, http};
use crate::ws::{self, KEY};

fn upgrade_head(edge: &Edge, connection: &str, upgrade: &str) -> String {
    format!(
        "GET /ws?x=1 HTTP/1.1\r\nHost: {}\r\nConnection: {connection}\r\nUpgrade: {upgrade}\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: chat, superchat\r\nX-Forwarded-For: 6.6.6.6",
        edge.listen
    )
}

/// Token lists and letter case of `Connection`/`Upgrade` are understood; the backend gets
/// HTTP/1.1 with `Upgrade`, `Connection: upgrade` and the `Sec-WebSocket-*` unchanged.
#[tokio::test]
async fn upgrade_variants_reach_the_backend_intact() {
    let echo = Echo::start("b1");
    let edge = Edge::start(&[&echo], "", "").await;
    for (connection, upgrade) in [
        ("keep-alive, Upgrade", "WebSocket"),
        ("upgrade", "websocket"),
    ] {
        let (stream, head) =
            ws::raw_handshake(edge.listen, &upgrade_head(&edge, connection, upgrade)).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-protocol: chat\r\n"),
            "{head}"
        );
        let mut client = ws::client_over(stream).await;
        let seen: serde_json::Value =
            serde_json::from_str(&ws::roundtrip(&mut client, "__headers__").await.unwrap())
                .unwrap();
        let headers = &seen["headers"];
        assert_eq!(seen["version"], "HTTP/1.1");
        assert_eq!(
            headers["upgrade"][0].as_str().unwrap().to_ascii_lowercase(),
            "websocket"
        );
        let conn = headers["connection"][0]
            .as_str()
            .unwrap()
            .to_ascii_lowercase();
        assert!(conn.contains("upgrade"), "{conn}");
        assert_eq!(headers["sec-websocket-key"][0], KEY);
        assert_eq!(headers["sec-websocket-version"][0], "13");
        assert_eq!(headers["sec-websocket-protocol"][0], "chat, superchat");
        assert_eq!(
            headers["x-forwarded-for"][0], "127.0.0.1",
            "untrusted XFF replaced"
        );
        assert_eq!(headers["x-forwarded-proto"][0], "http");
        assert_eq!(headers["x-request-id"][0].as_str().unwrap().len(), 36);
        assert_eq!(ws::roundtrip(&mut client, "hello").await.unwrap(), "hello");
    }
}

/// A backend's refusal (non-101) reaches the client unchanged, and a request without
/// `Upgrade` is proxied as plain HTTP.
#[tokio::test]
async fn non_101_answers_and_plain_requests_pass_unchanged() {
    let echo = Echo::start("b1");
    let edge = Edge::start(&[&echo], "", "").await;
    let head = format!(
        "{}\r\nx-echo-status: 403",
        upgrade_head(&edge, "Upgrade", "websocket")
    );
    let (mut stream, answer) = ws::raw_handshake(edge.listen, &head).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("x-echo-id: b1"),
        "{answer}"
    );
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut body)).await;
    assert_eq!(String::from_utf8_lossy(&body), "b1\n");

    let plain = http(
        edge.listen,
        "GET",
        "/headers",
        &[("Connection", "keep-alive")],
    )
    .await
    .unwrap();
    assert_eq!(plain.status, 200);
    let seen: serde_json::Value = serde_json::from_str(&plain.body).unwrap();
    assert!(seen["headers"].get("upgrade").is_none(), "{seen}");
}

/// Forwarding headers from a trusted proxy are kept and extended.
#[tokio::test]
async fn forwarding_headers_are_trusted_only_from_configured_proxies() {
    let echo = Echo::start("b1");
    let edge = Edge::start(&[&echo], "trusted_proxies = [\"127.0.0.0/8\"]", "").await;
    let headers = [
        ("X-Forwarded-For", "198.51.100.4"),
        ("X-Forwarded-Proto", "https"),
    ];
    let answer = http(edge.listen, "GET", "/headers", &headers)
        .await
        .unwrap();
    let seen: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(
        seen["headers"]["x-forwarded-for"][0],
        "198.51.100.4, 127.0.0.1"
    );
    assert_eq!(seen["headers"]["x-forwarded-proto"][0], "https");
}

/// A silent tunnel outlives five plain-HTTP read timeouts, while a stalled plain request
/// is cut by that same timeout (so the timeout is real).
#[tokio::test]
async fn idle_tunnel_outlives_the_http_read_timeout() {
    let echo = Echo::start("b1");
    let edge = Edge::start(
        &[&echo],
        "http_read_timeout = \"1s\"",
        "[tunnel]\nidle_timeout = \"0s\"\n",
    )
    .await;
    let (mut client, _) = ws::connect(&edge.ws_url("/ws")).await.unwrap();

    let mut stalled = tokio::net::TcpStream::connect(edge.listen).await.unwrap();
    let head = "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab";
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut sink = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(4), stalled.read_to_end(&mut sink)).await;
    assert!(
        cut.is_ok(),
        "a stalled plain request is cut by http_read_timeout"
    );

    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(
        ws::roundtrip(&mut client, "still here").await.unwrap(),
        "still here"
    );
}

/// The explicit tunnel idle timeout closes a silent tunnel, logs the reason and counts it.
#[tokio::test]
async fn tunnel_idle_timeout_is_logged_and_counted() {
    let echo = Echo::start("b1");
    let edge = Edge::start(&[&echo], "", "[tunnel]\nidle_timeout = \"1s\"\n").await;
    let (mut client, _) = ws::connect(&edge.ws_url("/ws")).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), client.next()).await;
    assert!(ended.is_ok(), "the tunnel was closed");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        edge.metric("ringcast_edge_tunnel_idle_timeouts_total")
            .await,
        1.0
    );
    assert!(edge.log().contains("idle timeout"), "{}", edge.log());
}

/// The relay is transparent: large messages arrive intact in both directions.
#[tokio::test]
async fn large_messages_pass_intact_both_ways() {
    let echo = Echo::start("b1");
    let edge = Edge::start(&[&echo], "", "").await;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let (mut client, _) =
        tokio_tungstenite::connect_async_with_config(edge.ws_url("/ws"), Some(config), false)
            .await
            .unwrap();
    for size in [1 << 20, (4 << 20) + 1, 16 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        client.send(Message::binary(payload.clone())).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(30), client.next())
            .await
            .unwrap();
        match reply {
            Some(Ok(Message::Binary(data))) => assert!(data == payload, "size {size} changed"),
            other => panic!("size {size}: {other:?}"),
        }
    }
}

/// Close codes pass unchanged; a backend's abrupt death is a TCP close, never a close frame
/// with a reserved code (1005, 1006, 1015).
#[tokio::test]
async fn close_frames_never_carry_reserved_codes() {
    let mut echo = Echo::start("b1");
    let edge = Edge::start(&[&echo], "", "").await;
    let (mut client, _) = ws::connect(&edge.ws_url("/ws")).await.unwrap();
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    client.send(Message::Close(Some(frame))).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), client.next())
        .await
        .unwrap();
    match reply {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the echoed close: {other:?}"),
    }

    let (mut client, _) = ws::connect(&edge.ws_url("/ws")).await.unwrap();
    echo.kill();
    let end = tokio::time::timeout(Duration::from_secs(5), client.next())
        .await
        .unwrap();
    if let Some(Ok(Message::Close(Some(frame)))) = &end {
        let code = u16::from(frame.code);
        assert!(
            ![1005, 1006, 1015].contains(&code),
            "reserved close code {code}"
        );
    }
}
