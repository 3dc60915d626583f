//! Provenance: every finished job carries `manifest.json`, signed with the server's ed25519
//! key, saying what went in (the model's sha256, the expanded pipeline, seeds, the server's
//! version) and what came out (each artifact's name, size and sha256).
//!
//! The file is `{"payload": "<JSON text>", "signature": {...}}`: the signature covers the
//! payload string's UTF-8 bytes exactly as stored, so a verifier needs no canonical JSON
//! (the same idea as JWS's flattened form). `modelpress verify DIR` checks a downloaded job;
//! the public key is served at `GET /v1/signing-key`.

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The file name of the manifest among a job's artifacts.
pub const MANIFEST: &str = "manifest.json";
/// The file under the data directory holding the signing key's seed (hex, mode 0600).
pub const KEY_FILE: &str = "signing-key.ed25519";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("signing key {path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The server's signing key.
pub struct Signer {
    key: SigningKey,
}

impl Signer {
    /// Loads the key from `dir`, or makes one there on first start.
    pub fn load_or_create(dir: &Path) -> Result<Signer, ManifestError> {
        Signer::load_or_create_at(&dir.join(KEY_FILE))
    }

    /// Loads the key file at `path`, or makes it on first start (a fleet's processes name one
    /// shared file, so what any worker signs verifies under the key the API serves).
    pub fn load_or_create_at(path: &Path) -> Result<Signer, ManifestError> {
        let path = path.to_path_buf();
        let bad = |why: String| ManifestError::Key {
            path: path.clone(),
            why,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let seed: [u8; 32] = hex::decode(text.trim())
                    .map_err(|e| bad(format!("not hex: {e}")))?
                    .try_into()
                    .map_err(|_| bad("not 32 bytes".into()))?;
                Ok(Signer {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| bad(format!("no randomness: {e}")))?;
                match write_private(&path, hex::encode(seed).as_bytes()) {
                    Ok(()) => {}
                    // Another process made it first: use that one.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Signer::load_or_create_at(&path)
                    }
                    Err(e) => return Err(bad(e.to_string())),
                }
                tracing::info!(path = %path.display(), "made a new manifest signing key");
                Ok(Signer {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) => Err(bad(e.to_string())),
        }
    }

    /// A 32-byte key for `purpose`, derived from the signing key's seed (HMAC-SHA256 keyed
    /// by the seed over the purpose): what must stay out of the database is keyed by what
    /// lives beside the signing key, in its 0600 file.
    pub fn derive_key(&self, purpose: &str) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2_11::Sha256>::new_from_slice(&self.key.to_bytes())
            .expect("HMAC takes any key length");
        mac.update(b"modelpress derived key\0");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// `GET /v1/signing-key`'s body.
    pub fn public_doc(&self) -> Value {
        let pk = self.public_key();
        json!({
            "algorithm": "ed25519",
            "key_id": key_id(&pk),
            "public_key": hex::encode(pk.as_bytes()),
        })
    }

    /// The signed manifest file for a payload.
    pub fn sign(&self, payload: &Value) -> Vec<u8> {
        let text = payload.to_string();
        let sig = self.key.sign(text.as_bytes());
        let pk = self.public_key();
        let doc = json!({
            "payload": text,
            "signature": {
                "algorithm": "ed25519",
                "key_id": key_id(&pk),
                "public_key": hex::encode(pk.as_bytes()),
                "value": hex::encode(sig.to_bytes()),
            },
        });
        serde_json::to_vec_pretty(&doc).unwrap_or_default()
    }
}

/// Creates `path` readable by its owner only, failing if it exists (two processes starting
/// at once must not overwrite each other's key).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A short name for a public key: the first 16 hex digits of its sha256.
pub fn key_id(pk: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(pk.as_bytes()))[..16].to_string()
}

/// One output file as the manifest lists it.
pub struct Entry<'a> {
    pub name: &'a str,
    pub size_bytes: u64,
    pub sha256: &'a str,
}

