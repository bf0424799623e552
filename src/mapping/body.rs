//! From the raw body and its `Content-Type` to the JSON value the references read (SPEC 6.4):
//! JSON as it is; `application/x-www-form-urlencoded` and `multipart/form-data` into an object
//! of strings, with PHP-style bracket keys nested (`customer[email]`, `tags[]`). Pure, bounded:
//! the body is already capped by `server.max_body_bytes`, and a form may hold at most
//! [`MAX_FIELDS`] fields nested at most [`MAX_DEPTH`] brackets deep.
//!
//! Multipart is parsed here over the buffered body rather than with `multer`: the body is in
//! memory already (it is verified and stored byte for byte), so a streaming parser would add a
//! dependency tree (and an async state machine) to split a byte slice at a boundary.

use serde_json::{Map, Value};

/// The most fields (pairs, or parts) one form may hold.
pub const MAX_FIELDS: usize = 1000;
/// The most bracket groups one field name may nest (`a[b][c]` is two).
pub const MAX_DEPTH: usize = 16;
/// The largest part header block of a multipart body.
const MAX_PART_HEAD: usize = 8 * 1024;

/// How a body is read, from its `Content-Type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `application/json`, any `+json` type, or no `Content-Type`.
    Json,
    Form,
    Multipart {
        boundary: String,
    },
}

/// Why a body cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A `Content-Type` sprintlink does not read: 415.
    #[error("content type {0:?} is not accepted: send JSON, a form or multipart/form-data")]
    Unsupported(String),
    /// A JSON body that does not parse: 400 `invalid_json`.
    #[error("body is not valid JSON: {0}")]
    Json(String),
    /// A form that does not parse: 400 `invalid_body`.
    #[error("{0}")]
    Form(String),
}

impl Kind {
    /// The kind of body a `Content-Type` announces.
    pub fn of(content_type: Option<&str>) -> Result<Kind, BodyError> {
        let Some(ct) = content_type.map(str::trim).filter(|c| !c.is_empty()) else {
            return Ok(Kind::Json);
        };
        let (media, params) = ct.split_once(';').unwrap_or((ct, ""));
        let media = media.trim().to_ascii_lowercase();
        match media.as_str() {
            "application/json" => Ok(Kind::Json),
            m if m.starts_with("application/") && m.ends_with("+json") => Ok(Kind::Json),
            "application/x-www-form-urlencoded" => Ok(Kind::Form),
            "multipart/form-data" => {
                let boundary = parameters(params)
                    .into_iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("boundary"))
                    .map(|(_, v)| v)
                    .filter(|b| (1..=70).contains(&b.len()))
                    .ok_or_else(|| {
                        BodyError::Form(
                            "multipart/form-data without a boundary (1 to 70 characters)".into(),
                        )
                    })?;
                Ok(Kind::Multipart { boundary })
            }
            _ => Err(BodyError::Unsupported(media)),
        }
    }
}

/// Reads `raw` as `content_type` says.
pub fn parse(content_type: Option<&str>, raw: &[u8]) -> Result<Value, BodyError> {
    match Kind::of(content_type)? {
        Kind::Json => serde_json::from_slice(raw).map_err(|e| BodyError::Json(e.to_string())),
        Kind::Form => form(raw),
        Kind::Multipart { boundary } => multipart(raw, &boundary),
    }
}

/// `a=1&b[c]=2&d[]=3&d[]=4` as `{"a": "1", "b": {"c": "2"}, "d": ["3", "4"]}`. Bytes that are
/// not UTF-8 once decoded become U+FFFD (the raw body is kept as it came).
pub fn form(raw: &[u8]) -> Result<Value, BodyError> {
    let mut root = Map::new();
    let mut fields = 0;
    for (name, value) in form_urlencoded::parse(raw) {
        fields += 1;
        if fields > MAX_FIELDS {
            return Err(too_many());
        }
        insert(&mut root, &name, Value::String(value.into_owned()))?;
    }
    Ok(Value::Object(root))
}

fn too_many() -> BodyError {
    BodyError::Form(format!("the form has more than {MAX_FIELDS} fields"))
}

/// One step of a field name: `[key]` or `[]` (append).
#[derive(Debug, PartialEq)]
enum Step<'a> {
    Key(&'a str),
    Push,
}

