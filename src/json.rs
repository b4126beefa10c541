//! JSON on the hot path: a validator that finds a value's span without building anything, and
//! string quoting byte-identical to serde_json's. Both are checked against serde_json below.

/// If `text` is exactly one JSON value with optional surrounding whitespace (what
/// `serde_json::from_str::<&RawValue>` accepts), that value without the whitespace.
pub fn value_span(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    let start = skip_ws(b, 0);
    let end = scan_value(b, start)?;
    (skip_ws(b, end) == b.len()).then(|| &text[start..end])
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it.
pub fn quote(out: &mut Vec<u8>, s: &str) {
    if skip_plain(s.as_bytes(), 0) < s.len() {
        // Rare (quotes, backslashes, control characters): let serde_json do it.
        let _ = serde_json::to_writer(&mut *out, s);
        return;
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// The open containers, innermost last: bits of a `u128` (1 = object) for the first 128
/// levels, so usual values allocate nothing; deeper ones (serde_json sets no limit for a raw
/// value either) spill into a `Vec`.
#[derive(Default)]
struct Open {
    low: u128,
    deep: Vec<bool>,
    depth: usize,
}

impl Open {
    fn push(&mut self, is_object: bool) {
        if self.depth < 128 {
            self.low = (self.low & !(1 << self.depth)) | (u128::from(is_object) << self.depth);
        } else {
            self.deep.push(is_object);
        }
        self.depth += 1;
    }

    fn pop(&mut self) {
        self.depth -= 1;
        if self.depth >= 128 {
            self.deep.pop();
        }
    }

    fn innermost_is_object(&self) -> bool {
        match self.depth - 1 {
            d if d < 128 => self.low >> d & 1 == 1,
            _ => self.deep.last().copied().unwrap_or(false),
        }
    }
}

/// Scans one value starting at `i` (no leading whitespace); returns the index after it.
fn scan_value(b: &[u8], mut i: usize) -> Option<usize> {
    let mut open = Open::default();
    'value: loop {
        // A value starts at `i`.
        match *b.get(i)? {
            bracket @ (b'{' | b'[') => {
                let is_object = bracket == b'{';
                i = skip_ws(b, i + 1);
                let close = if is_object { b'}' } else { b']' };
                if b.get(i) == Some(&close) {
                    i += 1;
                } else {
                    open.push(is_object);
                    if is_object {
                        i = scan_key(b, i)?;
                    }
                    continue 'value;
                }
            }
            b'"' => i = scan_string(b, i)?,
            b't' => i = literal(b, i, b"true")?,
            b'f' => i = literal(b, i, b"false")?,
            b'n' => i = literal(b, i, b"null")?,
            b'-' | b'0'..=b'9' => i = scan_number(b, i)?,
            _ => return None,
        }
        // A value ended at `i`: close containers, or go on to the next element.
        loop {
            if open.depth == 0 {
                return Some(i);
            }
            i = skip_ws(b, i);
            let in_object = open.innermost_is_object();
            match (*b.get(i)?, in_object) {
                (b',', true) => {
                    i = scan_key(b, skip_ws(b, i + 1))?;
                    continue 'value;
                }
                (b',', false) => {
                    i = skip_ws(b, i + 1);
                    continue 'value;
                }
                (b'}', true) | (b']', false) => {
                    i += 1;
                    open.pop();
                }
                _ => return None,
            }
        }
    }
}

/// `"key"` then `:`; returns where the member's value starts.
fn scan_key(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let i = skip_ws(b, scan_string(b, i)?);
    if b.get(i) != Some(&b':') {
        return None;
    }
    Some(skip_ws(b, i + 1))
}

/// A string starting at the quote at `i`. The input is already UTF-8 (it is a `str`), so only
/// escapes and raw control characters need checking.
fn scan_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        i = skip_plain(b, i);
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' => {
                    let hex = b.get(i + 2..i + 6)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    i += 6;
                }
                _ => return None,
            },
            // A raw control character.
            _ => return None,
        }
    }
}