/// What a job's manifest says.
pub struct Facts<'a> {
    pub job_id: uuid::Uuid,
    pub tenant: &'a str,
    pub model_id: uuid::Uuid,
    pub model_name: &'a str,
    pub model_sha256: &'a str,
    pub spec: &'a Value,
    /// The pipeline as run: a preset expanded, or the steps a search chose.
    pub pipeline: Value,
    pub attempt: i64,
    pub created_at_ms: i64,
    pub artifacts: Vec<Entry<'a>>,
}

pub fn payload(f: &Facts) -> Value {
    // Every seed a job can take; the methods without one are deterministic.
    let seeds: serde_json::Map<String, Value> = ["finetune", "distill"]
        .iter()
        .filter_map(|block| {
            let b = f.spec.get(*block)?;
            let seed = b
                .get("seed")
                .or_else(|| b.get("train").and_then(|t| t.get("seed")))
                .cloned()
                .unwrap_or(json!(0));
            Some((block.to_string(), seed))
        })
        .collect();
    json!({
        "manifest_version": 1,
        "generator": format!("modelpress {}", env!("CARGO_PKG_VERSION")),
        "job_id": f.job_id,
        "tenant": f.tenant,
        "attempt": f.attempt,
        "created_at": crate::util::rfc3339(f.created_at_ms),
        "input": {
            "model_id": f.model_id,
            "name": f.model_name,
            "sha256": f.model_sha256,
        },
        "spec": f.spec,
        "pipeline": f.pipeline,
        "seeds": seeds,
        "artifacts": f.artifacts.iter().map(|a| json!({
            "name": a.name,
            "size_bytes": a.size_bytes,
            "sha256": a.sha256,
        })).collect::<Vec<_>>(),
    })
}

/// What `verify` found.
#[derive(Debug)]
pub struct Verified {
    pub key_id: String,
    pub job_id: String,
    /// Artifacts whose file in the directory matched the manifest.
    pub checked: Vec<String>,
    /// Artifacts the manifest lists that are not in the directory.
    pub missing: Vec<String>,
}

/// Checks `manifest.json` in `dir`: its signature (by `trusted` when given, else by the key
/// it names, which the caller should compare with the server's), then every listed artifact
/// present in `dir` against its size and sha256. A file that differs is an error; a file
/// that is absent is reported in `missing`.
pub fn verify_dir(dir: &Path, trusted: Option<&VerifyingKey>) -> Result<Verified, ManifestError> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|source| ManifestError::Io {
        path: path.clone(),
        source,
    })?;
    let invalid = |m: String| ManifestError::Invalid(m);
    let doc: Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
    let text = doc["payload"]
        .as_str()
        .ok_or_else(|| invalid(format!("{MANIFEST}: no payload string")))?;
    let sig = &doc["signature"];
    if sig["algorithm"] != "ed25519" {
        return Err(invalid(format!("{MANIFEST}: the signature is not ed25519")));
    }
    let hex_field = |name: &str| -> Result<Vec<u8>, ManifestError> {
        sig[name]
            .as_str()
            .and_then(|s| hex::decode(s).ok())
            .ok_or_else(|| invalid(format!("{MANIFEST}: signature.{name} is not hex")))
    };
    let named: [u8; 32] = hex_field("public_key")?
        .try_into()
        .map_err(|_| invalid("signature.public_key is not 32 bytes".into()))?;
    let named = VerifyingKey::from_bytes(&named)
        .map_err(|e| invalid(format!("signature.public_key: {e}")))?;
    let key = match trusted {
        Some(t) if t != &named => {
            return Err(invalid(format!(
                "signed by key {}, not by the trusted key {}",
                key_id(&named),
                key_id(t)
            )))
        }
        Some(t) => *t,
        None => named,
    };
    let value: [u8; 64] = hex_field("value")?
        .try_into()
        .map_err(|_| invalid("signature.value is not 64 bytes".into()))?;
    key.verify(text.as_bytes(), &Signature::from_bytes(&value))
        .map_err(|_| invalid("the signature does not match the payload".into()))?;
    let payload: Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("payload: {e}")))?;
    let mut out = Verified {
        key_id: key_id(&key),
        job_id: payload["job_id"].as_str().unwrap_or_default().to_string(),
        checked: Vec::new(),
        missing: Vec::new(),
    };
    for a in payload["artifacts"].as_array().into_iter().flatten() {
        let name = a["name"]
            .as_str()
            .ok_or_else(|| invalid("payload: an artifact has no name".into()))?;
        // Names are flat file names; anything else is not ours to open.
        if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(invalid(format!(
                "payload: artifact name {name:?} is not a file name"
            )));
        }
        let file = dir.join(name);
        let data = match std::fs::read(&file) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                out.missing.push(name.to_string());
                continue;
            }
            Err(source) => return Err(ManifestError::Io { path: file, source }),
        };
        let sha = hex::encode(Sha256::digest(&data));
        if Some(sha.as_str()) != a["sha256"].as_str()
            || Some(data.len() as u64) != a["size_bytes"].as_u64()
        {
            return Err(invalid(format!(
                "{name}: sha256 {sha} ({} bytes) differs from the manifest's {} ({} bytes)",
                data.len(),
                a["sha256"],
                a["size_bytes"]
            )));
        }
        out.checked.push(name.to_string());
    }
    Ok(out)
}

