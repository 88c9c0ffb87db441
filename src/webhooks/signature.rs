//! Webhook signature schemes: who may knock on the front door.
//!
//! Each source signs its deliveries with an HMAC-SHA256 over the raw body (and, for some, a timestamp and id);
//! the exact schemes are in the "Webhook sources" section of `contracts.md`. Verification here is deliberately
//! strict and fail-closed:
//!
//! * a source without a usable secret rejects everything;
//! * the headers a scheme needs must each appear exactly once and be printable ASCII;
//! * timestamps are plain decimal seconds and must be within the replay window (inclusive);
//! * every configured secret is tried (rotation), and every comparison is constant-time, so neither the
//!   signature bytes nor which secret matched leak through timing.
//!
//! The body is only ever fed to the MAC as opaque bytes: it is never parsed here.

use std::borrow::Cow;
use std::time::Duration;

use axum::http::HeaderMap;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

use crate::config::{Secret, SecretList};

type HmacSha256 = Hmac<Sha256>;

/// Length of an HMAC-SHA256 tag in bytes.
const TAG_LEN: usize = 32;
type Tag = [u8; TAG_LEN];

/// The longest timestamp we accept, in digits. Twelve digits reach the year 33658, far beyond any real clock,
/// while keeping parsing trivially overflow-free.
const MAX_TIMESTAMP_DIGITS: usize = 12;

// Header names, lower case as `HeaderMap` stores them.
const SLACK_SIGNATURE: &str = "x-slack-signature";
const SLACK_TIMESTAMP: &str = "x-slack-request-timestamp";
const GITHUB_SIGNATURE: &str = "x-hub-signature-256";
const GITHUB_DELIVERY: &str = "x-github-delivery";
const PAGERDUTY_SIGNATURE: &str = "x-pagerduty-signature";
const PAGERDUTY_WEBHOOK_ID: &str = "x-webhook-id";
const STANDARD_ID: &str = "webhook-id";
const STANDARD_TIMESTAMP: &str = "webhook-timestamp";
const STANDARD_SIGNATURE: &str = "webhook-signature";

/// Standard Webhooks secrets and signatures are standard-alphabet base64. Padding is accepted whether present or
/// not: a secret pasted without its trailing `=` is still the same key, and it costs nothing in strictness
/// because the decoded signature length is checked exactly anyway.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A webhook sender, each with its own signature scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Slack,
    GitHub,
    PagerDuty,
    IncidentIo,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::Slack, Source::GitHub, Source::PagerDuty, Source::IncidentIo];

    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Slack => "slack",
            Source::GitHub => "github",
            Source::PagerDuty => "pagerduty",
            Source::IncidentIo => "incidentio",
        }
    }

    /// The canonical names (any case), plus the spellings people naturally type for Incident.io.
    pub fn parse(s: &str) -> Option<Source> {
        match s.to_ascii_lowercase().as_str() {
            "slack" => Some(Source::Slack),
            "github" => Some(Source::GitHub),
            "pagerduty" => Some(Source::PagerDuty),
            "incidentio" | "incident.io" | "incident-io" => Some(Source::IncidentIo),
            _ => None,
        }
    }
}

/// Why a delivery was refused. All of them are answered with 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// No usable secret is configured for the source: everything is rejected (fail closed).
    NotConfigured,
    MissingSignature,
    MissingTimestamp,
    /// The Standard Webhooks `webhook-id` is absent, empty or not printable ASCII.
    MissingId,
    /// A signature, timestamp or id header appears more than once, so which one was signed is ambiguous.
    DuplicateHeader,
    /// Wrong prefix, bad hex or base64, wrong length, or not printable ASCII.
    MalformedSignature,
    /// Not a plain decimal integer of at most 12 digits (no sign, no spaces).
    MalformedTimestamp,
    StaleTimestamp,
    FutureTimestamp,
    /// Well-formed, but no configured secret produces it.
    BadSignature,
}

impl Rejection {
    /// A stable machine-readable code, used in the error body and as a metrics label.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NotConfigured => "source_not_configured",
            Rejection::MissingSignature => "missing_signature",
            Rejection::MissingTimestamp => "missing_timestamp",
            Rejection::MissingId => "missing_webhook_id",
            Rejection::DuplicateHeader => "duplicate_header",
            Rejection::MalformedSignature => "malformed_signature",
            Rejection::MalformedTimestamp => "malformed_timestamp",
            Rejection::StaleTimestamp => "stale_timestamp",
            Rejection::FutureTimestamp => "future_timestamp",
            Rejection::BadSignature => "bad_signature",
        }
    }

    /// Human-readable text for the sender. It never mentions secrets, expected signatures or the body.
    pub fn message(&self) -> &'static str {
        match self {
            Rejection::NotConfigured => "webhooks from this source are not accepted: no signing secret is configured",
            Rejection::MissingSignature => "the signature header is missing",
            Rejection::MissingTimestamp => "the timestamp header is missing",
            Rejection::MissingId => "the webhook-id header is missing, empty or not printable ASCII",
            Rejection::DuplicateHeader => "a signature, timestamp or id header appears more than once",
            Rejection::MalformedSignature => "the signature header is not in the expected format",
            Rejection::MalformedTimestamp => "the timestamp header is not a plain Unix time in seconds",
            Rejection::StaleTimestamp => "the timestamp is older than the replay window allows",
            Rejection::FutureTimestamp => "the timestamp is further in the future than the replay window allows",
            Rejection::BadSignature => "the signature does not match the body for any configured secret",
        }
    }
}

