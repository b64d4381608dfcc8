//! Every API error is `{"code": …, "message": …}` (plus detail for some
//! codes) with an HTTP status that follows from the code.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json_, json};

use crate::error::Error;

/// An API error: a status, a stable code, a human message and optional detail
/// merged into the JSON body.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code (`NOT_FOUND`, `DUPLICATE_EMAIL`, …).
    pub code: String,
    /// For people.
    pub message: String,
    /// Extra keys of the body (`existing` for a duplicate, …).
    pub detail: serde_json::Map<String, Json_>,
}

impl ApiError {
    /// A new error without detail.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            detail: serde_json::Map::new(),
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 500 for a failure that is not the caller's.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", message)
    }

    /// Adds a detail key.
    pub fn with(mut self, key: &str, value: Json_) -> ApiError {
        self.detail.insert(key.to_string(), value);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Json_ {
        let mut m = self.detail.clone();
        m.insert("code".into(), json!(self.code));
        m.insert("message".into(), json!(self.message));
        Json_::Object(m)
    }
}

/// The HTTP status for a store error code.
pub fn status_for(e: &Error) -> StatusCode {
    use entente_model::ModelError as M;
    match e {
        Error::NotFound(_) | Error::CollisionNotFound(_) => StatusCode::NOT_FOUND,
        Error::Duplicate { .. } | Error::AlreadyExists(_) => StatusCode::CONFLICT,
        Error::PeerNotReady(_) | Error::VerifyInProgress(_) | Error::VerifyUnsupported(_) => {
            StatusCode::CONFLICT
        }
        Error::BadReference { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Error::Model(m) => match m {
            M::InvalidId(_) => StatusCode::BAD_REQUEST,
            M::Deleted(_) | M::NotDeleted(_) => StatusCode::CONFLICT,
            M::UnknownCollection(_)
            | M::UnknownField { .. }
            | M::WrongType { .. }
            | M::MissingRequired(_)
            | M::InvalidHeads(_)
            | M::InvalidResolution(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let mut out = ApiError::new(status_for(&e), &e.code(), e.to_string());
        match &e {
            Error::Duplicate {
                field,
                value,
                existing,
                ..
            } => {
                out = out
                    .with("field", json!(field))
                    .with("value", json!(value))
                    .with("existing", json!(existing));
            }
            Error::AlreadyExists(id) => out = out.with("existing", json!(id)),
            Error::BadReference { field, target, .. } => {
                out = out
                    .with("field", json!(field))
                    .with("target", json!(target));
            }
            _ => {}
        }
        out
    }
}

impl From<entente_model::ModelError> for ApiError {
    fn from(e: entente_model::ModelError) -> ApiError {
        ApiError::from(Error::Model(e))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let text = r.body_text();
        match r {
            JsonRejection::JsonSyntaxError(_) => ApiError::bad_request("MALFORMED_JSON", text),
            JsonRejection::JsonDataError(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_BODY", text)
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "expected `Content-Type: application/json`",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BODY_TOO_LARGE",
                "the request body is larger than this route accepts",
            ),
            other => ApiError::new(other.status(), "BAD_BODY", text),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::bad_request("BAD_QUERY", r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
