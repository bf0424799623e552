//! One byte budget for the request bodies held in memory across all requests at once
//! (`server.max_buffered_bytes`). A layer wraps every request body: each chunk is counted as it
//! arrives and the count is given back when the request has been answered. When a chunk does not
//! fit, reading the body fails and the answer is 503 `unavailable` with Retry-After, whatever the
//! route; a body whose declared `Content-Length` does not fit is refused before it is read.
//!
//! Large bodies (more than [`SMALL_BODY`] bytes so far) may fill three quarters of the budget
//! only: the last quarter stays for ordinary small webhooks, so stalled large uploads cannot
//! starve them.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};

use crate::http::error::AppError;

/// Bodies up to this size may use the whole budget; larger ones three quarters of it.
pub const SMALL_BODY: usize = 64 * 1024;

/// The process-wide count of buffered request body bytes.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    used: AtomicUsize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// What a body that will hold `body_total` bytes may fill the budget up to.
    fn ceiling(&self, body_total: usize) -> usize {
        if body_total > SMALL_BODY {
            self.limit - self.limit / 4
        } else {
            self.limit
        }
    }

    /// Whether `n` more bytes, for a body that then holds `body_total`, fit now.
    fn fits(&self, n: usize, body_total: usize) -> bool {
        self.used().saturating_add(n) <= self.ceiling(body_total)
    }

    /// Takes `n` bytes for a body that then holds `body_total`; false (nothing taken) when they
    /// do not fit.
    fn try_take(&self, n: usize, body_total: usize) -> bool {
        let ceiling = self.ceiling(body_total);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|after| *after <= ceiling)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// What one request holds; given back when the last of the request and its body is dropped.
#[derive(Debug)]
struct Reservation {
    budget: Arc<BodyBudget>,
    held: AtomicUsize,
    refused: AtomicBool,
}

impl Reservation {
    fn grow(&self, n: usize) -> bool {
        let total = self.held.load(Ordering::Relaxed) + n;
        if self.budget.try_take(n, total) {
            self.held.fetch_add(n, Ordering::Relaxed);
            true
        } else {
            self.refused.store(true, Ordering::Relaxed);
            false
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(*self.held.get_mut());
    }
}

/// The error a body read fails with when the budget is full.
#[derive(Debug, thiserror::Error)]
#[error("the server is receiving too many request bodies at once")]
pub struct BudgetFull;

/// Whether a body-read error (anywhere in its chain of sources) is the budget's refusal.
pub fn is_budget_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.is::<BudgetFull>() {
            return true;
        }
        current = err.source();
    }
    false
}

/// A request body that counts its chunks against the budget.
struct Budgeted {
    inner: Body,
    reservation: Arc<Reservation>,
}

impl http_body::Body for Budgeted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
            && !self.reservation.grow(data.len())
        {
            return Poll::Ready(Some(Err(axum::Error::new(BudgetFull))));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn busy() -> Response {
    AppError::Unavailable(
        "the server is receiving too many request bodies at once, retry shortly".into(),
    )
    .into_response()
}

/// The layer: refuses a declared length that does not fit, counts the rest as it arrives, and
/// answers 503 when a chunk did not fit (whatever the handler made of the failed read).
pub async fn limit_buffered(
    State(budget): State<Arc<BodyBudget>>,
    req: Request,
    next: Next,
) -> Response {
    use http_body::Body as _;
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared
        && !budget.fits(n, n)
    {
        tracing::debug!(
            declared = n,
            used = budget.used(),
            "body budget full; refused before reading"
        );
        return busy();
    }
    let reservation = Arc::new(Reservation {
        budget,
        held: AtomicUsize::new(0),
        refused: AtomicBool::new(false),
    });
    let (parts, body) = req.into_parts();
    let body = Body::new(Budgeted {
        inner: body,
        reservation: reservation.clone(),
    });
    let response = next.run(Request::from_parts(parts, body)).await;
    if reservation.refused.load(Ordering::Relaxed) {
        tracing::debug!("body budget full; refused while reading");
        return busy();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reservation(budget: &Arc<BodyBudget>) -> Reservation {
        Reservation {
            budget: budget.clone(),
            held: AtomicUsize::new(0),
            refused: AtomicBool::new(false),
        }
    }

    #[test]
    fn large_bodies_leave_a_quarter_for_small_ones_and_drop_gives_back() {
        let budget = BodyBudget::new(1_000_000);
        let large = reservation(&budget);
        assert!(large.grow(700_000));
        assert!(large.grow(50_000), "up to three quarters");
        assert!(!large.grow(1), "a large body stops at three quarters");
        assert!(large.refused.load(Ordering::Relaxed));
        let small = reservation(&budget);
        assert!(small.grow(SMALL_BODY), "small bodies use the last quarter");
        assert!(!budget.fits(200_000, 200_000));
        drop(large);
        drop(small);
        assert_eq!(budget.used(), 0);
        assert!(budget.fits(750_000, 750_000));
    }

    #[tokio::test]
    async fn a_refused_read_is_recognised_through_to_bytes() {
        let budget = BodyBudget::new(10);
        let body = Body::new(Budgeted {
            inner: Body::from(vec![0u8; 100]),
            reservation: Arc::new(reservation(&budget)),
        });
        let err = axum::body::to_bytes(body, 1000).await.unwrap_err();
        assert!(is_budget_full(&err), "{err}");
        assert_eq!(budget.used(), 0);
    }
}
