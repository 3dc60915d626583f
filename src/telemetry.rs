//! Logging and the Prometheus recorder (installed once per process).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::{fmt, EnvFilter};

pub fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder; the first call installs it.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".into()),
                    &[
                        0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                        900.0,
                    ],
                )
                .expect("static buckets are valid")
                .install_recorder()
                .inspect(|_| describe_metrics())
                .expect("the metrics recorder is installed once")
        })
        .clone()
}

/// Help text for every metric family, so `/metrics` passes `promtool check metrics`.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "modelpress_http_requests_total",
        "HTTP requests answered, by method, route and status"
    );
    describe_histogram!(
        "modelpress_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request handling time, by method and route"
    );
    describe_counter!(
        "modelpress_jobs_submitted_total",
        "Compression jobs accepted by POST /v1/jobs"
    );
    describe_counter!(
        "modelpress_jobs_finished_total",
        "Job attempts that ended, by outcome"
    );
    describe_histogram!(
        "modelpress_job_duration_seconds",
        Unit::Seconds,
        "Wall time of a job attempt on a worker"
    );
    describe_counter!(
        "modelpress_upload_bytes_total",
        Unit::Bytes,
        "Bytes received in uploads (models and datasets)"
    );
    describe_counter!(
        "modelpress_download_bytes_total",
        Unit::Bytes,
        "Bytes of artifacts served"
    );
    describe_counter!(
        "modelpress_artifact_bytes_written_total",
        Unit::Bytes,
        "Bytes of artifacts stored by workers"
    );
    describe_gauge!("modelpress_jobs", "Jobs in the database, by state");
    describe_gauge!(
        "modelpress_queue_depth",
        "Jobs queued and waiting for a worker"
    );
    describe_gauge!("modelpress_workers", "Worker tasks in this process");
    describe_gauge!(
        "modelpress_event_streams",
        "Server-Sent Event streams open in this process"
    );
    describe_counter!(
        "modelpress_event_streams_opened_total",
        "Server-Sent Event streams opened, by stream (job or all)"
    );
    describe_gauge!(
        "modelpress_busy_workers",
        "Worker tasks running a job in this process"
    );
}
