//! The chunks nearly every event of an answer is, read in one pass without serde: a piece of text, and perhaps why
//! the answer stopped.
//!
//! A chunk arrives for every few characters of an answer, and reading it into serde's derived structs was the largest
//! cost of an event on its way from the provider to the client: on the benchmark's box about 350 ns an event read
//! that way (its text taken out included; the SSE lines around it another 135), 205 with this reader. It reads JSON
//! strictly, and takes a chunk only where it reads it exactly as serde reads it into `Chunk`; anything else is left to
//! serde (`None`): tool call fragments, a usage or error that is not `null`, a key given twice, a key or finish reason
//! with escapes, a `\u` escape of a surrogate, nesting deeper than [`MAX_DEPTH`], and every JSON error.

use std::borrow::Cow;

use crate::json;

/// Nesting deeper than this is left to serde (which refuses more than 128).
const MAX_DEPTH: usize = 64;

/// What a plain chunk says of its first choice.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plain<'a> {
    /// `choices[0].delta.content`, when a string.
    pub content: Option<Cow<'a, str>>,
    /// `choices[0].finish_reason`, when a string.
    pub finish_reason: Option<&'a str>,
}

/// The chunk `json` when it is plain: no tool calls, no usage, no error.
pub(super) fn plain(json: &str) -> Option<Plain<'_>> {
    let mut reader = Reader { text: json, at: 0 };
    let mut plain = Plain::default();
    reader.fields(0, ["choices", "usage", "error"], |reader, field| {
        if field != 0 {
            // A usage or an error: serde's.
            return None;
        }
        reader.array(1, |reader, index| {
            if index == 0 {
                choice(reader, &mut plain)
            } else {
                reader.skip(2)
            }
        })
    })?;
    reader.whitespace();
    (reader.at == json.len()).then_some(plain)
}

/// The first choice: `delta` and `finish_reason`.
fn choice<'a>(reader: &mut Reader<'a>, plain: &mut Plain<'a>) -> Option<()> {
    reader.fields(2, ["delta", "finish_reason"], |reader, field| {
        if field == 1 {
            plain.finish_reason = Some(reader.plain_string()?);
            return Some(());
        }
        reader.fields(3, ["content", "tool_calls"], |reader, field| {
            if field == 1 {
                // Tool calls: serde's.
                return None;
            }
            plain.content = Some(reader.string()?);
            Some(())
        })
    })
}

struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// Takes `byte`, after whitespace.
    fn take(&mut self, byte: u8) -> Option<()> {
        self.whitespace();
        (self.peek() == Some(byte)).then(|| self.at += 1)
    }

    /// Takes `null` if it comes next.
    fn null(&mut self) -> bool {
        self.whitespace();
        self.literal(b"null").is_some()
    }

    /// An object at `depth`, each value read by `value` after its key.
    fn object(
        &mut self,
        depth: usize,
        mut value: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.take(b'{')?;
        if self.take(b'}').is_some() {
            return Some(());
        }
        loop {
            self.whitespace();
            let key = self.plain_string()?;
            self.take(b':')?;
            value(self, key)?;
            if self.take(b',').is_none() {
                return self.take(b'}');
            }
        }
    }

    /// An object at `depth` whose fields named in `names` are read by `value`, with the name's place, unless `null`
    /// (as serde reads an absent one); a field given twice is refused, as serde refuses it; other fields are skipped.
    fn fields<const N: usize>(
        &mut self,
        depth: usize,
        names: [&str; N],
        mut value: impl FnMut(&mut Self, usize) -> Option<()>,
    ) -> Option<()> {
        let mut seen = [false; N];
        self.object(depth, |reader, key| {
            let Some(field) = names.iter().position(|name| *name == key) else {
                return reader.skip(depth + 1);
            };
            if std::mem::replace(&mut seen[field], true) {
                return None;
            }
            if reader.null() {
                return Some(());
            }
            value(reader, field)
        })
    }

    /// An array at `depth`, each element read by `element` with its index.
    fn array(
        &mut self,
        depth: usize,
        mut element: impl FnMut(&mut Self, usize) -> Option<()>,
    ) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.take(b'[')?;
        if self.take(b']').is_some() {
            return Some(());
        }
        for index in 0.. {
            element(self, index)?;
            if self.take(b',').is_none() {
                break;
            }
        }
        self.take(b']')
    }

    /// Any value at `depth`, read and dropped.
    fn skip(&mut self, depth: usize) -> Option<()> {
        self.whitespace();
        match self.peek()? {
            b'{' => self.object(depth, |reader, _| reader.skip(depth + 1)),
            b'[' => self.array(depth, |reader, _| reader.skip(depth + 1)),
            b'"' => self.raw_string().map(drop),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.text.as_bytes()[self.at..]
            .starts_with(word)
            .then(|| self.at += word.len())
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let from = self.at;
        self.digits();
        (self.at > from).then_some(())
    }

    /// A string, after whitespace: where its text lies between the quotes, and whether it has escapes. Raw control
    /// characters, unknown escapes and `\u` escapes of surrogates are refused.
    fn raw_string(&mut self) -> Option<(usize, usize, bool)> {
        self.take(b'"')?;
        let bytes = self.text.as_bytes();
        let from = self.at;
        let mut escaped = false;
        loop {
            self.at += json::to_escape(&bytes[self.at..])?;
            match bytes[self.at] {
                b'"' => {
                    self.at += 1;
                    return Some((from, self.at - 1, escaped));
                }
                b'\\' => {
                    escaped = true;
                    self.at += 1;
                    match *bytes.get(self.at)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                        b'u' => {
                            hex4(bytes.get(self.at + 1..self.at + 5)?)?;
                            self.at += 5;
                        }
                        _ => return None,
                    }
                }
                // A control character.
                _ => return None,
            }
        }
    }

    /// A string without escapes, borrowed.
    fn plain_string(&mut self) -> Option<&'a str> {
        match self.raw_string()? {
            (from, to, false) => Some(&self.text[from..to]),
            _ => None,
        }
    }

    /// A string, borrowed when it has no escapes.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let (from, to, escaped) = self.raw_string()?;
        let raw = &self.text[from..to];
        if !escaped {
            return Some(Cow::Borrowed(raw));
        }
        let mut text = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(slash) = rest.find('\\') {
            text.push_str(&rest[..slash]);
            let escape = rest.as_bytes()[slash + 1];
            rest = &rest[slash + 2..];
            text.push(match escape {
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let code = hex4(&rest.as_bytes()[..4])?;
                    rest = &rest[4..];
                    char::from_u32(code)?
                }
                other => char::from(other),
            });
        }
        text.push_str(rest);
        Some(Cow::Owned(text))
    }
}

/// Four hex digits, not a surrogate's.
fn hex4(digits: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(digits).ok()?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let code = u32::from_str_radix(text, 16).ok()?;
    (!(0xD800..=0xDFFF).contains(&code)).then_some(code)
}

#[cfg(test)]
mod tests {
    use super::super::Chunk;
    use super::*;

