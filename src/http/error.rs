//! The one application error type, and the one place it becomes an HTTP answer.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::mapping::{Unstorable, UnstorableValue};
use crate::signature::SignatureError;

/// Every code an error answer can carry, and so the OpenAPI document's list of them: a code is
/// documented exactly when some `AppError` answers with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    BadRequest,
    InvalidEventId,
    InvalidEventType,
    InvalidId,
    MissingSignature,
    InvalidSignature,
    TimestampOutOfTolerance,
    Unauthorized,
    Csrf,
    UnknownSource,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    TooManyRequests,
    Unavailable,
    InvalidBody,
    ForbiddenAddress,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidEventId => "invalid_event_id",
            ErrorCode::InvalidEventType => "invalid_event_type",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::MissingSignature => "missing_signature",
            ErrorCode::InvalidSignature => "invalid_signature",
            ErrorCode::TimestampOutOfTolerance => "timestamp_out_of_tolerance",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Csrf => "csrf",
            ErrorCode::UnknownSource => "unknown_source",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::ForbiddenAddress => "forbidden_address",
        }
    }
}

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
    /// A 400 with its own code (`invalid_event_id`, `invalid_id`, ...): nothing was stored.
    #[error("{}", .0.message)]
    Unstorable(Unstorable),
    #[error("too many failed admin token checks from this address: retry in {0} s")]
    TooManyRequests(u64),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A form or multipart body that cannot be read.
    #[error("{0}")]
    InvalidBody(String),
    /// The source's `allow_ips` does not hold the sender's address.
    #[error("{0}")]
    ForbiddenAddress(String),
}

impl AppError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AppError::UnknownSource(_) => ErrorCode::UnknownSource,
            AppError::Signature(SignatureError::Missing(_)) => ErrorCode::MissingSignature,
            AppError::Signature(SignatureError::Invalid) => ErrorCode::InvalidSignature,
            AppError::Signature(SignatureError::TimestampOutOfTolerance(_)) => {
                ErrorCode::TimestampOutOfTolerance
            }
            AppError::InvalidJson(_) => ErrorCode::InvalidJson,
            AppError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            AppError::Unavailable(_) | AppError::Storage(_) => ErrorCode::Unavailable,
            AppError::Unauthorized => ErrorCode::Unauthorized,
            AppError::NotFound(_) => ErrorCode::NotFound,
            AppError::BadRequest(_) => ErrorCode::BadRequest,
            AppError::Conflict(_) => ErrorCode::Conflict,
            AppError::Csrf => ErrorCode::Csrf,
            AppError::Timeout(_) => ErrorCode::RequestTimeout,
            AppError::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            AppError::Unstorable(u) => match u.code {
                UnstorableValue::EventId => ErrorCode::InvalidEventId,
                UnstorableValue::EventType => ErrorCode::InvalidEventType,
                UnstorableValue::Id => ErrorCode::InvalidId,
            },
            AppError::TooManyRequests(_) => ErrorCode::TooManyRequests,
            AppError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            AppError::InvalidBody(_) => ErrorCode::InvalidBody,
            AppError::ForbiddenAddress(_) => ErrorCode::ForbiddenAddress,
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
            AppError::Unstorable(_) => StatusCode::BAD_REQUEST,
            AppError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::InvalidBody(_) => StatusCode::BAD_REQUEST,
            AppError::ForbiddenAddress(_) => StatusCode::FORBIDDEN,
        }
    }
}

impl From<crate::mapping::body::BodyError> for AppError {
    fn from(e: crate::mapping::body::BodyError) -> Self {
        use crate::mapping::body::BodyError;
        match e {
            BodyError::Unsupported(_) => AppError::UnsupportedMediaType(e.to_string()),
            BodyError::Json(m) => AppError::InvalidJson(m),
            BodyError::Form(m) => AppError::InvalidBody(m),
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

/// The JSON error body every route shares, and its OpenAPI schema.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": {"code": "invalid_signature", "message": "no signature matches"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
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
        let mut resp = (status, axum::Json(ErrorBody::new(self.code(), message))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if let AppError::TooManyRequests(secs) = &self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
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

/// The body limit of a router whose handlers take [`ApiJson`] or [`ApiBytes`], as a request
/// extension next to axum's `DefaultBodyLimit`, so that their 413 can name it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// axum's own limit when a router sets none.
const AXUM_DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;

fn body_rejection(status: StatusCode, text: String, limit: Option<BodyLimit>) -> AppError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            AppError::PayloadTooLarge(limit.map_or(AXUM_DEFAULT_BODY_LIMIT, |l| l.0))
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => AppError::UnsupportedMediaType(text),
        _ => AppError::BadRequest(text),
    }
}

/// `axum::Json` answering every rejection with the JSON error: `unsupported_media_type` (415)
/// without `Content-Type: application/json`, `payload_too_large` (413) over the body limit, and
/// `bad_request` (400) for a body that is not JSON or not the expected shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, AppError> {
        let limit = req.extensions().get::<BodyLimit>().copied();
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|j| ApiJson(j.0))
            .map_err(|e| body_rejection(e.status(), e.body_text(), limit))
    }
}

