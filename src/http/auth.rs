//! What guards the admin token beyond the comparison itself, shared by the admin API and the
//! dashboard:
//!
//! - [`Throttle`]: failed token checks (a wrong bearer token on `/admin` or `/ui`, a wrong token
//!   in the login form) are counted per client address. After `admin.failed_auth_limit` failures
//!   within `admin.failed_auth_window_seconds` (counted from the first failure), every token check
//!   from that address is answered `429 too_many_requests` with `Retry-After` until the window
//!   ends, the right token included, so a blocked guesser learns nothing. Successes are not
//!   counted. The table is bounded: at most [`THROTTLE_CAPACITY`] addresses are tracked one by
//!   one (IPv6 by /64); when it is full of live entries, new addresses share one overflow bucket.
//! - [`Sessions`]: the dashboard's logins, held server side in a bounded map. The cookie is a
//!   session id and its MAC, both keyed by a random secret drawn when the process starts: the
//!   cookie says nothing about the admin token, logging out removes the session, and a restart
//!   signs everybody out.
//!
//! The client address is the TCP peer (`ConnectInfo<SocketAddr>`, set by the server); without it
//! every client shares one bucket.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use http::request::Parts;
use subtle::ConstantTimeEq;

use crate::config::AdminConfig;
use crate::signature::mac;

/// The most client addresses the throttle tracks one by one.
pub const THROTTLE_CAPACITY: usize = 4096;
/// The most dashboard sessions alive at once; a login beyond it ends the oldest one.
pub const SESSION_CAPACITY: usize = 1024;
/// How long a dashboard login lasts, in seconds.
pub const SESSION_SECONDS: i64 = 12 * 3600;

/// The per-process guards of the admin token.
pub struct Auth {
    pub throttle: Throttle,
    pub sessions: Sessions,
}

impl Auth {
    /// Draws the session secret from the operating system's random source.
    pub fn new(admin: &AdminConfig) -> Result<Auth, String> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)
            .map_err(|e| format!("the operating system's random source failed: {e}"))?;
        Ok(Auth {
            throttle: Throttle::new(
                admin.failed_auth_limit,
                Duration::from_secs(admin.failed_auth_window_seconds),
                THROTTLE_CAPACITY,
            ),
            sessions: Sessions::new(key, SESSION_CAPACITY),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The tables stay consistent at every step, so a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ------------------------------------------------------------------ client address

/// The address a request came from (the TCP peer), when the server recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub Option<IpAddr>);

impl Peer {
    pub fn of(extensions: &http::Extensions) -> Peer {
        Peer(
            extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        )
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer::of(&parts.extensions))
    }
}

// ------------------------------------------------------------------ throttle

/// What one throttle entry counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Bucket {
    V4([u8; 4]),
    /// The /64 prefix: one host usually holds a whole /64.
    V6([u8; 8]),
    /// Requests without a recorded peer address.
    Unknown,
    /// New addresses while the table is full of live entries.
    Overflow,
}

