//! Reading a Server-Sent Events stream (a model provider's answer, or agentd's own stream in `agentd chat`), in time
//! linear in its bytes.
//!
//! Each byte is looked at once: the search for a line's end resumes where the last one stopped when a line spans
//! chunks, and consumed bytes are dropped from the buffer only when they make up at least half of it, so the cost of
//! moving what is left is paid for by what was consumed. (A parser that shifts its buffer after every event costs the
//! square of the bytes of one read.) Lines end with LF, CRLF or CR, including a CRLF split across two chunks; a
//! leading byte-order mark is skipped; the fields are those of the WHATWG `EventSource` processing model.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its `event:` type; `message` when none was given (not allocated for each event: most have none).
    pub event: Cow<'static, str>,
    /// Its `data:` lines joined with `\n`.
    pub data: String,
    /// The last `id:` seen in the stream so far ("" when none).
    pub id: String,
    /// The `retry:` given with this event, if any.
    pub retry: Option<Duration>,
}

impl Default for Event {
    fn default() -> Self {
        Self {
            event: Cow::Borrowed("message"),
            data: String::new(),
            id: String::new(),
            retry: None,
        }
    }
}

/// The UTF-8 byte-order mark, skipped at the start of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Turns bytes, fed in chunks of any size, into events.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Where the next line starts in `buf`.
    pos: usize,
    /// How far past `pos` a line end has been looked for already.
    scanned: usize,
    /// The last line ended with CR: an LF right after it is part of that line end.
    after_cr: bool,
    /// Whether a possible byte-order mark at the start has been dealt with.
    started: bool,
    pending: Pending,
}

/// The event being read.
#[derive(Debug, Default)]
struct Pending {
    event: String,
    data: String,
    has_data: bool,
    id: String,
    retry: Option<Duration>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < chunk.len() {
            // A new buffer for what is left and the chunk: growing this one would copy all of its old allocation,
            // consumed bytes included, and a provider's reads can be hundreds of KiB.
            let left = &self.buf[self.pos..];
            let mut grown =
                Vec::with_capacity((left.len() + chunk.len()).max(2 * self.buf.capacity()));
            grown.extend_from_slice(left);
            self.buf = grown;
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Gives back the buffer when everything fed has been read (nothing of a line is waiting for the rest of it): a
    /// stream that waits long for its next bytes (a model thinking) holds no buffer meanwhile.
    fn release_if_read(&mut self) {
        if self.pos == self.buf.len() {
            self.buf = Vec::new();
            self.pos = 0;
        }
    }

    /// The next event of `bytes`, the stream this decoder is fed from: `None` at its end (bytes after the last blank
    /// line, an event never finished, are dropped), or the error reading it. While the next bytes are not there, the
    /// buffer goes if all of it was read.
    pub fn poll_event<E>(
        &mut self,
        mut bytes: Pin<&mut impl Stream<Item = Result<Bytes, E>>>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Event, E>>> {
        loop {
            if let Some(event) = self.next_event() {
                return Poll::Ready(Some(Ok(event)));
            }
            match bytes.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => self.feed(&chunk),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    self.release_if_read();
                    return Poll::Pending;
                }
            }
        }
    }

    /// The next complete event in what was fed so far, if there is one.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if !self.started {
                let rest = &self.buf[self.pos..];
                if rest.len() < BOM.len() && BOM.starts_with(rest) {
                    return None;
                }
                if rest.starts_with(BOM) {
                    self.pos += BOM.len();
                }
                self.started = true;
            }
            if self.after_cr {
                match self.buf.get(self.pos) {
                    None => return None,
                    Some(b'\n') => self.pos += 1,
                    Some(_) => {}
                }
                self.after_cr = false;
            }
            let from = self.pos + self.scanned;
            let Some(found) = memchr::memchr2(b'\n', b'\r', &self.buf[from..]) else {
                self.scanned = self.buf.len() - self.pos;
                return None;
            };
            let end = from + found;
            self.after_cr = self.buf[end] == b'\r';
            let line = self.pos..end;
            self.pos = end + 1;
            self.scanned = 0;
            if let Some(event) = self.pending.line(&self.buf[line]) {
                return Some(event);
            }
        }
    }
}

impl Pending {
    fn line(&mut self, line: &[u8]) -> Option<Event> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                let value = text(value);
                // The line and its newline in one allocation.
                self.data.reserve(value.len() + 1);
                self.data.push_str(&value);
                self.data.push('\n');
                self.has_data = true;
            }
            b"event" => self.event = text(value).into_owned(),
            b"id" if !value.contains(&0) => self.id = text(value).into_owned(),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Ok(ms) = text(value).parse() {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<Event> {
        let event = std::mem::take(&mut self.event);
        let retry = self.retry.take();
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        Some(Event {
            event: if event.is_empty() {
                Cow::Borrowed("message")
            } else {
                Cow::Owned(event)
            },
            data,
            id: self.id.clone(),
            retry,
        })
    }
}

