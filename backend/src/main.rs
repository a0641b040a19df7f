//! `ringcast-node`: a Ringcast WebSocket node.

fn main() {}
