//! What the HTTP providers share: the clients (a provider's streams 100 to a connection), retries, reading an
//! upstream SSE stream with an idle timeout, and the messages users see when a provider fails.
//!
//! Retries: a request answered 429, 500–504 or 529, or that cannot connect, is tried again, up to [`ATTEMPTS`] in
//! all, after an exponential backoff with jitter (or the provider's `Retry-After`). This happens before the upstream
//! stream has produced anything, so the client sees one clean stream. Once the stream is flowing, any failure ends the
//! run: replaying it would repeat text the client already has. Users see a short message by kind (rate limited,
//! unavailable, configuration, broken stream); the log keeps the provider's status and body.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream;
use tokio::time::Instant;

use super::{ModelError, ModelEvent, ModelStream};
use crate::secret::Secret;
use crate::sse::{self, Event};

/// Tries per request, the first included.
pub const ATTEMPTS: u32 = 3;
/// First backoff; doubled on each retry, with jitter.
const BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait a `Retry-After` may ask for before we give up instead.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(20);
/// How much of an upstream error body the log keeps.
const LOGGED_BODY: usize = 2000;

/// Where a provider is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub base_url: String,
    pub api_key: Option<Secret>,
    /// Speak HTTP/2 without TLS, by prior knowledge (`OPENAI_H2C`): for a local server that supports it, so that
    /// many streams share a connection (at most [`STREAMS_PER_CONNECTION`] on each). Over TLS, HTTP/2 is offered
    /// anyway (ALPN) and used when the provider takes it.
    pub h2c: bool,
}

