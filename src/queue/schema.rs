//! The two migration sets (`migrations/` for SQLite, `migrations/postgres/` for PostgreSQL)
//! describe one schema: this test applies both and compares what they made, table by table
//! (columns, their type class and nullability, primary keys), index by index (columns,
//! uniqueness, partial or not) and trigger by trigger. A migration added to one set and not
//! the other fails it.

use super::{open, postgres, ManualClock};
use sqlx::{Connection, Row};
use std::collections::BTreeSet;
use std::sync::Arc;

/// What a schema is made of, in terms both dialects share.
#[derive(Debug, Default, PartialEq)]
struct Schema {
    /// (table, column, type class, not null, part of the primary key)
    columns: BTreeSet<(String, String, &'static str, bool, bool)>,
    /// (table, index name or `(unique constraint)`, columns, unique, partial)
    indexes: BTreeSet<(String, String, Vec<String>, bool, bool)>,
    /// (table, trigger)
    triggers: BTreeSet<(String, String)>,
}

/// PostgreSQL's notifications (LISTEN/NOTIFY wakes the fleet's workers and relays job
/// states); SQLite has no such thing, and one process needs none.
const POSTGRES_ONLY_TRIGGERS: &[&str] = &[
    "jobs_queued_notify",
    "jobs_state_notify_insert",
    "jobs_state_notify_update",
];

/// The type classes the two dialects' types map to: SQLite stores uuids as text, flags as
/// integers and times as integer milliseconds.
fn sqlite_class(declared: &str) -> &'static str {
    match declared.to_ascii_uppercase().as_str() {
        "INTEGER" | "BIGINT" => "integer",
        "REAL" => "real",
        "TEXT" => "text",
        "BLOB" => "blob",
        _ => "unknown",
    }
}

fn postgres_class(data_type: &str, table: &str, column: &str) -> &'static str {
    match data_type {
        "bigint" | "integer" | "smallint" | "boolean" => "integer",
        "double precision" | "real" => "real",
        "text" | "character varying" => "text",
        // Ids: uuid in PostgreSQL, their text in SQLite.
        "uuid" => "text",
        "bytea" => "blob",
        other => panic!("{table}.{column}: no class for PostgreSQL type {other}"),
    }
}