    fn pick<'t>(rng: &mut fastrand::Rng, of: &[&'t str]) -> &'t str {
        of[rng.usize(..of.len())]
    }

    fn space(rng: &mut fastrand::Rng) -> &'static str {
        pick(rng, &["", "", "", " ", "\n", " \t\r\n"])
    }

    /// A JSON string's text, quotes included: mostly valid (plain text, escapes, any character), now and then not
    /// (a raw control character, an unknown escape, a short or surrogate `\u`, no closing quote).
    fn string(rng: &mut fastrand::Rng) -> String {
        let mut text = String::from("\"");
        for _ in 0..rng.usize(0..12) {
            match rng.u8(0..40) {
                0 => text.push_str(pick(
                    rng,
                    &["\\\"", "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t"],
                )),
                1 => text.push_str(&format!("\\u{:04x}", rng.u32(0..0x1_0000))),
                2 => text.push_str(pick(
                    rng,
                    &["\\ud83d\\ude00", "\\x", "\\u12", "\u{1}", "\t"],
                )),
                3 => text.push(rng.char(..)),
                4 => text.push_str(pick(rng, &["é", "日本", "🙂"])),
                _ => text.push(rng.alphanumeric()),
            }
        }
        if rng.u8(0..50) != 0 {
            text.push('"');
        }
        text
    }

    /// Any JSON value's text, nested at most `depth` levels more; now and then not JSON.
    fn value(rng: &mut fastrand::Rng, depth: usize) -> String {
        let most = if depth == 0 { 6 } else { 8 };
        match rng.u8(0..most) {
            0 => "null".to_owned(),
            1 => pick(rng, &["true", "false", "nul", "tru"]).to_owned(),
            2 => pick(
                rng,
                &["0", "-1", "12.5", "1e9", "-0.5E-3", "01", "1.", "-", "3e"],
            )
            .to_owned(),
            3..=5 => string(rng),
            6 => {
                let items: Vec<String> = (0..rng.usize(0..4))
                    .map(|_| value(rng, depth - 1))
                    .collect();
                format!("[{}]", items.join(pick(rng, &[",", ", ", ",,"])))
            }
            _ => {
                let fields: Vec<String> = (0..rng.usize(0..4))
                    .map(|_| format!("{}:{}", string(rng), value(rng, depth - 1)))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }
        }
    }

    /// An object of `fields`, each a key and a value, in a random order, some given twice, with others among them.
    fn object(rng: &mut fastrand::Rng, mut fields: Vec<(String, String)>) -> String {
        for _ in 0..rng.usize(0..3) {
            let key = pick(
                rng,
                &["\"id\"", "\"index\"", "\"logprobs\"", "\"object\"", "\"x\""],
            )
            .to_owned();
            fields.push((key, value(rng, 2)));
        }
        if rng.u8(0..20) == 0 && !fields.is_empty() {
            let twice = fields[rng.usize(..fields.len())].clone();
            fields.push(twice);
        }
        rng.shuffle(&mut fields);
        let text: Vec<String> = fields
            .iter()
            .map(|(key, value)| {
                format!(
                    "{}{key}{}:{}{value}{}",
                    space(rng),
                    space(rng),
                    space(rng),
                    space(rng)
                )
            })
            .collect();
        format!("{{{}}}", text.join(","))
    }

    /// `null`, most often; otherwise `value`, or any value.
    fn maybe(rng: &mut fastrand::Rng, value: impl FnOnce(&mut fastrand::Rng) -> String) -> String {
        match rng.u8(0..10) {
            0..6 => "null".to_owned(),
            6..9 => value(rng),
            _ => self::value(rng, 2),
        }
    }

    /// A chunk as providers send them, with some of what they may send besides, and now and then what is not JSON.
    fn chunk(rng: &mut fastrand::Rng) -> String {
        let delta = |rng: &mut fastrand::Rng| {
            let mut fields = Vec::new();
            if rng.bool() {
                fields.push(("\"content\"".to_owned(), maybe(rng, string)));
            }
            if rng.u8(0..4) == 0 {
                fields.push(("\"tool_calls\"".to_owned(), maybe(rng, |rng| value(rng, 2))));
            }
            if rng.u8(0..4) == 0 {
                fields.push(("\"role\"".to_owned(), "\"assistant\"".to_owned()));
            }
            object(rng, fields)
        };
        let choice = |rng: &mut fastrand::Rng| {
            let mut fields = Vec::new();
            if rng.u8(0..8) != 0 {
                fields.push(("\"delta\"".to_owned(), maybe(rng, delta)));
            }
            if rng.bool() {
                let reason = |rng: &mut fastrand::Rng| {
                    pick(rng, &["\"stop\"", "\"length\"", "\"len\\u0067th\""]).to_owned()
                };
                fields.push(("\"finish_reason\"".to_owned(), maybe(rng, reason)));
            }
            object(rng, fields)
        };
        let mut fields = Vec::new();
        if rng.u8(0..10) != 0 {
            let choices = match rng.u8(0..10) {
                0 => "null".to_owned(),
                1 => "[]".to_owned(),
                2 => value(rng, 2),
                _ => {
                    let mut items = vec![choice(rng)];
                    if rng.u8(0..5) == 0 {
                        items.push(value(rng, 2));
                    }
                    format!("[{}]", items.join(","))
                }
            };
            fields.push(("\"choices\"".to_owned(), choices));
        }
        for key in ["\"usage\"", "\"error\""] {
            if rng.u8(0..4) == 0 {
                fields.push((key.to_owned(), maybe(rng, |rng| value(rng, 2))));
            }
        }
        if rng.u8(0..20) == 0 {
            fields.push(("\"ch\\u006fices\"".to_owned(), "[]".to_owned()));
        }
        let mut text = format!("{}{}{}", space(rng), object(rng, fields), space(rng));
        if rng.u8(0..30) == 0 {
            let mut at = rng.usize(..text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text.truncate(at);
        }
        if rng.u8(0..30) == 0 {
            text.push_str(pick(rng, &["x", "}", ",", "{}"]));
        }
        text
    }

    /// What this reader takes, serde reads alike (and finds no tool calls, usage or error in); and it takes most of
    /// the chunks providers send.
    #[test]
    fn what_is_taken_serde_reads_alike() {
        let (mut taken, mut serde_took) = (0, 0);
        for seed in 0..30_000 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let text = chunk(&mut rng);
            let theirs = serde_json::from_str::<Chunk<'_>>(&text);
            let plain_for_serde = theirs.as_ref().is_ok_and(|chunk| {
                chunk.usage.is_none()
                    && chunk.error.is_none()
                    && chunk.choices.0.as_ref().is_none_or(|choice| {
                        choice
                            .delta
                            .as_ref()
                            .is_none_or(|delta| delta.tool_calls.is_none())
                    })
            });
            serde_took += usize::from(plain_for_serde);
            let Some(ours) = plain(&text) else {
                continue;
            };
            taken += 1;
            let chunk = theirs.unwrap_or_else(|error| {
                panic!("seed {seed}: taken, refused by serde ({error}): {text}")
            });
            assert!(plain_for_serde, "seed {seed}: {text}");
            let choice = chunk.choices.0.unwrap_or_default();
            let delta = choice.delta.unwrap_or_default();
            assert_eq!(ours.content, delta.content, "seed {seed}: {text}");
            assert_eq!(
                ours.finish_reason,
                choice.finish_reason.as_deref(),
                "seed {seed}: {text}"
            );
        }
        // Left to serde, besides what it refuses or finds more in: escaped keys and finish reasons, and surrogates.
        assert!(taken * 10 > serde_took * 8, "taken {taken} of {serde_took}");
    }

    #[test]
    fn chunks_as_providers_send_them_are_taken() {
        let chunks = [
            (
                r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1717000000,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
                Some(""),
                None,
            ),
            (
                r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1717000000,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Line one.\n\n- caf\u00e9 \"quoted\""},"logprobs":null,"finish_reason":null}]}"#,
                Some("Line one.\n\n- café \"quoted\""),
                None,
            ),
            (
                r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1717000000,"model":"gpt-4o","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}],"usage":null}"#,
                None,
                Some("length"),
            ),
            (
                r#"{"id":"cmpl-2","object":"chat.completion.chunk","created":1,"model":"llama","choices":[{"index":0,"delta":{"content":" world"},"logprobs":null,"finish_reason":null,"stop_reason":null}]}"#,
                Some(" world"),
                None,
            ),
        ];
        for (text, content, finish_reason) in chunks {
            let plain = plain(text).unwrap_or_else(|| panic!("not taken: {text}"));
            assert_eq!(plain.content.as_deref(), content, "{text}");
            assert_eq!(plain.finish_reason, finish_reason, "{text}");
        }
    }

    #[test]
    fn tool_calls_usage_errors_and_keys_twice_are_left_to_serde() {
        for text in [
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","function":{"name":"get","arguments":""}}]}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#,
            r#"{"error":{"message":"overloaded"}}"#,
            r#"{"choices":[{"delta":{"content":"a"},"delta":{"content":"b"}}]}"#,
            r#"{"choices":[{"delta":{"content":"\ud83d\ude00"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a"}}]} x"#,
            r#"{"choices":[{"delta":{"content":"a"}}],}"#,
        ] {
            assert_eq!(plain(text), None, "{text}");
        }
    }
}
