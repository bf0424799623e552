//! Object creation, a step of delivery for sources with `[sources.object]`: once an event's
//! leads are known, `POST /customobjects/objects/{definition_id}` with its fields, commit the new
//! id (with the event's links), and only then link. A creation is marked as being sent, durably,
//! before the call, so one cut off by a crash is recognised (and recorded as `unknown`) when it
//! is claimed again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::backoff::{Next, after_failure};
use super::fleet::Fleet;
use crate::alerts::{Alerts, Example};
use crate::config::{AlertKind, Config, ObjectRule};
use crate::domain::CreationOutcome;
use crate::mapping;
use crate::sprinthub::{CreateFailure, Failure, SprintHubClient};
use crate::store::{
    Attempt, ObjectAttempt, ObjectCompletion, ObjectJob, ObjectUpdate, Store, now_ms,
};
use crate::telemetry::Metrics;

pub struct Creator {
    alerts: Alerts,
    store: Arc<dyn Store>,
    hub: SprintHubClient,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    fleet: Arc<Fleet>,
}

impl Creator {
    pub fn new(
        store: Arc<dyn Store>,
        hub: SprintHubClient,
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
        alerts: Alerts,
        fleet: Arc<Fleet>,
    ) -> Self {
        Creator {
            alerts,
            store,
            hub,
            cfg,
            metrics,
            fleet,
        }
    }

    /// One creation attempt for a claimed event, at its rate-limit `slot`, and its record.
    pub async fn run(
        &self,
        job: ObjectJob,
        slot: tokio::time::Instant,
        shutdown: CancellationToken,
    ) {
        let span = tracing::info_span!("create_object", event_id = %job.event_id, source = %job.source, definition_id = %job.definition_id);
        if job.lost {
            self.metrics.object_creation(CreationOutcome::Unknown);
            tracing::warn!(parent: &span, "an earlier creation was sent but its answer was lost; SprintHub may hold an unlinked object; creating again");
        }
        let go = tokio::select! {
            _ = tokio::time::sleep_until(slot) => true,
            _ = shutdown.cancelled() => false,
        };
        // Paused meanwhile (throttling seen by another call): handed back, not sent.
        let go = go && self.fleet.paused_cached().is_none();
        let (attempt, update) = if go {
            match self.attempt(&job, &span).await {
                Some(done) => done,
                // The lease is gone (or the mark could not be written): nothing was sent.
                None => return,
            }
        } else {
            (None, ObjectUpdate::Release)
        };
        if let ObjectUpdate::Dead(reason) = &update {
            self.alerts.report(
                AlertKind::Dead,
                Example::event(&job.source, &job.event_id)
                    .error(format!("object creation: {reason}")),
            );
        }
        let done = ObjectCompletion {
            event_pk: job.event_pk,
            lease: job.lease,
            attempt,
            update,
        };
        if let Err(e) = self.store.complete_object(&done, now_ms()).await {
            // The lease runs out and the creation is claimed again, found sent, and marked
            // unknown: at most one extra object, never a lost event.
            tracing::error!(parent: &span, error = %e, "could not record the object creation");
        }
    }