/// Skips string bytes that need no attention (not `"`, `\`, or below 0x20), eight at a time.
fn skip_plain(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero, or below `n`, iff its high bit is set in the result (SWAR).
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS;
    while let Some(chunk) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let hits = below(x, 0x20)
            | below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1);
        if hits != 0 {
            // The lowest flagged byte is the first special one (borrows only run upwards).
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while b
        .get(i)
        .is_some_and(|&c| c >= 0x20 && c != b'"' && c != b'\\')
    {
        i += 1;
    }
    i
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    (b.get(i..i + word.len())? == word).then_some(i + word.len())
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
fn scan_number(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |mut i: usize| {
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        (i > start).then_some(i)
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match *b.get(i)? {
        b'0' => {
            i += 1;
            if b.get(i).is_some_and(u8::is_ascii_digit) {
                return None;
            }
        }
        b'1'..=b'9' => i = digits(i)?,
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        i = digits(i + 1)?;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        i = digits(i)?;
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn reference(text: &str) -> Option<&str> {
        serde_json::from_str::<&RawValue>(text)
            .ok()
            .map(RawValue::get)
    }

    fn agree(text: &str) {
        assert_eq!(value_span(text), reference(text), "input: {text:?}");
    }

    #[test]
    fn known_cases_agree_with_serde_json() {
        for text in [
            "",
            " ",
            "{}",
            "[]",
            " {} ",
            "{ }",
            "[ ]",
            "0",
            "-0",
            "01",
            "-",
            "1.",
            "1.5",
            ".5",
            "1e5",
            "1E+5",
            "1e-5",
            "1e",
            "1e+",
            "-1.25e10",
            "true",
            "tru",
            "truex",
            "null",
            "false",
            "\"\"",
            "\"a\\\"b\"",
            "\"\\u00e9\"",
            "\"\\u00g9\"",
            "\"\\x\"",
            "\"\t\"",
            "\"é ünï ✓\"",
            "{\"a\":1}",
            "{\"a\" : [1, 2, {\"b\": null}] }",
            "{\"a\":1,}",
            "[1,]",
            "[,1]",
            "{\"a\"}",
            "{1:2}",
            "{\"a\":1 \"b\":2}",
            "[1 2]",
            "[1] [2]",
            "{\"a\":1}}",
            "[[[]]]",
            "[[[]]",
            "\"\\ud800\"",
            "\r\n\t[1]\r\n",
            "[\"\u{7f}\"]",
            "{\"items\":{\"Temp\":{\"value\":23.6,\"time\":1714528800000}}}",
        ] {
            agree(text);
        }
    }

    /// The eight-at-a-time skip: every special byte at every offset around chunk boundaries.
    #[test]
    fn special_bytes_at_every_offset() {
        for len in 0..40 {
            for at in 0..len {
                for special in [
                    "\"", "\\", "\\n", "\\u00e9", "\n", "\u{1f}", "\t", "é", "\u{7f}",
                ] {
                    let mut inner: String =
                        "abcdefghijklmnopqrstuvwxyz0123456789ABCD"[..len].into();
                    inner.replace_range(at..at + 1, special);
                    agree(&format!("\"{inner}\""));
                    agree(&format!("[\"{inner}\",1]"));
                    let mut out = Vec::new();
                    quote(&mut out, &inner);
                    assert_eq!(out, serde_json::to_vec(&inner).unwrap());
                }
            }
        }
    }

    #[test]
    fn deep_nesting_agrees_with_serde_json() {
        for depth in (120..135).chain([300, 5_000]) {
            agree(&format!("{}{}", "[".repeat(depth), "]".repeat(depth)));
            let objects = format!("{}1{}", "{\"k\":".repeat(depth), "}".repeat(depth));
            agree(&objects);
            agree(&format!("{}{{}}{}", "[".repeat(depth), "]".repeat(depth)));
        }
    }

    /// Random JSON-ish texts (valid values, then mutated) must get the same verdict and span.
    #[test]
    fn random_texts_agree_with_serde_json() {
        let mut rng = fastrand::Rng::with_seed(0x150_5ab);
        const PIECES: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            " ",
            "\n",
            "\"k\"",
            "\"\\n\"",
            "\"\\u12ab\"",
            "0",
            "-1",
            "2.5",
            "1e3",
            "true",
            "false",
            "null",
            "\"é\"",
            "\\",
            "\"",
            "x",
            "\t",
            "00",
            "-",
        ];
        for _ in 0..50_000 {
            let mut text = String::new();
            if rng.bool() {
                random_value(&mut rng, &mut text, 0);
            }
            for _ in 0..rng.usize(0..3) {
                let at = rng.usize(0..=text.len());
                if text.is_char_boundary(at) {
                    text.insert_str(at, PIECES[rng.usize(..PIECES.len())]);
                }
            }
            if rng.u8(..4) == 0 && !text.is_empty() {
                let at = rng.usize(..text.len());
                if text.is_char_boundary(at) && text.is_char_boundary(at + 1) {
                    text.remove(at);
                }
            }
            agree(&text);
        }
    }

    fn random_value(rng: &mut fastrand::Rng, out: &mut String, depth: u32) {
        let ws = |rng: &mut fastrand::Rng, out: &mut String| {
            if rng.u8(..4) == 0 {
                out.push_str([" ", "\n", "\t ", "\r\n"][rng.usize(..4)]);
            }
        };
        ws(rng, out);
        match rng.u8(..if depth > 4 { 4 } else { 6 }) {
            0 => out.push_str(["true", "false", "null"][rng.usize(..3)]),
            1 => out.push_str(&rng.i64(..).to_string()),
            2 => out.push_str(&format!("{}e{}", rng.f64(), rng.i8(..))),
            3 => out.push_str(&serde_json::to_string(&random_string(rng)).unwrap()),
            4 => {
                out.push('[');
                for k in 0..rng.usize(0..4) {
                    if k > 0 {
                        out.push(',');
                    }
                    random_value(rng, out, depth + 1);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for k in 0..rng.usize(0..4) {
                    if k > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    out.push_str(&serde_json::to_string(&random_string(rng)).unwrap());
                    ws(rng, out);
                    out.push(':');
                    random_value(rng, out, depth + 1);
                }
                out.push('}');
            }
        }
        ws(rng, out);
    }

    fn random_string(rng: &mut fastrand::Rng) -> String {
        (0..rng.usize(0..8))
            .map(|_| match rng.u8(..5) {
                0 => rng.char('\0'..'\u{80}'),
                1 => rng.char('\u{80}'..'\u{800}'),
                2 => ['"', '\\', '/', '\n', '\u{7f}'][rng.usize(..5)],
                _ => rng.alphanumeric(),
            })
            .collect()
    }

    #[test]
    fn quoting_is_byte_identical_to_serde_json() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut cases: Vec<String> = [
            "",
            "plain",
            "with \"quotes\"",
            "back\\slash",
            "tab\tnl\n",
            "\u{0}\u{1f}\u{7f}",
            "é/✓",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        cases.extend((0..5_000).map(|_| random_string(&mut rng)));
        for s in cases {
            let mut out = Vec::new();
            quote(&mut out, &s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&s).unwrap()
            );
        }
    }
}
