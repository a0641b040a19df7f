//! Consistent hashing through the real edge: which keys move when a backend is drained,
//! killed, removed or added (1,000 keys, exact sets asserted), weight 0, and nginx parity.

use std::time::Duration;

use crate::common::{Echo, Edge, HASH_SID, owners};
use crate::ws;

const KEYS: usize = 1000;

/// Asserts that only keys owned by `gone` moved; returns how many moved.
fn only_moved_from(before: &[String], after: &[String], gone: &str) -> usize {
    let mut moved = 0;
    for (k, (b, a)) in before.iter().zip(after).enumerate() {
        if b != a {
            assert_eq!(b, gone, "key-{k} of {b} moved to {a}");
            moved += 1;
        }
    }
    assert_eq!(
        moved,
        before.iter().filter(|b| *b == gone).count(),
        "all of {gone}'s keys moved"
    );
    moved
}

#[tokio::test]
async fn keys_move_only_from_the_affected_backend() {
    let mut echoes = [Echo::start("b1"), Echo::start("b2"), Echo::start("b3")];
    let refs: Vec<&Echo> = echoes.iter().collect();
    let edge = Edge::start(&refs, "", HASH_SID).await;
    let baseline = owners(&edge, KEYS).await;
    for id in ["b1", "b2", "b3"] {
        let share = baseline.iter().filter(|b| *b == id).count() as f64 / KEYS as f64;
        assert!((share - 1.0 / 3.0).abs() < 0.1, "{id} owns {share}");
    }

    // Drain by admin: b2's keys move, and come back on undrain.
    assert_eq!(
        edge.admin("POST", "/backends/b2/drain", "").await.status,
        200
    );
    only_moved_from(&baseline, &owners(&edge, KEYS).await, "b2");
    assert_eq!(
        edge.admin("POST", "/backends/b2/undrain", "").await.status,
        200
    );
    assert_eq!(owners(&edge, KEYS).await, baseline);

    // Kill: b3's keys move once it is seen down (passively or by the checks).
    echoes[2].kill();
    edge.wait_state("b3", "down").await;
    only_moved_from(&baseline, &owners(&edge, KEYS).await, "b3");
    echoes[2].restart();
    edge.wait_state("b3", "healthy").await;
    assert_eq!(owners(&edge, KEYS).await, baseline);

    // Remove from the membership, then add back: exactly the same keys return.
    assert_eq!(edge.admin("DELETE", "/backends/b2", "").await.status, 200);
    only_moved_from(&baseline, &owners(&edge, KEYS).await, "b2");
    let b2 = format!("{{\"id\":\"b2\",\"address\":\"{}\"}}", echoes[1].address);
    assert_eq!(edge.admin("POST", "/backends", &b2).await.status, 200);
    assert_eq!(owners(&edge, KEYS).await, baseline);

    // Add a fourth: only keys that now belong to it move, about a quarter.
    let b4 = Echo::start("b4");
    let body = format!("{{\"id\":\"b4\",\"address\":\"{}\"}}", b4.address);
    assert_eq!(edge.admin("POST", "/backends", &body).await.status, 200);
    let grown = owners(&edge, KEYS).await;
    let moved = baseline.iter().zip(&grown).filter(|(b, a)| b != a).count();
    assert!(
        grown
            .iter()
            .zip(&baseline)
            .all(|(g, b)| g == b || g == "b4")
    );
    let share = moved as f64 / KEYS as f64;
    assert!(
        (share - 0.25).abs() < 0.08,
        "adding one of four moved {share}"
    );
    drop(echoes);
}

/// Weight 0 (some discovery sources drain that way) never crashes the ring update: the
/// backend keeps its open tunnel, gets no new clients, and other failures still fail over.
#[tokio::test]
async fn weight_zero_keeps_tunnels_and_failover_still_works() {
    let mut a = Echo::start("a");
    let b = Echo::start("b");
    let c = Echo::start("c");
    let edge = Edge::start(&[&a, &b, &c], "", HASH_SID).await;
    let baseline = owners(&edge, 300).await;
    let key_of_c = baseline
        .iter()
        .position(|o| o == "c")
        .expect("c owns a key");
    let (mut tunnel, id) = ws::connect(&edge.ws_url(&format!("/ws?sid=key-{key_of_c}")))
        .await
        .unwrap();
    assert_eq!(id, "c");

    let text = std::fs::read_to_string(&edge.config_path).unwrap();
    let marker = format!("id = \"c\"\naddress = \"{}\"\n", c.address);
    std::fs::write(
        &edge.config_path,
        text.replace(&marker, &format!("{marker}weight = 0\n")),
    )
    .unwrap();
    let reload = edge.admin("POST", "/reload", "").await;
    assert_eq!(reload.status, 200, "{}", reload.body);

    only_moved_from(&baseline, &owners(&edge, 300).await, "c");
    assert_eq!(edge.backend("c").await["state"], "draining");
    assert_eq!(ws::roundtrip(&mut tunnel, "kept").await.unwrap(), "kept");

    a.kill();
    edge.wait_state("a", "down").await;
    let after = owners(&edge, 300).await;
    assert!(after.iter().all(|o| o == "b"), "only b takes new clients");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ws::roundtrip(&mut tunnel, "still").await.unwrap(), "still");
}

