//! Signed webhooks: a job may name `"webhook": {"url": "https://…"}`; on its terminal state
//! the server POSTs the job, signed with the tenant's secret.
//!
//! - **Durable.** The database writes a delivery row in the same transaction that ends the
//!   job (a trigger, `migrations/0006`); [`spawn_deliverer`] sends due rows and retries
//!   with exponential backoff until `MODELPRESS_WEBHOOK_GIVE_UP_SECS` have passed, then
//!   records `gave_up`. A restart loses nothing; a delivery may arrive twice (at least once),
//!   so receivers dedupe on `Modelpress-Delivery`.
//! - **Signed** like Stripe's: `Modelpress-Signature: t=UNIX_SECONDS,v1=HEX` where HEX is
//!   HMAC-SHA256 with the tenant's secret over `"{t}.{body}"`. README shows how to check it.
//! - **SSRF guard.** http(s) only; every address the host resolves to must be public (not
//!   loopback, private, link-local, CGNAT, multicast, documentation or cloud-metadata
//!   addresses) unless `MODELPRESS_WEBHOOK_ALLOW` lists its network; the connection goes to
//!   the addresses that were checked (pinned, no second lookup), through no proxy, and
//!   redirects are not followed.

use crate::queue::{DeliveryOutcome, DeliveryRecord, JobQueue, QueueError, WebhookOutbox};
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

type HmacSha256 = hmac::Hmac<sha2_11::Sha256>;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "modelpress-signature";

/// The `webhook` block of a job spec: its URL, checked for form (not yet resolved).
pub fn parse(spec: &Value) -> Result<Option<reqwest::Url>, String> {
    let Some(block) = spec.get("webhook") else {
        return Ok(None);
    };
    let obj = block
        .as_object()
        .ok_or("webhook: must be an object {\"url\": \"https://…\"}")?;
    if let Some(k) = obj.keys().find(|k| k.as_str() != "url") {
        return Err(format!(
            "webhook.{}: unknown field (expected url)",
            crate::util::clip(k)
        ));
    }
    let raw = obj
        .get("url")
        .and_then(Value::as_str)
        .ok_or("webhook.url: is required (a string)")?;
    if raw.len() > 2048 {
        return Err("webhook.url: longer than 2048 characters".into());
    }
    let url = reqwest::Url::parse(raw).map_err(|e| format!("webhook.url: not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "webhook.url: scheme {:?} is not http or https",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("webhook.url: has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "webhook.url: must not carry credentials (the signature authenticates the server)"
                .into(),
        );
    }
    Ok(Some(url))
}

/// Networks a webhook may reach although they are not public (`MODELPRESS_WEBHOOK_ALLOW`:
/// comma-separated CIDRs such as `10.0.0.0/8,127.0.0.1/32`).
#[derive(Debug, Clone, Default)]
pub struct AllowList(Vec<(IpAddr, u8)>);

impl FromStr for AllowList {
    type Err = String;
    fn from_str(s: &str) -> Result<AllowList, String> {
        let mut nets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (addr, len) = match part.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (part, None),
            };
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("{part:?} is not an IP network (CIDR)"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = match len {
                None => max,
                Some(l) => l
                    .parse::<u8>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| format!("{part:?}: prefix length must be 0..={max}"))?,
            };
            nets.push((ip, len));
        }
        Ok(AllowList(nets))
    }
}

impl AllowList {
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|(net, len)| in_network(ip, *net, *len))
    }
}

fn in_network(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Why an address is no place for a webhook, or None when it is public.
pub fn blocked(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => {
            // An IPv4 address written as IPv6 is judged as the IPv4 address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return blocked_v4(v4);
            }
            blocked_v6(v6)
        }
    }
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified (\"this network\")")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        // 169.254.169.254 is the cloud metadata service.
        Some("link-local (cloud metadata)")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("carrier-grade NAT (shared)")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else if ip.is_documentation() {
        Some("documentation")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        Some("multicast, broadcast or reserved")
    } else {
        None
    }
}

