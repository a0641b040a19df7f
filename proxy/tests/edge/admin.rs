//! Runtime changes without dropping tunnels: admin drain/undrain, add/remove, reload by
//! admin call and by SIGHUP; metrics on the admin listener.

use std::process::Command;
use std::time::Duration;

use crate::common::{Echo, Edge, HASH_SID, backends_toml, owners};
use crate::ws;

const TUNNELS: usize = 100;

#[tokio::test]
async fn admin_changes_and_reloads_keep_every_tunnel() {
    let b1 = Echo::start("b1");
    let b2 = Echo::start("b2");
    let b3 = Echo::start("b3");
    let edge = Edge::start(&[&b1, &b2, &b3], "", HASH_SID).await;
    let mut tunnels = Vec::new();
    for n in 0..TUNNELS {
        tunnels.push(
            ws::connect(&edge.ws_url(&format!("/?sid=t{n}")))
                .await
                .unwrap(),
        );
    }
    let on_b3 = tunnels.iter().filter(|(_, id)| id == "b3").count();
    assert!(on_b3 > 0);

    // Reload by SIGHUP with a fourth backend added.
    let b4 = Echo::start("b4");
    let text = std::fs::read_to_string(&edge.config_path).unwrap();
    std::fs::write(
        &edge.config_path,
        format!("{text}\n{}", backends_toml(&[&b4])),
    )
    .unwrap();
    let status = Command::new("kill")
        .arg("-HUP")
        .arg(edge.pid().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    wait_for(|| async { edge.backend("b4").await["id"] == "b4" }).await;

    // Drain, undrain, remove b3 (its tunnels stay), reload by admin call.
    assert_eq!(
        edge.admin("POST", "/backends/b1/drain", "").await.status,
        200
    );
    assert_eq!(
        edge.admin("POST", "/backends/b1/undrain", "").await.status,
        200
    );
    assert_eq!(edge.admin("DELETE", "/backends/b3", "").await.status, 200);
    assert_eq!(edge.admin("POST", "/reload", "").await.status, 200);
    assert_eq!(
        edge.admin("POST", "/backends/nope/drain", "").await.status,
        404
    );
    let bad = edge
        .admin(
            "POST",
            "/backends",
            "{\"id\":\"x\",\"address\":\"nonsense\"}",
        )
        .await;
    assert_eq!(bad.status, 400);

    for (n, (client, id)) in tunnels.iter_mut().enumerate() {
        let text = format!("after-{n}");
        assert_eq!(
            ws::roundtrip(client, &text).await,
            Ok(text),
            "tunnel {n} on {id}"
        );
    }
    let active = edge.metric("ringcast_edge_tunnels_active").await;
    assert_eq!(active as usize, TUNNELS);
    let switched = edge.metric("ringcast_edge_upgrades_total{backend=").await;
    assert_eq!(switched as usize, TUNNELS);
    assert!(owners(&edge, 50).await.iter().any(|o| o == "b4"));
}

/// A reload with a broken file changes nothing and says what is wrong.
#[tokio::test]
async fn broken_reload_is_rejected_with_the_reason() {
    let b1 = Echo::start("b1");
    let edge = Edge::start(&[&b1], "", "").await;
    let text = std::fs::read_to_string(&edge.config_path).unwrap();
    std::fs::write(&edge.config_path, text.replace("[log]", "[log]\nbogus = 1")).unwrap();
    let answer = edge.admin("POST", "/reload", "").await;
    assert_eq!(answer.status, 422);
    assert!(answer.body.contains("edge.toml"), "{}", answer.body);
    assert!(answer.body.contains("bogus"), "{}", answer.body);
    assert_eq!(edge.backend("b1").await["state"], "healthy");
}

async fn wait_for<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached");
}

/// Graceful binary upgrade (`-u` + SIGQUIT): the new process takes the listener at once;
/// the old one keeps its tunnels, then closes them spread over the grace period instead
/// of dropping them all at its end.
#[tokio::test]
async fn graceful_upgrade_spreads_the_old_tunnels_closes() {
    let b1 = Echo::start("b1");
    let mut edge = Edge::start(&[&b1], "grace_period = \"5s\"", "").await;
    let mut tunnels = Vec::new();
    for _ in 0..20 {
        tunnels.push(ws::connect(&edge.ws_url("/")).await.unwrap().0);
    }
    edge.upgrade().await;

    let (mut fresh, _) = ws::connect(&edge.ws_url("/"))
        .await
        .expect("new process accepts");
    assert_eq!(ws::roundtrip(&mut fresh, "new").await, Ok("new".to_owned()));
    assert_eq!(
        ws::roundtrip(&mut tunnels[0], "old").await,
        Ok("old".to_owned())
    );

    let started = std::time::Instant::now();
    let closes = futures_util::future::join_all(tunnels.into_iter().map(|mut t| async move {
        let _ = tokio::time::timeout(
            Duration::from_secs(20),
            futures_util::StreamExt::next(&mut t),
        )
        .await;
        std::time::Instant::now()
    }))
    .await;
    let first = closes.iter().min().unwrap().duration_since(started);
    let last = closes.iter().max().unwrap().duration_since(started);
    assert!(
        last - first >= Duration::from_secs(2),
        "closes spread: {first:?}..{last:?}"
    );
    assert!(
        last < Duration::from_secs(15),
        "all closed before the old process ended: {last:?}"
    );
    assert_eq!(
        ws::roundtrip(&mut fresh, "still").await,
        Ok("still".to_owned())
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        edge.old_exited(),
        "the old process exited after its grace period"
    );
}
