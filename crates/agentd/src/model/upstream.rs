//! What the HTTP providers share: their lanes of clients (`lane.rs`, 100 streams to a connection), retries, reading
//! an upstream SSE stream with an idle timeout, and the messages users see when a provider fails.
//!
//! Retries: a request answered 429, 500–504 or 529, or that cannot connect, is tried again, up to [`ATTEMPTS`] in
//! all, after an exponential backoff with jitter (or the provider's `Retry-After`). This happens before the upstream
//! stream has produced anything, so the client sees one clean stream. Once the stream is flowing, any failure ends the
//! run: replaying it would repeat text the client already has. Users see a short message by kind (rate limited,
//! unavailable, configuration, broken stream); the log keeps the provider's status and body.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream;
use http_body_util::BodyDataStream;

use super::lane::{self, Lane};
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
    /// many streams share a connection (at most `lane::STREAMS_PER_CONNECTION` on each). Over TLS, HTTP/2 is offered
    /// anyway (ALPN) and used when the provider takes it.
    pub h2c: bool,
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
        let tls = lane::tls_settings();
        let lane = |endpoint: &Endpoint| Lane::new(connect_timeout, endpoint.h2c, tls.clone());
        Self {
            openai_lane: lane(&openai),
            anthropic_lane: lane(&anthropic),
            openai,
            anthropic,
            idle_timeout,
        }
    }

    /// Each provider's lane, by the name a model spec gives the provider (`openai:…`, `anthropic:…`).
    pub fn lanes(&self) -> [(&'static str, &Lane); 2] {
        [
            ("openai", &self.openai_lane),
            ("anthropic", &self.anthropic_lane),
        ]
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

/// What upstream events meant, not yet handed on, oldest first. Nearly every event means one thing (a piece of
/// text), which is kept in place; only a second one waits in a queue. (A queue kept by every open stream was an
/// allocation of 320 bytes each, held while the stream waited for its provider.)
#[derive(Debug, Default)]
pub struct Ready {
    first: Option<ModelEvent>,
    rest: VecDeque<ModelEvent>,
}

impl Ready {
    pub fn push_back(&mut self, event: ModelEvent) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(event);
        } else {
            self.rest.push_back(event);
        }
    }

    pub fn pop_front(&mut self) -> Option<ModelEvent> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    pub fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
    }
}

impl Extend<ModelEvent> for Ready {
    fn extend<I: IntoIterator<Item = ModelEvent>>(&mut self, events: I) {
        events.into_iter().for_each(|event| self.push_back(event));
    }
}

/// Reads a provider's wire format, one SSE event at a time.
pub trait WireParser: Send + 'static {
    /// What one upstream event means, added to `out`; an error ends the run.
    fn read(&mut self, event: &Event, out: &mut Ready) -> Result<(), ModelError>;
    /// Whether the provider has said its answer is complete; a stream that ends before that is broken.
    fn done(&self) -> bool;

    /// What one upstream event means, on its own.
    #[cfg(test)]
    fn on_event(&mut self, event: &Event) -> Result<Vec<ModelEvent>, ModelError> {
        let mut out = Ready::default();
        self.read(event, &mut out)?;
        Ok(std::iter::from_fn(|| out.pop_front()).collect())
    }
}

/// The model's events from an upstream SSE response, with an idle timeout between upstream events. Dropping the
/// stream drops the response, which closes the connection to the provider.
pub fn parse_stream<P: WireParser + Unpin>(
    provider: &'static str,
    response: reqwest::Response,
    parser: P,
    idle: Duration,
) -> Pin<Box<Upstream<P>>> {
    Box::pin(Upstream {
        provider,
        body: BodyDataStream::new(response.into()),
        decoder: sse::Decoder::new(),
        parser,
        ready: Ready::default(),
        ended: false,
        idle,
        waiting_since: None,
        idle_timer: Box::pin(tokio::time::sleep(idle)),
        _place: None,
    })
}

/// An upstream stream as it is read: the response's body, its SSE decoder, the provider's parser and what it made of
/// the last event, and the idle timer, in one allocation (a stream of streams, each boxed, was seven of them, about
/// 700 bytes held by every stream waiting for its provider).
pub struct Upstream<P> {
    provider: &'static str,
    body: BodyDataStream<reqwest::Body>,
    decoder: sse::Decoder,
    parser: P,
    ready: Ready,
    /// The stream ended, or failed (its error was the last item).
    ended: bool,
    idle: Duration,
    /// When this wait for the provider began: when the stream was read again after it handed an event on, or after
    /// the last upstream event, however long its reader was away before.
    waiting_since: Option<tokio::time::Instant>,
    /// Fires once the stream may have gone `idle`: moved on when it fires early, rather than set anew for every
    /// event (a timer made and dropped per event took about 5% of agentd's CPU on an unpaced stream).
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    /// The stream's place on its lane's client, kept for as long as the stream is open.
    _place: Option<lane::Slot>,
}

impl<P> std::fmt::Debug for Upstream<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("provider", &self.provider)
            .field("ended", &self.ended)
            .field("waiting_since", &self.waiting_since)
            .finish_non_exhaustive()
    }
}

impl<P> Upstream<P> {
    /// `event` comes out first again, before anything the stream holds.
    fn unread(&mut self, event: ModelEvent) {
        if let Some(first) = self.ready.first.replace(event) {
            self.ready.rest.push_front(first);
        }
    }

