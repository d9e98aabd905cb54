//! How requests reach a provider: a lane of HTTP clients, each carrying at most [`STREAMS_PER_CONNECTION`] streams,
//! more added as its streams need them, the spare ones dropped once idle, and the first made anew once idle after a
//! burst.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Streams one connection to a provider carries at a time. An HTTP/2 server caps the streams a connection may have
/// open (`SETTINGS_MAX_CONCURRENT_STREAMS`: at least 100 as RFC 9113 recommends; nginx allows 128, hyper 200), and a
/// request past the cap waits until a stream of that connection ends, which for a model's answer can be minutes. The
/// HTTP client keeps one HTTP/2 connection per provider and does not open a second when it is full, so a lane has as
/// many clients as its streams need, each carrying at most this many. Over HTTP/1.1 each stream has its own
/// connection anyway.
pub const STREAMS_PER_CONNECTION: usize = 100;
/// A lane's client other than its first, idle this long, is dropped with its connection: the connections a burst
/// opened do not outlast it for long (each keeps its buffers and tables), and a load that comes and goes around a
/// multiple of 100 streams does not open and close one for each stream. The first client, idle this long after it
/// carried a connection's worth of streams at once, is made anew: its connection's tables (HTTP/2) or its pool of
/// idle connections (HTTP/1.1) are a burst's size, and the HTTP client would keep them until 90 s idle. Otherwise its
/// connection stays for the next stream (closed by the HTTP client after 90 s idle).
const SPARE_IDLE: Duration = Duration::from_secs(10);

/// How requests reach one provider: HTTP clients, each carrying at most [`STREAMS_PER_CONNECTION`] streams, and
/// whether the provider's answers share a connection (HTTP/2), so that a stream to it holds a share of a descriptor
/// rather than one of its own.
#[derive(Debug, Clone)]
pub struct Lane {
    inner: Arc<LaneInner>,
}

#[derive(Debug)]
struct LaneInner {
    client: ClientSettings,
    /// The first is made with the lane and kept (made anew after a burst); the others are made when every one before
    /// is full.
    carriers: Mutex<Vec<Arc<Carrier>>>,
    multiplexed: AtomicBool,
    /// Seen answering over HTTP/1.1 (and not over HTTP/2): each stream has a connection of its own whatever the
    /// client, so the first client carries them all, and its pool keeps their connections for the next ones.
    over_http1: AtomicBool,
}

/// One HTTP client of a lane and the streams it carries now.
#[derive(Debug)]
struct Carrier {
    client: reqwest::Client,
    streams: AtomicUsize,
    /// Whether it has carried [`STREAMS_PER_CONNECTION`] streams at once.
    was_full: AtomicBool,
    /// When its last stream ended; read while `streams` is 0.
    idle_since: Mutex<Instant>,
}

/// What every client of every lane is made with. The TLS settings are made once: each client made from them shares
/// their certificate verifier (and the system's roots it loads) and the cache of TLS sessions to resume.
#[derive(Debug, Clone)]
struct ClientSettings {
    connect_timeout: Duration,
    h2c: bool,
    tls: rustls::ClientConfig,
}

impl ClientSettings {
    fn client(&self) -> reqwest::Client {
        let builder = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .tls_backend_preconfigured(self.tls.clone());
        let builder = if self.h2c {
            builder.http2_prior_knowledge()
        } else {
            builder
        };
        builder
            .build()
            .expect("the HTTP client builds with settings it was first built with")
    }
}

/// HTTP/2 or HTTP/1.1 (ALPN), certificates checked against the system's roots: what the HTTP client does by default.
pub(super) fn tls_settings() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(Arc::clone(&provider))
        .expect("the system's certificate verifier is available");
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the default TLS versions are supported")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tls
}

