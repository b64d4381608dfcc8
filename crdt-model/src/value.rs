//! Typed field values, their JSON form and their Automerge form.

use automerge::ScalarValue;
use serde_json::Value as Json;

use crate::error::{ModelError, Result};
use crate::schema::FieldType;

/// One value of one field, typed by the schema.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FieldValue {
    /// `string` and `text`.
    String(String),
    /// `integer`.
    Integer(i64),
    /// `decimal`, as validated canonical text.
    Decimal(String),
    /// `boolean`.
    Boolean(bool),
    /// `date`, `YYYY-MM-DD`.
    Date(String),
    /// `timestamp`, ms since the Unix epoch.
    Timestamp(i64),
    /// `reference`: a record id.
    Reference(String),
}

fn wrong(field: &str, ty: &FieldType, detail: impl Into<String>) -> ModelError {
    ModelError::WrongType {
        field: field.to_string(),
        expected: ty.describe().to_string(),
        detail: detail.into(),
    }
}

/// The longest string value accepted, in bytes.
pub const MAX_STRING_BYTES: usize = 64 * 1024;

impl FieldValue {
    /// Checks a JSON value against a field type and converts it.
    pub fn from_json(field: &str, ty: &FieldType, v: &Json) -> Result<FieldValue> {
        let s = |v: &Json| -> Result<String> {
            match v {
                Json::String(s) if s.len() <= MAX_STRING_BYTES => Ok(s.clone()),
                Json::String(_) => Err(wrong(
                    field,
                    ty,
                    format!("longer than {MAX_STRING_BYTES} bytes"),
                )),
                other => Err(wrong(field, ty, format!("got {}", json_kind(other)))),
            }
        };
        Ok(match ty {
            FieldType::String | FieldType::Text => FieldValue::String(s(v)?),
            FieldType::Integer => match v.as_i64() {
                Some(i) => FieldValue::Integer(i),
                None => return Err(wrong(field, ty, format!("got {}", json_kind(v)))),
            },
            FieldType::Decimal => {
                let text = match v {
                    Json::Number(n) => n.to_string(),
                    other => s(other)?,
                };
                FieldValue::Decimal(
                    canonical_decimal(&text)
                        .ok_or_else(|| wrong(field, ty, format!("`{text}`")))?,
                )
            }
            FieldType::Boolean => match v {
                Json::Bool(b) => FieldValue::Boolean(*b),
                other => return Err(wrong(field, ty, format!("got {}", json_kind(other)))),
            },
            FieldType::Date => {
                let d = s(v)?;
                if !valid_date(&d) {
                    return Err(wrong(field, ty, format!("`{d}`")));
                }
                FieldValue::Date(d)
            }
            FieldType::Timestamp => match v.as_i64() {
                Some(i) => FieldValue::Timestamp(i),
                None => return Err(wrong(field, ty, format!("got {}", json_kind(v)))),
            },
            FieldType::Reference => {
                let id = s(v)?;
                let id = crate::ids::RecordId::parse(&id)
                    .map_err(|_| wrong(field, ty, format!("`{id}` is not a UUID or ULID")))?;
                FieldValue::Reference(id.as_str().to_string())
            }
        })
    }

    /// Parses a value typed on a command line (`FIELD=VALUE`) for a field type.
    pub fn from_text(field: &str, ty: &FieldType, text: &str) -> Result<FieldValue> {
        let json = match ty {
            FieldType::Integer | FieldType::Timestamp => match text.trim().parse::<i64>() {
                Ok(i) => Json::from(i),
                Err(_) => return Err(wrong(field, ty, format!("`{text}`"))),
            },
            FieldType::Boolean => match text.trim() {
                "true" | "yes" | "1" => Json::Bool(true),
                "false" | "no" | "0" => Json::Bool(false),
                _ => return Err(wrong(field, ty, format!("`{text}`"))),
            },
            _ => Json::String(text.to_string()),
        };
        FieldValue::from_json(field, ty, &json)
    }

    /// The JSON form.
    pub fn to_json(&self) -> Json {
        match self {
            FieldValue::String(s)
            | FieldValue::Decimal(s)
            | FieldValue::Date(s)
            | FieldValue::Reference(s) => Json::String(s.clone()),
            FieldValue::Integer(i) | FieldValue::Timestamp(i) => Json::from(*i),
            FieldValue::Boolean(b) => Json::Bool(*b),
        }
    }

    /// The value as text (for normalization and display).
    pub fn to_text(&self) -> String {
        match self {
            FieldValue::String(s)
            | FieldValue::Decimal(s)
            | FieldValue::Date(s)
            | FieldValue::Reference(s) => s.clone(),
            FieldValue::Integer(i) | FieldValue::Timestamp(i) => i.to_string(),
            FieldValue::Boolean(b) => b.to_string(),
        }
    }

