//! The API subcommands, one module per group, and the table helpers they
//! share.

pub mod collisions;
pub mod feed;
pub mod ops;
pub mod records;
pub mod serve_api;
pub mod transfer;

use serde_json::{Map, Value as Json};

use crate::client::{CliError, CliResult, Client, enc};

/// Prints rows as aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// A JSON value as a table cell: strings bare, the rest as JSON.
pub fn cell(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A node id shortened for tables.
pub fn short(s: &Json) -> String {
    match s.as_str() {
        Some(s) if s.len() > 12 => s[..12].to_string(),
        Some(s) => s.to_string(),
        None => "-".into(),
    }
}

/// Types `FIELD=VALUE` assignments with the node's schema (`FIELD:=JSON`
/// passes raw JSON). Unknown fields go as strings: the node refuses them
/// with `UNKNOWN_FIELD`.
pub fn assignments(
    client: &Client,
    collection: &str,
    items: &[String],
) -> CliResult<Map<String, Json>> {
    let schema = if items.iter().any(|a| !a.contains(":=")) {
        Some(client.get("/schema")?)
    } else {
        None
    };
    let mut out = Map::new();
    for a in items {
        if let Some((f, raw)) = a.split_once(":=")
            && !f.contains('=')
        {
            let v = serde_json::from_str(raw)
                .map_err(|e| CliError::input(format!("`{a}`: not JSON: {e}")))?;
            out.insert(f.to_string(), v);
            continue;
        }
        let (f, text) = a
            .split_once('=')
            .ok_or_else(|| CliError::input(format!("`{a}` is not FIELD=VALUE")))?;
        let ty = schema
            .as_ref()
            .and_then(|s| s["collections"][collection]["fields"][f]["type"].as_str())
            .unwrap_or("string")
            .to_string();
        let ty: entente_model::FieldType = serde_json::from_value(Json::String(ty))
            .map_err(|e| CliError::other(format!("schema: {e}")))?;
        let v = entente_model::FieldValue::from_text(f, &ty, text)
            .map_err(|e| CliError::input(format!("{}: {e}", e.code())))?;
        out.insert(f.to_string(), v.to_json());
    }
    Ok(out)
}

/// Query string from pairs.
pub fn query(pairs: &[(&str, String)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_calendar_dates() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1), "1970-01-01 00:00:00");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(time(1_795_000_000_123), "2026-11-18 11:06:40");
    }
}
