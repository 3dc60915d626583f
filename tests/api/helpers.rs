//! spawn_app(): the real server on port 0 against a fresh SQLite file in a TempDir.

use modelpress::config::ServeConfig;
use modelpress::startup::{Application, Role};
use modelpress::state::AppState;
use modelpress::worker::{self, Outcome};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

pub fn cases() -> PathBuf {
    let p = std::env::var_os("MODELPRESS_CASES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/cases"));
    assert!(
        p.join("README.md").exists(),
        "the shared cases are missing at {}",
        p.display()
    );
    p
}

pub fn case_file(rel: &str) -> Vec<u8> {
    std::fs::read(cases().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

static LOGS: Once = Once::new();

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A server with no background workers: tests drain the queue with [`TestApp::drain`].
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut ServeConfig)) -> TestApp {
    spawn_app_in(tempfile::tempdir().expect("tempdir"), adjust).await
}

/// A server on the data directory under `dir` (a restart keeps what an earlier one stored).
pub async fn spawn_app_in(
    dir: tempfile::TempDir,
    adjust: impl FnOnce(&mut ServeConfig),
) -> TestApp {
    spawn_role_in(dir, Role::Serve, adjust).await
}

/// A `modelpress worker` process's application (workers, and health on its listener).
pub async fn spawn_worker_with(adjust: impl FnOnce(&mut ServeConfig)) -> TestApp {
    spawn_role_in(tempfile::tempdir().expect("tempdir"), Role::Worker, adjust).await
}

async fn spawn_role_in(
    dir: tempfile::TempDir,
    role: Role,
    adjust: impl FnOnce(&mut ServeConfig),
) -> TestApp {
    LOGS.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            modelpress::telemetry::init_logging("text");
        }
    });
    let mut config = ServeConfig::for_data_dir(dir.path().join("data"));
    config.workers = Some(0);
    adjust(&mut config);
    let app = Application::build_as(config, role)
        .await
        .expect("build app");
    let base = format!("http://{}", app.local_addr());
    let state = app.state.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run(async move {
            let _ = rx.await;
        })
        .await
        .expect("server run");
    });
    TestApp {
        base,
        client: reqwest::Client::new(),
        state,
        dir,
        stop: Some(tx),
        task: Some(task),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn upload(&self, bytes: Vec<u8>, name: &str) -> Value {
        let r = self
            .client
            .post(self.url(&format!("/v1/models?name={name}")))
            .body(bytes)
            .send()
            .await
            .expect("upload");
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        assert_eq!(status, 201, "upload {name}: {body}");
        body
    }

    pub async fn submit(&self, spec: Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/jobs"))
            .json(&spec)
            .send()
            .await
            .expect("submit")
    }

    /// Submits a job that must be accepted; returns the job.
    pub async fn submit_json(&self, spec: Value) -> Value {
        let r = self.submit(spec).await;
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        assert_eq!(status, 202, "{body}");
        body
    }

    /// POSTs raw bytes; the status and the JSON answer (an upload that may be refused).
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .body(body)
            .send()
            .await
            .expect("post");
        let s = r.status().as_u16();
        (s, r.json().await.expect("a JSON answer"))
    }

    /// The body of a GET as text (metrics, the served openapi.yaml).
    pub async fn get_text(&self, path: &str) -> String {
        let r = self.client.get(self.url(path)).send().await.expect("get");
        r.text().await.expect("text")
    }

    /// `POST /v1/jobs/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/jobs/{id}/cancel")))
            .send()
            .await
            .expect("cancel")
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.expect("get");
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// Runs queued jobs to completion on this task, deterministically.
    pub async fn drain(&self) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        loop {
            match worker::try_execute_one(&self.state).await.expect("execute") {
                Outcome::Empty | Outcome::NoRoom => return outcomes,
                o => outcomes.push(o),
            }
        }
    }

    pub async fn job(&self, id: &str) -> Value {
        let (s, v) = self.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    pub async fn download(&self, job: &Value, name: &str) -> Vec<u8> {
        let url = job["artifacts"]
            .as_array()
            .expect("artifacts")
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("no artifact {name} in {job}"))["url"]
            .as_str()
            .expect("url")
            .to_string();
        let r = self
            .client
            .get(self.url(&url))
            .send()
            .await
            .expect("download");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("bytes").to_vec()
    }

    /// Downloads an artifact into this app's temp dir; returns its path.
    pub async fn download_to(&self, job: &Value, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, self.download(job, name).await).expect("write artifact");
        path
    }

    pub async fn stop(self) {
        self.stop_keeping_data().await;
    }

    /// Shuts the server down and hands back its directory, for a restart on the same data.
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let TestApp { dir, .. } = self;
        dir
    }
}

