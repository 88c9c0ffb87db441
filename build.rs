//! `sqlx::migrate!` embeds `migrations/` at compile time, but cargo does not know to rebuild when a
//! migration is added: without this, a new migration file would be missing from the binary until
//! some other change forced a rebuild.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
