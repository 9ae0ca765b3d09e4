//! Who may connect and what they may do: JWTs for WebSocket clients, an API
//! key for backends, and channel permissions from the token's claims.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{AuthMode, ConfigError, Secret, ServeConfig};
use crate::protocol::{ChannelName, SessionId};

/// Why a client or backend was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("a token is required (Authorization: Bearer <jwt> or ?token=)")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("the token names no session (claim sid or sub)")]
    NoSession,
    #[error("the token's session is not a valid session id: {0}")]
    BadSession(String),
}

/// Channel names or prefix patterns (`chat.*`) a session may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelGrant {
    patterns: Vec<String>,
}

impl ChannelGrant {
    pub fn new(patterns: Vec<String>) -> Self {
        Self { patterns }
    }

    /// Exact names match themselves; a pattern ending in `*` matches every
    /// channel starting with what precedes the `*`.
    pub fn allows(&self, channel: &ChannelName) -> bool {
        self.patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => p == channel.as_str(),
        })
    }
}

/// What an authenticated client may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The session the token is for; `None` in auth mode `none`.
    pub session: Option<SessionId>,
    /// `None`: every channel (auth mode `none`).
    pub channels: Option<ChannelGrant>,
    /// The token's `exp` (Unix seconds): the connection closes with 1008 at
    /// that moment unless the client sends a `refresh` first. `None` in
    /// auth mode `none`.
    pub expires_at: Option<u64>,
}

impl Grant {
    pub fn anonymous() -> Self {
        Self {
            session: None,
            channels: None,
            expires_at: None,
        }
    }

    pub fn may_use(&self, channel: &ChannelName) -> bool {
        self.channels.as_ref().is_none_or(|g| g.allows(channel))
    }
}

#[derive(Deserialize)]
struct Claims {
    sid: Option<String>,
    sub: Option<String>,
    #[serde(default)]
    channels: Vec<String>,
    /// Required (and checked) by the validation; kept for the connection's life.
    exp: u64,
}

/// Verifies client tokens according to the configured auth mode.
pub struct Authenticator {
    jwt: Option<(DecodingKey, Validation)>,
}

impl Authenticator {
    pub fn from_config(config: &ServeConfig) -> Result<Self, ConfigError> {
        if config.auth == AuthMode::None {
            return Ok(Self { jwt: None });
        }
        let (key, alg) = if let Some(Secret(secret)) = &config.jwt_hs256_secret {
            (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )
        } else if let Some(path) = &config.jwt_rs256_public_key_file {
            let pem = std::fs::read(path).map_err(|source| ConfigError::JwtKeyFile {
                path: path.clone(),
                source,
            })?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .map_err(|e| ConfigError::JwtKeyInvalid(e.to_string()))?;
            (key, Algorithm::RS256)
        } else {
            return Err(ConfigError::JwtKeyMissing);
        };
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_aud = false;
        validation.leeway = 5;
        Ok(Self {
            jwt: Some((key, validation)),
        })
    }

    pub fn requires_token(&self) -> bool {
        self.jwt.is_some()
    }

    /// Checks a token (or its absence) and says what its holder may do.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Grant, AuthError> {
        let Some((key, validation)) = &self.jwt else {
            return Ok(Grant::anonymous());
        };
        let token = token.ok_or(AuthError::MissingToken)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let claims = data.claims;
        let session = claims.sid.or(claims.sub).ok_or(AuthError::NoSession)?;
        let session =
            SessionId::parse(&session).map_err(|e| AuthError::BadSession(e.to_string()))?;
        Ok(Grant {
            session: Some(session),
            channels: Some(ChannelGrant::new(claims.channels)),
            expires_at: Some(claims.exp),
        })
    }
}

/// Compares an API key without leaking through timing where it differs.
pub fn api_key_matches(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= (*x ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn hs256(secret: &str) -> Authenticator {
        let config =
            ServeConfig::from_args(["--auth", "jwt", "--jwt-hs256-secret", secret]).unwrap();
        Authenticator::from_config(&config).unwrap()
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn in_an_hour() -> u64 {
        crate::bus::now_ms() / 1000 + 3600
    }

    #[test]
    fn channel_patterns() {
        let grant = ChannelGrant::new(vec!["chat.*".into(), "news".into()]);
        let cases = [
            ("chat.room1", true),
            ("chat.", true),
            ("chatroom", false),
            ("news", true),
            ("news.x", false),
        ];
        for (channel, allowed) in cases {
            assert_eq!(
                grant.allows(&ChannelName::parse(channel).unwrap()),
                allowed,
                "{channel}"
            );
        }
    }

    #[test]
    fn valid_token_names_session_and_channels() {
        let auth = hs256("k");
        let t = token(
            "k",
            serde_json::json!({"sub": "u1", "sid": "s9", "exp": in_an_hour(), "channels": ["a.*"]}),
        );
        let grant = auth.authenticate(Some(&t)).unwrap();
        assert_eq!(grant.session.as_deref(), Some("s9"));
        assert!(grant.may_use(&ChannelName::parse("a.b").unwrap()));
        assert!(!grant.may_use(&ChannelName::parse("b").unwrap()));
        assert!(
            grant
                .expires_at
                .is_some_and(|e| e.abs_diff(in_an_hour()) <= 5),
            "exp is kept for the connection's life"
        );
    }

    #[test]
    fn bad_tokens_are_refused() {
        let auth = hs256("k");
        let expired = token("k", serde_json::json!({"sub": "u1", "exp": 1_000}));
        let wrong_key = token(
            "other",
            serde_json::json!({"sub": "u1", "exp": in_an_hour()}),
        );
        let no_exp = token("k", serde_json::json!({"sub": "u1"}));
        let no_session = token("k", serde_json::json!({"exp": in_an_hour()}));
        assert_eq!(auth.authenticate(None), Err(AuthError::MissingToken));
        for t in [expired, wrong_key, no_exp, "garbage".to_string()] {
            assert!(
                matches!(auth.authenticate(Some(&t)), Err(AuthError::InvalidToken(_))),
                "{t}"
            );
        }
        assert_eq!(
            auth.authenticate(Some(&no_session)),
            Err(AuthError::NoSession)
        );
    }

    #[test]
    fn api_key_comparison() {
        assert!(api_key_matches("abc", "abc"));
        assert!(!api_key_matches("abc", "abd"));
        assert!(!api_key_matches("abc", "ab"));
        assert!(!api_key_matches("abc", "abcd"));
        assert!(!api_key_matches("abc", ""));
    }
}
