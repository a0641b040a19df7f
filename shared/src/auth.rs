//! Token authentication shared by nodes, the client library and the testbed: HS256 JWT
//! claims, room patterns, and helpers to mint and verify tokens.
//!
//! A token carries the user id (`sub`), an expiry (`exp`, seconds since the Unix epoch), the
//! room patterns the user may join (`rooms`) and those it may publish to (`publish`). A
//! pattern is an exact room name, or a prefix ending in `*` (`chat/*` allows `chat/a` and
//! `chat/b/c`); `*` alone allows every room. An empty list allows nothing.
//!
//! ```
//! use ringcast_shared::auth::{Claims, mint_token, verify_token};
//! use std::time::Duration;
//!
//! let claims = Claims::new("alice", Duration::from_secs(3600))
//!     .with_rooms(["chat/*"])
//!     .with_publish(["chat/general"]);
//! let token = mint_token(b"a long shared secret", &claims).unwrap();
//! let back = verify_token(b"a long shared secret", &token).unwrap();
//! assert!(back.may_join("chat/random"));
//! assert!(!back.may_publish("chat/random"));
//! ```

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Clock skew tolerated when checking `exp`, in seconds.
pub const EXPIRY_LEEWAY_SECS: u64 = 5;

/// The claims of a Ringcast token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Room patterns the user may join.
    #[serde(default)]
    pub rooms: Vec<String>,
    /// Room patterns the user may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
}

impl Claims {
    /// Claims for `user` expiring `ttl` from now, allowing no room yet.
    pub fn new(user: impl Into<String>, ttl: Duration) -> Self {
        Self {
            sub: user.into(),
            exp: unix_now_secs().saturating_add(ttl.as_secs()),
            rooms: Vec::new(),
            publish: Vec::new(),
        }
    }

    /// Replaces the join patterns.
    #[must_use]
    pub fn with_rooms<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rooms = patterns.into_iter().map(Into::into).collect();
        self
    }

    /// Replaces the publish patterns.
    #[must_use]
    pub fn with_publish<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.publish = patterns.into_iter().map(Into::into).collect();
        self
    }

    /// Whether the token allows joining `room`.
    pub fn may_join(&self, room: &str) -> bool {
        any_matches(&self.rooms, room)
    }

    /// Whether the token allows publishing to `room`.
    pub fn may_publish(&self, room: &str) -> bool {
        any_matches(&self.publish, room)
    }
}

/// Whether `pattern` (exact name, `prefix*` or `*`) allows `room`.
pub fn pattern_matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

fn any_matches(patterns: &[String], room: &str) -> bool {
    patterns
        .iter()
        .any(|pattern| pattern_matches(pattern, room))
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is well formed and correctly signed but its `exp` has passed.
    #[error("token expired")]
    Expired,
    /// The token is malformed, badly signed, uses another algorithm or lacks a claim.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token could not be signed (an unusable secret).
    #[error("cannot sign token: {0}")]
    Sign(String),
}

impl AuthError {
    /// Whether the same request can succeed later. Never for a bad token.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Signs `claims` with HS256 and `secret`.
///
/// # Errors
/// [`AuthError::Sign`] when the secret cannot be used as an HMAC key.
pub fn mint_token(secret: &[u8], claims: &Claims) -> Result<String, AuthError> {
    let key = EncodingKey::from_secret(secret).map_err(|e| AuthError::Sign(e.to_string()))?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)
        .map_err(|e| AuthError::Sign(e.to_string()))
}

/// Checks an HS256 token's signature, algorithm and expiry (with
/// [`EXPIRY_LEEWAY_SECS`] of leeway) and returns its claims.
///
/// # Errors
/// [`AuthError::Expired`] for an expired token, [`AuthError::Invalid`] otherwise.
pub fn verify_token(secret: &[u8], token: &str) -> Result<Claims, AuthError> {
    let key = DecodingKey::from_secret(secret).map_err(|e| AuthError::Invalid(e.to_string()))?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = EXPIRY_LEEWAY_SECS;
    validation.set_required_spec_claims(&["exp", "sub"]);
    match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
        Ok(data) => Ok(data.claims),
        Err(err) if matches!(err.kind(), ErrorKind::ExpiredSignature) => Err(AuthError::Expired),
        Err(err) => Err(AuthError::Invalid(err.to_string())),
    }
}

/// Reads a token's claims WITHOUT checking its signature or expiry. Only for nodes running
/// with `auth.mode = "none"`, where the token just names the user.
///
/// # Errors
/// [`AuthError::Invalid`] when the text is not a JWT with Ringcast claims.
pub fn read_claims_unverified(token: &str) -> Result<Claims, AuthError> {
    jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(token)
        .map_err(|e| AuthError::Invalid(e.to_string()))
}

fn unix_now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test secret of reasonable length";

    #[test]
    fn patterns_match_exact_prefix_and_all() {
        assert!(pattern_matches("chat", "chat"));
        assert!(!pattern_matches("chat", "chat2"));
        assert!(pattern_matches("chat/*", "chat/a/b"));
        assert!(!pattern_matches("chat/*", "chat"));
        assert!(pattern_matches("*", "anything"));
    }

    #[test]
    fn empty_pattern_list_allows_nothing() {
        let claims = Claims::new("u", Duration::from_secs(60));
        assert!(!claims.may_join("a"));
        assert!(!claims.may_publish("a"));
    }

    #[test]
    fn minted_token_round_trips() {
        let claims = Claims::new("bob", Duration::from_secs(60)).with_rooms(["*"]);
        let token = mint_token(SECRET, &claims).unwrap();
        assert_eq!(verify_token(SECRET, &token).unwrap(), claims);
    }

    #[test]
    fn wrong_secret_is_invalid() {
        let token = mint_token(SECRET, &Claims::new("bob", Duration::from_secs(60))).unwrap();
        let err = verify_token(b"another secret entirely", &token).unwrap_err();
        assert!(matches!(err, AuthError::Invalid(_)), "{err}");
    }

    #[test]
    fn expired_token_is_reported_as_expired() {
        let mut claims = Claims::new("bob", Duration::ZERO);
        claims.exp = unix_now_secs() - 3600;
        let token = mint_token(SECRET, &claims).unwrap();
        assert_eq!(verify_token(SECRET, &token), Err(AuthError::Expired));
    }

    #[test]
    fn garbage_is_invalid() {
        assert!(matches!(
            verify_token(SECRET, "not.a.jwt"),
            Err(AuthError::Invalid(_))
        ));
    }
}