/// Bytes as text; a byte that is not UTF-8 becomes U+FFFD, as a browser decodes an event stream.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    // The strict check reads ASCII a word at a time; the lossy one goes byte by byte, and a provider's text is
    // nearly always valid.
    match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// The events of a byte stream; an error reading it is the last item. Bytes after the last blank line (an event
/// that was never finished) are dropped, as the processing model says.
pub fn events<E: std::fmt::Display>(
    bytes: impl Stream<Item = Result<Bytes, E>> + Send + 'static,
) -> Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>> {
    let mut bytes = Box::pin(bytes);
    let mut decoder = Decoder::new();
    let mut ended = false;
    Box::pin(futures_util::stream::poll_fn(move |cx| {
        if ended {
            return Poll::Ready(None);
        }
        let next = ready!(decoder.poll_event(bytes.as_mut(), cx));
        ended = !matches!(next, Some(Ok(_)));
        Poll::Ready(next.map(|event| event.map_err(|error| error.to_string())))
    }))
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn decode_in(chunks: &[&[u8]]) -> Vec<Event> {
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk);
            while let Some(event) = decoder.next_event() {
                out.push(event);
            }
        }
        out
    }

    #[test]
    fn the_buffer_goes_once_all_of_it_is_read_and_stays_while_a_line_waits_for_its_end() {
        let mut decoder = Decoder::new();
        decoder.feed(b"data: a\n\n");
        assert_eq!(decoder.next_event(), Some(data("message", "a")));
        assert_eq!(decoder.next_event(), None);
        decoder.release_if_read();
        assert_eq!(decoder.buf.capacity(), 0);
        // Half a line: kept for the rest of it.
        decoder.feed(b"data: b");
        assert_eq!(decoder.next_event(), None);
        decoder.release_if_read();
        assert_eq!(&decoder.buf[decoder.pos..], b"data: b");
        decoder.feed(b"c\r");
        assert_eq!(decoder.next_event(), None);
        // The line ended with CR, read; whether an LF follows is told by the next bytes, which need no buffer.
        decoder.release_if_read();
        decoder.feed(b"\n\n");
        assert_eq!(decoder.next_event(), Some(data("message", "bc")));
        decoder.release_if_read();
        assert_eq!(decoder.buf.capacity(), 0);
    }

    fn data(event: &str, data: &str) -> Event {
        Event {
            event: event.to_owned().into(),
            data: data.to_owned(),
            ..Event::default()
        }
    }

    #[test]
    fn the_processing_model_examples() {
        let events = decode_in(&[b": a comment\n\
            data: first\n\n\
            event: update\ndata: two\ndata:  lines\n\n\
            data\n\n\
            id: 7\nretry: 300\ndata:x\n\n\
            event: lost\n\n\
            data: unfinished"]);
        assert_eq!(events.len(), 4, "{events:?}");
        assert_eq!(events[0], data("message", "first"));
        assert_eq!(events[1], data("update", "two\n lines"));
        assert_eq!(events[2], data("message", ""));
        assert_eq!(
            events[3],
            Event {
                id: "7".into(),
                retry: Some(Duration::from_millis(300)),
                ..data("message", "x")
            }
        );
    }

    #[test]
    fn every_line_ending_and_a_crlf_split_across_chunks() {
        let events = decode_in(&[
            b"\xEF\xBB",
            b"\xBFdata: a\r",
            b"\n\r\ndata: b\r\rdata: c\n\n",
        ]);
        assert_eq!(
            events,
            [
                data("message", "a"),
                data("message", "b"),
                data("message", "c")
            ]
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_become_replacement_characters() {
        let events = decode_in(&[b"data: a\xFFb\n\n"]);
        assert_eq!(events, [data("message", "a\u{FFFD}b")]);
    }

    /// A random stream of events in random line endings, comments and field orders; what it must decode to.
    fn random_stream(rng: &mut fastrand::Rng) -> (Vec<u8>, Vec<(String, String)>) {
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        // One kind of line end per stream: a CR line end followed by an LF one would read as one CRLF.
        let ending: &[u8] = match rng.u8(0..3) {
            0 => b"\n",
            1 => b"\r\n",
            _ => b"\r",
        };
        let newline = |_: &mut fastrand::Rng| ending;
        let word = |rng: &mut fastrand::Rng| -> String {
            let alphabet = ['a', 'b', ' ', ':', 'é', '{', '"', '✓', '0'];
            (0..rng.usize(0..12))
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect()
        };
        for _ in 0..rng.usize(0..40) {
            if rng.u8(0..5) == 0 {
                bytes.extend_from_slice(b": keep-alive");
                bytes.extend_from_slice(newline(rng));
            }
            let kind = if rng.bool() {
                let kind = format!("kind{}", rng.u8(0..9));
                bytes.extend_from_slice(format!("event: {kind}").as_bytes());
                bytes.extend_from_slice(newline(rng));
                kind
            } else {
                "message".to_owned()
            };
            let lines: Vec<String> = (0..rng.usize(1..4)).map(|_| word(rng)).collect();
            for line in &lines {
                // With or without the one space after the colon that is not part of the value.
                let prefix: &[u8] = if line.starts_with(' ') || rng.bool() {
                    b"data: "
                } else {
                    b"data:"
                };
                bytes.extend_from_slice(prefix);
                bytes.extend_from_slice(line.as_bytes());
                bytes.extend_from_slice(newline(rng));
            }
            bytes.extend_from_slice(newline(rng));
            expected.push((kind, lines.join("\n")));
        }
        (bytes, expected)
    }

    #[test]
    fn any_split_of_a_random_stream_decodes_to_its_events() {
        for seed in 0..2000 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (bytes, expected) = random_stream(&mut rng);
            let mut cuts: Vec<usize> = (0..rng.usize(0..8))
                .map(|_| rng.usize(0..=bytes.len()))
                .collect();
            cuts.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut at = 0;
            for cut in cuts {
                chunks.push(&bytes[at..cut]);
                at = cut;
            }
            chunks.push(&bytes[at..]);
            let got: Vec<(String, String)> = decode_in(&chunks)
                .into_iter()
                .map(|e| (e.event.into_owned(), e.data))
                .collect();
            assert_eq!(
                got,
                expected,
                "seed {seed}: {:?}",
                String::from_utf8_lossy(&bytes)
            );
            // Byte by byte too.
            let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(decode_in(&bytewise).len(), expected.len(), "seed {seed}");
        }
    }

    /// The same streams, read by another implementation of the processing model, give the same events.
    #[tokio::test]
    async fn another_parser_agrees_on_random_streams() {
        use eventsource_stream::Eventsource;
        for seed in 0..300 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (mut bytes, _) = random_stream(&mut rng);
            // That parser holds a CR at the very end of a stream, waiting for an LF that never comes (this one
            // ends the line at once, as the processing model says); an LF there means the same to both.
            if bytes.ends_with(b"\r") {
                bytes.push(b'\n');
            }
            let chunks: Vec<Result<Bytes, std::convert::Infallible>> = bytes
                .chunks(rng.usize(1..64))
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            let theirs: Vec<(String, String)> = futures_util::stream::iter(chunks.clone())
                .eventsource()
                .map(|e| e.map(|e| (e.event, e.data)).unwrap())
                .collect()
                .await;
            let ours: Vec<(String, String)> = events(futures_util::stream::iter(chunks))
                .map(|e| e.map(|e| (e.event.into_owned(), e.data)).unwrap())
                .collect()
                .await;
            assert_eq!(
                ours,
                theirs,
                "seed {seed}: {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn the_buffer_keeps_only_what_is_not_yet_consumed() {
        let mut decoder = Decoder::new();
        let event = b"data: 0123456789abcdef\n\n";
        for _ in 0..10_000 {
            decoder.feed(event);
            assert!(decoder.next_event().is_some());
        }
        assert!(
            decoder.buf.len() <= 2 * event.len(),
            "{}",
            decoder.buf.len()
        );
        // One long line fed in small pieces is searched once, not once per piece.
        let mut decoder = Decoder::new();
        decoder.feed(b"data: ");
        for _ in 0..1000 {
            decoder.feed(b"xxxxxxxxxx");
            assert!(decoder.next_event().is_none());
            assert_eq!(decoder.scanned, decoder.buf.len() - decoder.pos);
        }
        decoder.feed(b"\n\n");
        assert_eq!(decoder.next_event().unwrap().data.len(), 10_000);
    }

    #[tokio::test]
    async fn a_byte_stream_becomes_events_and_an_error_ends_it() {
        let chunks: Vec<Result<Bytes, String>> = vec![
            Ok(Bytes::from_static(b"data: a\n")),
            Ok(Bytes::from_static(b"\ndata: b\n\n")),
            Err("reset".to_owned()),
            Ok(Bytes::from_static(b"data: never\n\n")),
        ];
        let got: Vec<Result<Event, String>> =
            events(futures_util::stream::iter(chunks)).collect().await;
        assert_eq!(
            got,
            [
                Ok(data("message", "a")),
                Ok(data("message", "b")),
                Err("reset".to_owned())
            ]
        );
    }
}