/// A PostgreSQL database of the test's own on the server `.ci/run` checks is up
/// (`MODELPRESS_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`),
/// dropped by [`PgDatabase::drop_now`].
pub struct PgDatabase {
    admin: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        let admin = std::env::var("MODELPRESS_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let url = modelpress::queue::postgres::scratch_database(&admin, "mp_test")
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} (is it running? see .ci/run): {e}"));
        PgDatabase { admin, url }
    }

    pub async fn drop_now(self) {
        modelpress::queue::postgres::drop_scratch_database(&self.admin, &self.url)
            .await
            .expect("drop the test database");
    }
}

/// Uploads mnist-8 and submits an int8 job (latency off); returns the job's id.
pub async fn mnist_int8_job(app: &TestApp) -> String {
    let model = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let job = app
        .submit_json(
            serde_json::json!({"model_id": model["id"], "preset": "int8", "latency": false}),
        )
        .await;
    job["id"].as_str().unwrap().to_string()
}

/// Downloads each of `job`'s artifacts from the server at `base` and checks it against the
/// sha256 the job lists.
pub async fn assert_artifacts_download(client: &reqwest::Client, base: &str, job: &Value) {
    for a in job["artifacts"].as_array().unwrap() {
        let bytes = client
            .get(format!("{base}{}", a["url"].as_str().unwrap()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(
            modelpress::util::sha256_hex(&bytes),
            a["sha256"].as_str().unwrap(),
            "{}",
            a["name"]
        );
    }
}

/// The names of a job's artifacts, in the order the job lists them.
pub fn artifact_names(job: &Value) -> Vec<String> {
    job["artifacts"]
        .as_array()
        .expect("artifacts")
        .iter()
        .map(|a| a["name"].as_str().expect("name").to_string())
        .collect()
}

pub fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// Runs a Python snippet (numpy, onnxruntime, safetensors are installed by .ci/run).
pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Scores an ONNX file on a shared case with the case's own evaluate.py (onnxruntime).
pub fn evaluate(case: &str, onnx: &Path) -> Value {
    let out = Command::new("python3")
        .arg(cases().join("evaluate.py"))
        .arg(cases().join(case))
        .arg(onnx)
        .arg("--json")
        .output()
        .expect("evaluate.py runs");
    assert!(
        out.status.success(),
        "evaluate.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("evaluate.py prints JSON")
}

/// Runs the next queued job (`id`) on a worker task, cancels it once `ready` holds for its
/// view, and returns the worker's outcome.
pub async fn cancel_when(
    app: &TestApp,
    id: &str,
    ready: impl Fn(&Value) -> bool,
) -> modelpress::worker::Outcome {
    let state = app.state.clone();
    let runner =
        tokio::spawn(async move { modelpress::worker::try_execute_one(&state).await.unwrap() });
    while !ready(&app.job(id).await) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = app.cancel(id).await;
    assert_eq!(r.status(), 202);
    runner.await.unwrap()
}

/// A calibration set for a shared case's ONNX model: the case's calib.npz or train.npz (rows
/// disjoint from eval.npz), else its eval.npz (silero ships no other data).
pub fn calibration_data(input: &Path) -> Option<PathBuf> {
    let dir = input.parent()?;
    ["calib.npz", "train.npz", "eval.npz"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
}

/// Runs a spec on a file as the CLI does, and returns report.json; a preset that learns from
/// data gets the case's calibration set. None when the spec needs calibration and the file
/// is weight-only (the run refuses it: such a model cannot be run).
pub fn compress_case(input: &Path, spec: Value, dir: &Path) -> Option<Value> {
    use modelpress::compress::{self, NoControl};
    use modelpress::job;
    let calibrated = spec["preset"]
        .as_str()
        .is_some_and(compress::preset_needs_calibration);
    let mut spec = spec;
    if calibrated {
        spec["calibration"] = serde_json::json!({"dataset_id": uuid::Uuid::nil().to_string()});
    }
    let plan = modelpress::job::parse_spec(&spec).expect("spec");
    let weight_only =
        modelpress::formats::read_path(input).unwrap().format != modelpress::formats::Format::Onnx;
    let data = calibration_data(input).filter(|_| calibrated && !weight_only);
    let cspec = modelpress::calibrate::CalibrationSpec::parse(&spec).unwrap();
    let calibration = cspec
        .as_ref()
        .zip(data.as_deref())
        .map(|(spec, dataset)| job::CalibrationInput { spec, dataset });
    let data = job::Data {
        eval: None,
        calibration,
        finetune: None,
        distill: None,
    };
    match job::execute(input, &plan, dir, &NoControl, data) {
        Ok(_) => {}
        Err(job::RunError::InvalidSpec(m)) if calibrated && weight_only => {
            assert!(m.contains("needs an ONNX model"), "{m}");
            return None;
        }
        Err(e) => panic!("{} {spec}: {e}", input.display()),
    }
    Some(serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap())
}

/// Uploads a shared case's .npz as a dataset.
pub async fn upload_dataset(app: &TestApp, rel: &str) -> Value {
    let r = app
        .client
        .post(app.url("/v1/datasets"))
        .body(case_file(rel))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

/// Submits each spec and checks it is refused with this status and code, and a message
/// that holds the fragment (the field it names).
pub async fn assert_refused(app: &TestApp, cases: Vec<(Value, u16, &str, &str)>) {
    for (body, status, code, says) in cases {
        let r = app.submit(body.clone()).await;
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!((s, error_code(&v)), (status, code), "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{body}: {v}"
        );
    }
}

/// A `modelpress` OS process of this build: `args` (`serve` or `worker`) and `env` on top of
/// `MODELPRESS_ADDR=127.0.0.1:0`, JSON logs at `info` on a pipe that is read until the
/// process announces its address (and drained after). `MODELPRESS_FAILPOINT` is not
/// inherited.
pub struct Process {
    pub child: std::process::Child,
    pub base: String,
}

impl Process {
    pub fn start(args: &[&str], env: &[(&str, String)]) -> Process {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelpress"));
        cmd.args(args)
            .env("MODELPRESS_ADDR", "127.0.0.1:0")
            .env("MODELPRESS_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("MODELPRESS_FAILPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start modelpress");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            let mut before = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["fields"]["message"] == "modelpress listening" {
                            let addr = v["fields"]["addr"].as_str().unwrap_or("").to_string();
                            let _ = tx.send(Ok(addr));
                            sent = true;
                        }
                    }
                    before.push(line);
                }
            }
            if !sent {
                let _ = tx.send(Err(before.join("\n")));
            }
        });
        let addr = match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(Ok(addr)) => addr,
            Ok(Err(log)) => panic!("modelpress {args:?} exited before listening:\n{log}"),
            Err(e) => panic!("modelpress {args:?} did not announce its address: {e}"),
        };
        Process {
            child,
            base: format!("http://{addr}"),
        }
    }

    /// SIGTERM (`kill -TERM`; std has no way to send it without `unsafe`).
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }
}

/// A test that fails leaves no process behind (SIGKILL; a no-op for one that has exited).
impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
