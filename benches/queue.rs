//! Queue claims per second: PostgreSQL (`FOR UPDATE SKIP LOCKED`) with 1, 8 and 32 concurrent
//! claimers against SQLite's single writer, on the same machine in the same run. Each round
//! enqueues JOBS jobs into a fresh database, then the claimers claim until the queue is empty
//! and complete each claim (claim + complete is what a worker does per job, minus the work).
//! Prints one JSON line per (store, claimers) with the median of ROUNDS rounds.
//!
//! usage: cargo bench --bench queue -- [JOBS] [ROUNDS]
//! PostgreSQL: MODELPRESS_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test);
//! each round makes and drops its own database.

use modelpress::queue::{self, postgres, Database, Enqueued, ModelRecord, NewJob, SystemClock};
use std::sync::Arc;
use std::time::Instant;
use uuid::Uuid;

async fn fill(db: &Arc<dyn Database>, jobs: usize) {
    let id = Uuid::now_v7();
    let model = ModelRecord {
        id,
        tenant_id: "default".into(),
        name: "bench".into(),
        format: "onnx".into(),
        size_bytes: 1,
        sha256: "00".repeat(32),
        tensor_count: 1,
        parameter_count: 1,
        blob_key: format!("models/{id}"),
        tensors_json: "[]".into(),
        inputs_json: None,
        created_at: 0,
    };
    db.insert_model(&model).await.expect("model");
    for _ in 0..jobs {
        let job = NewJob {
            id: Uuid::now_v7(),
            tenant_id: "default".into(),
            model_id: id,
            spec: serde_json::json!({"preset": "int8"}),
            max_attempts: 3,
            idempotency_key: None,
            fingerprint: String::new(),
        };
        assert!(matches!(
            db.enqueue(job).await.expect("enqueue"),
            Enqueued::Created(_)
        ));
    }
}

/// Claims and completes every job with `claimers` tasks; returns claims per second.
async fn drain(db: &Arc<dyn Database>, claimers: usize, jobs: usize) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..claimers)
        .map(|w| {
            let db = db.clone();
            tokio::spawn(async move {
                let worker = format!("bench/{w}");
                let mut n = 0usize;
                while let Some(j) = db.claim(&worker, 60_000).await.expect("claim") {
                    assert!(db
                        .complete(j.id, &worker, &serde_json::json!({}), &[])
                        .await
                        .expect("complete"));
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("claimer");
    }
    assert_eq!(total, jobs, "every job claimed once");
    jobs as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .filter_map(|a| a.parse().ok())
        .collect();
    let jobs = args.first().copied().unwrap_or(2_000);
    let rounds = args.get(1).copied().unwrap_or(3);
    let admin = std::env::var("MODELPRESS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    for store in ["sqlite", "postgres"] {
        for claimers in [1usize, 8, 32] {
            let mut rates = Vec::new();
            for _ in 0..rounds {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = match store {
                    "sqlite" => format!("sqlite://{}", dir.path().join("q.db").display()),
                    _ => postgres::scratch_database(&admin, "mp_bench")
                        .await
                        .expect("a PostgreSQL database"),
                };
                let db = queue::open(&url, Arc::new(SystemClock))
                    .await
                    .expect("open");
                fill(&db, jobs).await;
                rates.push(drain(&db, claimers, jobs).await);
                db.close().await;
                if store == "postgres" {
                    postgres::drop_scratch_database(&admin, &url)
                        .await
                        .expect("drop");
                }
            }
            println!(
                "{}",
                serde_json::json!({
                    "store": store, "claimers": claimers, "jobs": jobs, "rounds": rounds,
                    "claims_per_sec_median": median(rates.clone()).round(),
                    "claims_per_sec": rates.iter().map(|r| r.round()).collect::<Vec<_>>(),
                })
            );
        }
    }
}
