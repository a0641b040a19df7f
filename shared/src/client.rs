//! A Rust client for Ringcast nodes: connect with a token, reconnect with exponential backoff
//! and full jitter, resume rooms by offset and epoch, drop duplicates, publish with acks, and
//! receive a stream of events.