/// Verifies a delivery of `source` over the raw body bytes. `now_unix` is the current Unix time in seconds.
///
/// Checks run cheapest-first and in a fixed order: configuration, then the presence and uniqueness of every
/// needed header, then their format, then the replay window, and only then the MAC.
pub fn verify(
    source: Source,
    headers: &HeaderMap,
    body: &[u8],
    secrets: &SecretList,
    now_unix: i64,
    window: Duration,
) -> Result<(), Rejection> {
    let keys: Vec<Cow<'_, [u8]>> = secrets.iter().filter_map(|s| signing_key(source, s)).collect();
    if keys.is_empty() {
        return Err(Rejection::NotConfigured);
    }

    match source {
        Source::Slack => {
            let signature = one_header(headers, SLACK_SIGNATURE, Rejection::MissingSignature)?;
            let timestamp = one_header(headers, SLACK_TIMESTAMP, Rejection::MissingTimestamp)?;
            let candidates = parse_prefixed_hex(signature, "v0=")?;
            let (timestamp, timestamp_text) = parse_timestamp(timestamp)?;
            check_window(timestamp, now_unix, window)?;
            // The timestamp is signed exactly as sent (leading zeros included), so use its text, not the number.
            matches_any(&keys, &candidates, &[b"v0:", timestamp_text.as_bytes(), b":", body])
        }
        Source::GitHub => {
            let signature = one_header(headers, GITHUB_SIGNATURE, Rejection::MissingSignature)?;
            let candidates = parse_prefixed_hex(signature, "sha256=")?;
            matches_any(&keys, &candidates, &[body])
        }
        Source::PagerDuty => {
            let signature = one_header(headers, PAGERDUTY_SIGNATURE, Rejection::MissingSignature)?;
            let candidates = parse_pagerduty_signatures(signature)?;
            matches_any(&keys, &candidates, &[body])
        }
        Source::IncidentIo => {
            let signature = one_header(headers, STANDARD_SIGNATURE, Rejection::MissingSignature)?;
            let timestamp = one_header(headers, STANDARD_TIMESTAMP, Rejection::MissingTimestamp)?;
            let id = one_header(headers, STANDARD_ID, Rejection::MissingId)?;
            // The id is also the dedupe key, so an empty or unprintable one is as good as none.
            let id = printable_ascii(id)
                .filter(|id| !id.is_empty())
                .ok_or(Rejection::MissingId)?;
            let candidates = parse_standard_signatures(signature)?;
            let (timestamp, timestamp_text) = parse_timestamp(timestamp)?;
            check_window(timestamp, now_unix, window)?;
            matches_any(
                &keys,
                &candidates,
                &[id.as_bytes(), b".", timestamp_text.as_bytes(), b".", body],
            )
        }
    }
}

/// Headers (lower-case name, value) that make `body` a correctly signed delivery of `source` with the FIRST secret,
/// for tests and the `orchestrator webhook sign` operator command.
///
/// `now_unix` becomes the timestamp; `delivery_id` becomes Standard Webhooks' `webhook-id`, and is also sent as
/// GitHub's `X-GitHub-Delivery` and PagerDuty's `X-Webhook-Id` so the result is a complete delivery (Slack has no
/// delivery-id header: its dedupe key is in the body).
///
/// Errors: `NotConfigured` if there is no (non-empty) first secret; `MalformedSignature` if an Incident.io secret
/// does not decode to a key; `MalformedTimestamp` if `now_unix` is not a timestamp `verify` would accept (negative
/// or more than 12 digits); `MissingId` if a needed `delivery_id` is empty or not printable ASCII.
pub fn signed_headers(
    source: Source,
    secrets: &SecretList,
    body: &[u8],
    now_unix: i64,
    delivery_id: &str,
) -> Result<Vec<(String, String)>, Rejection> {
    let secret = secrets.iter().next().ok_or(Rejection::NotConfigured)?;
    let key = signing_key(source, secret).ok_or(match source {
        Source::IncidentIo => Rejection::MalformedSignature,
        _ => Rejection::NotConfigured,
    })?;
    // Refuse to produce headers that `verify` would refuse, rather than hand the operator a dud.
    let timestamp = now_unix.to_string();
    let timestamp_ok = parse_timestamp(timestamp.as_bytes()).is_ok();
    let id_ok = printable_ascii(delivery_id.as_bytes()).is_some_and(|id| !id.is_empty());

    let header = |name: &str, value: String| (name.to_string(), value);
    let headers = match source {
        Source::Slack => {
            if !timestamp_ok {
                return Err(Rejection::MalformedTimestamp);
            }
            let tag = sign(&key, &[b"v0:", timestamp.as_bytes(), b":", body]);
            vec![
                header(SLACK_TIMESTAMP, timestamp),
                header(SLACK_SIGNATURE, format!("v0={}", hex::encode(tag))),
            ]
        }
        Source::GitHub => {
            if !id_ok {
                return Err(Rejection::MissingId);
            }
            let tag = sign(&key, &[body]);
            vec![
                header(GITHUB_DELIVERY, delivery_id.to_string()),
                header(GITHUB_SIGNATURE, format!("sha256={}", hex::encode(tag))),
            ]
        }
        Source::PagerDuty => {
            if !id_ok {
                return Err(Rejection::MissingId);
            }
            let tag = sign(&key, &[body]);
            vec![
                header(PAGERDUTY_WEBHOOK_ID, delivery_id.to_string()),
                header(PAGERDUTY_SIGNATURE, format!("v1={}", hex::encode(tag))),
            ]
        }
        Source::IncidentIo => {
            if !timestamp_ok {
                return Err(Rejection::MalformedTimestamp);
            }
            if !id_ok {
                return Err(Rejection::MissingId);
            }
            let tag = sign(&key, &[delivery_id.as_bytes(), b".", timestamp.as_bytes(), b".", body]);
            vec![
                header(STANDARD_ID, delivery_id.to_string()),
                header(STANDARD_TIMESTAMP, timestamp),
                header(STANDARD_SIGNATURE, format!("v1,{}", BASE64.encode(tag))),
            ]
        }
    };
    Ok(headers)
}

