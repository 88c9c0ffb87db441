//! The team token step: the one step where re-running could do harm (a second token, or one
//! whose secret nobody holds), so it records what it is about to do before doing it.

use serde_json::{json, Value};
use uuid::Uuid;

use super::engine::Engine;
use super::steps::{StepDone, StepError};
use super::store;
use crate::config::Secret;

/// Issues a team token unless the team has an active one, without ever leaving an issued token
/// whose secret nobody holds. Before issuing, the step records which token ids already exist; if
/// an attempt died between the config service issuing and us sealing the secret (a crash, or a
/// timeout after the token was created), the next attempt finds an active token not in that list,
/// revokes it, and issues a fresh one it can hand out.
pub async fn issue_once(
    engine: &Engine,
    run_id: Uuid,
    position: i16,
    credential: &Secret,
    org: &str,
    team: &str,
) -> Result<StepDone, StepError> {
    let intent = store::step_result(&engine.db, run_id, position)
        .await
        .map_err(|e| StepError::database(&e))?;
    let known_before: Option<Vec<String>> = intent
        .as_ref()
        .filter(|r| r.get("issuing") == Some(&Value::Bool(true)))
        .and_then(|r| serde_json::from_value(r.get("known_token_ids").cloned().unwrap_or_default()).ok());

    let tokens = engine.config_service.list_team_tokens(credential, org, team).await?;
    let mut active: Vec<&str> = tokens
        .iter()
        .filter(|t| !t.revoked)
        .map(|t| t.token_id.as_str())
        .collect();
    let mut revoked_orphans = Vec::new();
    if let Some(known) = &known_before {
        for orphan in active.iter().filter(|id| !known.iter().any(|k| k == *id)) {
            engine
                .config_service
                .revoke_team_token(credential, org, team, orphan)
                .await?;
            tracing::warn!(%run_id, token_id = %orphan, "revoked a team token an interrupted attempt issued without handing it out");
            revoked_orphans.push(orphan.to_string());
        }
        active.retain(|id| known.iter().any(|k| k == id));
    }
    if !active.is_empty() {
        return Ok(json!({"created": false, "existing_tokens": tokens.len(), "active_token_ids": active}).into());
    }
    let all_ids: Vec<&str> = tokens.iter().map(|t| t.token_id.as_str()).collect();
    store::record_step_intent(
        &engine.db,
        run_id,
        position,
        &json!({"issuing": true, "known_token_ids": all_ids}),
    )
    .await
    .map_err(|e| StepError::database(&e))?;
    let issued = engine.config_service.issue_team_token(credential, org, team).await?;
    Ok(StepDone {
        result: json!({"created": true, "token_id": issued.token_id, "issued_at": issued.issued_at, "revoked_orphans": revoked_orphans}),
        issued_token: Some(issued.token),
    })
}
