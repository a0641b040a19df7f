//! `ringcast-edge`: the Ringcast edge proxy.

fn main() {}
