//! Group commit: callers hand items to one task that writes whatever has queued up in a single
//! transaction, so requests arriving together share one fsync. A group the database refuses for
//! the data of one member is written again member by member, so one bad request never fails
//! another's.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::StoreError;

type Item<T, R> = (T, oneshot::Sender<Result<R, StoreError>>);

/// A handle to submit items to a group-commit task.
pub struct Batcher<T, R> {
    tx: mpsc::Sender<Item<T, R>>,
    health: Arc<Health>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
            health: self.health.clone(),
        }
    }
}

/// The outcome of the latest group, for readiness: a store that answers a ping can still be
/// failing every commit (a full disk), and that is what senders see.
#[derive(Default)]
struct Health {
    /// When the latest group failed for a reason other than its data; `None` once one succeeds.
    failure: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl Health {
    fn record(&self, failure: Option<&StoreError>) {
        if let Ok(mut f) = self.failure.lock() {
            *f = failure.map(|e| (std::time::Instant::now(), e.to_string()));
        }
    }
}

impl<T: Clone + Send + Sync + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the task. `write` receives up to `max_batch` items and answers one result per item,
    /// in order, or one error for all of them. When that error is a data error
    /// (`StoreError::is_data_error`), each item is written again alone and gets its own answer.
    /// The task ends when every handle is dropped.
    pub fn spawn<F, Fut>(max_batch: usize, write: F) -> Self
    where
        F: Fn(Arc<[T]>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<R>, StoreError>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<Item<T, R>>(max_batch * 4);
        let health = Arc::new(Health::default());
        let recorder = health.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(max_batch);
            while rx.recv_many(&mut buf, max_batch).await > 0 {
                let (items, acks): (Vec<T>, Vec<_>) = std::mem::take(&mut buf).into_iter().unzip();
                let items: Arc<[T]> = items.into();
                match write(items.clone()).await {
                    Ok(results) => {
                        recorder.record(None);
                        for (ack, r) in acks.into_iter().zip(results) {
                            let _ = ack.send(Ok(r));
                        }
                    }
                    Err(e) if e.is_data_error() && items.len() > 1 => {
                        tracing::warn!(error = %e, members = items.len(),
                            "a group commit was refused for its data; writing its members one by one");
                        for (item, ack) in items.iter().zip(acks) {
                            let one = write(Arc::from([item.clone()])).await;
                            match &one {
                                Err(e) if !e.is_data_error() => recorder.record(Some(e)),
                                Ok(_) => recorder.record(None),
                                Err(_) => {}
                            }
                            let _ = ack.send(one.and_then(|mut r| {
                                r.pop()
                                    .ok_or_else(|| StoreError::broken("no result for the item"))
                            }));
                        }
                    }
                    Err(e) => {
                        recorder.record(Some(&e));
                        for ack in acks {
                            let _ = ack.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Batcher { tx, health }
    }

    /// Why the latest group failed, if it failed less than `within` ago and none has succeeded
    /// since (data refused for one member does not count: the others were written).
    pub fn failing(&self, within: std::time::Duration) -> Option<String> {
        let f = self.health.failure.lock().ok()?;
        f.as_ref()
            .filter(|(at, _)| at.elapsed() < within)
            .map(|(_, e)| e.clone())
    }

    /// Queues one item and waits until its transaction has committed (or failed).
    pub async fn submit(&self, item: T) -> Result<R, StoreError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send((item, ack))
            .await
            .map_err(|_| StoreError::Closed)?;
        done.await.map_err(|_| StoreError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Cause;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_submissions_share_batches_and_keep_order() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let b: Batcher<u32, u32> = Batcher::spawn(64, move |items: Arc<[u32]>| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok(items.iter().map(|i| i * 2).collect())
            }
        });
        let handles: Vec<_> = (0..100u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { (i, b.submit(i).await.unwrap()) })
            })
            .collect();
        for h in handles {
            let (i, r) = h.await.unwrap();
            assert_eq!(r, i * 2);
        }
        assert!(calls.load(Ordering::SeqCst) < 100, "no batching happened");
    }

    #[tokio::test]
    async fn a_storage_failure_fails_the_whole_batch_and_is_reported_until_a_success() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = fail.clone();
        let b: Batcher<u32, u32> = Batcher::spawn(8, move |items: Arc<[u32]>| {
            let fail = f.load(Ordering::SeqCst);
            async move {
                if fail {
                    Err(StoreError::broken("disk full"))
                } else {
                    Ok(items.to_vec())
                }
            }
        });
        let window = std::time::Duration::from_secs(60);
        assert_eq!(b.failing(window), None);
        assert!(
            b.submit(1)
                .await
                .unwrap_err()
                .to_string()
                .contains("disk full")
        );
        assert!(b.failing(window).is_some_and(|e| e.contains("disk full")));
        assert_eq!(
            b.failing(std::time::Duration::ZERO),
            None,
            "older than the window"
        );
        fail.store(false, Ordering::SeqCst);
        assert_eq!(b.submit(2).await.unwrap(), 2);
        assert_eq!(b.failing(window), None, "a success clears it");
    }

    /// The database refuses the data of one member (odd numbers here): the others of its group
    /// still commit, and only that member gets the error.
    #[tokio::test]
    async fn a_refused_member_fails_alone() {
        let b: Batcher<u32, u32> = Batcher::spawn(64, |items: Arc<[u32]>| async move {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            if items.iter().any(|i| i % 10 == 3) {
                return Err(StoreError::Rejected(Cause::msg(
                    "invalid byte sequence 0x00",
                )));
            }
            Ok(items.to_vec())
        });
        let handles: Vec<_> = (0..50u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { (i, b.submit(i).await) })
            })
            .collect();
        for h in handles {
            let (i, r) = h.await.unwrap();
            if i % 10 == 3 {
                assert!(r.unwrap_err().is_data_error(), "{i} should be refused");
            } else {
                assert_eq!(r.unwrap(), i, "{i} was failed by another member");
            }
        }
    }
}
