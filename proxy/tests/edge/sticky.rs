//! Cookie stickiness for socket.io-style sessions: a polling handshake, follow-up polls and
//! the WebSocket upgrade of one session all reach the backend that issued it, even when
//! the hash key of the follow-ups would point elsewhere.

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::{Echo, Edge, http};

const STICKY: &str = "[hash]\nsources = [\"query:sid\", \"header:x-client\", \"ip\"]\nsticky_cookie = \"rc_backend\"\n";

async fn sequence(edge: &Edge, n: usize) -> Result<(), String> {
    let client = format!("client-{n}");
    let first = http(
        edge.listen,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        &[("x-client", &client)],
    )
    .await
    .map_err(|e| e.to_string())?;
    let issuer = first.body.trim().to_owned();
    let cookie = first
        .header("set-cookie")
        .ok_or("no cookie set")?
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    if cookie != format!("rc_backend={issuer}") {
        return Err(format!("cookie {cookie} for {issuer}"));
    }
    let sid = format!("sid-{n}-x");
    for _ in 0..2 {
        let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
        let poll = http(edge.listen, "GET", &path, &[("cookie", &cookie)])
            .await
            .map_err(|e| e.to_string())?;
        if poll.status != 200 || poll.body.trim() != issuer {
            return Err(format!(
                "poll of {n} reached {} ({})",
                poll.body.trim(),
                poll.status
            ));
        }
    }
    let url = edge.ws_url(&format!("/socket.io/?EIO=4&transport=websocket&sid={sid}"));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("cookie", cookie.parse().unwrap());
    let (_socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| e.to_string())?;
    let upgraded_on = response
        .headers()
        .get("x-echo-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if upgraded_on != issuer {
        return Err(format!(
            "upgrade of {n} reached {upgraded_on}, issuer {issuer}"
        ));
    }
    Ok(())
}

#[tokio::test]
async fn every_request_of_a_session_reaches_its_issuer() {
    let echoes = [Echo::start("b1"), Echo::start("b2"), Echo::start("b3")];
    let refs: Vec<&Echo> = echoes.iter().collect();
    let edge = Edge::start(&refs, "", STICKY).await;
    let results: Vec<Result<(), String>> = futures_util::stream::iter(0..1000)
        .map(|n| sequence(&edge, n))
        .buffer_unordered(16)
        .collect()
        .await;
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of 1000 failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );
}

/// A cookie naming a backend that takes no new clients is not followed: the request goes
/// to the ring and gets a fresh cookie.
#[tokio::test]
async fn cookie_of_a_drained_backend_is_not_followed() {
    let b1 = Echo::start("b1");
    let b2 = Echo::start("b2");
    let edge = Edge::start(&[&b1, &b2], "", STICKY).await;
    assert_eq!(
        edge.admin("POST", "/backends/b1/drain", "").await.status,
        200
    );
    let answer = http(edge.listen, "GET", "/", &[("cookie", "rc_backend=b1")])
        .await
        .unwrap();
    assert_eq!(answer.body.trim(), "b2");
    assert_eq!(
        answer.header("set-cookie").unwrap().split(';').next(),
        Some("rc_backend=b2")
    );
    let kept = http(edge.listen, "GET", "/", &[("cookie", "rc_backend=b2")])
        .await
        .unwrap();
    assert_eq!(kept.body.trim(), "b2");
    assert!(
        kept.header("set-cookie").is_none(),
        "a followed cookie is not set again"
    );
}