    /// The Automerge scalar stored in the document.
    pub fn to_scalar(&self) -> ScalarValue {
        match self {
            FieldValue::String(s)
            | FieldValue::Decimal(s)
            | FieldValue::Date(s)
            | FieldValue::Reference(s) => ScalarValue::Str(s.as_str().into()),
            FieldValue::Integer(i) => ScalarValue::Int(*i),
            FieldValue::Timestamp(i) => ScalarValue::Timestamp(*i),
            FieldValue::Boolean(b) => ScalarValue::Boolean(*b),
        }
    }

    /// Reads a stored scalar back as the field's type. A value of another type
    /// (written by a foreign Automerge client) is shown as text rather than
    /// dropped.
    pub fn from_scalar(ty: &FieldType, v: &ScalarValue) -> FieldValue {
        match (ty, v) {
            (FieldType::Integer, ScalarValue::Int(i)) => FieldValue::Integer(*i),
            (FieldType::Integer, ScalarValue::Uint(u)) => FieldValue::Integer(*u as i64),
            (FieldType::Timestamp, ScalarValue::Timestamp(i) | ScalarValue::Int(i)) => {
                FieldValue::Timestamp(*i)
            }
            (FieldType::Boolean, ScalarValue::Boolean(b)) => FieldValue::Boolean(*b),
            (FieldType::Decimal, ScalarValue::Str(s)) => FieldValue::Decimal(s.to_string()),
            (FieldType::Date, ScalarValue::Str(s)) => FieldValue::Date(s.to_string()),
            (FieldType::Reference, ScalarValue::Str(s)) => FieldValue::Reference(s.to_string()),
            (_, ScalarValue::Str(s)) => FieldValue::String(s.to_string()),
            (_, other) => FieldValue::String(other.to_string()),
        }
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// `-?digits(.digits)?`, at most 40 digits; returns the text with a leading
/// `+` and redundant leading zeros removed.
fn canonical_decimal(t: &str) -> Option<String> {
    let t = t.trim();
    let (neg, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    if int.is_empty()
        || !int.bytes().all(|c| c.is_ascii_digit())
        || frac.is_some_and(|f| f.is_empty() || !f.bytes().all(|c| c.is_ascii_digit()))
        || body.len() > 41
    {
        return None;
    }
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    out.push_str(int);
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    Some(out)
}

fn valid_date(d: &str) -> bool {
    let b = d.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| d.get(r)?.parse::<u32>().ok();
    let (Some(y), Some(m), Some(day)) = (num(0..4), num(5..7), num(8..10)) else {
        return false;
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let max = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=max).contains(&day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_conversion() {
        let ok = |ty: FieldType, v: Json| FieldValue::from_json("f", &ty, &v).unwrap();
        let err = |ty: FieldType, v: Json| FieldValue::from_json("f", &ty, &v).unwrap_err().code();
        assert_eq!(ok(FieldType::Integer, json!(5)), FieldValue::Integer(5));
        assert_eq!(err(FieldType::Integer, json!("5")), "WRONG_TYPE");
        assert_eq!(err(FieldType::Integer, json!(5.5)), "WRONG_TYPE");
        assert_eq!(
            ok(FieldType::Decimal, json!("+007.50")),
            FieldValue::Decimal("7.50".into())
        );
        assert_eq!(
            ok(FieldType::Decimal, json!(-3)),
            FieldValue::Decimal("-3".into())
        );
        assert_eq!(err(FieldType::Decimal, json!("1e5")), "WRONG_TYPE");
        assert_eq!(
            ok(FieldType::Date, json!("2024-02-29")),
            FieldValue::Date("2024-02-29".into())
        );
        assert_eq!(err(FieldType::Date, json!("2023-02-29")), "WRONG_TYPE");
        assert_eq!(err(FieldType::Boolean, json!("true")), "WRONG_TYPE");
        assert_eq!(err(FieldType::Reference, json!("contact-1")), "WRONG_TYPE");
        assert_eq!(err(FieldType::String, json!(null)), "WRONG_TYPE");
        assert_eq!(
            err(FieldType::String, json!("x".repeat(MAX_STRING_BYTES + 1))),
            "WRONG_TYPE"
        );
    }

    #[test]
    fn scalar_round_trip() {
        for (ty, v) in [
            (FieldType::String, FieldValue::String("a".into())),
            (FieldType::Integer, FieldValue::Integer(-4)),
            (FieldType::Decimal, FieldValue::Decimal("1.25".into())),
            (FieldType::Boolean, FieldValue::Boolean(true)),
            (FieldType::Date, FieldValue::Date("2020-01-31".into())),
            (
                FieldType::Timestamp,
                FieldValue::Timestamp(1_700_000_000_000),
            ),
        ] {
            assert_eq!(FieldValue::from_scalar(&ty, &v.to_scalar()), v);
            assert_eq!(FieldValue::from_json("f", &ty, &v.to_json()).unwrap(), v);
        }
    }

    #[test]
    fn text_input() {
        assert_eq!(
            FieldValue::from_text("f", &FieldType::Boolean, "yes").unwrap(),
            FieldValue::Boolean(true)
        );
        assert_eq!(
            FieldValue::from_text("f", &FieldType::Integer, "42").unwrap(),
            FieldValue::Integer(42)
        );
    }
}