/// `axum::body::Bytes` answering a body over the limit (or one that cannot be read) with the
/// JSON error.
#[derive(Debug, Clone, Default)]
pub struct ApiBytes(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for ApiBytes {
    type Rejection = AppError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, AppError> {
        let limit = req.extensions().get::<BodyLimit>().copied();
        axum::body::Bytes::from_request(req, state)
            .await
            .map(ApiBytes)
            .map_err(|e| body_rejection(e.status(), e.body_text(), limit))
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::extract::DefaultBodyLimit;
    use axum::routing::post;
    use serde::Deserialize;
    use tower::ServiceExt;

    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Shape {
        #[allow(dead_code)]
        n: u32,
    }

    fn router() -> Router {
        Router::new()
            .route("/json", post(|ApiJson(_): ApiJson<Shape>| async { "ok" }))
            .route(
                "/bytes",
                post(|ApiBytes(b): ApiBytes| async move { b.len().to_string() }),
            )
            .route(
                "/q/{n}",
                post(
                    |ApiPath(n): ApiPath<u32>, ApiQuery(_): ApiQuery<Shape>| async move {
                        n.to_string()
                    },
                ),
            )
            .layer(DefaultBodyLimit::max(64))
            .layer(axum::Extension(BodyLimit(64)))
    }

    async fn call(uri: &str, ct: Option<&str>, body: &str) -> (StatusCode, serde_json::Value) {
        let mut req = http::Request::post(uri);
        if let Some(ct) = ct {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let resp = router()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        if status.is_success() {
            return (
                status,
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into()),
            );
        }
        assert_eq!(ct, "application/json", "{uri}: a JSON error");
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    /// One error that answers with `code`: exhaustive, so a code no error returns does not
    /// compile, and the answer must carry that very code.
    fn producer(code: ErrorCode) -> AppError {
        let t = || "x".to_string();
        let unstorable = |v| {
            AppError::Unstorable(Unstorable {
                code: v,
                message: t(),
            })
        };
        match code {
            ErrorCode::InvalidJson => AppError::InvalidJson(t()),
            ErrorCode::BadRequest => AppError::BadRequest(t()),
            ErrorCode::InvalidEventId => unstorable(UnstorableValue::EventId),
            ErrorCode::InvalidEventType => unstorable(UnstorableValue::EventType),
            ErrorCode::InvalidId => unstorable(UnstorableValue::Id),
            ErrorCode::MissingSignature => SignatureError::Missing("x").into(),
            ErrorCode::InvalidSignature => SignatureError::Invalid.into(),
            ErrorCode::TimestampOutOfTolerance => SignatureError::TimestampOutOfTolerance(1).into(),
            ErrorCode::Unauthorized => AppError::Unauthorized,
            ErrorCode::Csrf => AppError::Csrf,
            ErrorCode::UnknownSource => AppError::UnknownSource(t()),
            ErrorCode::NotFound => AppError::NotFound(t()),
            ErrorCode::MethodNotAllowed => AppError::MethodNotAllowed,
            ErrorCode::RequestTimeout => AppError::Timeout(1),
            ErrorCode::Conflict => AppError::Conflict(t()),
            ErrorCode::PayloadTooLarge => AppError::PayloadTooLarge(1),
            ErrorCode::UnsupportedMediaType => AppError::UnsupportedMediaType(t()),
            ErrorCode::TooManyRequests => AppError::TooManyRequests(1),
            ErrorCode::Unavailable => AppError::Unavailable(t()),
            ErrorCode::InvalidBody => AppError::InvalidBody(t()),
            ErrorCode::ForbiddenAddress => AppError::ForbiddenAddress(t()),
        }
    }

    #[tokio::test]
    async fn the_documented_codes_are_exactly_the_returned_ones() {
        use utoipa::OpenApi as _;
        let doc = crate::http::openapi::ApiDoc::openapi();
        let doc: serde_json::Value = serde_json::to_value(&doc).unwrap();
        let documented: Vec<String> = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .expect("ErrorCode is an enum in the document")
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert!(documented.len() >= 21, "{documented:?}");
        for text in &documented {
            let code: ErrorCode = serde_json::from_value(serde_json::json!(text)).unwrap();
            let e = producer(code);
            assert_eq!(e.code(), code);
            assert_eq!(code.as_str(), text);
            let resp = e.into_response();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"]["code"], *text);
        }
    }

    #[tokio::test]
    async fn extractor_rejections_are_json_errors_with_codes() {
        let json = Some("application/json");
        for (uri, ct, body, status, code) in [
            ("/json", None, r#"{"n":1}"#, 415, "unsupported_media_type"),
            (
                "/json",
                Some("text/plain"),
                r#"{"n":1}"#,
                415,
                "unsupported_media_type",
            ),
            ("/json", json, "{not json", 400, "bad_request"),
            ("/json", json, r#"{"n":"x"}"#, 400, "bad_request"),
            ("/json", json, r#"{"m":1}"#, 400, "bad_request"),
            (
                "/json",
                json,
                &format!(r#"{{"n":1,"p":"{}"}}"#, "x".repeat(100)),
                413,
                "payload_too_large",
            ),
            ("/bytes", None, &"x".repeat(65), 413, "payload_too_large"),
            ("/q/abc?n=1", None, "", 400, "bad_request"),
            ("/q/1?n=-1", None, "", 400, "bad_request"),
        ] {
            let (got, body) = call(uri, ct, body).await;
            assert_eq!(got.as_u16(), status, "{uri}: {body}");
            assert_eq!(body["error"]["code"], code, "{uri}: {body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        let (status, body) = call("/json", json, r#"{"n":1}"#).await;
        assert_eq!((status.as_u16(), body.as_str()), (200, Some("ok")));
        let (status, body) = call("/bytes", None, &"x".repeat(64)).await;
        assert_eq!((status.as_u16(), body.as_str()), (200, Some("64")));
        let (_, body) = call("/json", json, &"x".repeat(100)).await;
        assert_eq!(body["error"]["message"], "body is larger than 64 bytes");
    }
}