impl Bucket {
    fn of(ip: Option<IpAddr>) -> Bucket {
        match ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(v4)) => Bucket::V4(v4.octets()),
            Some(IpAddr::V6(v6)) => {
                let mut prefix = [0u8; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                Bucket::V6(prefix)
            }
            None => Bucket::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// The outcome of a token check through the throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Wrong; counted.
    Denied,
    /// Not checked: too many failures from this address; retry after this many seconds.
    Throttled(u64),
}

/// Failed token checks per client address, in a bounded table.
pub struct Throttle {
    limit: u32,
    window: Duration,
    capacity: usize,
    table: Mutex<HashMap<Bucket, Window>>,
}

impl Throttle {
    pub fn new(limit: u32, window: Duration, capacity: usize) -> Throttle {
        Throttle {
            limit: limit.max(1),
            window,
            capacity: capacity.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    fn live(&self, w: &Window, now: Instant) -> bool {
        now.saturating_duration_since(w.started) < self.window
    }

    /// The entry `client` counts in: its own, or the overflow bucket when the table is full of
    /// live entries (expired ones are dropped first).
    fn bucket(
        &self,
        table: &mut HashMap<Bucket, Window>,
        client: Option<IpAddr>,
        now: Instant,
    ) -> Bucket {
        let b = Bucket::of(client);
        if table.contains_key(&b) || table.len() < self.capacity {
            return b;
        }
        table.retain(|_, w| self.live(w, now));
        if table.len() < self.capacity {
            b
        } else {
            Bucket::Overflow
        }
    }

    fn wait(&self, w: Option<&Window>, now: Instant) -> Option<u64> {
        let w = w.filter(|w| self.live(w, now) && w.failures >= self.limit)?;
        let left = (w.started + self.window).saturating_duration_since(now);
        Some(left.as_secs() + u64::from(left.subsec_nanos() > 0)).map(|s| s.max(1))
    }

    /// Seconds `client` must still wait, when it is blocked: for checks that must come before
    /// reading a body (the login form).
    pub fn blocked(&self, client: Option<IpAddr>, now: Instant) -> Option<u64> {
        let mut table = lock(&self.table);
        let b = self.bucket(&mut table, client, now);
        self.wait(table.get(&b), now)
    }

    /// Runs `check` (a constant-time token comparison) unless `client` is blocked, and counts it
    /// when it fails. Checking and counting happen under one lock, so parallel guesses cannot
    /// slip past the limit.
    pub fn attempt(
        &self,
        client: Option<IpAddr>,
        now: Instant,
        check: impl FnOnce() -> bool,
    ) -> Verdict {
        let mut table = lock(&self.table);
        let b = self.bucket(&mut table, client, now);
        if let Some(wait) = self.wait(table.get(&b), now) {
            return Verdict::Throttled(wait);
        }
        if check() {
            return Verdict::Allowed;
        }
        let w = table.entry(b).or_insert(Window {
            started: now,
            failures: 0,
        });
        if !self.live(w, now) {
            *w = Window {
                started: now,
                failures: 0,
            };
        }
        w.failures += 1;
        if w.failures == self.limit {
            tracing::warn!(
                client = ?client,
                failures = w.failures,
                window_seconds = self.window.as_secs(),
                "too many failed admin token checks: this address is throttled until the window ends"
            );
        }
        Verdict::Denied
    }

    /// How many entries the table holds (for tests of its bound).
    pub fn tracked(&self) -> usize {
        lock(&self.table).len()
    }
}

// ------------------------------------------------------------------ sessions

/// The dashboard's sessions: random ids kept server side until they expire or are revoked.
pub struct Sessions {
    key: [u8; 32],
    capacity: usize,
    table: Mutex<SessionTable>,
}

struct SessionTable {
    /// Session id -> expiry (Unix seconds).
    live: HashMap<[u8; 16], i64>,
    issued: u64,
}

impl Sessions {
    pub fn new(key: [u8; 32], capacity: usize) -> Sessions {
        Sessions {
            key,
            capacity: capacity.max(1),
            table: Mutex::new(SessionTable {
                live: HashMap::new(),
                issued: 0,
            }),
        }
    }

    fn tag(&self, id: &[u8]) -> Vec<u8> {
        mac(&self.key, &[b"sprintlink-ui-session:", id])
    }

    /// A new session valid for [`SESSION_SECONDS`]; its cookie value `<id hex>.<MAC hex>`.
    pub fn create(&self, now_s: i64) -> String {
        let mut t = lock(&self.table);
        t.issued += 1;
        // Unpredictable without the process's key, unique by the counter.
        let mut id = [0u8; 16];
        id.copy_from_slice(&mac(&self.key, &[b"sprintlink-ui-id:", &t.issued.to_be_bytes()])[..16]);
        if t.live.len() >= self.capacity {
            t.live.retain(|_, exp| *exp > now_s);
        }
        if t.live.len() >= self.capacity
            && let Some(oldest) = t.live.iter().min_by_key(|(_, exp)| **exp).map(|(k, _)| *k)
        {
            t.live.remove(&oldest);
        }
        t.live.insert(id, now_s + SESSION_SECONDS);
        format!("{}.{}", hex::encode(id), hex::encode(self.tag(&id)))
    }

    /// The session id of a well-formed cookie value whose MAC is right (compared in constant time).
    fn id_of(&self, value: &str) -> Option<[u8; 16]> {
        let (id, tag) = value.split_once('.')?;
        let id: [u8; 16] = hex::decode(id).ok()?.try_into().ok()?;
        let tag = hex::decode(tag).ok()?;
        bool::from(self.tag(&id).ct_eq(&tag)).then_some(id)
    }

    /// True when `value` is a live session of this process.
    pub fn valid(&self, value: &str, now_s: i64) -> bool {
        let Some(id) = self.id_of(value) else {
            return false;
        };
        let mut t = lock(&self.table);
        match t.live.get(&id) {
            Some(exp) if *exp > now_s => true,
            Some(_) => {
                t.live.remove(&id);
                false
            }
            None => false,
        }
    }

    /// Ends a session (logout); an unknown or malformed value is ignored.
    pub fn revoke(&self, value: &str) {
        if let Some(id) = self.id_of(value) {
            lock(&self.table).live.remove(&id);
        }
    }

    /// The CSRF token of a session's forms.
    pub fn csrf(&self, value: &str) -> String {
        hex::encode(mac(&self.key, &[b"sprintlink-ui-csrf:", value.as_bytes()]))
    }

    /// How many sessions are held (for tests of the bound).
    pub fn held(&self) -> usize {
        lock(&self.table).live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn throttle_blocks_after_the_limit_until_the_window_ends() {
        let t = Throttle::new(3, Duration::from_secs(60), 16);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(
                t.attempt(a, t0, || true),
                Verdict::Allowed,
                "successes are not counted"
            );
        }
        for _ in 0..3 {
            assert_eq!(t.attempt(a, t0, || false), Verdict::Denied);
        }
        let later = t0 + Duration::from_millis(20_500);
        assert_eq!(t.attempt(a, later, || true), Verdict::Throttled(40));
        assert_eq!(t.blocked(a, later), Some(40));
        let mut checked = false;
        t.attempt(a, later, || {
            checked = true;
            true
        });
        assert!(!checked, "a blocked address's token is not even compared");
        // Other addresses are not affected; IPv4-mapped IPv6 is the same client.
        assert_eq!(t.attempt(ip("192.0.2.2"), later, || true), Verdict::Allowed);
        assert_eq!(t.blocked(ip("::ffff:192.0.2.1"), later), Some(40));
        // After the window, a fresh start.
        let after = t0 + Duration::from_secs(60);
        assert_eq!(t.blocked(a, after), None);
        assert_eq!(t.attempt(a, after, || false), Verdict::Denied);
        assert_eq!(t.attempt(a, after, || true), Verdict::Allowed);
    }

    #[test]
    fn throttle_groups_ipv6_by_64_and_unknown_peers_share_a_bucket() {
        let t = Throttle::new(2, Duration::from_secs(60), 16);
        let now = Instant::now();
        t.attempt(ip("2001:db8:1:2::1"), now, || false);
        t.attempt(ip("2001:db8:1:2::ffff"), now, || false);
        assert!(t.blocked(ip("2001:db8:1:2:abcd::9"), now).is_some());
        assert!(t.blocked(ip("2001:db8:1:3::1"), now).is_none());
        t.attempt(None, now, || false);
        t.attempt(None, now, || false);
        assert!(t.blocked(None, now).is_some());
    }

    #[test]
    fn throttle_memory_is_bounded_under_many_addresses() {
        let t = Throttle::new(3, Duration::from_secs(60), 8);
        let now = Instant::now();
        for i in 0..10_000u32 {
            let addr = IpAddr::from(i.to_be_bytes());
            t.attempt(Some(addr), now, || false);
        }
        assert!(t.tracked() <= 9, "{}", t.tracked());
        // Addresses beyond the table share the overflow bucket, which is blocked by now...
        assert!(t.blocked(ip("198.51.100.7"), now).is_some());
        // ...while the tracked ones keep their own counts.
        assert!(
            t.blocked(Some(IpAddr::from(0u32.to_be_bytes())), now)
                .is_none()
        );
        // Once the window has passed, expired entries make room again.
        let later = now + Duration::from_secs(61);
        assert_eq!(
            t.attempt(ip("198.51.100.7"), later, || true),
            Verdict::Allowed
        );
        t.attempt(ip("198.51.100.7"), later, || false);
        assert!(t.tracked() <= 9);
        assert!(t.blocked(ip("198.51.100.8"), later).is_none());
    }

    #[test]
    fn sessions_expire_are_revocable_and_belong_to_one_process() {
        let s = Sessions::new([7; 32], 16);
        let now = 1_700_000_000;
        let v = s.create(now);
        assert!(s.valid(&v, now));
        assert!(s.valid(&v, now + SESSION_SECONDS - 1));
        assert!(!s.valid(&v, now + SESSION_SECONDS), "expired");
        assert_eq!(s.held(), 0, "an expired session is dropped when seen");

        let v = s.create(now);
        let w = s.create(now);
        assert_ne!(v, w);
        // Tampered, truncated or forged values are refused.
        let (id, tag) = v.split_once('.').unwrap();
        let flipped = format!(
            "{id}.{}{}",
            if tag.starts_with('0') { "1" } else { "0" },
            &tag[1..]
        );
        for bad in [flipped.as_str(), id, "", ".", "zz.zz", &v[..v.len() - 2]] {
            assert!(!s.valid(bad, now), "{bad:?}");
        }
        // Another process (another key) does not know it.
        let other = Sessions::new([8; 32], 16);
        assert!(!other.valid(&v, now));
        // Logout revokes only that session.
        s.revoke(&v);
        assert!(!s.valid(&v, now));
        assert!(s.valid(&w, now));
        // CSRF tokens differ per session and per key.
        assert_ne!(s.csrf(&v), s.csrf(&w));
        assert_ne!(s.csrf(&w), other.csrf(&w));
        assert_eq!(s.csrf(&w).len(), 64);
    }

    #[test]
    fn sessions_are_bounded_and_the_oldest_goes_first() {
        let s = Sessions::new([1; 32], 4);
        let now = 1_700_000_000;
        let first = s.create(now);
        let rest: Vec<String> = (1..=4).map(|i| s.create(now + i)).collect();
        assert_eq!(s.held(), 4);
        assert!(!s.valid(&first, now + 5), "the oldest made room");
        assert!(rest.iter().all(|v| s.valid(v, now + 5)));
    }

    #[test]
    fn auth_keys_are_random_per_process() {
        let a = Auth::new(&AdminConfig::default()).unwrap();
        let b = Auth::new(&AdminConfig::default()).unwrap();
        let v = a.sessions.create(1_700_000_000);
        assert!(a.sessions.valid(&v, 1_700_000_000));
        assert!(!b.sessions.valid(&v, 1_700_000_000));
    }
}