async fn sqlite_schema(url: &str) -> Schema {
    let mut db = sqlx::SqliteConnection::connect(url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_sqlx%' ORDER BY name",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let mut s = Schema::default();
    for t in &tables {
        for r in sqlx::query("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?)")
            .bind(t)
            .fetch_all(&mut db)
            .await
            .unwrap()
        {
            let pk = r.get::<i64, _>("pk") > 0;
            s.columns.insert((
                t.clone(),
                r.get("name"),
                sqlite_class(&r.get::<String, _>("type")),
                // A primary key is never null in PostgreSQL; SQLite allows it on text keys
                // but nothing here writes one.
                r.get::<i64, _>("notnull") == 1 || pk,
                pk,
            ));
        }
        for r in sqlx::query("SELECT name, \"unique\", origin, partial FROM pragma_index_list(?)")
            .bind(t)
            .fetch_all(&mut db)
            .await
            .unwrap()
        {
            let origin: String = r.get("origin");
            if origin == "pk" {
                continue;
            }
            let name: String = r.get("name");
            let columns: Vec<String> =
                sqlx::query_scalar("SELECT name FROM pragma_index_info(?) ORDER BY seqno")
                    .bind(&name)
                    .fetch_all(&mut db)
                    .await
                    .unwrap();
            let name = if origin == "u" {
                "(unique constraint)".to_string()
            } else {
                name
            };
            s.indexes.insert((
                t.clone(),
                name,
                columns,
                r.get::<i64, _>("unique") == 1,
                r.get::<i64, _>("partial") == 1,
            ));
        }
    }
    for r in sqlx::query("SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'")
        .fetch_all(&mut db)
        .await
        .unwrap()
    {
        s.triggers.insert((r.get("tbl_name"), r.get("name")));
    }
    s
}

async fn postgres_schema(url: &str) -> Schema {
    let mut db = sqlx::PgConnection::connect(url).await.unwrap();
    let mut s = Schema::default();
    let primary: BTreeSet<(String, String)> = sqlx::query(
        "SELECT tc.table_name::text AS t, kcu.column_name::text AS c \
         FROM information_schema.table_constraints tc \
         JOIN information_schema.key_column_usage kcu \
           ON tc.constraint_name = kcu.constraint_name AND tc.table_schema = kcu.table_schema \
         WHERE tc.table_schema = 'public' AND tc.constraint_type = 'PRIMARY KEY'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get("t"), r.get("c")))
    .collect();
    for r in sqlx::query(
        "SELECT table_name::text AS t, column_name::text AS c, data_type::text AS ty, \
         is_nullable::text AS nullable FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap()
    {
        let (t, c): (String, String) = (r.get("t"), r.get("c"));
        let class = postgres_class(&r.get::<String, _>("ty"), &t, &c);
        let pk = primary.contains(&(t.clone(), c.clone()));
        let not_null = r.get::<String, _>("nullable") == "NO";
        s.columns.insert((t, c, class, not_null, pk));
    }
    for r in sqlx::query(
        "SELECT t.relname::text AS t, i.relname::text AS name, ix.indisunique AS uniq, \
         ix.indisprimary AS pk, ix.indpred IS NOT NULL AS partial, \
         EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.oid AND c.contype = 'u') AS constraint_backed, \
         ARRAY(SELECT a.attname::text FROM unnest(ix.indkey) WITH ORDINALITY k(attnum, n) \
               JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum ORDER BY k.n) AS columns \
         FROM pg_index ix JOIN pg_class i ON i.oid = ix.indexrelid JOIN pg_class t ON t.oid = ix.indrelid \
         JOIN pg_namespace ns ON ns.oid = t.relnamespace \
         WHERE ns.nspname = 'public' AND t.relname NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap()
    {
        if r.get::<bool, _>("pk") {
            continue;
        }
        let name = if r.get::<bool, _>("constraint_backed") {
            "(unique constraint)".to_string()
        } else {
            r.get("name")
        };
        s.indexes.insert((
            r.get("t"),
            name,
            r.get("columns"),
            r.get("uniq"),
            r.get("partial"),
        ));
    }
    for r in sqlx::query(
        "SELECT DISTINCT event_object_table::text AS t, trigger_name::text AS name \
         FROM information_schema.triggers WHERE trigger_schema = 'public'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap()
    {
        let name: String = r.get("name");
        if !POSTGRES_ONLY_TRIGGERS.contains(&name.as_str()) {
            s.triggers.insert((r.get("t"), name));
        }
    }
    s
}

/// Lines in `a` that `b` lacks, for a readable failure.
fn missing<T: Ord + std::fmt::Debug>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> Vec<String> {
    a.difference(b).map(|x| format!("{x:?}")).collect()
}

#[tokio::test]
async fn both_migration_sets_make_the_same_schema() {
    let dir = tempfile::tempdir().unwrap();
    let lite_url = format!("sqlite://{}", dir.path().join("schema.db").display());
    let clock = Arc::new(ManualClock::new(0));
    drop(
        open(&lite_url, clock.clone())
            .await
            .expect("SQLite migrations"),
    );
    let lite = sqlite_schema(&lite_url).await;

    let admin = std::env::var("MODELPRESS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pg_url = postgres::scratch_database(&admin, "mp_schema")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} (is it running? see .ci/run): {e}"));
    drop(open(&pg_url, clock).await.expect("PostgreSQL migrations"));
    let pg = postgres_schema(&pg_url).await;
    postgres::drop_scratch_database(&admin, &pg_url)
        .await
        .unwrap();

    assert!(lite.columns.len() > 50, "{lite:?}");
    for (what, only_lite, only_pg) in [
        (
            "columns",
            missing(&lite.columns, &pg.columns),
            missing(&pg.columns, &lite.columns),
        ),
        (
            "indexes",
            missing(&lite.indexes, &pg.indexes),
            missing(&pg.indexes, &lite.indexes),
        ),
        (
            "triggers",
            missing(&lite.triggers, &pg.triggers),
            missing(&pg.triggers, &lite.triggers),
        ),
    ] {
        assert!(
            only_lite.is_empty() && only_pg.is_empty(),
            "{what} differ:\n  only in SQLite: {only_lite:#?}\n  only in PostgreSQL: {only_pg:#?}"
        );
    }
}