/// The IPv4 address two 16-bit groups of an IPv6 address spell.
fn v4_of(high: u16, low: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(high) << 16) | u32::from(low))
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        // fd00:ec2::254 (AWS metadata over IPv6) is in here.
        Some("unique local (private)")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("documentation")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64 (64:ff9b::/96, and the local-use 64:ff9b:1::/48) can reach any IPv4
        // address, private ones included.
        Some("NAT64")
    } else if s[0] == 0x2002 && blocked_v4(v4_of(s[1], s[2])).is_some() {
        // 6to4 carries the IPv4 address it reaches in its second and third groups.
        Some("6to4 of a non-public IPv4 address")
    } else if s[0] == 0x2001
        && s[1] == 0
        && (blocked_v4(v4_of(s[2], s[3])).is_some() || blocked_v4(v4_of(!s[6], !s[7])).is_some())
    {
        // Teredo: the server's IPv4 address in the third and fourth groups, the client's
        // (bits inverted) in the last two.
        Some("Teredo with a non-public IPv4 address")
    } else if ip.to_ipv4().is_some() {
        Some("IPv4-compatible")
    } else {
        None
    }
}

/// Resolves the URL's host and checks every address; the connection must go to exactly
/// these (see [`client_for`]).
pub async fn resolve(url: &reqwest::Url, allow: &AllowList) -> Result<Vec<SocketAddr>, String> {
    let host = url.host_str().ok_or("the URL has no host")?;
    let port = url.port_or_known_default().ok_or("the URL has no port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::lookup_host((host, port)),
        )
        .await
        .map_err(|_| format!("looking up {host} took more than 5 s"))?
        .map_err(|e| format!("{host} does not resolve: {e}"))?
        .collect(),
    };
    if addrs.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    for a in &addrs {
        if let Some(why) = blocked(a.ip()) {
            if !allow.allows(a.ip()) {
                return Err(format!(
                    "{host} resolves to {} ({why}); webhooks go to public addresses only \
                     unless MODELPRESS_WEBHOOK_ALLOW lists the network",
                    a.ip()
                ));
            }
        }
    }
    Ok(addrs)
}

/// A client that connects only to `addrs` for the URL's host, follows no redirect and uses
/// no proxy.
pub fn client_for(url: &reqwest::Url, addrs: &[SocketAddr]) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .user_agent(concat!(
            "modelpress/",
            env!("CARGO_PKG_VERSION"),
            " webhook"
        ));
    if let Some(host) = url.host_str() {
        if host.parse::<IpAddr>().is_err() {
            b = b.resolve_to_addrs(host, addrs);
        }
    }
    b.build().map_err(|e| e.to_string())
}

/// `t=UNIX_SECONDS,v1=HEX`: HMAC-SHA256 with `secret` over `"{t}.{body}"`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A fresh tenant secret: `whsec_` and 64 hex digits (256 random bits).
pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS has randomness");
    format!("whsec_{}", hex::encode(b))
}

/// How tenants' webhook secrets rest in the database: sealed, never in plain text (issue 30
/// item 8). A stored value is `sealed:v1:NONCE:CIPHERTEXT:TAG` (hex): the secret XORed with an
/// HMAC-SHA256 keystream over a random nonce, and an HMAC tag binding it to its tenant. The
/// key is derived from the server's signing key, which lives in its own 0600 file (a fleet's
/// processes share it): a copy of the database alone yields no secret.
#[derive(Clone)]
pub struct SecretSeal {
    key: [u8; 32],
}

const SEALED: &str = "sealed:v1:";

impl SecretSeal {
    pub fn new(key: [u8; 32]) -> SecretSeal {
        SecretSeal { key }
    }

    /// The seal of the server whose signing key is `signer`.
    pub fn of(signer: &crate::manifest::Signer) -> SecretSeal {
        SecretSeal::new(signer.derive_key("webhook secrets"))
    }

