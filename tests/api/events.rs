//! Server-Sent Events: `/v1/jobs/{id}/events` and `/v1/events` over real HTTP.

use crate::helpers::{
    case_file, error_code, mnist_int8_job, spawn_app, spawn_app_in, spawn_app_with,
};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Sse {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

/// Reads a text/event-stream response until `stop` says so, the stream ends or `limit`
/// passes.
pub async fn read_events(
    resp: reqwest::Response,
    limit: Duration,
    stop: impl Fn(&[Sse]) -> bool,
) -> Vec<Sse> {
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(c))) => c,
            _ => return out,
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, String::from("message"), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue; // a keep-alive comment or a bare retry
            }
            out.push(Sse {
                id,
                event,
                data: serde_json::from_str(&data).expect("event data is JSON"),
            });
            if stop(&out) {
                return out;
            }
        }
    }
}

fn kinds(evs: &[Sse]) -> Vec<&str> {
    evs.iter().map(|e| e.event.as_str()).collect()
}

#[tokio::test]
async fn a_job_stream_goes_from_queued_to_done_with_increasing_ids() {
    let app = spawn_app().await;
    let id = mnist_int8_job(&app).await;
    let resp = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let reader = tokio::spawn(read_events(resp, Duration::from_secs(60), |_| false));
    // Let the stream connect, then run the job.
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.drain().await;
    let evs = reader.await.unwrap();
    let k = kinds(&evs);
    assert_eq!(k.first(), Some(&"state"), "{evs:?}");
    assert_eq!(evs[0].data["state"], "queued");
    assert_eq!(
        k.last(),
        Some(&"done"),
        "the stream ends after done: {evs:?}"
    );
    assert!(
        evs.iter()
            .any(|e| e.event == "state" && e.data["state"] == "running"),
        "{evs:?}"
    );
    let done = evs.last().unwrap();
    assert_eq!(done.data["state"], "succeeded");
    assert!(done.data["ratio"].as_f64().unwrap() > 2.0);
    let ids: Vec<u64> = evs
        .iter()
        .map(|e| e.id.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_reconnect_after_the_end_and_after_a_restart_still_gets_the_terminal_event() {
    let app = spawn_app().await;
    let id = mnist_int8_job(&app).await;
    app.drain().await;
    let url = format!("/v1/jobs/{id}/events");
    let first = read_events(
        app.client.get(app.url(&url)).send().await.unwrap(),
        Duration::from_secs(10),
        |_| false,
    )
    .await;
    assert_eq!(kinds(&first), ["state", "done"]);
    let last_id = first[1].id.clone().unwrap();
    // A new process on the same data: the terminal state comes from the database.
    let dir = app.stop_keeping_data().await;
    let app = spawn_app_in(dir, |_| {}).await;
    let resp = app
        .client
        .get(app.url(&url))
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    let again = read_events(resp, Duration::from_secs(10), |_| false).await;
    assert_eq!(kinds(&again), ["state", "done"]);
    assert_eq!(again[1].data["state"], "succeeded");
    let new_id: u64 = again[0].id.as_deref().unwrap().parse().unwrap();
    assert!(
        new_id > last_id.parse::<u64>().unwrap(),
        "ids keep growing across a restart"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_cancelled_queued_job_ends_its_stream_and_unknown_ids_are_404() {
    let app = spawn_app().await;
    let id = mnist_int8_job(&app).await;
    let resp = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(read_events(resp, Duration::from_secs(30), |_| false));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = app.cancel(&id).await;
    assert_eq!(r.status(), 200);
    let evs = reader.await.unwrap();
    assert_eq!(kinds(&evs), ["state", "state", "done"], "{evs:?}");
    assert_eq!(evs[2].data["state"], "cancelled");

    let (s, v) = app
        .get_json("/v1/jobs/0190f5c8-0000-7000-8000-000000000000/events")
        .await;
    assert_eq!((s, error_code(&v)), (404, "job_not_found"));
    let (s, v) = app.get_json("/v1/jobs/not-an-id/events").await;
    assert_eq!((s, error_code(&v)), (404, "job_not_found"));
    app.stop().await;
}

#[tokio::test]
async fn the_all_jobs_stream_carries_state_changes_and_progress() {
    // A short lease makes the heartbeat (and its progress events) frequent; the failpoint
    // build slows each tensor so progress is seen between start and end.
    let app = spawn_app_with(|c| {
        c.lease_ms = 600;
        if cfg!(feature = "failpoints") {
            c.failpoint = Some("tensor-delay-ms=300".into());
        }
    })
    .await;
    let resp = app.client.get(app.url("/v1/events")).send().await.unwrap();
    let reader = tokio::spawn(read_events(resp, Duration::from_secs(60), |evs| {
        evs.iter().filter(|e| e.event == "done").count() == 2
    }));
    let model = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let job = app
            .submit_json(json!({"model_id": model["id"], "preset": "int8", "latency": false}))
            .await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    app.drain().await;
    let evs = reader.await.unwrap();
    assert_eq!(kinds(&evs)[0], "hello");
    for id in &ids {
        let mine: Vec<&Sse> = evs.iter().filter(|e| e.data["job_id"] == **id).collect();
        let states: Vec<&str> = mine
            .iter()
            .filter(|e| e.event == "state")
            .map(|e| e.data["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["queued", "running", "succeeded"], "{mine:?}");
        assert_eq!(mine.last().unwrap().event, "done");
        if cfg!(feature = "failpoints") {
            assert!(
                mine.iter().any(|e| e.event == "progress"
                    && e.data["progress"].as_f64().unwrap() > 0.0
                    && e.data["stage"].is_string()),
                "a slowed job reports progress: {mine:?}"
            );
        }
    }
    app.stop().await;
}

/// 200 clients follow one job; each gets the terminal event, and the streams hold no
/// database connection (the pool is far smaller than 200).
#[tokio::test]
async fn two_hundred_concurrent_streams_all_see_the_end() {
    let app = spawn_app().await;
    let id = mnist_int8_job(&app).await;
    let url = app.url(&format!("/v1/jobs/{id}/events"));
    let mut readers = Vec::new();
    for _ in 0..200 {
        // One connection per client, as 200 browsers would have.
        let client = reqwest::Client::new();
        let resp = client.get(&url).send().await.unwrap();
        readers.push(tokio::spawn(read_events(
            resp,
            Duration::from_secs(120),
            |_| false,
        )));
    }
    assert!(app.state.events.listeners() >= 200);
    // While 200 streams are open, the API still answers (no connection is held).
    let (s, _) = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(s, 200);
    app.drain().await;
    for r in readers {
        let evs = r.await.unwrap();
        let done = evs.last().expect("events");
        assert_eq!(done.event, "done");
        assert_eq!(done.data["state"], "succeeded");
    }
    app.stop().await;
}

/// Follows `id`'s stream while the queue drains; returns its events.
async fn follow_while_draining(app: &crate::helpers::TestApp, id: &str) -> Vec<Sse> {
    let resp = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(read_events(resp, Duration::from_secs(600), |_| false));
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.drain().await;
    reader.await.unwrap()
}

/// Submits `spec`, follows the job to success, and returns its id with the progress
/// details of `phase` it streamed (at least one).
async fn details(app: &crate::helpers::TestApp, spec: Value, phase: &str) -> (String, Vec<Value>) {
    let job = app.submit_json(spec).await;
    let id = job["id"].as_str().unwrap().to_string();
    let evs = follow_while_draining(app, &id).await;
    assert_eq!(evs.last().unwrap().data["state"], "succeeded", "{evs:?}");
    let found: Vec<Value> = evs
        .iter()
        .filter(|e| e.event == "progress" && e.data["detail"]["phase"] == phase)
        .map(|e| e.data["detail"].clone())
        .collect();
    assert!(!found.is_empty(), "{phase} detail streamed: {evs:?}");
    (id, found)
}

async fn chart(app: &crate::helpers::TestApp, id: &str, name: &str) -> String {
    let r = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/charts/{name}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{name}");
    r.text().await.unwrap()
}

/// A search streams its trial and best so far, training its epoch, loss and validation
/// metric; their charts (the frontier with the chosen point, loss and metric per epoch) are
/// drawn from search.json and training.json.
#[tokio::test]
async fn search_and_training_stream_their_detail_and_draw_their_charts() {
    // A short lease: a heartbeat (and a progress event) every 100 ms.
    let app = spawn_app_with(|c| c.lease_ms = 300).await;
    let mnist = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let data = crate::helpers::upload_dataset(&app, "mnist8/calib.npz").await;
    let (id, trials) = details(
        &app,
        json!({"model_id": mnist["id"], "preset": "auto", "latency": false,
            "eval": {"dataset_id": data["id"], "metric": "agreement"}}),
        "search",
    )
    .await;
    for d in &trials {
        assert!(
            d["trial"].as_u64().unwrap() <= d["trials"].as_u64().unwrap(),
            "{d}"
        );
    }
    let svg = chart(&app, &id, "frontier").await;
    assert_eq!(svg.matches("class=\"chosen\"").count(), 1, "{svg}");

    let digits = app
        .upload(case_file("digits_mlp_control/digits_mlp.onnx"), "d.onnx")
        .await;
    let train = crate::helpers::upload_dataset(&app, "digits_mlp_control/train.npz").await;
    let (id, epochs) = details(
        &app,
        json!({"model_id": digits["id"], "preset": "int4", "latency": false,
            "finetune": {"dataset_id": train["id"], "epochs": 3}}),
        "train",
    )
    .await;
    for d in &epochs {
        assert_eq!(d["epochs"], 3, "{d}");
        assert!(d["loss"].as_f64().unwrap().is_finite(), "{d}");
    }
    let svg = chart(&app, &id, "training").await;
    assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
    app.stop().await;
}

/// An idle stream gets a comment line every `KEEP_ALIVE` (15 s), so proxies keep it open.
#[tokio::test]
async fn an_idle_stream_gets_keep_alive_comments() {
    let app = spawn_app().await;
    let resp = app.client.get(app.url("/v1/events")).send().await.unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    let limit = modelpress::api::events::KEEP_ALIVE + Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + limit;
    while !seen.lines().any(|l| l.starts_with(':')) {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            other => panic!("no keep-alive comment within {limit:?}: {other:?} after {seen:?}"),
        }
    }
    app.stop().await;
}

/// Shutdown closes open streams, so the server drains instead of waiting on its clients.
#[tokio::test]
async fn shutdown_closes_open_streams() {
    let app = spawn_app().await;
    let id = mnist_int8_job(&app).await;
    let url = app.url(&format!("/v1/jobs/{id}/events"));
    let one = app.client.get(url).send().await.unwrap();
    let all = app.client.get(app.url("/v1/events")).send().await.unwrap();
    let readers =
        [one, all].map(|r| tokio::spawn(read_events(r, Duration::from_secs(60), |_| false)));
    tokio::time::timeout(Duration::from_secs(20), app.stop())
        .await
        .expect("the server stops with streams open");
    for r in readers {
        let evs = tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .expect("the stream ended")
            .unwrap();
        assert!(!evs.is_empty());
    }
}
