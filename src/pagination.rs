//! Keyset pagination shared by the list endpoints: newest first, with an opaque cursor naming
//! the last row returned (its timestamp and id), so pages stay stable while rows are added.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};

use crate::domain::{OrgId, TeamNodeId, TextEnum};
use crate::error::{ApiError, OrInvalidField};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

pub fn limit(requested: Option<i64>) -> Result<i64, ApiError> {
    match requested {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid_field(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        )),
    }
}

pub fn encode<I: std::fmt::Display>(at: DateTime<Utc>, id: I) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{id}", at.timestamp_micros()))
}

/// `(timestamp, id)` of the last row of the previous page.
pub fn decode(cursor: &str) -> Result<(DateTime<Utc>, String), ApiError> {
    let bad = || ApiError::invalid_field("cursor", "is not a cursor this service issued");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (micros, id) = text.split_once('|').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    // Postgres' timestamps end in the year 294276; a cursor past what it can compare is not ours.
    let at = DateTime::<Utc>::from_timestamp_micros(micros)
        .filter(|at| (1..=9999).contains(&chrono::Datelike::year(at)))
        .ok_or_else(bad)?;
    Ok((at, id.to_string()))
}

/// A page keyed by `(timestamp, uuid)`: the decoded cursor of a list endpoint.
pub fn decode_uuid(cursor: Option<&str>) -> Result<Option<(DateTime<Utc>, uuid::Uuid)>, ApiError> {
    let Some(cursor) = cursor else { return Ok(None) };
    let (at, id) = decode(cursor)?;
    let id = id
        .parse()
        .map_err(|_| ApiError::invalid_field("cursor", "is not a cursor this service issued"))?;
    Ok(Some((at, id)))
}

/// Lists fetch `limit + 1` rows: the extra one says there is a next page, whose cursor is the
/// key of the last row kept (`(timestamp, id)` of a newest-first list).
pub fn split<T, I: std::fmt::Display>(
    rows: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> (DateTime<Utc>, I),
) -> (Vec<T>, Option<String>) {
    split_by(rows, limit, |row| {
        let (at, id) = key(row);
        encode(at, id)
    })
}

/// The same, for a list in another order: `cursor` encodes the last row's key.
pub fn split_by<T>(mut rows: Vec<T>, limit: i64, cursor: impl Fn(&T) -> String) -> (Vec<T>, Option<String>) {
    if rows.len() as i64 <= limit {
        return (rows, None);
    }
    rows.truncate(limit as usize);
    let next = rows.last().map(cursor);
    (rows, next)
}

/// The cursor of a list in (org, team) order.
pub fn encode_team(org: &str, team: &str) -> String {
    // Identifiers never hold a '|'.
    URL_SAFE_NO_PAD.encode(format!("{org}|{team}"))
}

pub fn decode_team(cursor: Option<&str>) -> Result<Option<(String, String)>, ApiError> {
    let Some(cursor) = cursor else { return Ok(None) };
    let bad = || ApiError::invalid_field("cursor", "is not a cursor this service issued");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (org, team) = text.split_once('|').ok_or_else(bad)?;
    let org = OrgId::parse(org).map_err(|_| bad())?;
    let team = TeamNodeId::parse(team).map_err(|_| bad())?;
    Ok(Some((org.into(), team.into())))
}

/// A list filter naming one of a closed set of values: anything else is a 422 listing them.
pub fn enum_filter<T: TextEnum>(value: Option<&str>, field: &str) -> Result<Option<T>, ApiError> {
    value
        .map(str::parse::<T>)
        .transpose()
        .map_err(|_| ApiError::invalid_field(field, format!("must be one of {}", T::names())))
}

/// A list filter naming an org: anything but an identifier (a control character, a NUL that
/// Postgres would refuse) is a 422, never a 500.
pub fn org_filter(value: Option<&str>) -> Result<Option<OrgId>, ApiError> {
    value.map(OrgId::parse).transpose().or_invalid("org_id")
}

/// A list filter naming a team, likewise.
pub fn team_filter(value: Option<&str>) -> Result<Option<TeamNodeId>, ApiError> {
    value.map(TeamNodeId::parse).transpose().or_invalid("team_node_id")
}
