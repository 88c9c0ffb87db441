//! Small JSON and time helpers shared by the stand-ins.

use axum::body::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

/// RFC 7386 JSON merge patch: objects merge recursively, `null` deletes a key, anything else
/// (arrays included) replaces. This is both the config service's "deep merge" and Kubernetes'
/// `application/merge-patch+json`.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Parse a request body as JSON; an empty body is `None`.
pub(crate) fn parse_body(bytes: &Bytes) -> Result<Option<Value>, serde_json::Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes).map(Some)
}

/// Now, as RFC 3339 with second precision and a `Z` suffix (the Kubernetes style).
pub(crate) fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A time as the platform's Python services write it: ISO 8601 with microseconds and no offset
/// (`datetime.utcnow().isoformat()`, naive UTC), e.g. `2026-01-09T14:03:27.123456`.
pub(crate) fn naive_utc(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

/// Now, the Python way ([`naive_utc`]).
pub(crate) fn now_naive() -> String {
    naive_utc(Utc::now())
}

/// A random string of letters and digits, like Python's `secrets.token_urlsafe` without `-_`.
pub(crate) fn random_base62(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for byte in uuid::Uuid::new_v4().as_bytes() {
            if out.len() < len {
                out.push(ALPHABET[usize::from(*byte) % ALPHABET.len()] as char);
            }
        }
    }
    out
}

/// A random lower-case hex string of `len` characters (at most 64).
pub(crate) fn random_hex(len: usize) -> String {
    let mut hex = uuid::Uuid::new_v4().simple().to_string();
    hex.push_str(&uuid::Uuid::new_v4().simple().to_string());
    hex.truncate(len);
    hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_merges_objects_replaces_arrays_and_deletes_nulls() {
        let mut target = json!({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": 1});
        merge_patch(
            &mut target,
            &json!({"a": {"c": [3], "n": {"z": null, "y": 2}}, "d": null, "f": true}),
        );
        assert_eq!(
            target,
            json!({"a": {"b": 1, "c": [3], "n": {"y": 2}}, "e": 1, "f": true})
        );
    }
}
