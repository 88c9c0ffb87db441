//! Small JSON and time helpers shared by the stand-ins.

use axum::body::Bytes;
use chrono::{SecondsFormat, Utc};
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
