//! Server-Sent Events as agentd writes them: the events a follower has ready go out in one frame, encoded straight
//! into one buffer, and a stream that has been silent for a while writes a keep-alive comment.
//!
//! One frame for several events (a group commit releases many at once) is one trip through hyper's body and one
//! chunk on the wire instead of one per event; the keep-alive's timer is moved only when it fires, not at every
//! write.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_core::Stream;
use tokio::time::{Instant, Sleep};

/// The comment a stream writes when it has had nothing else to say for a while.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// Appends one event: `id: <id_prefix><seq>`, then `data` (compact JSON is one line; a line break in it would
/// start another `data:` line, as the format wants).
pub fn put_event(buf: &mut BytesMut, id_prefix: &str, seq: u64, data: &str) {
    buf.put_slice(b"id: ");
    buf.put_slice(id_prefix.as_bytes());
    buf.put_slice(itoa::Buffer::new().format(seq).as_bytes());
    buf.put_u8(b'\n');
    put_data(buf, data);
}

/// About how many bytes [`put_event`] writes for an event (exactly, when its data is one line).
pub fn event_len(id_prefix: &str, data: &str) -> usize {
    // `id: `, the seq (at most 20 digits), a newline, `data: `, and the blank line.
    4 + id_prefix.len() + 20 + 1 + 6 + data.len() + 2
}

/// Appends one event with the `retry:` field (how long a client waits before it reconnects) and `data`.
pub fn put_retry_event(buf: &mut BytesMut, retry: Duration, data: &str) {
    buf.put_slice(b"retry: ");
    buf.put_slice(itoa::Buffer::new().format(retry.as_millis()).as_bytes());
    buf.put_u8(b'\n');
    put_data(buf, data);
}

/// `data: ` and the text, a `data: ` line per line of it, and the blank line that ends the event.
fn put_data(buf: &mut BytesMut, data: &str) {
    let data = data.as_bytes();
    buf.put_slice(b"data: ");
    let mut from = 0;
    for end in memchr::memchr2_iter(b'\n', b'\r', data) {
        buf.put_slice(&data[from..=end]);
        buf.put_slice(b"data: ");
        from = end + 1;
    }
    buf.put_slice(&data[from..]);
    buf.put_slice(b"\n\n");
}

/// The frames of `inner`, with [`KEEP_ALIVE`] after every `every` without one.
pub struct KeepAlive<S> {
    inner: Pin<Box<S>>,
    every: Duration,
    /// When the keep-alive is due: `every` after the last frame written.
    due: Instant,
    /// Armed for `due` or earlier; moved on only when it fires.
    timer: Pin<Box<Sleep>>,
}

impl<S: Stream<Item = Bytes>> KeepAlive<S> {
    pub fn new(inner: S, every: Duration) -> Self {
        let due = Instant::now() + every;
        Self {
            inner: Box::pin(inner),
            every,
            due,
            timer: Box::pin(tokio::time::sleep_until(due)),
        }
    }
}

impl<S: Stream<Item = Bytes>> Stream for KeepAlive<S> {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if let Poll::Ready(next) = self.inner.as_mut().poll_next(cx) {
            if next.is_some() {
                self.due = Instant::now() + self.every;
            }
            return Poll::Ready(next);
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if now >= self.due {
                self.due = now + self.every;
                let due = self.due;
                self.timer.as_mut().reset(due);
                return Poll::Ready(Some(Bytes::from_static(KEEP_ALIVE)));
            }
            // Frames were written since the timer was armed: wait for what is left.
            let due = self.due;
            self.timer.as_mut().reset(due);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use tokio::sync::mpsc;

    use super::*;

    #[test]
    fn events_are_written_as_the_format_wants() {
        let mut buf = BytesMut::new();
        put_event(
            &mut buf,
            "run:",
            7,
            r#"{"type":"model_delta","content":"a\nb"}"#,
        );
        put_event(
            &mut buf,
            "run:",
            18_446_744_073_709_551_615,
            "two\r\nlines\rand one",
        );
        put_retry_event(&mut buf, Duration::from_millis(250), "{}");
        assert_eq!(
            std::str::from_utf8(&buf).unwrap(),
            "id: run:7\ndata: {\"type\":\"model_delta\",\"content\":\"a\\nb\"}\n\n\
             id: run:18446744073709551615\ndata: two\rdata: \ndata: lines\rdata: and one\n\n\
             retry: 250\ndata: {}\n\n"
        );
        // What a reader makes of it: the same data back.
        let mut decoder = crate::sse::Decoder::new();
        decoder.feed(&buf);
        let first = decoder.next_event().unwrap();
        assert_eq!(first.id, "run:7");
        assert_eq!(first.data, r#"{"type":"model_delta","content":"a\nb"}"#);
        assert_eq!(decoder.next_event().unwrap().data, "two\n\nlines\nand one");
        assert_eq!(
            decoder.next_event().unwrap().retry,
            Some(Duration::from_millis(250))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_follows_every_silence_as_long_as_the_interval_and_no_busy_stream() {
        let every = Duration::from_secs(15);
        let (frames, rx) = mpsc::unbounded_channel::<Bytes>();
        let frames_in = futures_util::stream::unfold(rx, |mut rx| async move {
            let frame = rx.recv().await?;
            Some((frame, rx))
        });
        let mut stream = KeepAlive::new(frames_in, every);
        let started = Instant::now();

        // Silence: a keep-alive after `every`, and after each `every` of silence since.
        assert_eq!(stream.next().await.unwrap(), KEEP_ALIVE);
        assert_eq!(started.elapsed(), every);
        assert_eq!(stream.next().await.unwrap(), KEEP_ALIVE);
        assert_eq!(started.elapsed(), every * 2);

        // Frames written more often than `every`: no keep-alive between them.
        for _ in 0..5 {
            tokio::time::sleep(every / 2).await;
            frames.send(Bytes::from_static(b"data: x\n\n")).unwrap();
            assert_eq!(&stream.next().await.unwrap()[..], b"data: x\n\n");
        }
        let last = Instant::now();
        // Then silence again: the keep-alive comes `every` after the last frame, not after the timer's first arming.
        assert_eq!(stream.next().await.unwrap(), KEEP_ALIVE);
        assert_eq!(last.elapsed(), every);

        drop(frames);
        assert_eq!(stream.next().await, None);
    }
}