/// Streams one connection to a provider carries at a time. An HTTP/2 server caps the streams a connection may have
/// open (`SETTINGS_MAX_CONCURRENT_STREAMS`: at least 100 as RFC 9113 recommends; nginx allows 128, hyper 200), and a
/// request past the cap waits until a stream of that connection ends, which for a model's answer can be minutes. The
/// HTTP client keeps one HTTP/2 connection per provider and does not open a second when it is full, so a lane has as
/// many clients as its streams need, each carrying at most this many. Over HTTP/1.1 each stream has its own
/// connection anyway.
pub const STREAMS_PER_CONNECTION: usize = 100;
/// A lane's client other than its first, idle this long, is dropped with its connection: the connections a burst
/// opened do not outlast it for long (each keeps its buffers and tables), and a load that comes and goes around a
/// multiple of 100 streams does not open and close one for each stream. (The first client's connection is closed
/// by the HTTP client after 90 s idle.)
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
    /// The first is made with the lane and kept; the others are made when every one before is full.
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
fn tls_settings() -> rustls::ClientConfig {
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
    fn new(client: ClientSettings, multiplexed: bool) -> Self {
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
    fn saw(&self, version: reqwest::Version) {
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
        carrier.streams.fetch_add(1, Ordering::Relaxed);
        Slot { carrier }
    }

    /// Drops the clients other than the first that have carried nothing for `idle`, and their connections.
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
    }

    /// How many clients the lane has now (each with at most one connection over HTTP/2).
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.inner
            .carriers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Carrier {
    fn new(client: reqwest::Client) -> Arc<Self> {
        Arc::new(Self {
            client,
            streams: AtomicUsize::new(0),
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

/// The HTTP clients and the settings every provider request uses.
#[derive(Debug, Clone)]
pub struct Providers {
    pub openai: Endpoint,
    pub anthropic: Endpoint,
    pub openai_lane: Lane,
    pub anthropic_lane: Lane,
    /// Longest silence allowed inside an upstream stream.
    pub idle_timeout: Duration,
}

impl Providers {
    pub fn new(
        openai: Endpoint,
        anthropic: Endpoint,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let tls = tls_settings();
        let lane = |endpoint: &Endpoint| {
            let client = ClientSettings {
                connect_timeout,
                h2c: endpoint.h2c,
                tls: tls.clone(),
            };
            Lane::new(client, endpoint.h2c)
        };
        Self {
            openai_lane: lane(&openai),
            anthropic_lane: lane(&anthropic),
            openai,
            anthropic,
            idle_timeout,
        }
    }
}

fn retryable(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500..=504 | 529)
}

/// Sends the request built by `build`, retrying as the module docs say; returns a response whose stream can be read.
pub async fn send(
    provider: &'static str,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, ModelError> {
    let mut attempt = 1;
    loop {
        let failure = match build().send().await {
            Ok(response) if response.status().is_success() => return Ok(response),
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = response.text().await.unwrap_or_default();
                let body: String = body.chars().take(LOGGED_BODY).collect();
                tracing::warn!(provider, status = status.as_u16(), %body, attempt, "model provider answered an error");
                if !retryable(status) {
                    return Err(ModelError::Refused(provider));
                }
                let error = if status.as_u16() == 429 {
                    ModelError::RateLimited(provider)
                } else {
                    ModelError::Unavailable(provider)
                };
                (error, retry_after)
            }
            Err(error) => {
                tracing::warn!(provider, %error, attempt, "could not reach the model provider");
                (ModelError::Unavailable(provider), None)
            }
        };
        let (error, retry_after) = failure;
        if attempt >= ATTEMPTS || retry_after.is_some_and(|wait| wait > MAX_RETRY_AFTER) {
            return Err(error);
        }
        tokio::time::sleep(retry_after.unwrap_or_else(|| backoff(attempt))).await;
        attempt += 1;
    }
}

/// `BACKOFF * 2^(attempt-1)`, scaled by a jitter factor in [0.5, 1.0).
fn backoff(attempt: u32) -> Duration {
    let jitter = 0.5 + fastrand::f64() / 2.0;
    (BACKOFF * 2u32.pow(attempt - 1)).mul_f64(jitter)
}

/// Reads a provider's wire format, one SSE event at a time.
pub trait WireParser: Send + 'static {
    /// What one upstream event means, added to `out`; an error ends the run.
    fn read(&mut self, event: &Event, out: &mut VecDeque<ModelEvent>) -> Result<(), ModelError>;
    /// Whether the provider has said its answer is complete; a stream that ends before that is broken.
    fn done(&self) -> bool;

    /// What one upstream event means, on its own.
    #[cfg(test)]
    fn on_event(&mut self, event: &Event) -> Result<Vec<ModelEvent>, ModelError> {
        let mut out = VecDeque::new();
        self.read(event, &mut out)?;
        Ok(out.into())
    }
}

/// The model's events from an upstream SSE response, with an idle timeout between upstream events. Dropping the
/// stream drops the response, which closes the connection to the provider.
pub fn parse_stream<P: WireParser>(
    provider: &'static str,
    response: reqwest::Response,
    parser: P,
    idle: Duration,
) -> ModelStream {
    struct State<P> {
        events: std::pin::Pin<Box<dyn futures_core::Stream<Item = Result<Event, String>> + Send>>,
        parser: P,
        ready: VecDeque<ModelEvent>,
        ended: bool,
        /// Fires once the stream may have gone `idle`: moved on when it fires early, rather than set anew for every
        /// event (a timer made and dropped per event took about 5% of agentd's CPU on an unpaced stream).
        idle_timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    }
    let events = sse::events(response.bytes_stream());
    // Boxed: the stream hands its state on with every event, and a pointer moves where the state would be copied.
    let state = Box::new(State {
        events: Box::pin(events),
        parser,
        ready: VecDeque::new(),
        ended: false,
        idle_timer: Box::pin(tokio::time::sleep(idle)),
    });
    Box::pin(stream::unfold(state, move |mut state| async move {
        loop {
            if let Some(event) = state.ready.pop_front() {
                return Some((Ok(event), state));
            }
            if state.ended {
                return None;
            }
            // Idle is silence from here: from when this stream is read again, however long its reader was away.
            let waiting_since = tokio::time::Instant::now();
            let next = loop {
                tokio::select! {
                    biased;
                    next = state.events.next() => break next,
                    () = state.idle_timer.as_mut() => {
                        let deadline = waiting_since + idle;
                        if deadline > tokio::time::Instant::now() {
                            state.idle_timer.as_mut().reset(deadline);
                            continue;
                        }
                        tracing::warn!(
                            provider,
                            idle_s = idle.as_secs_f64(),
                            "model provider stream went idle"
                        );
                        state.ended = true;
                        return Some((Err(ModelError::StoppedAnswering(provider)), state));
                    }
                }
            };
            // `ready` is empty here: what the event means goes there, and nothing of it if it is an error.
            let parsed = match next {
                Some(Ok(event)) => {
                    let read = state.parser.read(&event, &mut state.ready);
                    if read.is_err() {
                        state.ready.clear();
                    }
                    read
                }
                Some(Err(error)) => {
                    tracing::warn!(provider, %error, "model provider stream broke");
                    Err(ModelError::BrokenStream(provider))
                }
                None => {
                    state.ended = true;
                    if state.parser.done() {
                        Ok(())
                    } else {
                        tracing::warn!(
                            provider,
                            "model provider stream ended before its end marker"
                        );
                        Err(ModelError::BrokenStream(provider))
                    }
                }
            };
            if let Err(error) = parsed {
                state.ended = true;
                return Some((Err(error), state));
            }
        }
    }))
}

/// POSTs `body` to `url` through `lane` (with retries, `authorize` adding the provider's credentials) and reads the
/// answer stream with the provider's parser.
pub fn post_and_stream<P: WireParser + Default>(
    provider: &'static str,
    lane: &Lane,
    idle: Duration,
    url: String,
    body: serde_json::Value,
    authorize: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> ModelStream {
    let lane = lane.clone();
    once_opened(async move {
        let mut attempt = 1;
        loop {
            let slot = lane.slot();
            let response =
                send(provider, || authorize(slot.client().post(&url).json(&body))).await?;
            lane.saw(response.version());
            let mut events = parse_stream(provider, response, P::default(), idle);
            // An overload told inside the stream before anything came (Anthropic's `event: error` right after
            // `message_start`) is the streaming form of a 529: retried like the status, since nothing was shown yet.
            let first = events.next().await;
            if let Some(Err(error)) = &first
                && matches!(
                    error,
                    ModelError::Overloaded(_)
                        | ModelError::RateLimited(_)
                        | ModelError::Unavailable(_)
                )
                && attempt < ATTEMPTS
            {
                tracing::warn!(provider, %error, attempt, "model provider failed before its answer began; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
            // The stream keeps its place on the client until it is dropped.
            let events = stream::iter(first).chain(events).map(move |event| {
                let _place = &slot;
                event
            });
            return Ok(Box::pin(events) as ModelStream);
        }
    })
}

/// The events of a stream that must first be opened (a request sent, retried); a failure to open it is the stream's
/// one item.
///
/// The opening (about 2 KB: the request, its body, the client's send) lives in its own allocation, freed once the
/// stream is open, rather than inline in the stream a run holds for as long as the answer lasts.
fn once_opened(
    open: impl std::future::Future<Output = Result<ModelStream, ModelError>> + Send + 'static,
) -> ModelStream {
    Box::pin(
        stream::once(Box::pin(open))
            .map(|opened| match opened {
                Ok(events) => events,
                Err(error) => Box::pin(stream::iter([Err(error)])) as ModelStream,
            })
            .flatten(),
    )
}

/// Parses one event's JSON data, or says the stream is broken.
pub fn json(provider: &'static str, data: &str) -> Result<serde_json::Value, ModelError> {
    serde_json::from_str(data).map_err(|error| {
        tracing::warn!(provider, %error, "model provider sent an event that is not JSON");
        ModelError::BrokenStream(provider)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each event's data as one text delta; done at `[DONE]`.
    #[derive(Default)]
    struct Echo {
        done: bool,
    }

    impl WireParser for Echo {
        fn read(
            &mut self,
            event: &Event,
            out: &mut VecDeque<ModelEvent>,
        ) -> Result<(), ModelError> {
            if event.data == "[DONE]" {
                self.done = true;
            } else {
                out.push_back(ModelEvent::TextDelta(event.data.clone()));
            }
            Ok(())
        }

        fn done(&self) -> bool {
            self.done
        }
    }

    /// A provider's answer whose body is the frames sent on the channel, as they are sent.
    fn answer(frames: tokio::sync::mpsc::UnboundedReceiver<String>) -> reqwest::Response {
        let body = stream::unfold(frames, |mut frames| async move {
            let frame = frames.recv().await?;
            Some((Ok::<_, std::io::Error>(bytes::Bytes::from(frame)), frames))
        });
        reqwest::Response::from(axum::http::Response::new(reqwest::Body::wrap_stream(body)))
    }

    fn text(event: Option<Result<ModelEvent, ModelError>>) -> String {
        match event {
            Some(Ok(ModelEvent::TextDelta(text))) => text,
            other => panic!("not a text delta: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_silent_for_the_idle_timeout_stops_the_stream_counted_from_when_it_is_read()
    {
        let idle = Duration::from_secs(10);
        let (send, frames) = tokio::sync::mpsc::unbounded_channel();
        let mut events = parse_stream("test", answer(frames), Echo::default(), idle);
        send.send("data: one\n\n".to_owned()).unwrap();
        assert_eq!(text(events.next().await), "one");

        // The reader was away three idle periods (a slow store, say) while the provider said nothing: the provider
        // still has a whole idle period from when it is read again.
        tokio::time::sleep(idle * 3).await;
        let reading = tokio::time::Instant::now();
        assert!(matches!(
            events.next().await,
            Some(Err(ModelError::StoppedAnswering("test")))
        ));
        assert_eq!(reading.elapsed(), idle);
        assert!(events.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_that_pauses_less_than_the_idle_timeout_is_read_to_its_end() {
        let idle = Duration::from_secs(10);
        let (send, frames) = tokio::sync::mpsc::unbounded_channel();
        let mut events = parse_stream("test", answer(frames), Echo::default(), idle);
        tokio::spawn(async move {
            for n in 0..6 {
                send.send(format!("data: {n}\n\n")).unwrap();
                tokio::time::sleep(idle * 9 / 10).await;
            }
            send.send("data: [DONE]\n\n".to_owned()).unwrap();
        });
        let began = tokio::time::Instant::now();
        for n in 0..6 {
            assert_eq!(text(events.next().await), n.to_string());
        }
        assert!(events.next().await.is_none(), "the answer ends cleanly");
        assert!(began.elapsed() >= idle * 5, "{:?}", began.elapsed());
    }

    /// A lane as `Providers` makes one: `h2c` configured, or not (then HTTP/2 only once seen).
    fn test_lane(h2c: bool) -> Lane {
        let settings = ClientSettings {
            connect_timeout: Duration::from_secs(1),
            h2c,
            tls: tls_settings(),
        };
        Lane::new(settings, h2c)
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
        // Idle, it goes; the first stays, idle or not.
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
    fn over_http1_a_lanes_first_client_carries_every_stream_until_the_provider_answers_over_http2()
    {
        let lane = test_lane(false);
        lane.saw(reqwest::Version::HTTP_11);
        let streams: Vec<Slot> = (0..=2 * STREAMS_PER_CONNECTION)
            .map(|_| lane.slot())
            .collect();
        assert_eq!(lane.clients(), 1);
        assert!(!lane.multiplexed());
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

    #[test]
    fn backoff_doubles_with_jitter() {
        for attempt in 1..=3 {
            let full = BACKOFF * 2u32.pow(attempt - 1);
            let wait = backoff(attempt);
            assert!(wait >= full / 2 && wait < full, "{attempt}: {wait:?}");
        }
    }

    #[test]
    fn only_overload_and_server_errors_are_retried() {
        for code in [429, 500, 502, 503, 504, 529] {
            assert!(
                retryable(reqwest::StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
        for code in [400, 401, 403, 404, 422] {
            assert!(
                !retryable(reqwest::StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
    }
}
