fn main() {
    // sqlx::migrate! embeds the folders; a new migration file must trigger a rebuild.
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=migrations/postgres");
}
