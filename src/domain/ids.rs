//! Identifiers that reach URL paths, Kubernetes label values and object names: a conservative
//! character set, checked once when the value enters the service.

use std::fmt;

/// Why a value is not a valid identifier; the caller names the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub &'static str);

/// `[A-Za-z0-9][A-Za-z0-9._-]*` of at most `max` bytes: nothing that could change a URL path
/// (`.` or `..` cannot start it) or need escaping in a label.
fn check(value: &str, max: usize, message: &'static str) -> Result<(), InvalidValue> {
    let valid = !value.is_empty()
        && value.len() <= max
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(InvalidValue(message))
    }
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $max:expr, $message:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize, sqlx::Type)]
        #[serde(try_from = "String", into = "String")]
        #[sqlx(transparent)]
        pub struct $name(String);

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidValue> {
                let value = value.into();
                check(&value, $max, $message)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidValue;
            fn try_from(value: String) -> Result<Self, InvalidValue> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
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

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

identifier!(
    /// An org's id in the config service.
    OrgId,
    128,
    "must be 1 to 128 characters of letters, digits, '-', '_' or '.', starting with a letter or digit"
);
identifier!(
    /// A team's node id in the config service.
    TeamNodeId,
    128,
    "must be 1 to 128 characters of letters, digits, '-', '_' or '.', starting with a letter or digit"
);
identifier!(
    /// An agent's name: a path segment of the agent service's URL.
    AgentName,
    64,
    "must be 1 to 64 of letters, digits, '-', '_' or '.', starting with a letter or digit"
);

impl AgentName {
    /// The agent a team runs when its config names none: the platform's entrance agent.
    pub fn planner() -> Self {
        Self("planner".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_identifiers_parse() {
        for ok in ["acme", "SRE_team.1", "a", &"x".repeat(128)] {
            assert!(OrgId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "-a", "a/b", "a b", "a\u{0}", &"x".repeat(129)] {
            assert!(TeamNodeId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(AgentName::parse("x".repeat(65)).is_err());
        assert!(AgentName::parse("planner").is_ok());
    }

    #[test]
    fn deserialising_checks_too() {
        assert!(serde_json::from_str::<OrgId>("\"acme\"").is_ok());
        assert!(serde_json::from_str::<OrgId>("\"a/b\"").is_err());
        assert_eq!(
            serde_json::to_string(&OrgId::parse("acme").unwrap()).unwrap(),
            "\"acme\""
        );
    }
}
