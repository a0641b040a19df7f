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
    std::fs::write(
        &edge.config_path,
        text.replace("[log]", "[log]\nlevel = \"info\"\nbogus = 1\n#"),
    )
    .unwrap();
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