/// The same keys and server list map to the same backends through nginx's
/// `hash $arg_sid consistent` and through the edge, so replacing nginx remaps nobody.
#[tokio::test]
#[ignore = "needs nginx in PATH; run with: cargo test -p ringcast-proxy --test edge -- --ignored"]
async fn same_mapping_as_nginx_hash_consistent() {
    let echoes = [
        Echo::start("b1"),
        Echo::start("b2"),
        Echo::start("b3"),
        Echo::start("b4"),
    ];
    let refs: Vec<&Echo> = echoes.iter().collect();
    let edge = Edge::start(&refs, "", HASH_SID).await;
    let nginx = crate::common::Nginx::start(&refs);
    let through_edge = owners(&edge, KEYS).await;
    let mut through_nginx = Vec::with_capacity(KEYS);
    for k in 0..KEYS {
        let path = format!("/?sid=key-{k}");
        let answer = crate::common::http(nginx.listen, "GET", &path, &[])
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        through_nginx.push(answer.body.trim().to_owned());
    }
    let distinct: std::collections::BTreeSet<&String> = through_nginx.iter().collect();
    assert_eq!(distinct.len(), 4, "every backend owns keys");
    let differ = through_edge
        .iter()
        .zip(&through_nginx)
        .filter(|(e, n)| e != n)
        .count();
    assert_eq!(differ, 0, "{differ} of {KEYS} keys map differently");
}

/// Which backend serves a client connecting from `source` (hashing on the client address).
async fn owner_from(edge: &Edge, source: std::net::Ipv4Addr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let mut stream = socket.connect(edge.listen).await.unwrap();
    let request = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer.rsplit("\r\n\r\n").next().unwrap().trim().to_owned()
}

async fn owners_from(edge: &Edge, sources: &[std::net::Ipv4Addr]) -> Vec<String> {
    let mut out = Vec::new();
    for source in sources {
        out.push(owner_from(edge, *source).await);
    }
    out
}

/// Hashing on the client address uses the full address (not the /24 as `ip_hash` does), and
/// removing a backend from the config file and adding it back (reloads) moves only its
/// clients, then restores exactly the old mapping.
#[tokio::test]
async fn client_address_hashing_survives_config_removal_and_return() {
    use std::net::Ipv4Addr;
    let echoes = [Echo::start("b1"), Echo::start("b2"), Echo::start("b3")];
    let refs: Vec<&Echo> = echoes.iter().collect();
    let edge = Edge::start(&refs, "", "[hash]\nsources = [\"ip\"]\n").await;

    let one_net: Vec<Ipv4Addr> = (1..=60).map(|d| Ipv4Addr::new(127, 9, 9, d)).collect();
    let spread: std::collections::BTreeSet<String> =
        owners_from(&edge, &one_net).await.into_iter().collect();
    assert_eq!(
        spread.len(),
        3,
        "clients of one /24 spread over every backend"
    );

    let sources: Vec<Ipv4Addr> = (0..300u16)
        .map(|i| Ipv4Addr::new(127, 10 + (i / 200) as u8, (i % 200) as u8, 1))
        .collect();
    let baseline = owners_from(&edge, &sources).await;
    let full = std::fs::read_to_string(&edge.config_path).unwrap();
    let b2 = crate::common::backends_toml(&[&echoes[1]]);
    std::fs::write(&edge.config_path, full.replace(&b2, "")).unwrap();
    assert_eq!(edge.admin("POST", "/reload", "").await.status, 200);
    let moved = only_moved_from(&baseline, &owners_from(&edge, &sources).await, "b2");
    let share = moved as f64 / sources.len() as f64;
    assert!(
        (share - 1.0 / 3.0).abs() < 0.1,
        "removing one of three moved {share}"
    );

    std::fs::write(&edge.config_path, full).unwrap();
    assert_eq!(edge.admin("POST", "/reload", "").await.status, 200);
    assert_eq!(
        owners_from(&edge, &sources).await,
        baseline,
        "the same keys returned"
    );
}
