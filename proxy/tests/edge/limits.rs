//! Admission control: each limit answers its status with `Retry-After` and is counted.

use crate::common::{Echo, Edge, http};
use crate::ws;

#[tokio::test]
async fn client_concurrency_cap_answers_429_with_retry_after() {
    let b1 = Echo::start("b1");
    let edge = Edge::start(
        &[&b1],
        "",
        "[limits]\nclient_concurrent = 2\nretry_after = \"3s\"\n",
    )
    .await;
    let first = ws::connect(&edge.ws_url("/")).await.unwrap();
    let second = ws::connect(&edge.ws_url("/")).await.unwrap();
    let answer = http(edge.listen, "GET", "/", &[]).await.unwrap();
    assert_eq!(answer.status, 429);
    assert_eq!(answer.header("retry-after"), Some("3"));
    drop((first, second));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        http(edge.listen, "GET", "/", &[]).await.unwrap().status,
        200
    );
    assert_eq!(
        edge.metric("ringcast_edge_rejections_total{limit=\"client_concurrent\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn client_rate_cap_answers_429_with_retry_after() {
    let b1 = Echo::start("b1");
    let edge = Edge::start(&[&b1], "", "[limits]\nclient_requests_per_second = 5\n").await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let answer = http(edge.listen, "GET", "/", &[]).await.unwrap();
        if answer.status == 429 {
            assert_eq!(answer.header("retry-after"), Some("1"));
        }
        statuses.push(answer.status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (5..=7).contains(&ok),
        "at most 5 per second window (two windows at most): {statuses:?}"
    );
    assert!(statuses.contains(&429));
}

/// A reconnect storm onto one backend is cut to its upgrade rate; the rest get 503 with
/// `Retry-After`, and plain requests are not affected by the upgrade cap.
#[tokio::test]
async fn backend_upgrade_rate_cap_answers_503_with_retry_after() {
    let b1 = Echo::start("b1");
    let edge = Edge::start(&[&b1], "", "[limits]\nbackend_upgrades_per_second = 5\n").await;
    let attempts = futures_util::future::join_all((0..20).map(|_| ws::connect_status(&edge))).await;
    let switched = attempts.iter().filter(|(s, _)| *s == 101).count();
    let refused: Vec<_> = attempts.iter().filter(|(s, _)| *s == 503).collect();
    assert!((5..=10).contains(&switched), "{attempts:?}");
    assert_eq!(switched + refused.len(), 20);
    assert!(
        refused
            .iter()
            .all(|(_, retry)| retry.as_deref() == Some("1"))
    );
    assert_eq!(
        http(edge.listen, "GET", "/", &[]).await.unwrap().status,
        200
    );
}
