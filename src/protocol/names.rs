//! Session ids and channel names: `[A-Za-z0-9._:-]{1,128}`.
//!
//! Both are shared (`Arc<str>`) because one name is held by the connection,
//! the bus maps and every delivery to it; cloning must not allocate.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// Longest session id or channel name the contract allows.
pub const MAX_NAME_LEN: usize = 128;

/// Why a string is not a valid session id or channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadName {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {MAX_NAME_LEN} characters")]
    TooLong { what: &'static str },
    #[error("{what} may only contain A-Z a-z 0-9 . _ : -")]
    BadChar { what: &'static str },
}

fn validate(what: &'static str, s: &str) -> Result<(), BadName> {
    if s.is_empty() {
        return Err(BadName::Empty { what });
    }
    if s.len() > MAX_NAME_LEN {
        return Err(BadName::TooLong { what });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err(BadName::BadChar { what });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, BadName> {
                validate($what, s)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A resumable client identity. At most one live connection per session in the fleet.
    SessionId,
    "session"
);
name_type!(
    /// A named fan-out group that sessions subscribe to.
    ChannelName,
    "channel"
);

impl SessionId {
    /// A fresh random id for clients that connect without one (auth mode `none`).
    pub fn random() -> Self {
        use rand::Rng;
        let n: u128 = rand::rng().random();
        Self(Arc::from(format!("anon-{n:032x}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_contract_alphabet() {
        for ok in ["s1", "a.b_c:d-e", "X", &"a".repeat(128)] {
            assert!(SessionId::parse(ok).is_ok(), "{ok}");
            assert!(ChannelName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        let cases = [
            ("", BadName::Empty { what: "session" }),
            (&"a".repeat(129), BadName::TooLong { what: "session" }),
            ("a b", BadName::BadChar { what: "session" }),
            ("é", BadName::BadChar { what: "session" }),
            ("a/b", BadName::BadChar { what: "session" }),
            ("a*", BadName::BadChar { what: "session" }),
        ];
        for (input, want) in cases {
            assert_eq!(SessionId::parse(input).unwrap_err(), want, "{input:?}");
        }
    }

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = SessionId::random();
        let b = SessionId::random();
        assert_ne!(a, b);
        assert!(SessionId::parse(&a).is_ok());
    }
}