/// `a[b][]` as `a`, `[Key(b), Push]`. A name that is not of that shape (an unclosed bracket,
/// text after a bracket) is one plain key, as written.
fn split_name(name: &str) -> Result<(&str, Vec<Step<'_>>), BodyError> {
    let Some(open) = name.find('[').filter(|&i| i > 0) else {
        return Ok((name, Vec::new()));
    };
    let (base, mut rest) = name.split_at(open);
    let mut steps = Vec::new();
    while !rest.is_empty() {
        let Some(close) = rest.strip_prefix('[').and_then(|r| r.find(']')) else {
            return Ok((name, Vec::new()));
        };
        let inner = &rest[1..=close];
        if inner.contains('[') {
            return Ok((name, Vec::new()));
        }
        steps.push(if inner.is_empty() {
            Step::Push
        } else {
            Step::Key(inner)
        });
        rest = &rest[close + 2..];
    }
    if steps.len() > MAX_DEPTH {
        return Err(BodyError::Form(format!(
            "field {base:?} is nested more than {MAX_DEPTH} levels deep"
        )));
    }
    Ok((base, steps))
}

/// Puts `value` at `name`: a repeated name becomes an array, brackets nest.
fn insert(root: &mut Map<String, Value>, name: &str, value: Value) -> Result<(), BodyError> {
    let (base, steps) = split_name(name)?;
    let conflict = || {
        BodyError::Form(format!(
            "field {name:?} is both a value and a group of fields"
        ))
    };
    let mut slot = root.entry(base.to_string()).or_insert(Value::Null);
    for (i, step) in steps.iter().enumerate() {
        // The container the next step needs: what follows decides what a new element is.
        let next = steps.get(i + 1);
        let fresh = || match next {
            Some(Step::Push) => Value::Array(Vec::new()),
            Some(Step::Key(_)) => Value::Object(Map::new()),
            None => Value::Null,
        };
        slot = match step {
            Step::Key(k) => {
                if slot.is_null() {
                    *slot = Value::Object(Map::new());
                }
                match slot {
                    Value::Object(m) => m.entry(k.to_string()).or_insert_with(fresh),
                    _ => return Err(conflict()),
                }
            }
            Step::Push => {
                if slot.is_null() {
                    *slot = Value::Array(Vec::new());
                }
                match slot {
                    Value::Array(items) => {
                        items.push(fresh());
                        items.last_mut().expect("just pushed")
                    }
                    _ => return Err(conflict()),
                }
            }
        };
    }
    match slot {
        Value::Null => *slot = value,
        Value::Array(items) => items.push(value),
        Value::Object(_) => return Err(conflict()),
        leaf => {
            let first = std::mem::take(leaf);
            *leaf = Value::Array(vec![first, value]);
        }
    }
    Ok(())
}

