//! The handshake's authentication step: turns `hello.token` into an [`Identity`] or a
//! close code with a reason, according to `[auth]`.

use ringcast_shared::auth::{self, AuthError, Claims};
use ringcast_shared::config::{AuthConfig, AuthMode};
use ringcast_shared::protocol::close;

/// Longest user id accepted from a token, in bytes.
const MAX_USER_LEN: usize = 128;

/// Who a connection belongs to and what it may do.
#[derive(Debug, Clone)]
pub struct Identity {
    /// User id.
    pub user: String,
    /// The token's permissions; `None` allows everything (auth mode `none`).
    pub claims: Option<Claims>,
}

impl Identity {
    /// Whether the connection may join (or query the presence of) `room`.
    pub fn may_join(&self, room: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.may_join(room))
    }

    /// Whether the connection may publish to `room`.
    pub fn may_publish(&self, room: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.may_publish(room))
    }
}

/// A refused handshake: the close code, the reason, and the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Close code (in the "do not reconnect" range).
    pub code: u16,
    /// Close reason for the client.
    pub reason: String,
    /// `missing`, `invalid` or `expired`.
    pub label: &'static str,
}

/// Checks tokens according to the `[auth]` section.
pub struct Authenticator {
    config: AuthConfig,
}

impl Authenticator {
    /// An authenticator for `config`.
    pub fn new(config: AuthConfig) -> Self {
        Self { config }
    }

    /// Authenticates the token of a `hello`; `conn` names anonymous users.
    ///
    /// # Errors
    /// A [`Refusal`] when the mode is `jwt` and the token is missing, invalid or expired.
    pub fn authenticate(&self, token: Option<&str>, conn: &str) -> Result<Identity, Refusal> {
        match self.config.mode {
            AuthMode::None => Ok(anonymous(token, conn)),
            AuthMode::Jwt => self.verify(token),
        }
    }

    fn verify(&self, token: Option<&str>) -> Result<Identity, Refusal> {
        let Some(token) = token else {
            return Err(refusal(close::UNAUTHORIZED, "token required", "missing"));
        };
        match auth::verify_token(self.config.secret.as_bytes(), token) {
            Ok(claims) if valid_user(&claims.sub) => Ok(Identity {
                user: claims.sub.clone(),
                claims: Some(claims),
            }),
            Ok(_) => Err(refusal(close::UNAUTHORIZED, "bad sub claim", "invalid")),
            Err(AuthError::Expired) => {
                Err(refusal(close::TOKEN_EXPIRED, "token expired", "expired"))
            }
            Err(_) => Err(refusal(close::UNAUTHORIZED, "invalid token", "invalid")),
        }
    }
}

/// With auth off, the user is the `sub` of an unverified token, the token text itself when
/// it is not a JWT, or `anonymous-<conn>`.
fn anonymous(token: Option<&str>, conn: &str) -> Identity {
    let user = match token {
        Some(token) => match auth::read_claims_unverified(token) {
            Ok(claims) if valid_user(&claims.sub) => claims.sub,
            _ if valid_user(token) => token.to_owned(),
            _ => format!("anonymous-{conn}"),
        },
        None => format!("anonymous-{conn}"),
    };
    Identity { user, claims: None }
}

fn valid_user(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER_LEN && !user.chars().any(char::is_control)
}

fn refusal(code: u16, reason: &str, label: &'static str) -> Refusal {
    Refusal {
        code,
        reason: reason.to_owned(),
        label,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SECRET: &str = "node test secret 0123456789";

    fn jwt() -> Authenticator {
        Authenticator::new(AuthConfig {
            mode: AuthMode::Jwt,
            secret: SECRET.to_owned(),
        })
    }

    #[test]
    fn missing_token_is_unauthorized() {
        let refusal = jwt().authenticate(None, "c1").unwrap_err();
        assert_eq!(refusal.code, close::UNAUTHORIZED);
        assert_eq!(refusal.label, "missing");
    }

    #[test]
    fn valid_token_gives_its_user_and_patterns() {
        let claims = Claims::new("ann", Duration::from_secs(60)).with_rooms(["a/*"]);
        let token = auth::mint_token(SECRET.as_bytes(), &claims).unwrap();
        let identity = jwt().authenticate(Some(&token), "c1").unwrap();
        assert_eq!(identity.user, "ann");
        assert!(identity.may_join("a/b"));
        assert!(!identity.may_join("b"));
        assert!(!identity.may_publish("a/b"));
    }

    #[test]
    fn no_auth_mode_allows_everything_and_names_users() {
        let open = Authenticator::new(AuthConfig {
            mode: AuthMode::None,
            secret: String::new(),
        });
        assert_eq!(open.authenticate(Some("bob"), "c1").unwrap().user, "bob");
        let anon = open.authenticate(None, "c9").unwrap();
        assert_eq!(anon.user, "anonymous-c9");
        assert!(anon.may_publish("x"));
    }
}