    /// HMAC-SHA256 under the seal's key over length-prefixed parts.
    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for p in parts {
            mac.update(&(p.len() as u64).to_le_bytes());
            mac.update(p);
        }
        mac
    }

    fn xor_keystream(&self, nonce: &[u8], data: &mut [u8]) {
        for (block, chunk) in data.chunks_mut(32).enumerate() {
            let pad = self.mac(&[b"stream", nonce, &(block as u64).to_le_bytes()]);
            for (d, k) in chunk.iter_mut().zip(pad.finalize().into_bytes()) {
                *d ^= k;
            }
        }
    }

    pub fn seal(&self, tenant: &str, secret: &str) -> String {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("the OS has randomness");
        let mut data = secret.as_bytes().to_vec();
        self.xor_keystream(&nonce, &mut data);
        let tag = self.mac(&[b"tag", tenant.as_bytes(), &nonce, &data]);
        let tag = &tag.finalize().into_bytes()[..16];
        format!(
            "{SEALED}{}:{}:{}",
            hex::encode(nonce),
            hex::encode(&data),
            hex::encode(tag)
        )
    }

    /// The secret a stored value seals for `tenant`.
    pub fn open(&self, tenant: &str, stored: &str) -> Result<String, String> {
        let parts: Vec<Vec<u8>> = stored
            .strip_prefix(SEALED)
            .ok_or("not a sealed value")?
            .split(':')
            .map(hex::decode)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("a sealed webhook secret: {e}"))?;
        let [nonce, data, tag] = parts.as_slice() else {
            return Err("a sealed webhook secret has three parts".into());
        };
        self.mac(&[b"tag", tenant.as_bytes(), nonce, data])
            .verify_truncated_left(tag)
            .map_err(|_| {
                "a webhook secret sealed under another signing key (every process of a fleet \
                 must name one --signing-key-file) or altered"
                    .to_string()
            })?;
        let mut data = data.clone();
        self.xor_keystream(nonce, &mut data);
        String::from_utf8(data).map_err(|_| "a sealed webhook secret is not text".into())
    }
}

/// The tenant's webhook secret, made and stored sealed on first use. A value some earlier
/// server stored in plain text is sealed in its place.
pub async fn tenant_secret(
    outbox: &dyn WebhookOutbox,
    seal: &SecretSeal,
    tenant: &str,
) -> Result<String, QueueError> {
    let stored = outbox
        .webhook_secret(tenant, &seal.seal(tenant, &new_secret()))
        .await?;
    if stored.starts_with(SEALED) {
        return seal.open(tenant, &stored).map_err(QueueError::Corrupt);
    }
    outbox
        .reseal_webhook_secret(tenant, &stored, &seal.seal(tenant, &stored))
        .await?;
    Ok(stored)
}

/// Seals every webhook secret an earlier server stored in plain text (at start-up).
pub async fn seal_plain_secrets(
    outbox: &dyn WebhookOutbox,
    seal: &SecretSeal,
) -> Result<usize, QueueError> {
    let plain = outbox.plain_webhook_secrets(SEALED).await?;
    for (tenant, secret) in &plain {
        outbox
            .reseal_webhook_secret(tenant, secret, &seal.seal(tenant, secret))
            .await?;
    }
    Ok(plain.len())
}

/// The backoff after `attempts` failed deliveries: `base_ms` doubled each time, at most an hour.
pub fn backoff_ms(base_ms: u64, attempts: i64) -> i64 {
    let doublings = (attempts.clamp(1, 30) - 1) as u32;
    base_ms
        .saturating_mul(1u64 << doublings.min(20))
        .min(3_600_000) as i64
}

/// What sends webhooks: the outbox, the jobs it posts, and the delivery settings.
#[derive(Clone)]
pub struct Deliverer {
    pub outbox: Arc<dyn WebhookOutbox>,
    pub jobs: Arc<dyn JobQueue>,
    pub allow: AllowList,
    /// How often the outbox is read (`MODELPRESS_WEBHOOK_POLL_MS`).
    pub poll_ms: u64,
    /// The first retry's delay; each later one doubles it.
    pub retry_base_ms: u64,
    /// A delivery not made this long after its job ended is given up.
    pub give_up_secs: u64,
    /// How the tenants' secrets rest in the outbox.
    pub seal: SecretSeal,
}