/// A multipart/form-data body: text parts as form fields, a file part as
/// `{"filename", "content_type", "size"}` (its bytes are counted, not kept apart).
pub fn multipart(raw: &[u8], boundary: &str) -> Result<Value, BodyError> {
    let bad = |what: &str| BodyError::Form(format!("multipart body: {what}"));
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    // The first delimiter may follow a preamble; every later one follows a CRLF.
    let mut at = if raw.starts_with(delimiter) {
        0
    } else {
        let crlf_delim = [b"\r\n".as_slice(), delimiter].concat();
        find(raw, &crlf_delim).ok_or_else(|| bad("no boundary found"))? + 2
    };
    let next_delim = [b"\r\n".as_slice(), delimiter].concat();
    let mut root = Map::new();
    let mut parts = 0;
    loop {
        at += delimiter.len();
        let rest = &raw[at..];
        if rest.starts_with(b"--") {
            return Ok(Value::Object(root));
        }
        // Transport padding after the delimiter, then CRLF.
        let line_end = find(rest, b"\r\n").ok_or_else(|| bad("a boundary line does not end"))?;
        if rest[..line_end].iter().any(|b| !matches!(b, b' ' | b'\t')) {
            return Err(bad("text after a boundary"));
        }
        let part_start = at + line_end + 2;
        let part = &raw[part_start..];
        let end = find(part, &next_delim)
            .ok_or_else(|| bad("a part does not end (no closing boundary)"))?;
        let part = &part[..end];
        parts += 1;
        if parts > MAX_FIELDS {
            return Err(too_many());
        }
        let (head, content) = match find(part, b"\r\n\r\n") {
            Some(i) => (&part[..i], &part[i + 4..]),
            // A part with no headers at all starts with the blank line.
            None if part.starts_with(b"\r\n") => (&part[..0], &part[2..]),
            None => return Err(bad("a part has no header end")),
        };
        if head.len() > MAX_PART_HEAD {
            return Err(bad("a part's headers are too long"));
        }
        let head = String::from_utf8_lossy(head);
        let mut name = None;
        let mut filename = None;
        let mut content_type = None;
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let k = k.trim();
            if k.eq_ignore_ascii_case("content-disposition") {
                let (disposition, params) = v.split_once(';').unwrap_or((v, ""));
                if !disposition.trim().eq_ignore_ascii_case("form-data") {
                    return Err(bad("a part is not form-data"));
                }
                for (pk, pv) in parameters(params) {
                    if pk.eq_ignore_ascii_case("name") {
                        name = Some(pv);
                    } else if pk.eq_ignore_ascii_case("filename")
                        || pk.eq_ignore_ascii_case("filename*")
                    {
                        filename.get_or_insert(pv);
                    }
                }
            } else if k.eq_ignore_ascii_case("content-type") {
                content_type = Some(v.trim().to_string());
            }
        }
        let name = name.ok_or_else(|| bad("a part has no name"))?;
        let value = match filename {
            Some(f) => serde_json::json!({
                "filename": f,
                "content_type": content_type,
                "size": content.len(),
            }),
            None => Value::String(String::from_utf8_lossy(content).into_owned()),
        };
        insert(&mut root, &name, value)?;
        at = part_start + end + 2;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `; a=1; b="x; y"` as `[("a", "1"), ("b", "x; y")]` (quoted strings unescaped).
fn parameters(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ';' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ';' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() && chars.peek().is_none() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| *c == ' ') {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => value.extend(chars.next()),
                        c => value.push(c),
                    }
                }
                // Anything up to the next `;` is ignored.
                while chars.peek().is_some_and(|c| *c != ';') {
                    chars.next();
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ';' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
                value = value.trim_end().to_string();
            }
        }
        let key = key.trim().to_string();
        if !key.is_empty() {
            out.push((key, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(text: &str) -> Value {
        form(text.as_bytes()).unwrap()
    }

    #[test]
    fn content_types_choose_the_reader() {
        assert_eq!(Kind::of(None), Ok(Kind::Json));
        assert_eq!(Kind::of(Some("")), Ok(Kind::Json));
        assert_eq!(
            Kind::of(Some("application/json; charset=utf-8")),
            Ok(Kind::Json)
        );
        assert_eq!(Kind::of(Some("application/vnd.api+json")), Ok(Kind::Json));
        assert_eq!(
            Kind::of(Some("Application/X-WWW-Form-Urlencoded")),
            Ok(Kind::Form)
        );
        assert_eq!(
            Kind::of(Some("multipart/form-data; boundary=\"a b\"")),
            Ok(Kind::Multipart {
                boundary: "a b".into()
            })
        );
        assert!(matches!(
            Kind::of(Some("multipart/form-data")),
            Err(BodyError::Form(_))
        ));
        assert_eq!(
            Kind::of(Some("text/plain")),
            Err(BodyError::Unsupported("text/plain".into()))
        );
    }

    #[test]
    fn forms_nest_brackets_and_collect_repeats() {
        assert_eq!(
            f("a=1&b%5Bc%5D=2&d[]=3&d[]=4&e=x&e=y&n[q][r]=z&plus=a+b%21"),
            json!({"a": "1", "b": {"c": "2"}, "d": ["3", "4"], "e": ["x", "y"],
                   "n": {"q": {"r": "z"}}, "plus": "a b!"})
        );
        assert_eq!(
            f("fields[email][value]=a%40b.com&fields[name][value]=Ann"),
            json!({"fields": {"email": {"value": "a@b.com"}, "name": {"value": "Ann"}}})
        );
        assert_eq!(
            f("a[][x]=1&a[][x]=2"),
            json!({"a": [{"x": "1"}, {"x": "2"}]})
        );
        assert_eq!(f(""), json!({}));
        assert_eq!(f("a"), json!({"a": ""}));
        // Names that are not bracket paths are kept as written.
        assert_eq!(
            f("a[b=1&[x]=2&c]=3&d[e]f=4"),
            json!({"a[b": "1", "[x]": "2", "c]": "3", "d[e]f": "4"})
        );
        assert_eq!(f("bad=%ZZ%ff"), json!({"bad": "%ZZ\u{FFFD}"}));
    }

    #[test]
    fn contradictions_and_excess_are_refused() {
        assert!(matches!(form(b"a=1&a[b]=2"), Err(BodyError::Form(_))));
        assert!(matches!(form(b"a[b]=2&a=1"), Err(BodyError::Form(_))));
        assert!(matches!(form(b"a[]=1&a[b]=2"), Err(BodyError::Form(_))));
        let deep = format!("a{}=1", "[x]".repeat(MAX_DEPTH + 1));
        assert!(matches!(form(deep.as_bytes()), Err(BodyError::Form(_))));
        let ok_deep = format!("a{}=1", "[x]".repeat(MAX_DEPTH));
        assert!(form(ok_deep.as_bytes()).is_ok());
        let many = vec!["k=v"; MAX_FIELDS + 1].join("&");
        assert!(matches!(form(many.as_bytes()), Err(BodyError::Form(_))));
        let at_cap = vec!["k=v"; MAX_FIELDS].join("&");
        assert!(form(at_cap.as_bytes()).is_ok());
    }

    fn mp(parts: &[&str]) -> Vec<u8> {
        let mut out = b"preamble\r\n".to_vec();
        for p in parts {
            out.extend_from_slice(b"--XyZ\r\n");
            out.extend_from_slice(p.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    #[test]
    fn multipart_text_and_file_parts() {
        let body = mp(&[
            "Content-Disposition: form-data; name=\"customer[email]\"\r\n\r\nann@example.com",
            "Content-Disposition: form-data; name=\"object_id\"\r\n\r\n77",
            "Content-Disposition: form-data; name=\"doc\"; filename=\"a \\\"b\\\".pdf\"\r\nContent-Type: application/pdf\r\n\r\n%PDF\r\n--Xy\0\u{ff}",
            "Content-Disposition: form-data; name=\"tags[]\"\r\n\r\nx",
            "Content-Disposition: form-data; name=\"tags[]\"\r\n\r\n",
        ]);
        let v = parse(Some("multipart/form-data; boundary=XyZ"), &body).unwrap();
        assert_eq!(
            v,
            json!({
                "customer": {"email": "ann@example.com"},
                "object_id": "77",
                "doc": {"filename": "a \"b\".pdf", "content_type": "application/pdf", "size": 13},
                "tags": ["x", ""],
            })
        );
        let no_ct = mp(&["Content-Disposition: form-data; name=f; filename=x.bin\r\n\r\n123"]);
        assert_eq!(
            multipart(&no_ct, "XyZ").unwrap(),
            json!({"f": {"filename": "x.bin", "content_type": null, "size": 3}})
        );
    }

    #[test]
    fn broken_multipart_is_refused() {
        for body in [
            b"no boundary at all".to_vec(),
            b"--XyZ\r\nContent-Disposition: form-data; name=a\r\n\r\nnever closed".to_vec(),
            mp(&["Content-Disposition: form-data\r\n\r\nno name"]),
            mp(&["Content-Disposition: attachment; name=a\r\n\r\nx"]),
            mp(&["no header end"]),
        ] {
            assert!(
                matches!(multipart(&body, "XyZ"), Err(BodyError::Form(_))),
                "{:?}",
                String::from_utf8_lossy(&body)
            );
        }
        assert_eq!(multipart(b"--XyZ--\r\n", "XyZ").unwrap(), json!({}));
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests: the readers never panic on any input, and simple forms survive a trip
    //! through `form_urlencoded`'s serializer.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn form_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = form(&raw);
        }

        #[test]
        fn bracket_forms_never_panic(raw in "[a-c\\[\\]=&%0-9]{0,80}") {
            let _ = form(raw.as_bytes());
        }

        #[test]
        fn multipart_never_panics(
            raw in proptest::collection::vec(any::<u8>(), 0..300),
            pieces in proptest::collection::vec(
                prop_oneof![Just("--B"), Just("\r\n"), Just("\r\n\r\n"), Just("--"),
                    Just("Content-Disposition: form-data; name=\"a[]\""), Just("; filename=x"), Just("x")],
                0..24),
        ) {
            let _ = multipart(&raw, "B");
            let _ = multipart(pieces.concat().as_bytes(), "B");
            let _ = parse(Some("multipart/form-data; boundary=B"), &raw);
        }

        #[test]
        fn simple_keys_round_trip(
            pairs in proptest::collection::btree_map("[a-zA-Z0-9_ .@+-]{1,12}", ".{0,20}", 0..20)
        ) {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &pairs {
                ser.append_pair(k, v);
            }
            let parsed = form(ser.finish().as_bytes()).unwrap();
            let expected: Map<String, Value> = pairs
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            prop_assert_eq!(parsed, Value::Object(expected));
        }
    }
}