/// Whether `secret` can ever verify a delivery of `source`, so configuration can be checked at startup instead
/// of every delivery failing with `NotConfigured`/`BadSignature`. Unusable: an empty secret (an empty HMAC key is
/// public knowledge) or, for Incident.io, one that is not base64 (after an optional `whsec_` prefix).
pub fn secret_is_usable(source: Source, secret: &Secret) -> bool {
    signing_key(source, secret).is_some()
}

/// The HMAC key a secret stands for, or `None` if it can never be used (then `verify` skips it).
fn signing_key(source: Source, secret: &Secret) -> Option<Cow<'_, [u8]>> {
    let raw = secret.expose();
    let key: Cow<'_, [u8]> = match source {
        // Slack, GitHub and PagerDuty use the secret string's bytes as they are.
        Source::Slack | Source::GitHub | Source::PagerDuty => Cow::Borrowed(raw.as_bytes()),
        // Standard Webhooks: the secret is base64 of the key, conventionally prefixed with `whsec_`.
        Source::IncidentIo => Cow::Owned(BASE64.decode(raw.strip_prefix("whsec_").unwrap_or(raw)).ok()?),
    };
    // An empty key would make every signature forgeable; treat it as no secret at all.
    (!key.is_empty()).then_some(key)
}

/// HMAC-SHA256 of the concatenation of `parts`, fed piecewise so a large body is never copied.
fn sign(key: &[u8], parts: &[&[u8]]) -> Tag {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Accepts if any candidate equals the MAC under any key. Every key and every candidate is always tried and the
/// results are combined without branching, so the time taken does not depend on which (if any) matched.
fn matches_any(keys: &[Cow<'_, [u8]>], candidates: &[Tag], parts: &[&[u8]]) -> Result<(), Rejection> {
    let mut matched = Choice::from(0);
    for key in keys {
        let expected = sign(key, parts);
        for candidate in candidates {
            matched |= expected.ct_eq(candidate);
        }
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(Rejection::BadSignature)
    }
}

/// The single value of a header: absent is `missing`; repeated is `DuplicateHeader`, because we could not tell
/// which copy the sender signed (and an attacker could add one).
fn one_header<'a>(headers: &'a HeaderMap, name: &'static str, missing: Rejection) -> Result<&'a [u8], Rejection> {
    let mut values = headers.get_all(name).iter();
    let first = values.next().ok_or(missing)?;
    if values.next().is_some() {
        return Err(Rejection::DuplicateHeader);
    }
    Ok(first.as_bytes())
}

/// The value as text if it is entirely printable ASCII (space included, tabs and control bytes not).
fn printable_ascii(bytes: &[u8]) -> Option<&str> {
    if bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

/// A plain decimal Unix time: digits only, at most 12 of them. Returns the value and the text that was signed.
fn parse_timestamp(raw: &[u8]) -> Result<(i64, &str), Rejection> {
    if raw.is_empty() || raw.len() > MAX_TIMESTAMP_DIGITS || !raw.iter().all(u8::is_ascii_digit) {
        return Err(Rejection::MalformedTimestamp);
    }
    // Only digits, so this is UTF-8, and twelve digits always fit in an i64.
    let text = std::str::from_utf8(raw).map_err(|_| Rejection::MalformedTimestamp)?;
    let value = text.parse().map_err(|_| Rejection::MalformedTimestamp)?;
    Ok((value, text))
}

/// Accepts timestamps at most `window` away from `now_unix` in either direction (inclusive). Saturating
/// arithmetic keeps absurd clocks or windows from overflowing; they simply fail the check.
fn check_window(timestamp: i64, now_unix: i64, window: Duration) -> Result<(), Rejection> {
    let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
    if timestamp <= now_unix {
        if now_unix.saturating_sub(timestamp) > window {
            return Err(Rejection::StaleTimestamp);
        }
    } else if timestamp.saturating_sub(now_unix) > window {
        return Err(Rejection::FutureTimestamp);
    }
    Ok(())
}

/// Exactly 64 hex digits (either case) encoding one tag.
fn decode_hex_tag(text: &str) -> Option<Tag> {
    let mut tag = [0u8; TAG_LEN];
    (text.len() == 2 * TAG_LEN && hex::decode_to_slice(text, &mut tag).is_ok()).then_some(tag)
}

/// `<prefix><64 hex>`, as Slack (`v0=`) and GitHub (`sha256=`) send it. The prefix is case-sensitive: both
/// senders always use lower case, and accepting variants would only widen what we parse.
fn parse_prefixed_hex(raw: &[u8], prefix: &str) -> Result<Vec<Tag>, Rejection> {
    let text = printable_ascii(raw).ok_or(Rejection::MalformedSignature)?;
    let hex = text.strip_prefix(prefix).ok_or(Rejection::MalformedSignature)?;
    let tag = decode_hex_tag(hex).ok_or(Rejection::MalformedSignature)?;
    Ok(vec![tag])
}

/// PagerDuty v3: `v1=<hex>[, v1=<hex>...]`. Several entries appear while PagerDuty rotates its secret. Entries
/// of other versions are skipped (a future scheme must not break today's verification), but a malformed `v1`
/// entry, an empty or unversioned entry, or the absence of any `v1` entry makes the whole header malformed:
/// PagerDuty never sends those, so they can only come from tampering or a broken proxy.
fn parse_pagerduty_signatures(raw: &[u8]) -> Result<Vec<Tag>, Rejection> {
    let text = printable_ascii(raw).ok_or(Rejection::MalformedSignature)?;
    let mut tags = Vec::new();
    for entry in text.split(',') {
        let (version, value) = entry
            .trim_matches(' ')
            .split_once('=')
            .ok_or(Rejection::MalformedSignature)?;
        if version == "v1" {
            tags.push(decode_hex_tag(value).ok_or(Rejection::MalformedSignature)?);
        }
    }
    if tags.is_empty() {
        return Err(Rejection::MalformedSignature);
    }
    Ok(tags)
}

/// Standard Webhooks: space-separated `v1,<base64>` entries (several during secret rotation). Same policy as
/// PagerDuty: other versions (e.g. the asymmetric `v1a`) are skipped, anything malformed rejects the header.
fn parse_standard_signatures(raw: &[u8]) -> Result<Vec<Tag>, Rejection> {
    let text = printable_ascii(raw).ok_or(Rejection::MalformedSignature)?;
    let mut tags = Vec::new();
    for entry in text.split(' ').filter(|e| !e.is_empty()) {
        let (version, value) = entry.split_once(',').ok_or(Rejection::MalformedSignature)?;
        if version == "v1" {
            let bytes = BASE64.decode(value).map_err(|_| Rejection::MalformedSignature)?;
            tags.push(Tag::try_from(bytes.as_slice()).map_err(|_| Rejection::MalformedSignature)?);
        }
    }
    if tags.is_empty() {
        return Err(Rejection::MalformedSignature);
    }
    Ok(tags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    const WINDOW: Duration = Duration::from_secs(300);
    const NOW: i64 = 1_700_000_000;

    fn secrets(values: &[&str]) -> SecretList {
        SecretList::new(values.iter().map(|v| Secret::new(*v)).collect())
    }

    fn header_map(pairs: &[(String, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn with_header(mut map: HeaderMap, name: &'static str, value: &[u8]) -> HeaderMap {
        map.insert(name, HeaderValue::from_bytes(value).unwrap());
        map
    }

    /// A secret that works for every source (valid base64 for Incident.io).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const OTHER_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

    /// A correctly signed delivery of `source` at `NOW`.
    fn delivery(source: Source, secret: &str, body: &[u8]) -> HeaderMap {
        header_map(&signed_headers(source, &secrets(&[secret]), body, NOW, "msg_test_1").unwrap())
    }

    fn check(source: Source, headers: &HeaderMap, body: &[u8], secret_list: &[&str]) -> Result<(), Rejection> {
        verify(source, headers, body, &secrets(secret_list), NOW, WINDOW)
    }

    // ---- Source and Rejection ----

    #[test]
    fn source_names_round_trip() {
        for source in Source::ALL {
            assert_eq!(Source::parse(source.as_str()), Some(source));
            assert_eq!(Source::parse(&source.as_str().to_uppercase()), Some(source));
        }
        assert_eq!(Source::parse("Incident.io"), Some(Source::IncidentIo));
        assert_eq!(Source::parse("incident-io"), Some(Source::IncidentIo));
        assert_eq!(Source::parse("GitHub"), Some(Source::GitHub));
        assert_eq!(Source::parse("gitlab"), None);
        assert_eq!(Source::parse(""), None);
    }

    #[test]
    fn rejection_codes_are_distinct_and_messages_are_present() {
        let all = [
            Rejection::NotConfigured,
            Rejection::MissingSignature,
            Rejection::MissingTimestamp,
            Rejection::MissingId,
            Rejection::DuplicateHeader,
            Rejection::MalformedSignature,
            Rejection::MalformedTimestamp,
            Rejection::StaleTimestamp,
            Rejection::FutureTimestamp,
            Rejection::BadSignature,
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(Rejection::code).collect();
        assert_eq!(codes.len(), all.len());
        assert!(all.iter().all(|r| !r.message().is_empty()));
    }

    // ---- Published examples ----

    const SLACK_BODY: &str = concat!(
        "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&",
        "channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&",
        "response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&",
        "trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c",
    );
    const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const SLACK_SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    fn slack_example_headers() -> HeaderMap {
        header_map(&[
            ("x-slack-request-timestamp".into(), "1531420618".into()),
            ("x-slack-signature".into(), SLACK_SIG.into()),
        ])
    }

    #[test]
    fn slack_published_example() {
        let list = secrets(&[SLACK_SECRET]);
        let ok = verify(
            Source::Slack,
            &slack_example_headers(),
            SLACK_BODY.as_bytes(),
            &list,
            1531420618 + 10,
            WINDOW,
        );
        assert_eq!(ok, Ok(()));
        let produced = signed_headers(Source::Slack, &list, SLACK_BODY.as_bytes(), 1531420618, "unused").unwrap();
        assert!(produced.contains(&("x-slack-signature".into(), SLACK_SIG.into())));
        assert!(produced.contains(&("x-slack-request-timestamp".into(), "1531420618".into())));
    }

    #[test]
    fn github_published_example() {
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let headers = header_map(&[("x-hub-signature-256".into(), sig.into())]);
        assert_eq!(
            check(
                Source::GitHub,
                &headers,
                b"Hello, World!",
                &["It's a Secret to Everybody"]
            ),
            Ok(())
        );
        let produced = signed_headers(
            Source::GitHub,
            &secrets(&["It's a Secret to Everybody"]),
            b"Hello, World!",
            NOW,
            "d-1",
        )
        .unwrap();
        assert!(produced.contains(&("x-hub-signature-256".into(), sig.into())));
        assert!(produced.contains(&("x-github-delivery".into(), "d-1".into())));
    }

    #[test]
    fn standard_webhooks_published_example() {
        let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let id = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let sig = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
        let headers = header_map(&[
            ("webhook-id".into(), id.into()),
            ("webhook-timestamp".into(), "1649367553".into()),
            ("webhook-signature".into(), sig.into()),
        ]);
        let list = secrets(&[secret]);
        assert_eq!(
            verify(Source::IncidentIo, &headers, body, &list, 1649367553, WINDOW),
            Ok(())
        );
        // The same key without the `whsec_` prefix is the same secret.
        let bare = secrets(&["C2FVsBQIhrscChlQIMV+b5sSYspob7oD"]);
        assert_eq!(
            verify(Source::IncidentIo, &headers, body, &bare, 1649367553, WINDOW),
            Ok(())
        );
        let produced = signed_headers(Source::IncidentIo, &list, body, 1649367553, id).unwrap();
        assert!(produced.contains(&("webhook-signature".into(), sig.into())));
        // Rotation-style list with an unknown version first and the real one second.
        let multi = with_header(headers, STANDARD_SIGNATURE, format!("v1a,Zm9vYmFy {sig}").as_bytes());
        assert_eq!(
            verify(Source::IncidentIo, &multi, body, &list, 1649367553, WINDOW),
            Ok(())
        );
    }

    #[test]
    fn pagerduty_hand_computed_and_multiple_entries() {
        let secret = "pd-secret-raw-bytes";
        let body = br#"{"event":{"id":"01ABC","event_type":"incident.triggered"}}"#;
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        let expected = hex::encode(mac.finalize().into_bytes());

        let produced = signed_headers(Source::PagerDuty, &secrets(&[secret]), body, NOW, "wh-1").unwrap();
        assert!(produced.contains(&("x-pagerduty-signature".into(), format!("v1={expected}"))));
        assert!(produced.contains(&("x-webhook-id".into(), "wh-1".into())));
        assert_eq!(
            check(Source::PagerDuty, &header_map(&produced), body, &[secret]),
            Ok(())
        );

        let wrong = "0".repeat(64);
        for value in [
            format!("v1={wrong},v1={expected}"),
            format!("v1={wrong}, v1={expected}"),
            format!("v2=abc, v1={wrong}, v1={expected}"),
            format!("v1={}", expected.to_uppercase()),
        ] {
            let headers = header_map(&[("x-pagerduty-signature".into(), value.clone())]);
            assert_eq!(check(Source::PagerDuty, &headers, body, &[secret]), Ok(()), "{value}");
        }
        let only_wrong = header_map(&[("x-pagerduty-signature".into(), format!("v1={wrong}, v1={wrong}"))]);
        assert_eq!(
            check(Source::PagerDuty, &only_wrong, body, &[secret]),
            Err(Rejection::BadSignature)
        );
        for value in [
            format!("v2={expected}"),
            format!("v1={expected},"),
            format!("v1={expected},v1=zz"),
            format!("v1={}", &expected[..62]),
            expected.clone(),
            String::new(),
        ] {
            let headers = header_map(&[("x-pagerduty-signature".into(), value.clone())]);
            assert_eq!(
                check(Source::PagerDuty, &headers, body, &[secret]),
                Err(Rejection::MalformedSignature),
                "{value}"
            );
        }
    }

    // ---- Secrets ----

    #[test]
    fn no_secrets_rejects_everything_first() {
        for source in Source::ALL {
            let headers = delivery(source, SECRET, b"{}");
            assert_eq!(check(source, &headers, b"{}", &[]), Err(Rejection::NotConfigured));
            // Even before looking at headers.
            assert_eq!(
                check(source, &HeaderMap::new(), b"{}", &[]),
                Err(Rejection::NotConfigured)
            );
            assert_eq!(
                signed_headers(source, &secrets(&[]), b"{}", NOW, "id"),
                Err(Rejection::NotConfigured)
            );
        }
    }

    #[test]
    fn unusable_secrets_count_as_not_configured() {
        // An empty key would let anyone sign: it must never be used.
        for source in Source::ALL {
            assert!(!secret_is_usable(source, &Secret::new("")));
            assert_eq!(
                check(source, &HeaderMap::new(), b"", &[""]),
                Err(Rejection::NotConfigured)
            );
        }
        assert!(!secret_is_usable(Source::IncidentIo, &Secret::new("whsec_")));
        assert!(!secret_is_usable(Source::IncidentIo, &Secret::new("whsec_not base64!")));
        assert!(secret_is_usable(Source::IncidentIo, &Secret::new(SECRET)));
        assert!(secret_is_usable(Source::GitHub, &Secret::new("whsec_not base64!")));
        assert_eq!(
            signed_headers(Source::IncidentIo, &secrets(&["not base64!"]), b"", NOW, "id"),
            Err(Rejection::MalformedSignature)
        );
        // An undecodable secret next to a good one is skipped, not fatal.
        let headers = delivery(Source::IncidentIo, SECRET, b"x");
        assert_eq!(check(Source::IncidentIo, &headers, b"x", &["bad!", SECRET]), Ok(()));
    }

    #[test]
    fn wrong_secret_and_rotation() {
        for source in Source::ALL {
            let headers = delivery(source, SECRET, b"payload");
            assert_eq!(
                check(source, &headers, b"payload", &[OTHER_SECRET]),
                Err(Rejection::BadSignature),
                "{source:?}"
            );
            assert_eq!(
                check(source, &headers, b"payload", &[OTHER_SECRET, SECRET]),
                Ok(()),
                "{source:?}"
            );
            assert_eq!(
                check(source, &headers, b"payload", &[SECRET, OTHER_SECRET]),
                Ok(()),
                "{source:?}"
            );
        }
    }

    #[test]
    fn delivery_for_one_source_is_rejected_by_another() {
        // Each source configured with its own secret, as in production.
        let secret_of = |s: Source| match s {
            Source::Slack => "whsec_c2xhY2stc2VjcmV0LWtleQ==",
            Source::GitHub => "whsec_Z2l0aHViLXNlY3JldC1rZXk=",
            Source::PagerDuty => "whsec_cGFnZXJkdXR5LXNlY3JldA==",
            Source::IncidentIo => "whsec_aW5jaWRlbnRpby1zZWNyZXQ=",
        };
        for signer in Source::ALL {
            let headers = delivery(signer, secret_of(signer), b"{}");
            for verifier in Source::ALL.into_iter().filter(|v| *v != signer) {
                let result = check(verifier, &headers, b"{}", &[secret_of(verifier)]);
                assert!(result.is_err(), "{signer:?} delivery accepted as {verifier:?}");
            }
        }
        // Even with the header renamed into the other scheme's format, a different secret does not verify.
        let github = delivery(Source::GitHub, secret_of(Source::GitHub), b"{}");
        let hex = github
            .get(GITHUB_SIGNATURE)
            .unwrap()
            .to_str()
            .unwrap()
            .strip_prefix("sha256=")
            .unwrap()
            .to_string();
        let as_pd = header_map(&[("x-pagerduty-signature".into(), format!("v1={hex}"))]);
        assert_eq!(
            check(Source::PagerDuty, &as_pd, b"{}", &[secret_of(Source::PagerDuty)]),
            Err(Rejection::BadSignature)
        );
        let as_slack = header_map(&[
            ("x-slack-signature".into(), format!("v0={hex}")),
            ("x-slack-request-timestamp".into(), NOW.to_string()),
        ]);
        assert_eq!(
            check(Source::Slack, &as_slack, b"{}", &[secret_of(Source::Slack)]),
            Err(Rejection::BadSignature)
        );
    }

    // ---- Timestamps ----

    fn at(source: Source, now: i64) -> Result<(), Rejection> {
        let headers = delivery(source, SECRET, b"{}");
        verify(source, &headers, b"{}", &secrets(&[SECRET]), now, WINDOW)
    }

    #[test]
    fn window_boundaries_are_inclusive() {
        for source in [Source::Slack, Source::IncidentIo] {
            // The delivery is stamped NOW; move the clock instead.
            assert_eq!(at(source, NOW + 300), Ok(()));
            assert_eq!(at(source, NOW + 301), Err(Rejection::StaleTimestamp));
            assert_eq!(at(source, NOW - 300), Ok(()));
            assert_eq!(at(source, NOW - 301), Err(Rejection::FutureTimestamp));
            assert_eq!(at(source, i64::MAX), Err(Rejection::StaleTimestamp));
            assert_eq!(at(source, i64::MIN), Err(Rejection::FutureTimestamp));
        }
        // Sources without a signed timestamp ignore the clock.
        assert_eq!(at(Source::GitHub, 0), Ok(()));
        assert_eq!(at(Source::PagerDuty, i64::MAX), Ok(()));
    }

    #[test]
    fn huge_windows_do_not_overflow() {
        let headers = delivery(Source::Slack, SECRET, b"{}");
        let list = secrets(&[SECRET]);
        assert_eq!(
            verify(Source::Slack, &headers, b"{}", &list, i64::MAX, Duration::MAX),
            Ok(())
        );
        assert_eq!(
            verify(Source::Slack, &headers, b"{}", &list, i64::MIN, Duration::MAX),
            Ok(())
        );
        assert_eq!(
            verify(Source::Slack, &headers, b"{}", &list, NOW + 1, Duration::ZERO),
            Err(Rejection::StaleTimestamp)
        );
        assert_eq!(
            verify(Source::Slack, &headers, b"{}", &list, NOW, Duration::ZERO),
            Ok(())
        );
    }

    #[test]
    fn malformed_timestamps() {
        for (source, name) in [
            (Source::Slack, SLACK_TIMESTAMP),
            (Source::IncidentIo, STANDARD_TIMESTAMP),
        ] {
            for bad in [
                &b"99999999999999999999"[..],
                b"1234567890123",
                b"-1700000000",
                b"+1700000000",
                b" 1700000000",
                b"1700000000 ",
                b"1700000000.5",
                b"1e9",
                b"0x65",
                b"",
                "１７００".as_bytes(),
                b"\xff\xfe",
            ] {
                let headers = with_header(delivery(source, SECRET, b"{}"), name, bad);
                assert_eq!(
                    check(source, &headers, b"{}", &[SECRET]),
                    Err(Rejection::MalformedTimestamp),
                    "{bad:?}"
                );
            }
        }
        // Leading zeros are a plain decimal integer; the signature covers the text as sent.
        let list = secrets(&[SLACK_SECRET]);
        let padded = with_header(slack_example_headers(), SLACK_TIMESTAMP, b"01531420618");
        let result = verify(Source::Slack, &padded, SLACK_BODY.as_bytes(), &list, 1531420618, WINDOW);
        assert_eq!(result, Err(Rejection::BadSignature));
        // signed_headers refuses to stamp a time verify would refuse.
        for source in [Source::Slack, Source::IncidentIo] {
            for now in [-1, 1_000_000_000_000, i64::MAX, i64::MIN] {
                let produced = signed_headers(source, &secrets(&[SECRET]), b"", now, "id");
                assert_eq!(produced, Err(Rejection::MalformedTimestamp));
            }
        }
        // Twelve digits is the maximum and still parses.
        assert!(signed_headers(Source::Slack, &secrets(&[SECRET]), b"", 999_999_999_999, "id").is_ok());
    }

    // ---- Signature formats ----

    #[test]
    fn slack_and_github_signature_formats() {
        let list = [SLACK_SECRET];
        let hex = SLACK_SIG.strip_prefix("v0=").unwrap();
        let slack = |value: &[u8]| {
            let headers = with_header(slack_example_headers(), SLACK_SIGNATURE, value);
            verify(
                Source::Slack,
                &headers,
                SLACK_BODY.as_bytes(),
                &secrets(&list),
                1531420618,
                WINDOW,
            )
        };
        assert_eq!(slack(format!("v0={}", hex.to_uppercase()).as_bytes()), Ok(()));
        for bad in [
            format!("v1={hex}"),
            format!("V0={hex}"),
            format!("v0={}", &hex[..63]),
            format!("v0={}", &hex[..62]),
            format!("v0={hex}00"),
            format!("v0={}g", &hex[..63]),
            format!("v0= {hex}"),
            format!("v0={hex},v0={hex}"),
            hex.to_string(),
            "v0=".to_string(),
            String::new(),
        ] {
            assert_eq!(slack(bad.as_bytes()), Err(Rejection::MalformedSignature), "{bad}");
        }
        let mut non_ascii = format!("v0={}", &hex[..62]).into_bytes();
        non_ascii.extend_from_slice("é".as_bytes());
        assert_eq!(slack(&non_ascii), Err(Rejection::MalformedSignature));

        let hex = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let github = |value: &str| {
            let headers = header_map(&[("x-hub-signature-256".into(), value.into())]);
            check(
                Source::GitHub,
                &headers,
                b"Hello, World!",
                &["It's a Secret to Everybody"],
            )
        };
        assert_eq!(github(&format!("sha256={}", hex.to_uppercase())), Ok(()));
        for bad in [
            format!("sha1={hex}"),
            format!("SHA256={hex}"),
            format!("sha256={}", &hex[..40]),
            hex.into(),
        ] {
            assert_eq!(github(&bad), Err(Rejection::MalformedSignature), "{bad}");
        }
        // A correct-looking but wrong MAC is a bad signature, not a malformed one.
        assert_eq!(
            github(&format!("sha256={}", "ab".repeat(32))),
            Err(Rejection::BadSignature)
        );
        // The legacy SHA-1 header alone is not enough.
        let legacy = header_map(&[(
            "x-hub-signature".into(),
            "sha1=0123456789abcdef0123456789abcdef01234567".into(),
        )]);
        assert_eq!(
            check(Source::GitHub, &legacy, b"Hello, World!", &["x"]),
            Err(Rejection::MissingSignature)
        );
    }

    #[test]
    fn standard_webhooks_signature_formats() {
        let body = b"{}";
        let base = delivery(Source::IncidentIo, SECRET, body);
        let good = base.get(STANDARD_SIGNATURE).unwrap().to_str().unwrap().to_string();
        let b64 = good.strip_prefix("v1,").unwrap().to_string();
        let run = |value: &[u8]| {
            let headers = with_header(base.clone(), STANDARD_SIGNATURE, value);
            check(Source::IncidentIo, &headers, body, &[SECRET])
        };
        assert_eq!(run(good.as_bytes()), Ok(()));
        assert_eq!(run(format!("v1,{} ", b64.trim_end_matches('=')).as_bytes()), Ok(()));
        assert_eq!(
            run(format!("v1,{}  {good}", BASE64.encode([7u8; 32])).as_bytes()),
            Ok(())
        );
        for bad in [
            format!("v2,{b64}"),
            format!("v1a,{b64}"),
            format!("v1={b64}"),
            format!("v1,{}", &b64[..20]),
            format!("v1,{}", BASE64.encode([0u8; 31])),
            format!("v1,{}", BASE64.encode([0u8; 33])),
            format!("v1,{}!", &b64[..43]),
            format!("{good} garbage"),
            b64.clone(),
            " ".to_string(),
            String::new(),
        ] {
            assert_eq!(run(bad.as_bytes()), Err(Rejection::MalformedSignature), "{bad}");
        }
        assert_eq!(
            run(format!("v1,{}", BASE64.encode([7u8; 32])).as_bytes()),
            Err(Rejection::BadSignature)
        );
        assert_eq!(run(b"v1,\x80\x81"), Err(Rejection::MalformedSignature));

        // The id is signed: changing it breaks the signature; an empty or unprintable one is no id.
        let other_id = with_header(base.clone(), STANDARD_ID, b"msg_other");
        assert_eq!(
            check(Source::IncidentIo, &other_id, body, &[SECRET]),
            Err(Rejection::BadSignature)
        );
        for bad in [&b""[..], b"msg_\xff", b"msg\tid"] {
            let headers = with_header(base.clone(), STANDARD_ID, bad);
            assert_eq!(
                check(Source::IncidentIo, &headers, body, &[SECRET]),
                Err(Rejection::MissingId)
            );
        }
        assert_eq!(
            signed_headers(Source::IncidentIo, &secrets(&[SECRET]), body, NOW, ""),
            Err(Rejection::MissingId)
        );
        assert_eq!(
            signed_headers(Source::GitHub, &secrets(&[SECRET]), body, NOW, "a\nb"),
            Err(Rejection::MissingId)
        );
    }

    // ---- Headers ----

    fn required_headers(source: Source) -> &'static [(&'static str, Rejection)] {
        match source {
            Source::Slack => &[
                (SLACK_SIGNATURE, Rejection::MissingSignature),
                (SLACK_TIMESTAMP, Rejection::MissingTimestamp),
            ],
            Source::GitHub => &[(GITHUB_SIGNATURE, Rejection::MissingSignature)],
            Source::PagerDuty => &[(PAGERDUTY_SIGNATURE, Rejection::MissingSignature)],
            Source::IncidentIo => &[
                (STANDARD_SIGNATURE, Rejection::MissingSignature),
                (STANDARD_TIMESTAMP, Rejection::MissingTimestamp),
                (STANDARD_ID, Rejection::MissingId),
            ],
        }
    }

    #[test]
    fn missing_and_duplicate_headers() {
        for source in Source::ALL {
            let base = delivery(source, SECRET, b"{}");
            assert_eq!(check(source, &base, b"{}", &[SECRET]), Ok(()));
            assert_eq!(
                check(source, &HeaderMap::new(), b"{}", &[SECRET]),
                Err(Rejection::MissingSignature)
            );
            for (name, missing) in required_headers(source) {
                let mut without = base.clone();
                without.remove(*name);
                assert_eq!(
                    check(source, &without, b"{}", &[SECRET]),
                    Err(*missing),
                    "{source:?} {name}"
                );

                // A repeated header is ambiguous even when both copies are identical.
                let mut twice = base.clone();
                let value = twice.get(*name).unwrap().clone();
                twice.append(*name, value);
                assert_eq!(
                    check(source, &twice, b"{}", &[SECRET]),
                    Err(Rejection::DuplicateHeader),
                    "{source:?} {name}"
                );
            }
        }
        // Presence is checked before format: a missing timestamp wins over a malformed signature.
        let mut headers = with_header(delivery(Source::Slack, SECRET, b""), SLACK_SIGNATURE, b"junk");
        headers.remove(SLACK_TIMESTAMP);
        assert_eq!(
            check(Source::Slack, &headers, b"", &[SECRET]),
            Err(Rejection::MissingTimestamp)
        );
        // Format is checked before the window: a malformed signature on a stale delivery is malformed.
        let headers = with_header(delivery(Source::Slack, SECRET, b""), SLACK_SIGNATURE, b"junk");
        let stale = verify(Source::Slack, &headers, b"", &secrets(&[SECRET]), NOW + 10_000, WINDOW);
        assert_eq!(stale, Err(Rejection::MalformedSignature));
        // The window is checked before the MAC: a stale forgery is reported stale.
        let headers = with_header(
            delivery(Source::Slack, SECRET, b""),
            SLACK_SIGNATURE,
            format!("v0={}", "0".repeat(64)).as_bytes(),
        );
        let stale = verify(Source::Slack, &headers, b"", &secrets(&[SECRET]), NOW + 10_000, WINDOW);
        assert_eq!(stale, Err(Rejection::StaleTimestamp));
    }

    // ---- Bodies ----

    #[test]
    fn any_body_bytes_verify() {
        let big = vec![0xa5u8; 5 * 1024 * 1024];
        let bodies: [&[u8]; 4] = [b"", &big, b"\xff\xfe\x00\x80 not utf-8 \xc3", b"{\"ok\":true}"];
        for source in Source::ALL {
            for body in bodies {
                let headers = delivery(source, SECRET, body);
                assert_eq!(
                    check(source, &headers, body, &[SECRET]),
                    Ok(()),
                    "{source:?} len {}",
                    body.len()
                );
            }
            // The signature binds the whole body: a truncated or extended body fails.
            let headers = delivery(source, SECRET, &big);
            assert_eq!(
                check(source, &headers, &big[..big.len() - 1], &[SECRET]),
                Err(Rejection::BadSignature)
            );
            assert_eq!(check(source, &headers, b"", &[SECRET]), Err(Rejection::BadSignature));
        }
    }

    // ---- Properties ----

    fn any_source() -> impl Strategy<Value = Source> {
        prop::sample::select(Source::ALL.to_vec())
    }

    /// Header values: arbitrary bytes, plus values shaped like the real thing so parsing gets past the first check.
    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..80),
            "[0-9]{0,14}".prop_map(String::into_bytes),
            "(v0=|sha256=|v1=|v1,)[0-9a-fA-F+/=]{0,70}( ?[, ]v1[=,][0-9a-zA-Z+/=]{0,70})?".prop_map(String::into_bytes),
            Just(NOW.to_string().into_bytes()),
        ]
    }

    /// Every header name any scheme reads, so that each one gets exercised.
    const ALL_NAMES: [&str; 9] = [
        SLACK_SIGNATURE,
        SLACK_TIMESTAMP,
        GITHUB_SIGNATURE,
        GITHUB_DELIVERY,
        PAGERDUTY_SIGNATURE,
        PAGERDUTY_WEBHOOK_ID,
        STANDARD_ID,
        STANDARD_TIMESTAMP,
        STANDARD_SIGNATURE,
    ];

    proptest! {
        #[test]
        fn verify_never_panics(
            pairs in prop::collection::vec((0..ALL_NAMES.len(), header_value()), 0..8),
            body in prop::collection::vec(any::<u8>(), 0..256),
            now in prop_oneof![Just(NOW), any::<i64>()],
            window_secs in prop_oneof![Just(300u64), any::<u64>()],
        ) {
            let mut headers = HeaderMap::new();
            for (index, value) in pairs {
                // Not every byte string is a legal header value; the HTTP layer would refuse those anyway.
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    headers.append(ALL_NAMES[index], value);
                }
            }
            for source in Source::ALL {
                let window = Duration::from_secs(window_secs);
                let result = verify(source, &headers, &body, &secrets(&[SECRET]), now, window);
                // Random headers essentially never carry a valid MAC.
                prop_assert!(result.is_err());
            }
        }

        #[test]
        fn signed_headers_round_trip(
            source in any_source(),
            body in prop::collection::vec(any::<u8>(), 0..512),
            raw_key in prop::collection::vec(any::<u8>(), 1..64),
            text_secret in "[ -~]{1,64}",
            whsec_prefix in any::<bool>(),
            now in 0i64..=999_999_999_999,
            skew in -300i64..=300,
            id in "[A-Za-z0-9_.-]{1,40}",
        ) {
            let secret = match source {
                Source::IncidentIo if whsec_prefix => format!("whsec_{}", BASE64.encode(&raw_key)),
                Source::IncidentIo => BASE64.encode(&raw_key),
                _ => text_secret,
            };
            let list = secrets(&[&secret]);
            let headers = header_map(&signed_headers(source, &list, &body, now, &id).unwrap());
            prop_assert_eq!(verify(source, &headers, &body, &list, now + skew, WINDOW), Ok(()));
        }

        #[test]
        fn flipping_any_body_byte_fails(
            source in any_source(),
            body in prop::collection::vec(any::<u8>(), 1..512),
            index in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let headers = delivery(source, SECRET, &body);
            let mut tampered = body.clone();
            tampered[index.index(body.len())] ^= flip;
            prop_assert_eq!(check(source, &headers, &tampered, &[SECRET]), Err(Rejection::BadSignature));
        }
    }
}