/// Parses a public key given as 64 hex digits.
pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey, ManifestError> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ManifestError::Invalid("the key is not 64 hex digits".into()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| ManifestError::Invalid(format!("the key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed_dir() -> (tempfile::TempDir, Signer) {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::load_or_create(dir.path()).unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"weights").unwrap();
        let sha = hex::encode(Sha256::digest(b"weights"));
        let facts = Facts {
            job_id: uuid::Uuid::nil(),
            tenant: "t",
            model_id: uuid::Uuid::nil(),
            model_name: "m.onnx",
            model_sha256: "00",
            spec: &json!({"preset": "int8"}),
            pipeline: json!([{"method": "quantize", "bits": 8}]),
            attempt: 1,
            created_at_ms: 0,
            artifacts: vec![Entry {
                name: "model.onnx",
                size_bytes: 7,
                sha256: &sha,
            }],
        };
        std::fs::write(dir.path().join(MANIFEST), signer.sign(&payload(&facts))).unwrap();
        (dir, signer)
    }

    #[test]
    fn a_signed_manifest_verifies_and_any_change_is_caught() {
        let (dir, signer) = signed_dir();
        let v = verify_dir(dir.path(), Some(&signer.public_key())).unwrap();
        assert_eq!(v.checked, ["model.onnx"]);
        // The same key loads again from the data directory.
        let again = Signer::load_or_create(dir.path()).unwrap();
        assert_eq!(again.public_key(), signer.public_key());
        // Another key is refused when a key is trusted.
        let other = tempfile::tempdir().unwrap();
        let stranger = Signer::load_or_create(other.path()).unwrap();
        let err = verify_dir(dir.path(), Some(&stranger.public_key())).unwrap_err();
        assert!(err.to_string().contains("not by the trusted key"), "{err}");
        // A changed artifact.
        std::fs::write(dir.path().join("model.onnx"), b"weightz").unwrap();
        let err = verify_dir(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");
        // A changed payload.
        std::fs::write(dir.path().join("model.onnx"), b"weights").unwrap();
        let text = std::fs::read_to_string(dir.path().join(MANIFEST)).unwrap();
        std::fs::write(dir.path().join(MANIFEST), text.replace("m.onnx", "n.onnx")).unwrap();
        let err = verify_dir(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn a_missing_artifact_is_reported_not_passed_over() {
        let (dir, _) = signed_dir();
        std::fs::remove_file(dir.path().join("model.onnx")).unwrap();
        let v = verify_dir(dir.path(), None).unwrap();
        assert!(v.checked.is_empty());
        assert_eq!(v.missing, ["model.onnx"]);
    }
}
