# Everyday commands. `just --list` shows them; each is a plain cargo command underneath.

# Run the main job: the whole cluster on this machine through every fault, with a loss report.
demo *ARGS:
    cargo run --release -p ringcast-testbed -- demo {{ARGS}}

# Start Redis Cluster, nodes and the edge on loopback and keep them running until Ctrl-C.
up *ARGS:
    cargo run --release -p ringcast-testbed -- up {{ARGS}}

# Run every test (starts real Redis Clusters and processes on loopback ports).
test:
    cargo test --workspace

# Run the side-by-side benchmarks and rewrite docs/benchmarks.md.
bench *ARGS:
    cargo run --release -p ringcast-testbed -- bench {{ARGS}}

# Check formatting and lints as CI does.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Format the code.
fmt:
    cargo fmt --all