    async fn attempt(
        &self,
        job: &ObjectJob,
        span: &tracing::Span,
    ) -> Option<(Option<ObjectAttempt>, ObjectUpdate)> {
        let spec = match self.cfg.source(&job.source).map(|s| s.object_rule()) {
            Some(ObjectRule::Create(spec)) => spec,
            Some(ObjectRule::FromBody(_)) => {
                return Some((
                    None,
                    ObjectUpdate::Dead(format!(
                        "source {:?} no longer creates objects; replay the event",
                        job.source
                    )),
                ));
            }
            None => {
                return Some((
                    None,
                    ObjectUpdate::Dead(format!("source {:?} is no longer configured", job.source)),
                ));
            }
        };
        let body = match mapping::Input::read(&job.request) {
            Ok(v) => v,
            Err(e) => {
                return Some((
                    None,
                    ObjectUpdate::Dead(format!("the stored body cannot be read: {e}")),
                ));
            }
        };
        let fields = Value::Object(mapping::object_fields(spec, &body));
        // Durably "in flight" before anything leaves: a crash from here on is recognised.
        match self.store.object_sending(job, now_ms()).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(parent: span, "lease lost before sending; another worker has the creation");
                return None;
            }
            Err(e) => {
                tracing::warn!(parent: span, error = %e, "could not mark the creation as sent; not sending");
                return Some((None, ObjectUpdate::Release));
            }
        }
        let at = now_ms();
        let start = Instant::now();
        let result = self
            .hub
            .create_object(
                &job.definition_id,
                &fields,
                super::stored_trace(job.trace.as_deref()),
            )
            .await;
        let took = start.elapsed();
        self.fleet
            .observe(result.as_ref().err().map(CreateFailure::failure))
            .await;
        let duration_ms = crate::delivery::millis(took);
        Some(match result {
            Ok((id, ok)) => {
                self.metrics.attempt("success", took);
                self.metrics.object_creation(CreationOutcome::Created);
                tracing::info!(parent: span, object_id = %id, status = ok.status, "object created");
                (
                    Some(ObjectAttempt {
                        outcome: CreationOutcome::Created,
                        attempt: Attempt {
                            at,
                            status_code: Some(i64::from(ok.status)),
                            error: None,
                            response_excerpt: ok.excerpt,
                            duration_ms,
                        },
                    }),
                    ObjectUpdate::Created(id),
                )
            }
            Err(failure) => {
                let outcome = match &failure {
                    CreateFailure::Lost(_) => CreationOutcome::Unknown,
                    CreateFailure::Answered(_) => CreationOutcome::Failed,
                };
                let f = failure.failure();
                self.metrics.attempt(f.class(), took);
                if let Some(kind) = super::alert_kind(f) {
                    self.alerts.report(
                        kind,
                        Example::event(&job.source, &job.event_id)
                            .error(format!("object creation: {}", f.describe())),
                    );
                }
                self.metrics.object_creation(outcome);
                let error = match outcome {
                    CreationOutcome::Unknown => format!(
                        "{}; answer lost, SprintHub may hold an object that is not linked",
                        f.describe()
                    ),
                    _ => f.describe(),
                };
                let attempt = ObjectAttempt {
                    outcome,
                    attempt: Attempt {
                        at,
                        status_code: f.status().map(i64::from),
                        error: Some(error.clone()),
                        response_excerpt: f.excerpt().map(str::to_string),
                        duration_ms,
                    },
                };
                let update = self.next(job, f, error, span);
                (Some(attempt), update)
            }
        })
    }

    fn next(
        &self,
        job: &ObjectJob,
        f: &Failure,
        error: String,
        span: &tracing::Span,
    ) -> ObjectUpdate {
        match after_failure(
            f,
            job.attempts,
            job.first_at,
            now_ms(),
            &self.cfg.delivery,
            fastrand::f64(),
        ) {
            Next::Retry { delay, counted } => {
                match f {
                    Failure::Auth { .. } => {
                        tracing::error!(parent: span, error = %error, "SprintHub refused our credentials")
                    }
                    Failure::Misdirected { .. } => {
                        tracing::error!(parent: span, error = %error, "SprintHub answered with a redirect; sprinthub.base_url is wrong")
                    }
                    _ => {
                        tracing::warn!(parent: span, error = %error, retry_in_ms = delay.as_millis() as u64, "object creation failed")
                    }
                }
                ObjectUpdate::Retry {
                    due_at: super::after(now_ms(), delay.max(Duration::ZERO)),
                    counted,
                    error,
                }
            }
            Next::Dead(reason) => {
                tracing::error!(parent: span, error = %reason, "object creation gave up");
                ObjectUpdate::Dead(reason)
            }
        }
    }
}
