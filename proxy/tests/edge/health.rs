//! Health: draining keeps tunnels, dead backends are skipped (no panic mode), none healthy
//! answers 503 quickly, connect failures retry on the next ring node, application 4xx
//! never counts as a failure, and passive ejections are capped.

use futures_util::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Echo, Edge, HASH_SID, http, owner, owners};
use crate::ws;

#[tokio::test]
async fn draining_backend_keeps_its_tunnel_and_gets_no_new_clients() {
    let b1 = Echo::start("b1");
    let b2 = Echo::start("b2");
    let edge = Edge::start(&[&b1, &b2], "", HASH_SID).await;
    let baseline = owners(&edge, 200).await;
    let key = baseline.iter().position(|o| o == "b1").unwrap();
    let (mut tunnel, id) = ws::connect(&edge.ws_url(&format!("/?sid=key-{key}")))
        .await
        .unwrap();
    assert_eq!(id, "b1");

    b1.set_draining(true).await;
    edge.wait_state("b1", "draining").await;
    assert!(owners(&edge, 200).await.iter().all(|o| o == "b2"));
    assert_eq!(ws::roundtrip(&mut tunnel, "kept").await.unwrap(), "kept");
    assert_eq!(edge.backend("b1").await["active_tunnels"], 1);

    b1.set_draining(false).await;
    edge.wait_state("b1", "healthy").await;
    assert_eq!(owners(&edge, 200).await, baseline);
}

