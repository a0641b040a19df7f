//! Integration tests of `ringcast-edge`: real edge and echo-backend processes on loopback,
//! real WebSocket clients.

mod admin;
mod common;
mod config;
mod hashing;
mod health;
mod limits;
mod proxying;
mod sticky;
mod tls;
mod ws;
