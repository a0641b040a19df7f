//! `ringcast-edge -t`: exit 0 for a valid file, 1 with file, key and problem otherwise.

use std::process::Command;

fn check(text: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!(
        "ringcast-edge-check-{}-{}",
        std::process::id(),
        text.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("edge.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast-edge"))
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BACKEND: &str = "[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:9001\"\n";

#[test]
fn check_accepts_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/edge.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast-edge"))
        .args(["-t", "-c", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_names_file_key_and_problem() {
    let cases = [
        (
            format!("{BACKEND}[health]\nrise = 0\n"),
            "health.rise: must be at least 1",
        ),
        (
            format!("{BACKEND}[hash]\nsources = [\"body:x\"]\n"),
            "hash.sources[0]:",
        ),
        (
            format!("{BACKEND}[tunnel]\nidle = \"1s\"\n"),
            "tunnel.idle: unknown field",
        ),
        (
            format!("{BACKEND}[server]\nlisten = \"nowhere\"\n"),
            "server.listen:",
        ),
        (
            "[server]\n".to_owned(),
            "backends: at least one backend is required",
        ),
        (
            format!("{BACKEND}{BACKEND}"),
            "backends[1].id: \"a\" is used twice",
        ),
    ];
    for (text, expected) in cases {
        let (ok, stderr) = check(&text);
        assert!(!ok, "{text} should fail");
        assert!(stderr.contains("edge.toml: "), "{stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr}"
        );
    }
    let (ok, stderr) = check(BACKEND);
    assert!(ok, "{stderr}");
}
