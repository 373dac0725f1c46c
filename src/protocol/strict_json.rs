//! JSON text to a [`Value`], refusing a repeated object key anywhere in the tree: two parsers
//! (ours and a manager's, or a signature checker's) must never read one body two ways.

use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::command::child_path;

/// Why a body did not parse.
#[derive(Debug, PartialEq)]
pub(super) enum StrictError {
    /// Not JSON at all (serde_json's message).
    Syntax(String),
    /// A repeated key, at this JSON path (`$.data.rules[0].id`).
    DuplicateKey(String),
}

/// Parses `text`, remembering the path of the first repeated key.
pub(super) fn parse(text: &str) -> Result<Value, StrictError> {
    let duplicate = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = Seed {
        path: Path::Root,
        duplicate: &duplicate,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match (parsed, duplicate.into_inner()) {
        (_, Some(path)) => Err(StrictError::DuplicateKey(path)),
        (Ok(v), None) => Ok(v),
        (Err(e), None) => Err(StrictError::Syntax(e.to_string())),
    }
}

/// Longest path reported: a repeated key 128 levels down must still make a one-line ack.
const PATH_MAX: usize = 256;

/// `path`, cut to [`PATH_MAX`] bytes (at a character boundary) with `...` when longer.
fn shorten(path: String) -> String {
    if path.len() <= PATH_MAX {
        return path;
    }
    let mut end = PATH_MAX - 3;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &path[..end])
}

/// Where a value sits, made into text only for the error report: formatting a path for each
/// of a large rule set's values cost more than the parse itself.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root,
    Index(&'a Path<'a>, usize),
    Key(&'a Path<'a>, &'a str),
}

impl Path<'_> {
    fn render(&self) -> String {
        match self {
            Path::Root => "$".to_string(),
            Path::Index(parent, i) => format!("{}[{i}]", parent.render()),
            Path::Key(parent, key) => child_path(&parent.render(), key),
        }
    }
}

struct Seed<'a> {
    path: Path<'a>,
    duplicate: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = seq.next_element_seed(Seed {
            path: Path::Index(&self.path, out.len()),
            duplicate: self.duplicate,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                *self.duplicate.borrow_mut() = Some(shorten(child_path(&self.path.render(), &key)));
                return Err(A::Error::custom("repeated key"));
            }
            let v = map.next_value_seed(Seed {
                path: Path::Key(&self.path, &key),
                duplicate: self.duplicate,
            })?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_value_as_serde_json_for_valid_input() {
        for text in [
            r#"{"a":[1,-2,3.5,"x",null,true,{"b":{}}],"c":"\u00e9"}"#,
            "[]",
            "0",
            r#""s""#,
        ] {
            let ours = parse(text).unwrap();
            let theirs: Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours, theirs, "{text}");
        }
    }

    #[test]
    fn repeated_keys_are_found_with_their_path() {
        let cases = [
            (r#"{"id":"a","id":"b"}"#, "$.id"),
            (
                r#"{"data":{"rules":[{"id":"r1"},{"id":"r2","id":"r3"}]}}"#,
                "$.data.rules[1].id",
            ),
            (
                r#"{"data":{"address_sets":{"a b":[],"a b":[]}}}"#,
                "$.data.address_sets[\"a b\"]",
            ),
        ];
        for (text, path) in cases {
            assert_eq!(
                parse(text),
                Err(StrictError::DuplicateKey(path.into())),
                "{text}"
            );
        }
    }

    #[test]
    fn syntax_errors_stay_syntax_errors() {
        for text in ["{", r#"{"a":1}x"#, "", r#"{"a":1,}"#] {
            assert!(matches!(parse(text), Err(StrictError::Syntax(_))), "{text}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let text = "[".repeat(100_000);
        assert!(matches!(parse(&text), Err(StrictError::Syntax(_))));
    }
}
