//! TLS termination: plain HTTP and WebSocket over TLS with a certificate from the config;
//! the backend is told the client used https.

use pingora::tls::{ClientConfig, RootCertStore, ServerName, TlsConnector};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Echo, Edge};
use crate::ws;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn connector() -> TlsConnector {
    pingora::tls::install_default_crypto_provider();
    let mut roots = RootCertStore::empty();
    pingora::tls::load_ca_file_into_store(format!("{FIXTURES}/test-ca.crt"), &mut roots).unwrap();
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn tls_termination_serves_http_and_websocket() {
    let b1 = Echo::start("b1");
    let server = format!(
        "tls_cert = \"{FIXTURES}/edge-test.crt\"\ntls_key = \"{FIXTURES}/edge-test.key\"\n"
    );
    let edge = Edge::start(&[&b1], &server, "").await;
    let name = ServerName::try_from("localhost").unwrap();

    let tcp = TcpStream::connect(edge.listen).await.unwrap();
    let mut tls = connector()
        .connect(name.clone(), tcp)
        .await
        .expect("TLS handshake");
    let request = b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    tls.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("\"x-forwarded-proto\":[\"https\"]"),
        "{answer}"
    );

    let tcp = TcpStream::connect(edge.listen).await.unwrap();
    let tls = connector().connect(name, tcp).await.expect("TLS handshake");
    let (mut client, _) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
        .await
        .expect("WebSocket over TLS");
    assert_eq!(
        ws::roundtrip(&mut client, "secure").await,
        Ok("secure".to_owned())
    );
}
