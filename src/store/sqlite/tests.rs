use std::time::Duration;

use super::checkpoint::CHECKPOINT_EVERY;
use super::*;

fn event(n: usize) -> NewEvent {
    NewEvent {
        source: "erp".into(),
        event_id: format!("evt-{n}"),
        event_type: None,
        received_at: 1_000,
        request: StoredRequest::json(format!(
            r#"{{"id":"evt-{n}","padding":"{}"}}"#,
            "x".repeat(500)
        )),
        object_id: Some(format!("obj-{n}").into()),
        plan: Plan::Links(vec![format!("lead-{n}").into()]),
        trace: None,
    }
}

#[tokio::test]
async fn the_writer_closes_cleanly_after_a_group_commit() {
    // The group commit's statements live in the writer's statement cache; closing must
    // finalize them and close the connection without an error.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("c.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    store.ingest(&[event(1), event(2)]).await.unwrap();
    store.close_writer().await.unwrap();
}

/// The writer never checkpoints; the background pass must copy the log into the database
/// file and let the log start again, or the log would grow for as long as the service runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_checkpointed_beside_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let store = SqliteStore::open(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let empty = size(&db);
    for b in 0..40 {
        let events: Vec<NewEvent> = (0..50).map(|i| event(b * 50 + i)).collect();
        store.ingest(&events).await.unwrap();
    }
    let wal = dir.path().join("c.db-wal");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while size(&db) <= empty + 1_000_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "2000 events never reached the database file ({} bytes, log {} bytes)",
            size(&db),
            size(&wal)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once everything is copied, the next write starts the log from its beginning, so it
    // does not grow past what it held before.
    let before = size(&wal);
    tokio::time::sleep(CHECKPOINT_EVERY * 4).await;
    store.ingest(&[event(9_999)]).await.unwrap();
    let c = Connection::open(&db).unwrap();
    let frames: i64 = c
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
        .unwrap();
    c.close().unwrap();
    assert!(
        frames < 50,
        "the log kept {frames} frames after going quiet"
    );
    assert_eq!(
        size(&wal),
        before,
        "the log file grew instead of restarting"
    );
    store.close().await;
}

/// Pruning 2000 events of half a kilobyte frees hundreds of pages; `reclaim_space` gives every
/// one back (each step of `incremental_vacuum` frees one page, so all steps must run) and the
/// file shrinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_pages_go_back_to_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let store = SqliteStore::open(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    for b in 0..40 {
        let events: Vec<NewEvent> = (0..50).map(|i| event(b * 50 + i)).collect();
        store.ingest(&events).await.unwrap();
    }
    store
        .write_tx(|db| {
            db.execute_batch(
                "UPDATE links SET state = 'linked', due_at = NULL;
                 UPDATE events SET state = 'delivered';",
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let pages = |store: &SqliteStore| {
        let c = Connection::open(store_path(store)).unwrap();
        let n: (i64, i64) = c
            .query_row(
                "SELECT page_count, freelist_count FROM pragma_page_count(), pragma_freelist_count()",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        n
    };
    let (before, _) = pages(&store);
    let mut pruned = 0;
    while let n @ 1.. = store
        .prune_delivered(now_ms() + 1_000, now_ms(), 500)
        .await
        .unwrap()
    {
        pruned += n;
    }
    assert_eq!(pruned, 2000);
    let (_, free) = pages(&store);
    assert!(free > 100, "pruning freed pages ({free})");
    while store.reclaim_space(64).await.unwrap() {}
    let (after, free) = pages(&store);
    assert_eq!(free, 0, "every freed page given back");
    assert!(after < before - 100, "{before} pages before, {after} after");
    store.close().await;
}

fn store_path(store: &SqliteStore) -> std::path::PathBuf {
    match &store.target {
        Target::File(p) => p.clone(),
        Target::Memory(_) => unreachable!("a file database"),
    }
}
