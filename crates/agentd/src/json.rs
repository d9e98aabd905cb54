//! JSON string text looked at eight bytes at a time: where a string read from a provider's chunk ends, and whether an
//! answer's text can go into an event's JSON as it is.

/// The place of the first byte of `bytes` that JSON string text cannot hold as it is: a quote, a backslash or a
/// control character (below 0x20). Bytes of other characters, UTF-8's included, are taken as they are.
pub fn to_escape(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    /// The high bit of each byte of `word` that is zero; the lowest such bit is exact (above it a borrow may set
    /// more), and the lowest is all that is read.
    fn zero_bytes(word: u64) -> u64 {
        word.wrapping_sub(ONES) & !word & HIGH
    }
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = zero_bytes(word ^ (ONES * u64::from(b'"')));
        let backslash = zero_bytes(word ^ (ONES * u64::from(b'\\')));
        // Below 0x20: subtracting 0x20 borrows into the high bit, which the byte itself does not have.
        let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
        let found = quote | backslash | control;
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    bytes[at..]
        .iter()
        .position(|&byte| byte == b'"' || byte == b'\\' || byte < 0x20)
        .map(|place| at + place)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same answer as a byte at a time, for every place of every byte that stops it and every length.
    #[test]
    fn the_first_byte_to_escape_is_found_wherever_it_is() {
        let slow = |bytes: &[u8]| {
            bytes
                .iter()
                .position(|&byte| byte == b'"' || byte == b'\\' || byte < 0x20)
        };
        let mut rng = fastrand::Rng::with_seed(7);
        for len in 0..40 {
            for _ in 0..200 {
                let mut bytes: Vec<u8> = (0..len)
                    .map(|_| match rng.u8(0..4) {
                        0 => rng.u8(0x80..=0xff),
                        _ => rng.u8(0x20..0x7f),
                    })
                    .filter(|&byte| byte != b'"' && byte != b'\\')
                    .collect();
                for stop in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    if !bytes.is_empty() && rng.bool() {
                        let at = rng.usize(..bytes.len());
                        bytes[at] = stop;
                    }
                }
                assert_eq!(to_escape(&bytes), slow(&bytes), "{bytes:?}");
            }
        }
        assert_eq!(to_escape("café 🙂 ok".as_bytes()), None);
        assert_eq!(to_escape(b"0123456789abcde\x7f\""), Some(16));
    }
}