    /// Whether the provider has been silent for `idle` since `since`; arms the timer otherwise.
    fn poll_idle(&mut self, cx: &mut Context<'_>, since: tokio::time::Instant) -> Poll<()> {
        loop {
            ready!(self.idle_timer.as_mut().poll(cx));
            let deadline = since + self.idle;
            if deadline <= tokio::time::Instant::now() {
                return Poll::Ready(());
            }
            self.idle_timer.as_mut().reset(deadline);
        }
    }
}

impl<P: WireParser + Unpin> futures_core::Stream for Upstream<P> {
    type Item = Result<ModelEvent, ModelError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.ready.pop_front() {
                // The next wait begins when the stream is read again.
                this.waiting_since = None;
                return Poll::Ready(Some(Ok(event)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let since = *this
                .waiting_since
                .get_or_insert_with(tokio::time::Instant::now);
            let next = match this.decoder.poll_event(Pin::new(&mut this.body), cx) {
                Poll::Ready(next) => next,
                Poll::Pending => {
                    ready!(this.poll_idle(cx, since));
                    tracing::warn!(
                        provider = this.provider,
                        idle_s = this.idle.as_secs_f64(),
                        "model provider stream went idle"
                    );
                    this.ended = true;
                    return Poll::Ready(Some(Err(ModelError::StoppedAnswering(this.provider))));
                }
            };
            // Silence is counted again from here. `ready` is empty: what the event means goes there, and nothing of
            // it if it is an error.
            this.waiting_since = None;
            let parsed = match next {
                Some(Ok(event)) => {
                    let read = this.parser.read(&event, &mut this.ready);
                    if read.is_err() {
                        this.ready.clear();
                    }
                    read
                }
                Some(Err(error)) => {
                    tracing::warn!(provider = this.provider, %error, "model provider stream broke");
                    Err(ModelError::BrokenStream(this.provider))
                }
                None => {
                    this.ended = true;
                    if this.parser.done() {
                        Ok(())
                    } else {
                        tracing::warn!(
                            provider = this.provider,
                            "model provider stream ended before its end marker"
                        );
                        Err(ModelError::BrokenStream(this.provider))
                    }
                }
            };
            if let Err(error) = parsed {
                this.ended = true;
                return Poll::Ready(Some(Err(error)));
            }
        }
    }
}

/// POSTs `body` to `url` through `lane` (with retries, `authorize` adding the provider's credentials) and reads the
/// answer stream with the provider's parser.
pub fn post_and_stream<P: WireParser + Default + Unpin>(
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
            match events.next().await {
                Some(Err(
                    error @ (ModelError::Overloaded(_)
                    | ModelError::RateLimited(_)
                    | ModelError::Unavailable(_)),
                )) if attempt < ATTEMPTS => {
                    tracing::warn!(provider, %error, attempt, "model provider failed before its answer began; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
                // An error ends the stream: it is its one item.
                Some(Err(error)) => return Err(error),
                Some(Ok(first)) => events.unread(first),
                None => {}
            }
            // The stream keeps its place on the client until it is dropped.
            events._place = Some(slot);
            return Ok(events as ModelStream);
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

    #[test]
    fn ready_events_come_out_oldest_first_however_they_went_in() {
        let text = |t: &str| ModelEvent::TextDelta(t.to_owned());
        let mut ready = Ready::default();
        assert!(ready.pop_front().is_none());
        ready.push_back(text("a"));
        ready.extend([text("b"), text("c")]);
        assert!(matches!(ready.pop_front(), Some(ModelEvent::TextDelta(t)) if t == "a"));
        // One taken from the front while others wait: what comes in now goes behind them.
        ready.push_back(text("d"));
        let rest: Vec<_> = std::iter::from_fn(|| ready.pop_front()).collect();
        assert!(
            matches!(&rest[..], [ModelEvent::TextDelta(b), ModelEvent::TextDelta(c), ModelEvent::TextDelta(d)]
                if b == "b" && c == "c" && d == "d"),
            "{rest:?}"
        );
        ready.extend([text("e"), text("f")]);
        ready.clear();
        assert!(ready.pop_front().is_none());
        ready.push_back(text("g"));
        assert!(matches!(ready.pop_front(), Some(ModelEvent::TextDelta(t)) if t == "g"));
    }

    /// Each event's data as one text delta; done at `[DONE]`.
    #[derive(Default)]
    struct Echo {
        done: bool,
    }

    impl WireParser for Echo {
        fn read(&mut self, event: &Event, out: &mut Ready) -> Result<(), ModelError> {
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

    /// Each event's data twice over, as two text deltas (a provider's event that means two things).
    #[derive(Default)]
    struct Twice;

    impl WireParser for Twice {
        fn read(&mut self, event: &Event, out: &mut Ready) -> Result<(), ModelError> {
            out.extend([
                ModelEvent::TextDelta(format!("{}1", event.data)),
                ModelEvent::TextDelta(format!("{}2", event.data)),
            ]);
            Ok(())
        }

        fn done(&self) -> bool {
            true
        }
    }

    /// What the retry check read first goes back in front of what the same upstream event meant after it.
    #[tokio::test]
    async fn an_event_read_back_comes_out_first_and_the_rest_in_order() {
        let (send, frames) = tokio::sync::mpsc::unbounded_channel();
        let mut events = parse_stream("test", answer(frames), Twice, Duration::from_secs(10));
        send.send("data: a\n\ndata: b\n\n".to_owned()).unwrap();
        drop(send);
        let first = events.next().await.unwrap().unwrap();
        events.unread(first);
        let all: Vec<String> = events.map(|event| text(Some(event))).collect().await;
        assert_eq!(all, ["a1", "a2", "b1", "b2"]);
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
