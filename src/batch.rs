//! Group commit: callers hand items to one task that writes whatever has queued up in a single
//! transaction, so requests arriving together share one fsync.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use crate::store::StoreError;

type Item<T, R> = (T, oneshot::Sender<Result<R, StoreError>>);

/// A handle to submit items to a group-commit task.
pub struct Batcher<T, R> {
    tx: mpsc::Sender<Item<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the task. `write` receives up to `max_batch` items and answers one result per item,
    /// in order, or one error for all of them. The task ends when every handle is dropped.
    pub fn spawn<F, Fut>(max_batch: usize, write: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<R>, StoreError>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<Item<T, R>>(max_batch * 4);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(max_batch);
            while rx.recv_many(&mut buf, max_batch).await > 0 {
                let (items, acks): (Vec<T>, Vec<_>) = std::mem::take(&mut buf).into_iter().unzip();
                match write(items).await {
                    Ok(results) => {
                        for (ack, r) in acks.into_iter().zip(results) {
                            let _ = ack.send(Ok(r));
                        }
                    }
                    Err(e) => {
                        for ack in acks {
                            let _ = ack.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Batcher { tx }
    }

    /// Queues one item and waits until its transaction has committed (or failed).
    pub async fn submit(&self, item: T) -> Result<R, StoreError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send((item, ack))
            .await
            .map_err(|_| StoreError::Database("the writer has stopped".into()))?;
        done.await
            .map_err(|_| StoreError::Database("the writer stopped before committing".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_submissions_share_batches_and_keep_order() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let b: Batcher<u32, u32> = Batcher::spawn(64, move |items: Vec<u32>| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok(items.into_iter().map(|i| i * 2).collect())
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
    async fn one_error_fails_the_whole_batch() {
        let b: Batcher<u32, u32> = Batcher::spawn(8, |_items: Vec<u32>| async {
            Err(StoreError::Database("disk full".into()))
        });
        assert!(
            b.submit(1)
                .await
                .unwrap_err()
                .to_string()
                .contains("disk full")
        );
    }
}
