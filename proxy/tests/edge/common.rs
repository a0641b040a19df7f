//! Test fixtures: real `ringcast-echo` backends and a real `ringcast-edge` process on
//! loopback ports, killed on drop; a tiny HTTP/1.1 client and WebSocket helpers.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A running echo backend.
pub struct Echo {
    pub id: String,
    pub address: SocketAddr,
    child: Option<Child>,
}

impl Echo {
    pub fn start(id: &str) -> Self {
        Self::start_on(id, "127.0.0.1:0")
    }

    pub fn start_on(id: &str, listen: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringcast-echo"))
            .args(["--listen", listen, "--id", id])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ringcast-echo");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("echo prints its address");
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected echo output {line:?}"));
        Self {
            id: id.to_owned(),
            address,
            child: Some(child),
        }
    }

    /// SIGKILL, now.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts on the same address.
    pub fn restart(&mut self) {
        self.kill();
        let again = Self::start_on(&self.id, &self.address.to_string());
        *self = again;
    }

    /// Makes `/readyz` answer 503 (`true`) or 200.
    pub async fn set_draining(&self, draining: bool) {
        let path = if draining { "/drain" } else { "/undrain" };
        let answer = http(self.address, "POST", path, &[])
            .await
            .expect("echo control");
        assert_eq!(answer.status, 200);
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Health checks fast enough for tests (unless a test brings its own `[health]`).
const FAST_HEALTH: &str =
    "[health]\ninterval = \"200ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n";

static EDGE_SEQ: AtomicU32 = AtomicU32::new(0);

/// A running edge.
pub struct Edge {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    child: Option<Child>,
    old: Option<Child>,
}

/// The `[[backends]]` entries for `echoes`.
pub fn backends_toml(echoes: &[&Echo]) -> String {
    echoes
        .iter()
        .map(|e| {
            format!(
                "[[backends]]\nid = \"{}\"\naddress = \"{}\"\n",
                e.id, e.address
            )
        })
        .collect()
}

impl Edge {
    /// Starts an edge with `extra` TOML (sections other than `[server]`/`[admin]`,
    /// `server_extra` goes into `[server]`) and the given backends.
    pub async fn start(echoes: &[&Echo], server_extra: &str, extra: &str) -> Self {
        let seq = EDGE_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ringcast-edge-test-{}-{seq}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = format!(
            "[server]\nlisten = \"{listen}\"\nthreads = 2\nupgrade_socket = \"{}\"\n\
             pid_file = \"{}\"\nshutdown_timeout = \"1s\"\n{}{server_extra}\n\
             [admin]\nlisten = \"{admin}\"\n\n{}\n{}\n{extra}\n[log]\nlevel = \"info\"\n",
            dir.join("upgrade.sock").display(),
            dir.join("edge.pid").display(),
            if server_extra.contains("grace_period") {
                ""
            } else {
                "grace_period = \"1s\"\n"
            },
            if extra.contains("[health]") {
                ""
            } else {
                FAST_HEALTH
            },
            backends_toml(echoes),
        );
        let config_path = dir.join("edge.toml");
        std::fs::write(&config_path, text).unwrap();
        let mut edge = Self {
            listen,
            admin,
            dir,
            config_path,
            child: None,
            old: None,
        };
        edge.spawn(false);
        edge.wait_ready().await;
        edge
    }

    fn spawn(&mut self, upgrade: bool) {
        let log = std::fs::File::create(self.dir.join(format!("edge-{upgrade}.log"))).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringcast-edge"));
        command.arg("-c").arg(&self.config_path);
        if upgrade {
            command.arg("-u");
        }
        // EDGE_LOG=debug (for example) raises the edge's log level while debugging a test.
        command.env("RUST_LOG", std::env::var("EDGE_LOG").unwrap_or_default());
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn ringcast-edge");
        self.child = Some(child);
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let proxy_up = TcpStream::connect(self.listen).await.is_ok();
            let admin_up = http(self.admin, "GET", "/backends", &[]).await.is_ok();
            if proxy_up && admin_up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "edge did not start: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Graceful upgrade: starts a new edge with `-u`, then sends the running one SIGQUIT.
    /// Returns when the new process serves the admin API.
    pub async fn upgrade(&mut self) {
        self.old = self.child.take();
        self.spawn(true);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let old_pid = self.old.as_ref().map(Child::id).expect("old edge");
        let status = Command::new("kill")
            .arg("-QUIT")
            .arg(old_pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
        self.wait_ready().await;
    }

    /// Whether the pre-upgrade process has exited.
    pub fn old_exited(&mut self) -> bool {
        self.old
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("edge-false.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Admin call; returns the answer.
    pub async fn admin(&self, method: &str, path: &str, body: &str) -> Answer {
        http_body(self.admin, method, path, &[], body)
            .await
            .expect("admin answers")
    }

    /// State of backend `id` as the admin API reports it.
    pub async fn backend(&self, id: &str) -> serde_json::Value {
        let answer = self.admin("GET", "/backends", "").await;
        let list: Vec<serde_json::Value> = serde_json::from_str(&answer.body).unwrap();
        list.into_iter().find(|b| b["id"] == id).unwrap_or_default()
    }

    /// Waits until backend `id` reports `state`.
    pub async fn wait_state(&self, id: &str, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.backend(id).await["state"] != state {
            assert!(Instant::now() < deadline, "{id} never became {state}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A metric's value summed over the lines that start with `prefix`.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = self.admin("GET", "/metrics", "").await.body;
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.listen)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        for mut child in [self.child.take(), self.old.take()].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub async fn http(
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Answer> {
    http_body(to, method, path, headers, "").await
}

/// One request on a fresh connection (`Connection: close`), whole answer read.
pub async fn http_body(
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect(to).await?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("answer timed out"))??;
    parse_answer(&raw).ok_or_else(|| std::io::Error::other(format!("bad answer {raw:?}")))
}

fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some(Answer {
        status,
        headers,
        body,
    })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Which backend serves `key` (by the `sid` query parameter), via a plain GET.
pub async fn owner(edge: &Edge, key: &str) -> String {
    let answer = http(edge.listen, "GET", &format!("/?sid={key}"), &[])
        .await
        .expect("edge answers");
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.body.trim().to_owned()
}

/// Owners of `keys` keys, in order (32 requests in flight).
pub async fn owners(edge: &Edge, keys: usize) -> Vec<String> {
    use futures_util::StreamExt;
    futures_util::stream::iter(0..keys)
        .map(|k| async move { owner(edge, &format!("key-{k}")).await })
        .buffered(32)
        .collect()
        .await
}

/// Hash on the `sid` query parameter, then the client address.
pub const HASH_SID: &str = "[hash]\nsources = [\"query:sid\", \"ip\"]\n";

/// A real nginx with `hash $arg_sid consistent` over the given backends (for the parity
/// test, which is ignored by default because CI machines may lack nginx).
pub struct Nginx {
    pub listen: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    pub fn start(echoes: &[&Echo]) -> Self {
        let seq = EDGE_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ringcast-nginx-{}-{seq}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let servers: String = echoes
            .iter()
            .map(|e| format!("server {};\n", e.address))
            .collect();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log;\n\
             events {{ worker_connections 1024; }}\nhttp {{\naccess_log off;\n\
             client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};\n\
             uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
             upstream echoes {{\nhash $arg_sid consistent;\n{servers}}}\n\
             server {{ listen {listen}; location / {{ proxy_pass http://echoes; }} }}\n}}\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx in PATH");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { listen, dir, child }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
