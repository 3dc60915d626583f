//! The bound on a worker's scratch directory ([`ServeConfig::scratch_dir`]), where each job
//! copies its model and datasets from the blob store and writes its outputs.
//!
//! Two limits, both checked before a worker claims a job and again before each input is
//! copied in: the directory's file system keeps `MODELPRESS_MIN_FREE_BYTES` free, and the
//! files under the directory stay within `MODELPRESS_SCRATCH_MAX_BYTES` (0: no cap). A worker
//! without room does not claim (and its `/readyz` says why), so a worker with room takes the
//! job; a claimed job whose input does not fit goes back to the queue with a backoff
//! (`insufficient_storage`). Outputs are written on top of the inputs and are not
//! predicted: a disk that fills while they are written fails the attempt the same way.

use crate::config::ServeConfig;
use std::path::Path;

/// What the scratch directory holds and its file system has free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Bytes of the files under the directory (hard links counted in full).
    pub used: u64,
    /// Bytes free on its file system, when the platform tells.
    pub free: Option<u64>,
}

impl Room {
    /// Measures `dir` (blocking: a directory walk and a `statvfs`).
    pub fn measure(dir: &Path) -> Room {
        Room {
            used: tree_bytes(dir),
            free: free_bytes(dir),
        }
    }

    /// Why `need` more bytes do not fit under `floor` (bytes kept free) and `cap` (most bytes
    /// held; 0: none), or `None` when they do.
    pub fn refuse(&self, need: u64, floor: u64, cap: u64) -> Option<String> {
        if let Some(free) = self.free {
            if free < floor.saturating_add(need) {
                return Some(format!(
                    "the worker's scratch disk has {free} bytes free and keeps {floor} \
                     (MODELPRESS_MIN_FREE_BYTES); {need} more bytes do not fit"
                ));
            }
        }
        if cap > 0 && (self.used.saturating_add(need) > cap || self.used >= cap) {
            return Some(format!(
                "the worker's scratch directory holds {} bytes of its {cap} \
                 (MODELPRESS_SCRATCH_MAX_BYTES); {need} more bytes do not fit",
                self.used
            ));
        }
        None
    }
}

/// Why `need` more bytes do not fit in the scratch directory under `config`'s limits. It runs
/// before every claim: without a cap only the file system is asked (the walk that counts the
/// directory's files is needed for a cap alone).
pub async fn refuse(config: &ServeConfig, need: u64) -> Option<String> {
    let (dir, cap) = (config.scratch_dir(), config.scratch_max_bytes);
    let room = tokio::task::spawn_blocking(move || {
        if cap > 0 {
            Room::measure(&dir)
        } else {
            Room {
                used: 0,
                free: free_bytes(&dir),
            }
        }
    })
    .await
    .unwrap_or(Room {
        used: 0,
        free: None,
    });
    room.refuse(need, config.min_free_bytes, cap)
}

fn free_bytes(dir: &Path) -> Option<u64> {
    rustix::fs::statvfs(dir)
        .ok()
        .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
}

/// A claimed job's input that does not fit: the attempt goes back to the queue with a
/// backoff, as for a full disk.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoRoom(pub String);

/// The bytes of the regular files under `dir` (symbolic links are not followed; what
/// vanishes during the walk counts nothing).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_in_nested_directories_and_applies_both_limits() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("job-a/work")).unwrap();
        std::fs::write(d.path().join("job-a/model"), vec![0u8; 1000]).unwrap();
        std::fs::write(d.path().join("job-a/work/out"), vec![0u8; 24]).unwrap();
        std::fs::write(d.path().join("upload"), vec![0u8; 76]).unwrap();
        let room = Room::measure(d.path());
        assert_eq!(room.used, 1100);
        assert!(room.free.is_some());
        assert_eq!(room.refuse(0, 0, 0), None);
        // The cap: 1,100 held, so 900 more fit under 2,000 and 901 do not.
        assert_eq!(room.refuse(900, 0, 2000), None);
        assert!(room
            .refuse(901, 0, 2000)
            .unwrap()
            .contains("MODELPRESS_SCRATCH_MAX_BYTES"));
        // A full cap refuses even a job of unknown size.
        assert!(room.refuse(0, 0, 1100).is_some());
        // The floor: a disk with less free than kept refuses.
        let free = room.free.unwrap();
        assert!(room
            .refuse(0, free + 1, 0)
            .unwrap()
            .contains("MODELPRESS_MIN_FREE_BYTES"));
        assert_eq!(
            Room {
                used: 0,
                free: None
            }
            .refuse(u64::MAX, u64::MAX, 0),
            None
        );
        // Missing directory: nothing held.
        assert_eq!(Room::measure(&d.path().join("none")).used, 0);
    }
}
