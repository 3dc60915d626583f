fn main() {
    // sqlx::migrate! embeds the folder; a new migration file must trigger a rebuild.
    println!("cargo:rerun-if-changed=migrations");
}
