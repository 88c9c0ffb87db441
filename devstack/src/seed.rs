//! The initial content of the config service stand-in: orgs, teams and static bearer tokens.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

/// Initial content of the config service. Every field is optional in a seed file; a missing field
/// keeps its value from [`Seed::default`] (so a file with only `teams` still has the dev tokens).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct Seed {
    /// Org nodes: `"acme"` or `{"org_id": "acme", "name": "Acme", "config": {...}}`.
    pub orgs: Vec<SeedOrg>,
    /// Team nodes (their org node is created if missing).
    pub teams: Vec<SeedTeam>,
    /// Static bearer tokens and the principal `GET /api/v1/auth/me` answers for each. A principal
    /// with `role: "team"` is a team credential for its `org_id`/`team_node_id`. In a seed file
    /// these are added to the default dev tokens; `"token": null` removes a default one.
    #[serde(alias = "admin_tokens", deserialize_with = "tokens_over_defaults")]
    pub tokens: BTreeMap<String, Value>,
}

fn tokens_over_defaults<'de, D>(deserializer: D) -> Result<BTreeMap<String, Value>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let listed = BTreeMap::<String, Value>::deserialize(deserializer)?;
    let mut tokens = Seed::default().tokens;
    for (token, principal) in listed {
        if principal.is_null() {
            tokens.remove(&token);
        } else {
            tokens.insert(token, principal);
        }
    }
    Ok(tokens)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(from = "SeedOrgRepr")]
pub struct SeedOrg {
    pub org_id: String,
    pub name: Option<String>,
    pub config: Value,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SeedOrgRepr {
    Id(String),
    Full {
        org_id: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        config: Value,
    },
}

impl From<SeedOrgRepr> for SeedOrg {
    fn from(repr: SeedOrgRepr) -> Self {
        match repr {
            SeedOrgRepr::Id(org_id) => SeedOrg {
                org_id,
                name: None,
                config: json!({}),
            },
            SeedOrgRepr::Full { org_id, name, config } => SeedOrg {
                org_id,
                name,
                config: object_or_empty(config),
            },
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct SeedTeam {
    pub org_id: String,
    pub team_node_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "empty_object")]
    pub config: Value,
}

impl Seed {
    /// Load a seed from a JSON file.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Seed> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|err| anyhow::anyhow!("cannot read seed {}: {err}", path.display()))?;
        serde_json::from_str(&text).map_err(|err| anyhow::anyhow!("invalid seed {}: {err}", path.display()))
    }

    /// The seeded tokens whose principal is an admin, sorted by token.
    pub fn admin_tokens(&self) -> Vec<(&str, &Value)> {
        self.tokens
            .iter()
            .filter(|(_, principal)| principal["role"] != "team")
            .map(|(token, principal)| (token.as_str(), principal))
            .collect()
    }
}

impl Default for Seed {
    fn default() -> Self {
        let admin = |subject: &str, email: &str, org: Option<&str>, can_write, perms: &[&str]| {
            json!({
                "role": "admin",
                "auth_kind": "admin_token",
                "org_id": org,
                "team_node_id": null,
                "subject": subject,
                "email": email,
                "can_write": can_write,
                "permissions": perms,
            })
        };
        let tokens = BTreeMap::from([
            (
                "dev-super-admin".to_owned(),
                admin("super-admin", "super@example.com", None, true, &["admin:*"]),
            ),
            (
                "dev-internal-admin".to_owned(),
                admin(
                    "orchestrator-internal",
                    "orchestrator@example.com",
                    None,
                    true,
                    &["admin:*"],
                ),
            ),
            (
                "dev-org-admin-acme".to_owned(),
                admin("acme-admin", "admin@acme.example.com", Some("acme"), true, &["admin:*"]),
            ),
            (
                "dev-org-admin-globex".to_owned(),
                admin(
                    "globex-admin",
                    "admin@globex.example.com",
                    Some("globex"),
                    true,
                    &["admin:*"],
                ),
            ),
            (
                "dev-readonly-acme".to_owned(),
                admin(
                    "acme-readonly",
                    "readonly@acme.example.com",
                    Some("acme"),
                    false,
                    &["admin:provision:read"],
                ),
            ),
            (
                "dev-scoped-acme".to_owned(),
                admin(
                    "acme-scoped",
                    "scoped@acme.example.com",
                    Some("acme"),
                    true,
                    &["admin:provision", "admin:provision:read", "admin:agent:run"],
                ),
            ),
            (
                "dev-team-token".to_owned(),
                json!({
                    "role": "team",
                    "auth_kind": "team_token",
                    "org_id": "acme",
                    "team_node_id": "team-seeded",
                    "subject": "team:acme/team-seeded",
                    "email": null,
                    "can_write": false,
                    "permissions": [],
                }),
            ),
        ]);
        Seed {
            orgs: ["acme", "globex"]
                .into_iter()
                .map(|org| SeedOrg {
                    org_id: org.to_owned(),
                    name: None,
                    config: json!({}),
                })
                .collect(),
            teams: Vec::new(),
            tokens,
        }
    }
}

pub(crate) fn empty_object() -> Value {
    json!({})
}

pub(crate) fn object_or_empty(value: Value) -> Value {
    if value.is_object() {
        value
    } else {
        json!({})
    }
}
