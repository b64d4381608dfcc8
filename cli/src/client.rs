//! The blocking HTTP client every API subcommand uses, and the mapping from
//! API answers to the CLI's exit codes.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value as Json, json};

/// Exit codes (documented in the README).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other failure (a server error, an unexpected answer).
    pub const FAILURE: u8 = 1;
    /// Bad input: a malformed argument or value, a refused field or type, a
    /// bad import line (clap's usage errors are 2 too).
    pub const BAD_INPUT: u8 = 2;
    /// The record, collision or route does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// Refused as a duplicate (`DUPLICATE_<KEY>`, `ALREADY_EXISTS`).
    pub const DUPLICATE: u8 = 4;
    /// The node could not be reached.
    pub const UNREACHABLE: u8 = 5;
    /// The token is missing or wrong.
    pub const UNAUTHORIZED: u8 = 6;
    /// Refused for the record's state (`RECORD_DELETED`,
    /// `RECORD_NOT_DELETED`) or, for admin calls, the node's (`NO_NETWORK`).
    pub const REFUSED: u8 = 7;
}

/// A failed command: what to print and the exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub exit: u8,
    /// The API's code, when the API answered.
    pub code: Option<String>,
    /// For people.
    pub message: String,
    /// The API's whole error body.
    pub body: Option<Json>,
}

impl CliError {
    /// Bad input found before any request.
    pub fn input(message: impl Into<String>) -> CliError {
        CliError {
            exit: exit::BAD_INPUT,
            code: None,
            message: message.into(),
            body: None,
        }
    }

    /// Another failure.
    pub fn other(message: impl Into<String>) -> CliError {
        CliError {
            exit: exit::FAILURE,
            code: None,
            message: message.into(),
            body: None,
        }
    }

    fn from_api(status: u16, body: &str) -> CliError {
        let parsed: Option<Json> = serde_json::from_str(body).ok();
        let code = parsed
            .as_ref()
            .and_then(|b| b["code"].as_str())
            .map(str::to_string);
        let message = parsed
            .as_ref()
            .and_then(|b| b["message"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}: {}", body.trim()));
        let c = code.as_deref().unwrap_or("");
        let exit = match status {
            401 => exit::UNAUTHORIZED,
            404 => exit::NOT_FOUND,
            409 if c.starts_with("DUPLICATE_") || c == "ALREADY_EXISTS" => exit::DUPLICATE,
            409 | 503 if c != "TIMEOUT" => exit::REFUSED,
            400 | 413 | 415 | 422 => exit::BAD_INPUT,
            _ => exit::FAILURE,
        };
        CliError {
            exit,
            code,
            message,
            body: parsed,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(c) => write!(f, "{c}: {}", self.message)?,
            None => write!(f, "{}", self.message)?,
        }
        if let Some(b) = &self.body
            && let Some(e) = b.get("existing").and_then(Json::as_str)
        {
            write!(f, " (existing record: {e})")?;
        }
        Ok(())
    }
}

/// Result of a command.
pub type CliResult<T = ()> = Result<T, CliError>;

/// A connection to a node's API.
#[derive(Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// Where the token comes from: `ENTENTE_TOKEN`, else the data dir's token
/// file.
pub fn token_from(env_token: Option<String>, data_dir: Option<&Path>) -> Option<String> {
    env_token
        .filter(|t| !t.is_empty())
        .or_else(|| data_dir.and_then(entente_node::api::token::read))
}

impl Client {
    /// A client of the API at `base` (`http://127.0.0.1:7070`).
    pub fn new(base: &str, token: Option<String>) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(Duration::from_secs(120))
            .build();
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    /// A request with the token set.
    pub fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    /// Runs a request; a non-2xx answer becomes a [`CliError`] with its code.
    pub fn check(&self, sent: Result<ureq::Response, ureq::Error>) -> CliResult<ureq::Response> {
        match sent {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, resp)) => {
                let body = resp.into_string().unwrap_or_default();
                Err(CliError::from_api(status, &body))
            }
            Err(ureq::Error::Transport(t)) => Err(CliError {
                exit: exit::UNREACHABLE,
                code: None,
                message: format!("cannot reach the node at {}: {t}", self.base),
                body: None,
            }),
        }
    }

    /// A JSON request and its JSON answer.
    pub fn json(&self, method: &str, path: &str, body: Option<&Json>) -> CliResult<Json> {
        let req = self.request(method, path);
        let resp = match body {
            Some(b) => self.check(
                req.set("Content-Type", "application/json")
                    .send_string(&b.to_string()),
            )?,
            None => self.check(req.call())?,
        };
        let text = resp
            .into_string()
            .map_err(|e| CliError::other(format!("reading the answer: {e}")))?;
        serde_json::from_str(&text)
            .map_err(|e| CliError::other(format!("the node answered non-JSON ({e}): {text}")))
    }

    /// GET as JSON.
    pub fn get(&self, path: &str) -> CliResult<Json> {
        self.json("GET", path, None)
    }

    /// A streamed upload of JSON lines; the answer as JSON.
    pub fn post_lines(&self, path: &str, body: impl Read) -> CliResult<Json> {
        let req = self.request("POST", path);
        let resp = self.check(req.set("Content-Type", "application/x-ndjson").send(body))?;
        let text = resp
            .into_string()
            .map_err(|e| CliError::other(format!("reading the answer: {e}")))?;
        serde_json::from_str(&text).map_err(|e| CliError::other(format!("{e}: {text}")))
    }

    /// A GET whose answer is read as a stream.
    pub fn get_stream(&self, path: &str, timeout: Option<Duration>) -> CliResult<ureq::Response> {
        let mut req = self.request("GET", path);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        self.check(req.call())
    }
}

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// Prints JSON, pretty.
pub fn print_json(v: &Json) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| json!(null).to_string())
    );
}
