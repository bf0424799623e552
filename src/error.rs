//! The one application error type, and the one place it becomes an HTTP answer.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::signature::SignatureError;

/// Everything a request can fail with. Each variant has a stable JSON error code so that
/// senders and operators can act on it without parsing prose.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("no source named {0:?} is configured")]
    UnknownSource(String),
    #[error("{0}")]
    Signature(#[from] SignatureError),
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    Unavailable(String),
    #[error("admin token missing or wrong")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("csrf token missing or wrong")]
    Csrf,
    #[error("storage error: {0}")]
    Storage(String),
    #[error("the request took longer than {0} ms")]
    Timeout(u64),
    #[error("this route does not take that method")]
    MethodNotAllowed,
    /// A 400 with its own code (`invalid_event_id`, `invalid_id`, ...), from input checks.
    #[error("{1}")]
    InvalidInput(&'static str, String),
}

impl AppError {
    pub fn code(&self) -> &'static str {
        match self {
            AppError::UnknownSource(_) => "unknown_source",
            AppError::Signature(e) => e.code(),
            AppError::InvalidJson(_) => "invalid_json",
            AppError::PayloadTooLarge(_) => "payload_too_large",
            AppError::Unavailable(_) => "unavailable",
            AppError::Unauthorized => "unauthorized",
            AppError::NotFound(_) => "not_found",
            AppError::BadRequest(_) => "bad_request",
            AppError::Conflict(_) => "conflict",
            AppError::Csrf => "csrf",
            AppError::Storage(_) => "unavailable",
            AppError::Timeout(_) => "request_timeout",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::InvalidInput(code, _) => code,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::UnknownSource(_) | AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Signature(_) | AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::InvalidJson(_) | AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Unavailable(_) | AppError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::Csrf => StatusCode::FORBIDDEN,
            AppError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::InvalidInput(..) => StatusCode::BAD_REQUEST,
        }
    }
}

impl From<crate::store::StoreError> for AppError {
    /// Data the database refuses will be refused again: that is the caller's 400, not a 503
    /// to retry.
    fn from(e: crate::store::StoreError) -> Self {
        if e.is_data_error() {
            AppError::BadRequest(e.to_string())
        } else {
            AppError::Storage(e.to_string())
        }
    }
}

/// Builds the JSON error body every route shares.
pub fn error_body(code: &str, message: &str) -> serde_json::Value {
    json!({"error": {"code": code, "message": message}})
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            // Storage details stay in the log; the sender only needs to know to retry.
            AppError::Storage(detail) => {
                tracing::error!(error = %detail, "storage failure");
                "storage is unavailable, retry later".to_string()
            }
            other => other.to_string(),
        };
        let mut resp = (status, axum::Json(error_body(self.code(), &message))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if matches!(self, AppError::Unauthorized) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sprintlink-admin\""),
            );
        }
        resp
    }
}

/// Wraps an axum extractor so that its rejection is the JSON error every route answers with
/// (axum's own answers are plain text).
macro_rules! json_rejecting {
    ($(#[$doc:meta])* $name:ident, $inner:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $name<T>(pub T);

        impl<T, S> axum::extract::FromRequestParts<S> for $name<T>
        where
            T: serde::de::DeserializeOwned + Send,
            S: Send + Sync,
        {
            type Rejection = AppError;

            async fn from_request_parts(
                parts: &mut http::request::Parts,
                state: &S,
            ) -> Result<Self, Self::Rejection> {
                axum::extract::$inner::<T>::from_request_parts(parts, state)
                    .await
                    .map(|v| $name(v.0))
                    .map_err(|e| AppError::BadRequest(e.body_text()))
            }
        }
    };
}

json_rejecting!(
    /// `axum::extract::Query` answering a malformed query with the JSON `bad_request` error.
    ApiQuery,
    Query
);
json_rejecting!(
    /// `axum::extract::Path` answering a malformed path with the JSON `bad_request` error.
    ApiPath,
    Path
);
