//! `ringcast-testbed`: runs a whole Ringcast cluster on this machine.

fn main() {}
