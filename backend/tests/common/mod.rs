//! Test helpers: real `ringcast-node` processes on loopback ports chosen by the node
//! (listen on port 0, address read from its stdout), raw WebSocket clients, and tokens.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use ringcast_shared::auth::{Claims, mint_token};
use ringcast_shared::protocol::ServerFrame;
use serde_json::{Value, json};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Secret of the test tokens.
pub const SECRET: &str = "integration test secret 0123456789";

/// How long a single expected frame may take.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// The sections of a node's config file; each is the body of its table.
#[derive(Clone)]
pub struct Spec {
    pub id: String,
    pub node: String,
    pub auth: String,
    pub limits: String,
    pub drain: String,
    pub cluster: String,
}

impl Spec {
    /// A standalone node without auth.
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            node: String::new(),
            auth: "mode = \"none\"".into(),
            limits: String::new(),
            drain: String::new(),
            cluster: String::new(),
        }
    }

    pub fn jwt(mut self) -> Self {
        self.auth = format!("mode = \"jwt\"\nsecret = \"{SECRET}\"");
        self
    }

    pub fn limits(mut self, body: &str) -> Self {
        self.limits = body.into();
        self
    }

    pub fn node(mut self, body: &str) -> Self {
        self.node = body.into();
        self
    }

    pub fn drain(mut self, body: &str) -> Self {
        self.drain = body.into();
        self
    }

    /// Shares state through the given Redis Cluster seeds with a unique key prefix.
    pub fn redis(mut self, seeds: &[String], prefix: &str, extra: &str) -> Self {
        let nodes: Vec<String> = seeds.iter().map(|s| format!("{s:?}")).collect();
        self.cluster = format!(
            "nodes = [{}]\nkey_prefix = \"{prefix}\"\n{extra}",
            nodes.join(", ")
        );
        self
    }

    fn to_toml(&self) -> String {
        format!(
            "[node]\nid = \"{}\"\nlisten = \"127.0.0.1:0\"\n{}\n[auth]\n{}\n[limits]\n{}\n\
             [drain]\n{}\n[cluster]\n{}\n[log]\nlevel = \"warn\"\n",
            self.id, self.node, self.auth, self.limits, self.drain, self.cluster
        )
    }
}

/// A running node, killed (SIGKILL) on drop.
pub struct NodeProcess {
    child: Child,
    pub addr: String,
    pub id: String,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    pub async fn start(spec: &Spec) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, spec.to_toml()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringcast-node"))
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("node did not start in time")
            .unwrap()
            .expect("node exited before listening");
        let addr = line.rsplit(' ').next().unwrap().to_owned();
        Self {
            child,
            addr,
            id: spec.id.clone(),
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("node already reaped") as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.start_kill();
    }

    pub fn sigterm(&self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        kill(Pid::from_raw(self.pid()), Signal::SIGTERM).unwrap();
    }

    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// A plain HTTP GET; returns the status code and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(&self.addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    /// The value of a metric line (first sample whose name and labels start with `name`).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Mints a token for `user` allowed to join `rooms` and publish to `publish`.
pub fn token(user: &str, rooms: &[&str], publish: &[&str]) -> String {
    let claims = Claims::new(user, Duration::from_secs(3600))
        .with_rooms(rooms.iter().copied())
        .with_publish(publish.iter().copied());
    mint_token(SECRET.as_bytes(), &claims).unwrap()
}

/// What a raw client read.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Frame(ServerFrame),
    Close(u16, String),
    Ended,
}

/// A bare WebSocket client speaking JSON frames.
pub struct Raw {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Raw {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Self { ws }
    }

    /// Connects with a small kernel receive buffer, so that not reading fills up fast.
    pub async fn connect_small_buffer(addr: &str) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
        let url = format!("ws://{addr}/ws");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
        Self { ws }
    }

    /// Connects and says hello; returns the client and the welcome frame.
    pub async fn hello(
        url: &str,
        token: Option<&str>,
        session: Option<&str>,
    ) -> (Self, ServerFrame) {
        let mut raw = Self::connect(url).await;
        let mut hello = json!({"type": "hello"});
        if let Some(token) = token {
            hello["token"] = json!(token);
        }
        if let Some(session) = session {
            hello["session"] = json!(session);
        }
        raw.send(&hello).await;
        match raw.recv().await {
            Incoming::Frame(welcome @ ServerFrame::Welcome { .. }) => (raw, welcome),
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// The next frame other than `ping` (answered), a close, or the end.
    pub async fn recv(&mut self) -> Incoming {
        loop {
            let next = tokio::time::timeout(FRAME_TIMEOUT, self.ws.next())
                .await
                .expect("no frame in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    let frame: ServerFrame = serde_json::from_str(&text).unwrap();
                    if frame == ServerFrame::Ping {
                        let _ = self
                            .ws
                            .send(Message::Text(r#"{"type":"pong"}"#.into()))
                            .await;
                        continue;
                    }
                    return Incoming::Frame(frame);
                }
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Incoming::Close(frame.code.into(), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) | None => return Incoming::Ended,
                Some(Err(err)) => {
                    eprintln!("websocket read error: {err}");
                    return Incoming::Ended;
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Reads one text frame cheaply: the offset when it is a `message`, else `None`.
    /// Panics on a close or the end.
    pub async fn next_message_offset(&mut self) -> Option<u64> {
        let next = tokio::time::timeout(FRAME_TIMEOUT, self.ws.next())
            .await
            .expect("no frame in time");
        let Some(Ok(Message::Text(text))) = next else {
            panic!("expected a text frame, got {next:?}");
        };
        if !text.starts_with(r#"{"type":"message""#) {
            return None;
        }
        let start = text.find(r#""offset":"#)? + 9;
        let digits: String = text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    }

    /// The next frame other than a presence event; panics on a close.
    pub async fn frame(&mut self) -> ServerFrame {
        loop {
            match self.recv().await {
                Incoming::Frame(ServerFrame::PresenceEvent { .. }) => {}
                Incoming::Frame(frame) => return frame,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// Reads until the close frame and returns its code.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match self.recv().await {
                Incoming::Frame(_) => {}
                Incoming::Close(code, _) => return code,
                Incoming::Ended => panic!("socket ended without a close frame"),
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> ServerFrame {
        self.send(&json!({"type": "join", "id": 1, "room": room}))
            .await;
        self.frame().await
    }

    pub async fn publish(&mut self, room: &str, data: Value) -> ServerFrame {
        self.send(&json!({"type": "publish", "id": 2, "room": room, "data": data}))
            .await;
        self.frame().await
    }
}

/// The offset of a `message` frame, panicking on anything else.
pub fn message_offset(frame: &ServerFrame) -> u64 {
    match frame {
        ServerFrame::Message { offset, .. } => *offset,
        other => panic!("expected a message, got {other:?}"),
    }
}
