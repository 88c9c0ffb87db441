//! Team tokens. Issuing is the one step where re-running could do harm (a second token, or one
//! whose secret nobody holds), so it records what it is about to do before doing it.

use serde_json::{json, Value};

use super::{recorded_str, StepContext, StepDone, StepError, TeamScope};
use crate::clients::config_service::TeamTokenInfo;
use crate::provisioning::store;

/// Issues a team token unless the team has an active one, without ever leaving an issued token
/// whose secret nobody holds. Before issuing, the step records which token ids already exist; if
/// an attempt died between the config service issuing and us sealing the secret (a crash, or a
/// timeout after the token was created), the next attempt finds an active token not in that list,
/// revokes it, and issues a fresh one it can hand out.
pub(super) async fn issue_once(cx: &StepContext<'_>) -> Result<StepDone, StepError> {
    let scope = &cx.scope;
    let config = &scope.engine.config_service;
    let (org, team, credential) = (scope.org.as_str(), scope.team.as_str(), scope.credential);
    let tokens = config.list_team_tokens(credential, org, team).await?;
    let revoked_orphans = revoke_orphans(scope, cx.run_id, cx.recorded, &tokens).await?;
    let active: Vec<&str> = tokens
        .iter()
        .filter(|t| !t.revoked && !revoked_orphans.contains(&t.token_id))
        .map(|t| t.token_id.as_str())
        .collect();
    if !active.is_empty() {
        return Ok(json!({"created": false, "existing_tokens": tokens.len(), "active_token_ids": active}).into());
    }
    let all_ids: Vec<&str> = tokens.iter().map(|t| t.token_id.as_str()).collect();
    cx.journal
        .record_intent(cx.position, &json!({"issuing": true, "known_token_ids": all_ids}))
        .await?;
    let issued = config.issue_team_token(credential, org, team).await?;
    Ok(StepDone {
        result: json!({"created": true, "token_id": issued.token_id, "issued_at": issued.issued_at, "revoked_orphans": revoked_orphans}),
        issued_token: Some(issued.token),
    })
}

/// The token ids an attempt that recorded its intent knew before issuing (`None` without one).
fn known_before(recorded: Option<&Value>) -> Option<Vec<String>> {
    recorded
        .filter(|r| r.get("issuing") == Some(&Value::Bool(true)))
        .and_then(|r| serde_json::from_value(r.get("known_token_ids").cloned().unwrap_or_default()).ok())
}

/// Revokes the active tokens an interrupted attempt may have issued without handing them out:
/// those not known before it, when it recorded that it was issuing. Returns their ids.
async fn revoke_orphans(
    scope: &TeamScope<'_>,
    run_id: uuid::Uuid,
    recorded: Option<&Value>,
    tokens: &[TeamTokenInfo],
) -> Result<Vec<String>, StepError> {
    let Some(known) = known_before(recorded) else {
        return Ok(Vec::new());
    };
    let mut revoked = Vec::new();
    for orphan in tokens.iter().filter(|t| !t.revoked && !known.contains(&t.token_id)) {
        scope
            .engine
            .config_service
            .revoke_team_token(scope.credential, scope.org, scope.team, &orphan.token_id)
            .await?;
        tracing::warn!(%run_id, token_id = %orphan.token_id, "revoked a team token an interrupted attempt issued without handing it out");
        revoked.push(orphan.token_id.clone());
    }
    Ok(revoked)
}

/// For a run that ends without the token step succeeding: a token its last attempt may have
/// issued is revoked, or the team would keep a token nobody holds and never be issued another.
pub(crate) async fn revoke_unfinished(
    scope: &TeamScope<'_>,
    run_id: uuid::Uuid,
    recorded: Option<&Value>,
) -> Result<Vec<String>, StepError> {
    if known_before(recorded).is_none() {
        return Ok(Vec::new());
    }
    let tokens = scope
        .engine
        .config_service
        .list_team_tokens(scope.credential, scope.org, scope.team)
        .await?;
    revoke_orphans(scope, run_id, recorded, &tokens).await
}

/// Revokes the token this run issued, if it issued one, and forgets its sealed secret.
pub(super) async fn undo(cx: &StepContext<'_>) -> Result<Value, StepError> {
    let created = cx.recorded.and_then(|r| r.get("created")) == Some(&json!(true));
    match recorded_str(cx.recorded, "/token_id").filter(|_| created) {
        Some(token_id) => {
            let scope = &cx.scope;
            scope
                .engine
                .config_service
                .revoke_team_token(scope.credential, scope.org, scope.team, token_id)
                .await?;
            store::erase_team_token(&scope.engine.db, cx.run_id)
                .await
                .map_err(|e| StepError::database(&e))?;
            Ok(json!({"revoked_token_id": token_id}))
        }
        None => Ok(json!({"note": "no token was issued by this run"})),
    }
}

async fn active_token_ids(scope: &TeamScope<'_>) -> Result<Vec<String>, StepError> {
    let tokens = scope
        .engine
        .config_service
        .list_team_tokens(scope.credential, scope.org, scope.team)
        .await?;
    Ok(tokens.into_iter().filter(|t| !t.revoked).map(|t| t.token_id).collect())
}

/// Revokes every active token of the team, and erases any secret still held for a caller.
pub(super) async fn revoke_all(scope: &TeamScope<'_>) -> Result<StepDone, StepError> {
    let active = active_token_ids(scope).await?;
    for token_id in &active {
        scope
            .engine
            .config_service
            .revoke_team_token(scope.credential, scope.org, scope.team, token_id)
            .await?;
    }
    store::erase_team_tokens_of_team(&scope.engine.db, scope.org, scope.team)
        .await
        .map_err(|e| StepError::database(&e))?;
    Ok(json!({"deleted": {"team_tokens": {"revoked": active}}}).into())
}

pub(super) async fn plan_revoke_all(scope: &TeamScope<'_>) -> Result<Value, StepError> {
    Ok(json!({"deleted": {"team_tokens": {"would_revoke": active_token_ids(scope).await?}}}))
}

pub(super) async fn observe(scope: &TeamScope<'_>) -> Result<Value, StepError> {
    let active = active_token_ids(scope).await?;
    Ok(json!({"token_active": !active.is_empty(), "active_token_ids": active}))
}