/// With two of three backends down, every upgrade goes to the survivor; with none left
/// the edge answers 503 at once.
#[tokio::test]
async fn dead_backends_are_skipped_and_none_healthy_is_a_quick_503() {
    let mut b1 = Echo::start("b1");
    let mut b2 = Echo::start("b2");
    let mut b3 = Echo::start("b3");
    let edge = Edge::start(&[&b1, &b2, &b3], "", HASH_SID).await;
    b1.kill();
    b2.kill();
    edge.wait_state("b1", "down").await;
    edge.wait_state("b2", "down").await;
    for k in 0..300 {
        let (_client, id) = ws::connect(&edge.ws_url(&format!("/?sid=k{k}")))
            .await
            .unwrap();
        assert_eq!(id, "b3", "key k{k}");
    }

    b3.kill();
    edge.wait_state("b3", "down").await;
    let started = Instant::now();
    let answer = http(edge.listen, "GET", "/?sid=x", &[]).await.unwrap();
    assert_eq!(answer.status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

/// 2,000 new WebSocket connections, 200 at a time, with a backend SIGKILLed after 500:
/// no handshake fails, and every connection echoes its first message unless its own
/// backend died under it after the handshake (that is not a handshake failure).
#[tokio::test]
async fn no_failed_handshake_while_a_backend_dies() {
    let b1 = Echo::start("b1");
    let mut b2 = Echo::start("b2");
    let b3 = Echo::start("b3");
    let edge = Edge::start(&[&b1, &b2, &b3], "", HASH_SID).await;
    let done = Arc::new(AtomicUsize::new(0));
    let url = edge.ws_url("/ws");

    let run = futures_util::stream::iter(0..2000)
        .map(|n| {
            let (done, url) = (done.clone(), url.clone());
            async move {
                let outcome = match ws::connect(&format!("{url}?sid=c{n}")).await {
                    Err(err) => Err(format!("handshake of c{n} failed: {err}")),
                    Ok((mut client, id)) => {
                        match ws::roundtrip(&mut client, &format!("m{n}")).await {
                            Ok(reply) if reply == format!("m{n}") => Ok(None),
                            Ok(reply) => Err(format!("c{n} got {reply}")),
                            Err(err) => Ok(Some(format!("{id}: {err}"))),
                        }
                    }
                };
                done.fetch_add(1, Ordering::Relaxed);
                outcome
            }
        })
        .buffer_unordered(200)
        .collect::<Vec<_>>();
    let killer = async {
        while done.load(Ordering::Relaxed) < 500 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        b2.kill();
    };
    let (results, ()) = tokio::join!(run, killer);

    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let cut: Vec<&String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok()?.as_ref())
        .collect();
    let elsewhere: Vec<_> = cut.iter().filter(|c| !c.starts_with("b2:")).collect();
    let log = edge.log();
    let log: Vec<&str> = log.lines().filter(|l| !l.contains(" INFO ")).collect();
    assert!(
        elsewhere.is_empty(),
        "only tunnels on the killed backend may be cut: {elsewhere:?}\n{log:#?}"
    );
    assert!(
        edge.metric("ringcast_edge_upstream_connect_failures_total")
            .await
            >= 1.0
    );
}

/// Application 4xx answers never count as backend failures; passive ejection is capped at
/// `max_passive_ejected` even when more backends refuse connections.
#[tokio::test]
async fn app_errors_never_eject_and_passive_ejections_are_capped() {
    let mut b1 = Echo::start("b1");
    let mut b2 = Echo::start("b2");
    let b3 = Echo::start("b3");
    // Active checks effectively off, so only passive signals act.
    let health = "[health]\ninterval = \"1h\"\nmax_passive_ejected = 1\n";
    let edge = Edge::start(&[&b1, &b2, &b3], "", &format!("{HASH_SID}{health}")).await;
    let baseline = owners(&edge, 300).await;
    for k in 0..300 {
        let path = format!("/?sid=key-{k}");
        let answer = http(edge.listen, "GET", &path, &[("x-echo-status", "400")])
            .await
            .unwrap();
        assert_eq!(answer.status, 400);
    }
    for id in ["b1", "b2", "b3"] {
        assert_eq!(edge.backend(id).await["state"], "healthy", "{id}");
    }
    assert_eq!(owners(&edge, 300).await, baseline);

    b1.kill();
    b2.kill();
    let after = owners(&edge, 300).await;
    assert!(
        after.iter().all(|o| o == "b3"),
        "every request reached the survivor"
    );
    let states = [
        edge.backend("b1").await["state"].clone(),
        edge.backend("b2").await["state"].clone(),
    ];
    let ejected = states.iter().filter(|s| *s == "down").count();
    assert_eq!(ejected, 1, "at most one passive ejection: {states:?}");
    assert_eq!(owner(&edge, "key-0").await, "b3");
}

/// An upgrade whose first backend refuses the connection is retried on the next ring
/// node, and the resulting tunnel works like any other.
#[tokio::test]
async fn retried_upgrade_gives_a_working_tunnel() {
    let mut dead = Echo::start("dead");
    let live = Echo::start("live");
    let health = "[health]\ninterval = \"1h\"\nmax_passive_ejected = 0\n";
    let edge = Edge::start(&[&dead, &live], "", &format!("{HASH_SID}{health}")).await;
    let baseline = owners(&edge, 100).await;
    dead.kill();
    let mut retried = 0;
    for (k, owner) in baseline.iter().enumerate() {
        let (mut client, id) = ws::connect(&edge.ws_url(&format!("/?sid=key-{k}")))
            .await
            .unwrap();
        assert_eq!(id, "live");
        retried += usize::from(owner == "dead");
        assert_eq!(
            ws::roundtrip(&mut client, "one").await,
            Ok("one".to_owned()),
            "key-{k}"
        );
        assert_eq!(
            ws::roundtrip(&mut client, "two").await,
            Ok("two".to_owned()),
            "key-{k}"
        );
    }
    assert!(retried > 10);
}

/// Rolling restart: b2 drains (its readiness answers 503) and keeps its tunnels, then closes
/// them with 1001, which reaches its clients unchanged; b3 is killed, and its clients see
/// no reserved close code. Only b2's and b3's clients are disconnected, and all of them
/// reconnect onto backends that take new clients.
#[tokio::test]
async fn rolling_restart_disconnects_only_the_affected_clients() {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let b1 = Echo::start("b1");
    let b2 = Echo::start("b2");
    let mut b3 = Echo::start("b3");
    let edge = Edge::start(&[&b1, &b2, &b3], "", HASH_SID).await;
    let mut clients = Vec::new();
    for n in 0..90 {
        let (client, id) = ws::connect(&edge.ws_url(&format!("/?sid=c{n}")))
            .await
            .unwrap();
        clients.push((n, client, id));
    }

    b2.set_draining(true).await;
    edge.wait_state("b2", "draining").await;
    for (_, client, _) in clients.iter_mut() {
        assert_eq!(
            ws::roundtrip(client, "during drain").await.as_deref(),
            Ok("during drain")
        );
    }
    let closing = http(b2.address, "POST", "/close-all", &[]).await.unwrap();
    assert_eq!(closing.status, 200);
    for (n, client, id) in clients.iter_mut().filter(|(_, _, id)| id == "b2") {
        match tokio::time::timeout(Duration::from_secs(5), client.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("c{n} on {id}: {other:?}"),
        }
        let (again, now_on) = ws::connect(&edge.ws_url(&format!("/?sid=c{n}")))
            .await
            .unwrap();
        assert!(
            now_on == "b1" || now_on == "b3",
            "c{n} reconnected to {now_on}"
        );
        *client = again;
        *id = now_on;
    }

    b3.kill();
    for (n, client, id) in clients.iter_mut().filter(|(_, _, id)| id == "b3") {
        let end = tokio::time::timeout(Duration::from_secs(5), client.next())
            .await
            .unwrap();
        if let Some(Ok(Message::Close(Some(frame)))) = &end {
            let code = u16::from(frame.code);
            assert!(
                ![1005, 1006, 1015].contains(&code),
                "c{n}: reserved code {code}"
            );
        }
        let (again, now_on) = ws::connect(&edge.ws_url(&format!("/?sid=c{n}")))
            .await
            .unwrap();
        assert_eq!(now_on, "b1", "c{n} reconnected to {now_on}");
        *client = again;
        *id = now_on;
    }
    for (n, client, _) in clients.iter_mut() {
        assert_eq!(
            ws::roundtrip(client, "after").await.as_deref(),
            Ok("after"),
            "c{n}"
        );
    }
}

/// A node that starts draining refuses upgrades with 503 before the health checks notice;
/// the edge sends those handshakes to the next ring node, so no client sees the refusal.
#[tokio::test]
async fn upgrade_refused_by_a_draining_backend_goes_to_the_next_node() {
    let b1 = Echo::start("b1");
    let b2 = Echo::start("b2");
    let slow_checks = format!("{HASH_SID}[health]\ninterval = \"60s\"\n");
    let edge = Edge::start(&[&b1, &b2], "", &slow_checks).await;
    b1.set_draining(true).await;
    assert_eq!(edge.backend("b1").await["state"], "healthy");

    for k in 0..100 {
        let (_client, id) = ws::connect(&edge.ws_url(&format!("/?sid=k{k}")))
            .await
            .unwrap_or_else(|err| panic!("key k{k} failed its handshake: {err}"));
        assert_eq!(id, "b2", "key k{k}");
    }
    assert!(
        edge.metric("ringcast_edge_upgrades_total{backend=\"b1\",result=\"refused_retried\"}")
            .await
            > 0.0
    );

    // With no other node left, the draining node's own 503 reaches the client.
    b2.set_draining(true).await;
    let refused = ws::connect(&edge.ws_url("/?sid=k0")).await;
    assert!(refused.is_err(), "both backends refuse new clients");
}
