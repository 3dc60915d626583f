//! Per-tenant quotas: stored bytes (507 `quota_exceeded`), jobs queued or running at once and
//! jobs submitted per hour (429 `rate_limited` with `Retry-After`). Limits come from the
//! configuration (0: none); usage is read from the database, so it holds across processes
//! and restarts. Messages give the limit and the usage.

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::util::now_ms;

const HOUR_MS: i64 = 3_600_000;
/// What a client is told to wait when a running job must finish first.
const RETRY_CONCURRENT_SECS: u64 = 30;

/// Refuses an upload of `incoming` bytes that would take `tenant` past its stored-bytes
/// quota (`incoming` 0: refuses only a tenant already at or over it, before the body is read).
pub async fn check_storage(state: &AppState, tenant: &str, incoming: u64) -> Result<(), ApiError> {
    // The server's own floor first: a disk this full refuses every tenant.
    if let Some(free) = state.blobs.free_bytes().await {
        let floor = state.config.min_free_bytes;
        // A received upload already takes its room in the staging directory.
        if free < floor {
            tracing::warn!(
                free,
                floor,
                incoming,
                "upload refused: the disk is nearly full"
            );
            return Err(ApiError::new(
                ErrorCode::InsufficientStorage,
                format!(
                    "the server's disk has {free} bytes free and keeps {floor} (MODELPRESS_MIN_FREE_BYTES); the upload was not stored"
                ),
            ));
        }
    }
    let limit = state.config.quota_stored_bytes;
    if limit == 0 {
        return Ok(());
    }
    let used = state
        .models
        .tenant_usage(tenant, now_ms())
        .await?
        .stored_bytes;
    if used.saturating_add(incoming) > limit || (incoming == 0 && used >= limit) {
        return Err(ApiError::new(
            ErrorCode::QuotaExceeded,
            format!(
                "tenant {tenant} stores {used} bytes of its {limit} (MODELPRESS_QUOTA_STORED_BYTES); this upload of {incoming} bytes would pass it: delete models, datasets or jobs first"
            ),
        ));
    }
    Ok(())
}

/// Refuses a new job when `tenant` has its quota of jobs queued or running, or submitted
/// within the last hour.
pub async fn check_jobs(state: &AppState, tenant: &str) -> Result<(), ApiError> {
    let (concurrent, hourly) = (
        state.config.quota_concurrent_jobs,
        state.config.quota_jobs_per_hour,
    );
    if concurrent == 0 && hourly == 0 {
        return Ok(());
    }
    let now = now_ms();
    let u = state.models.tenant_usage(tenant, now - HOUR_MS).await?;
    if concurrent > 0 && u.active_jobs >= concurrent {
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "tenant {tenant} has {} jobs queued or running, its limit is {concurrent} (MODELPRESS_QUOTA_CONCURRENT_JOBS)",
                u.active_jobs
            ),
        )
        .retry_after(RETRY_CONCURRENT_SECS));
    }
    if hourly > 0 && u.recent_jobs >= hourly {
        // The window frees a slot when its oldest job is an hour old.
        let wait_ms = u.oldest_recent.map_or(HOUR_MS, |t| t + HOUR_MS - now);
        let secs = (wait_ms.max(0) as u64).div_ceil(1000).max(1);
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "tenant {tenant} submitted {} jobs in the last hour, its limit is {hourly} (MODELPRESS_QUOTA_JOBS_PER_HOUR); retry in {secs} s",
                u.recent_jobs
            ),
        )
        .retry_after(secs));
    }
    Ok(())
}
