//! How the platform's Python neighbours write values, read leniently: a field the orchestrator
//! merely records must never fail a call because of its format.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Reads a timestamp written with an offset (`2026-01-09T14:03:27Z`, `+00:00`) or without one
/// (`2026-01-09T14:03:27.123456`, Python's `isoformat()` of a naive UTC time, which the config
/// service writes). Naive means UTC. Anything else, including a number or a date without a time,
/// is read as absent rather than refused.
pub fn timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::String(text)) => parse_timestamp(&text),
        _ => None,
    })
}

pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.with_timezone(&Utc));
    }
    // Python's isoformat() with an offset but a space instead of `T` is rarer; naive is the norm.
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|naive| naive.and_utc())
}

/// Whether a field is present with a value: `revoked_at` says a token is revoked whatever format
/// its time is in.
pub fn is_set<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(!matches!(Option::<Value>::deserialize(d)?, None | Some(Value::Null)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Token {
        #[serde(default, deserialize_with = "timestamp")]
        at: Option<DateTime<Utc>>,
        #[serde(default, deserialize_with = "is_set")]
        revoked: bool,
    }

    fn read(json: &str) -> Token {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn naive_and_offset_timestamps_are_the_same_instant() {
        let naive = read(r#"{"at": "2026-12-06T16:20:27.562895"}"#).at.unwrap();
        let zulu = read(r#"{"at": "2026-12-06T16:20:27.562895Z"}"#).at.unwrap();
        let offset = read(r#"{"at": "2026-12-06T17:20:27.562895+01:00"}"#).at.unwrap();
        assert_eq!(naive, zulu);
        assert_eq!(naive, offset);
        assert_eq!(
            read(r#"{"at": "2026-12-06T16:25:27"}"#).at.unwrap().to_rfc3339(),
            "2026-12-06T16:25:27+00:00"
        );
    }

    #[test]
    fn an_unreadable_timestamp_is_absent_not_an_error() {
        for json in [
            r#"{"at": "yesterday"}"#,
            r#"{"at": 1796574327}"#,
            r#"{"at": null}"#,
            "{}",
        ] {
            assert!(read(json).at.is_none(), "{json}");
        }
    }

    #[test]
    fn a_revocation_counts_whatever_its_format() {
        assert!(read(r#"{"revoked": "not a time"}"#).revoked);
        assert!(read(r#"{"revoked": "2026-12-06T16:20:27.562895"}"#).revoked);
        assert!(!read(r#"{"revoked": null}"#).revoked);
        assert!(!read("{}").revoked);
    }
}