impl Lane {
    /// A lane whose clients connect within `connect_timeout`, over `tls` (made once by [`tls_settings`], shared by
    /// every lane), and speak HTTP/2 by prior knowledge when `h2c`.
    pub(super) fn new(connect_timeout: Duration, h2c: bool, tls: rustls::ClientConfig) -> Self {
        let client = ClientSettings {
            connect_timeout,
            h2c,
            tls,
        };
        let multiplexed = h2c;
        let first = Carrier::new(client.client());
        let inner = Arc::new(LaneInner {
            client,
            carriers: Mutex::new(vec![first]),
            multiplexed: AtomicBool::new(multiplexed),
            over_http1: AtomicBool::new(false),
        });
        // Every half of SPARE_IDLE, for as long as the lane is in use.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let lane = Arc::downgrade(&inner);
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(SPARE_IDLE / 2).await;
                    let Some(inner) = lane.upgrade() else {
                        return;
                    };
                    Lane { inner }.drop_idle(SPARE_IDLE);
                }
            });
        }
        Self { inner }
    }

    /// Whether this provider's streams share connections: configured (h2c), or seen (it answered over HTTP/2).
    pub fn multiplexed(&self) -> bool {
        self.inner.multiplexed.load(Ordering::Relaxed)
    }

    /// Notes the protocol the provider answered with.
    pub(super) fn saw(&self, version: reqwest::Version) {
        if version == reqwest::Version::HTTP_2 {
            self.inner.multiplexed.store(true, Ordering::Relaxed);
        } else if matches!(
            version,
            reqwest::Version::HTTP_11 | reqwest::Version::HTTP_10
        ) {
            self.inner.over_http1.store(true, Ordering::Relaxed);
        }
    }

    /// A place for one more stream: the first client with room, or a new one when all are full (or the first client,
    /// over HTTP/1.1). The stream counts on its client until the slot is dropped.
    pub fn slot(&self) -> Slot {
        let mut carriers = self
            .inner
            .carriers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let room = if self.inner.over_http1.load(Ordering::Relaxed) && !self.multiplexed() {
            usize::MAX
        } else {
            STREAMS_PER_CONNECTION
        };
        let found = carriers
            .iter()
            .find(|carrier| carrier.streams.load(Ordering::Relaxed) < room)
            .cloned();
        let carrier = found.unwrap_or_else(|| {
            let carrier = Carrier::new(self.inner.client.client());
            carriers.push(Arc::clone(&carrier));
            carrier
        });
        // Counted under the lock, so no client is given more than its share; released without it.
        if carrier.streams.fetch_add(1, Ordering::Relaxed) + 1 >= STREAMS_PER_CONNECTION {
            carrier.was_full.store(true, Ordering::Relaxed);
        }
        Slot { carrier }
    }

    /// Drops the clients other than the first that have carried nothing for `idle`, and their connections; makes the
    /// first anew if it was full once and has carried nothing for `idle`.
    fn drop_idle(&self, idle: Duration) {
        let mut carriers = self
            .inner
            .carriers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut index = 0;
        carriers.retain(|carrier| {
            index += 1;
            index == 1 || !carrier.idle_for(idle)
        });
        if carriers[0].was_full.load(Ordering::Relaxed) && carriers[0].idle_for(idle) {
            carriers[0] = Carrier::new(self.inner.client.client());
        }
    }

    /// How many clients the lane has now (each with at most one connection over HTTP/2).
    pub fn clients(&self) -> usize {
        self.inner
            .carriers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// How many streams its clients carry now.
    pub fn streams(&self) -> usize {
        self.inner
            .carriers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|carrier| carrier.streams.load(Ordering::Relaxed))
            .sum()
    }
}

