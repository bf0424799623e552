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
        object_id: Some(format!("obj-{n}")),
        plan: Plan::Links(vec![format!("lead-{n}")]),
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