/// Sends due deliveries every second until shutdown.
pub fn spawn_deliverer(
    state: Deliverer,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match state
                .outbox
                .due_deliveries(crate::util::now_ms(), 60_000, 16)
                .await
            {
                Ok(due) => {
                    for d in due {
                        deliver(&state, d).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read the webhook outbox"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(state.poll_ms)) => {}
                _ = stop.cancelled() => break,
            }
        }
    })
}

/// One attempt at one delivery; its outcome is recorded.
async fn deliver(state: &Deliverer, d: DeliveryRecord) {
    let attempt = d.attempts + 1;
    let result = attempt_delivery(state, &d).await;
    let now = crate::util::now_ms();
    let give_up_at = d.created_at + (state.give_up_secs as i64) * 1000;
    let outcome = match result {
        Ok(status) => {
            metrics::counter!("modelpress_webhook_deliveries_total", "outcome" => "delivered")
                .increment(1);
            tracing::info!(delivery = d.id, job_id = %d.job_id, status, "webhook delivered");
            DeliveryOutcome::Delivered { status }
        }
        Err((status, error, permanent)) => {
            let next = now + backoff_ms(state.retry_base_ms, attempt);
            if permanent || next > give_up_at {
                metrics::counter!("modelpress_webhook_deliveries_total", "outcome" => "gave_up")
                    .increment(1);
                tracing::warn!(delivery = d.id, job_id = %d.job_id, error, attempt, "webhook delivery gave up");
                DeliveryOutcome::GaveUp { status, error }
            } else {
                metrics::counter!("modelpress_webhook_deliveries_total", "outcome" => "retry")
                    .increment(1);
                tracing::info!(delivery = d.id, job_id = %d.job_id, error, attempt, "webhook delivery failed; will retry");
                DeliveryOutcome::Retry {
                    status,
                    error,
                    at: next,
                }
            }
        }
    };
    if let Err(e) = state.outbox.finish_delivery(d.id, &outcome).await {
        tracing::warn!(error = %e, delivery = d.id, "could not record a webhook delivery");
    }
}