impl Carrier {
    fn new(client: reqwest::Client) -> Arc<Self> {
        Arc::new(Self {
            client,
            streams: AtomicUsize::new(0),
            was_full: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    fn idle_for(&self, long: Duration) -> bool {
        self.streams.load(Ordering::Relaxed) == 0
            && self
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elapsed()
                >= long
    }
}

/// One stream's place on a lane's client (see [`Lane::slot`]).
#[derive(Debug)]
pub struct Slot {
    carrier: Arc<Carrier>,
}

impl Slot {
    pub fn client(&self) -> &reqwest::Client {
        &self.carrier.client
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut idle_since = self
            .carrier
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.carrier.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            *idle_since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lane as `Providers` makes one: `h2c` configured, or not (then HTTP/2 only once seen).
    fn test_lane(h2c: bool) -> Lane {
        Lane::new(Duration::from_secs(1), h2c, tls_settings())
    }

    #[test]
    fn a_lane_adds_a_client_when_each_carries_its_share_and_drops_idle_ones_but_its_first() {
        let lane = test_lane(true);
        let same = |a: &Slot, b: &Slot| Arc::ptr_eq(&a.carrier, &b.carrier);
        let mut first: Vec<Slot> = (0..STREAMS_PER_CONNECTION).map(|_| lane.slot()).collect();
        assert_eq!(lane.clients(), 1);
        let second = lane.slot();
        assert_eq!(lane.clients(), 2);
        assert!(!same(&second, &first[0]));
        // Room on the first client is taken before the second's.
        first.pop();
        let again = lane.slot();
        assert!(same(&again, &first[0]));
        let also = lane.slot();
        assert!(same(&also, &second));
        // A client carrying a stream stays, however long it has been since it was idle.
        drop(second);
        lane.drop_idle(Duration::ZERO);
        assert_eq!(lane.clients(), 2);
        // Idle, it goes; the lane keeps a first client, idle or not.
        drop((also, first, again));
        lane.drop_idle(Duration::ZERO);
        assert_eq!(lane.clients(), 1);
        // Idle for less than the wait, a client stays.
        let full: Vec<Slot> = (0..STREAMS_PER_CONNECTION).map(|_| lane.slot()).collect();
        drop(lane.slot());
        drop(full);
        lane.drop_idle(SPARE_IDLE);
        assert_eq!(lane.clients(), 2);
    }

    #[test]
    fn a_lanes_first_client_is_made_anew_once_idle_after_it_was_full_and_kept_otherwise() {
        let lane = test_lane(true);
        let first_now = || Arc::clone(&lane.slot().carrier);
        // Never full: kept, however long idle.
        let first = first_now();
        lane.drop_idle(Duration::ZERO);
        assert!(Arc::ptr_eq(&first_now(), &first));
        // Full once: kept while it carries a stream, and while idle for less than the wait.
        let mut full: Vec<Slot> = (0..STREAMS_PER_CONNECTION).map(|_| lane.slot()).collect();
        assert!(Arc::ptr_eq(&full[0].carrier, &first));
        let last = full.pop().unwrap();
        drop(full);
        lane.drop_idle(Duration::ZERO);
        assert!(Arc::ptr_eq(
            &last.carrier,
            &lane.inner.carriers.lock().unwrap()[0]
        ));
        drop(last);
        lane.drop_idle(SPARE_IDLE);
        assert!(Arc::ptr_eq(&first_now(), &first));
        // Idle long enough: made anew, and the new one, never full, is kept.
        lane.drop_idle(Duration::ZERO);
        let anew = first_now();
        assert!(!Arc::ptr_eq(&anew, &first));
        assert_eq!(lane.clients(), 1);
        lane.drop_idle(Duration::ZERO);
        assert!(Arc::ptr_eq(&first_now(), &anew));
    }

    #[test]
    fn over_http1_a_lanes_first_client_carries_every_stream_until_the_provider_answers_over_http2()
    {
        let lane = test_lane(false);
        lane.saw(reqwest::Version::HTTP_11);
        let streams: Vec<Slot> = (0..=2 * STREAMS_PER_CONNECTION)
            .map(|_| lane.slot())
            .collect();
        assert_eq!(lane.clients(), 1);
        assert!(!lane.multiplexed());
        // Its pool keeps a connection for each of them: once they are all idle, it is made anew, its pool with it.
        let first = Arc::clone(&streams[0].carrier);
        drop(streams);
        lane.drop_idle(Duration::ZERO);
        let streams: Vec<Slot> = (0..=2 * STREAMS_PER_CONNECTION)
            .map(|_| lane.slot())
            .collect();
        assert!(!Arc::ptr_eq(&streams[0].carrier, &first));
        assert_eq!(lane.clients(), 1);
        lane.saw(reqwest::Version::HTTP_2);
        assert!(lane.multiplexed());
        let next = lane.slot();
        assert_eq!(lane.clients(), 2);
        assert!(!Arc::ptr_eq(&next.carrier, &streams[0].carrier));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lanes_spare_clients_are_dropped_once_idle_for_a_while() {
        let lane = test_lane(true);
        let streams: Vec<Slot> = (0..=STREAMS_PER_CONNECTION).map(|_| lane.slot()).collect();
        assert_eq!(lane.clients(), 2);
        tokio::time::sleep(SPARE_IDLE * 3).await;
        assert_eq!(lane.clients(), 2, "carrying a stream");
        drop(streams);
        tokio::time::sleep(SPARE_IDLE / 2).await;
        assert_eq!(lane.clients(), 2, "not idle for long enough");
        tokio::time::sleep(SPARE_IDLE).await;
        assert_eq!(lane.clients(), 1, "the first stays");
    }
}