/// The status of a 2xx answer, or (status, why, whether retrying is pointless).
async fn attempt_delivery(
    state: &Deliverer,
    d: &DeliveryRecord,
) -> Result<i64, (Option<i64>, String, bool)> {
    let url = reqwest::Url::parse(&d.url).map_err(|e| (None, e.to_string(), true))?;
    let addrs = resolve(&url, &state.allow).await.map_err(|e| {
        // A blocked address is the policy's answer, not a passing failure.
        let permanent = e.contains("webhooks go to public addresses only");
        (None, e, permanent)
    })?;
    let job = state
        .jobs
        .get_job(&d.tenant_id, d.job_id)
        .await
        .map_err(|e| (None, e.to_string(), false))?
        .ok_or_else(|| (None, "the job no longer exists".to_string(), true))?;
    let artifacts = state
        .jobs
        .artifacts(d.job_id)
        .await
        .map_err(|e| (None, e.to_string(), false))?;
    let body = serde_json::to_vec(&json!({
        "event": d.event,
        "delivery_id": d.id,
        "job": crate::views::job_view(&job, &artifacts),
    }))
    .map_err(|e| (None, e.to_string(), true))?;
    let secret = tenant_secret(state.outbox.as_ref(), &state.seal, &d.tenant_id)
        .await
        .map_err(|e| (None, e.to_string(), false))?;
    let t = crate::util::now_ms() / 1000;
    let client = client_for(&url, &addrs).map_err(|e| (None, e, false))?;
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header(SIGNATURE_HEADER, signature(&secret, t, &body))
        .header("modelpress-event", &d.event)
        .header("modelpress-delivery", d.id.to_string())
        .body(body)
        .send()
        .await
        .map_err(|e| (None, format!("POST failed: {e}"), false))?;
    let status = i64::from(resp.status().as_u16());
    if resp.status().is_success() {
        Ok(status)
    } else if resp.status().is_redirection() {
        Err((
            Some(status),
            format!("answered {status}; redirects are not followed"),
            false,
        ))
    } else {
        Err((Some(status), format!("answered {status}"), false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_for_its_tenant_under_its_key_only() {
        let seal = SecretSeal::new([7; 32]);
        let secret = new_secret();
        let stored = seal.seal("acme", &secret);
        assert!(stored.starts_with(SEALED) && !stored.contains(&secret["whsec_".len()..]));
        assert_eq!(seal.open("acme", &stored).unwrap(), secret);
        assert_ne!(
            stored,
            seal.seal("acme", &secret),
            "a fresh nonce each time"
        );
        assert!(seal.open("other", &stored).is_err(), "bound to its tenant");
        assert!(SecretSeal::new([8; 32]).open("acme", &stored).is_err());
        let mut flipped = stored.clone().into_bytes();
        let at = SEALED.len() + 40;
        flipped[at] = if flipped[at] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(seal.open("acme", &flipped).is_err(), "altered ciphertext");
        for bad in ["whsec_00", "sealed:v1:zz:00:00", "sealed:v1:00:00"] {
            assert!(seal.open("acme", bad).is_err(), "{bad}");
        }
    }

    /// A database an earlier version wrote holds secrets in plain text: the start-up pass
    /// seals them in place, and the tenant keeps the secret its receivers verify with.
    #[tokio::test]
    async fn secrets_stored_in_plain_text_are_sealed_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let db = crate::queue::sqlite::SqliteStore::open(&url).await.unwrap();
        use crate::queue::KeyStore;
        for tenant in ["acme", "beta"] {
            let key = crate::queue::KeyRecord {
                id: uuid::Uuid::now_v7(),
                tenant_id: tenant.into(),
                scope: "admin".into(),
                prefix: "mp_test".into(),
                created_at: 1,
                revoked_at: None,
                last_used_at: None,
            };
            db.insert_key(&key, &format!("hash-{tenant}"))
                .await
                .unwrap();
        }
        let old = new_secret();
        assert_eq!(db.webhook_secret("acme", &old).await.unwrap(), old);
        let seal = SecretSeal::new([9; 32]);
        assert_eq!(seal_plain_secrets(&db, &seal).await.unwrap(), 1);
        assert_eq!(seal_plain_secrets(&db, &seal).await.unwrap(), 0);
        let stored = db.webhook_secret("acme", "unused").await.unwrap();
        assert!(stored.starts_with(SEALED), "{stored}");
        assert_eq!(tenant_secret(&db, &seal, "acme").await.unwrap(), old);
        // A new tenant's secret is made sealed, and is the same on every read.
        let fresh = tenant_secret(&db, &seal, "beta").await.unwrap();
        assert!(fresh.starts_with("whsec_"));
        assert_eq!(tenant_secret(&db, &seal, "beta").await.unwrap(), fresh);
        assert!(db.plain_webhook_secrets(SEALED).await.unwrap().is_empty());
        db.close().await;
    }

    /// 6to4 and Teredo carry an IPv4 address, NAT64 reaches one: each is judged by it.
    #[test]
    fn six_to_four_teredo_and_nat64_are_judged_by_the_ipv4_address_they_carry() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for refused in [
            "2002:7f00:1::",                        // 6to4 of 127.0.0.1
            "2002:a9fe:a9fe::1",                    // 6to4 of 169.254.169.254 (cloud metadata)
            "2002:c0a8:101::",                      // 6to4 of 192.168.1.1
            "2001:0:7f00:1::ffff:fffe",             // Teredo, server 127.0.0.1
            "2001:0:4136:e378:8000:63bf:f5ff:fffe", // Teredo, client 10.0.0.1 (inverted)
            "64:ff9b::a00:1",                       // NAT64 of 10.0.0.1
            "64:ff9b::808:808", // NAT64 reaches anything: refused whatever it carries
            "64:ff9b:1::a00:1", // local-use NAT64
        ] {
            assert!(blocked(ip(refused)).is_some(), "{refused} passed");
        }
        for passed in [
            "2002:808:808::",                       // 6to4 of 8.8.8.8
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7", // Teredo, server 65.54.227.120, client 8.8.8.8
            "2606:4700:4700::1111",
        ] {
            assert_eq!(blocked(ip(passed)), None, "{passed}");
        }
    }

    #[test]
    fn private_and_metadata_addresses_are_blocked_and_public_ones_pass() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ] {
            assert!(
                blocked(ip.parse().unwrap()).is_some(),
                "{ip} should be blocked"
            );
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(blocked(ip.parse().unwrap()), None, "{ip} is public");
        }
    }

    #[test]
    fn the_allow_list_matches_networks() {
        let allow: AllowList = "127.0.0.1/32, 10.0.0.0/8,fd00::/8".parse().unwrap();
        assert!(allow.allows("127.0.0.1".parse().unwrap()));
        assert!(!allow.allows("127.0.0.2".parse().unwrap()));
        assert!(allow.allows("10.200.1.1".parse().unwrap()));
        assert!(allow.allows("fd12::1".parse().unwrap()));
        assert!(!allow.allows("192.168.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<AllowList>().is_err());
        assert!("example.com".parse::<AllowList>().is_err());
    }

    #[tokio::test]
    async fn resolve_refuses_blocked_addresses_unless_allowed() {
        let none = AllowList::default();
        for url in [
            "http://127.0.0.1:9/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://localhost:8080/",
        ] {
            let u = reqwest::Url::parse(url).unwrap();
            let err = resolve(&u, &none).await.unwrap_err();
            assert!(err.contains("public addresses only"), "{url}: {err}");
        }
        let allow: AllowList = "127.0.0.0/8".parse().unwrap();
        let u = reqwest::Url::parse("http://127.0.0.1:9/x").unwrap();
        assert_eq!(resolve(&u, &allow).await.unwrap().len(), 1);
    }

    #[test]
    fn the_spec_block_is_checked_for_form() {
        assert!(parse(&json!({})).unwrap().is_none());
        let ok = parse(&json!({"webhook": {"url": "https://example.com/hook"}})).unwrap();
        assert_eq!(ok.unwrap().host_str(), Some("example.com"));
        for (bad, says) in [
            (json!({"webhook": "https://x"}), "must be an object"),
            (json!({"webhook": {}}), "is required"),
            (json!({"webhook": {"url": "ftp://x/"}}), "not http or https"),
            (
                json!({"webhook": {"url": "file:///etc/passwd"}}),
                "not http or https",
            ),
            (
                json!({"webhook": {"url": "https://u:p@example.com/"}}),
                "credentials",
            ),
            (
                json!({"webhook": {"url": "https://x/", "secret": 1}}),
                "unknown field",
            ),
            (json!({"webhook": {"url": "not a url"}}), "not a URL"),
        ] {
            let err = parse(&bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    /// The signature, computed the slow, obvious way (RFC 2104 over sha2 0.10), agrees with
    /// the hmac crate's.
    #[test]
    fn the_signature_is_rfc_2104_hmac_sha256_over_t_dot_body() {
        use sha2::{Digest, Sha256};
        let (secret, t, body) = (
            "whsec_abc",
            1_700_000_000i64,
            br#"{"event":"job.succeeded"}"#,
        );
        let mut key = [0u8; 64];
        key[..secret.len()].copy_from_slice(secret.as_bytes());
        let pad = |b: u8| key.iter().map(|k| k ^ b).collect::<Vec<u8>>();
        let msg = [format!("{t}.").as_bytes(), body].concat();
        let inner = Sha256::digest([pad(0x36), msg].concat());
        let outer = Sha256::digest([pad(0x5c), inner.to_vec()].concat());
        assert_eq!(
            signature(secret, t, body),
            format!("t={t},v1={}", hex::encode(outer))
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_ms(1000, 1), 1000);
        assert_eq!(backoff_ms(1000, 2), 2000);
        assert_eq!(backoff_ms(1000, 5), 16000);
        assert_eq!(backoff_ms(1000, 40), 3_600_000);
    }
}
