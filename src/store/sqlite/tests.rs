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
    mark_all_delivered(&store).await;
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

async fn temp_store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("w.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    (dir, store)
}

/// A background job (retention) queued behind a busy writer waits for the jobs queued after it:
/// a group commit never waits for a prune step that was asked for first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_job_waits_for_the_queued_jobs() {
    let (_dir, store) = temp_store().await;
    let store = Arc::new(store);
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mark = |order: &Arc<std::sync::Mutex<Vec<String>>>, what: String| {
        order.lock().unwrap().push(what);
    };
    let busy = {
        let (store, order) = (store.clone(), order.clone());
        tokio::spawn(async move {
            store
                .writer
                .run(move |_| {
                    std::thread::sleep(Duration::from_millis(300));
                    mark(&order, "busy".into());
                    Ok(())
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let background = {
        let (store, order) = (store.clone(), order.clone());
        tokio::spawn(async move {
            store
                .writer
                .run_background(move |_| {
                    mark(&order, "background".into());
                    Ok(())
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut commits = Vec::new();
    for i in 0..3 {
        let (store, order) = (store.clone(), order.clone());
        commits.push(tokio::spawn(async move {
            store
                .writer
                .run(move |_| {
                    mark(&order, format!("commit {i}"));
                    Ok(())
                })
                .await
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    busy.await.unwrap().unwrap();
    background.await.unwrap().unwrap();
    for c in commits {
        c.await.unwrap().unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        ["busy", "commit 0", "commit 1", "commit 2", "background"]
    );
    store.close_writer().await.unwrap();
}

/// Under a load that never lets the writer's queue empty, a background job still runs, after
/// about `BACKGROUND_MAX_WAIT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_job_is_not_starved_by_a_full_queue() {
    let (_dir, store) = temp_store().await;
    let store = Arc::new(store);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (store, stop) = (store.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store
                    .writer
                    .run(|_| {
                        std::thread::sleep(Duration::from_millis(5));
                        Ok(())
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let ran = tokio::time::timeout(
        writer::BACKGROUND_MAX_WAIT * 3,
        store.writer.run_background(|_| Ok(())),
    )
    .await;
    let waited = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    ran.expect("the background job never ran under load")
        .unwrap();
    assert!(
        waited >= writer::BACKGROUND_MAX_WAIT - Duration::from_millis(50),
        "it ran after {waited:?}, while the queue was never empty"
    );
    store.close_writer().await.unwrap();
}

/// A background job commits with `synchronous = NORMAL`; every other job, also after a
/// background job that failed, runs with `FULL` again (an acknowledged event is fsync'd).
#[tokio::test]
async fn the_writer_is_back_to_full_sync_after_a_background_job() {
    let (_dir, store) = temp_store().await;
    let sync = |db: &Connection| -> Result<i64> {
        Ok(db.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
    };
    assert_eq!(
        store
            .writer
            .run_background(move |db| sync(db))
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.writer.run(move |db| sync(db)).await.unwrap(), 2);
    let failed = store
        .writer
        .run_background(|db| -> Result<()> {
            db.execute_batch("CREATE TABLE scratch (x INTEGER)")?;
            Err(StoreError::broken("a failing step"))
        })
        .await;
    assert!(failed.is_err());
    assert_eq!(store.writer.run(move |db| sync(db)).await.unwrap(), 2);
    let kept: i64 = store
        .writer
        .run(|db| {
            Ok(db.query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'scratch'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
        .unwrap();
    assert_eq!(kept, 0, "the failed step was rolled back");
    store.close_writer().await.unwrap();
}

/// One prune step holds the writer for about its time budget, whatever its limit: with no
/// time to spare it deletes one event (never none, so pruning always moves), with time enough
/// its whole limit; steps until one removes nothing delete them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_step_stops_at_its_time_budget() {
    let (_dir, store) = temp_store().await;
    for b in 0..4 {
        let events: Vec<NewEvent> = (0..500).map(|i| event(b * 500 + i)).collect();
        store.ingest(&events).await.unwrap();
    }
    mark_all_delivered(&store).await;
    let step = |budget: Duration| {
        store.writer.run_background(move |db| {
            retention::prune_delivered(db, now_ms() + 1_000, now_ms(), 500, budget)
        })
    };
    assert_eq!(step(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(step(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(step(Duration::from_secs(3600)).await.unwrap(), 500);
    let mut total = 502;
    while let n @ 1.. = store
        .prune_delivered(now_ms() + 1_000, now_ms(), 500)
        .await
        .unwrap()
    {
        total += n;
    }
    assert_eq!(total, 2_000);
    let left: i64 = store
        .writer
        .run(|db| Ok(db.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?))
        .await
        .unwrap();
    assert_eq!(left, 0);
    store.close_writer().await.unwrap();
}

/// Every pair linked and every event delivered, as if the worker had run.
async fn mark_all_delivered(store: &SqliteStore) {
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
}

/// How many entries a deferred search index holds, and its mark.
async fn entries(store: &SqliteStore, table: &'static str) -> (i64, i64) {
    store
        .read(move |db| {
            Ok(db.query_row(
                &format!(
                    "SELECT (SELECT COUNT(*) FROM {table}),
                            (SELECT upto FROM index_marks WHERE name = '{table}')"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
        .await
        .unwrap()
}

/// Runs `sql` in one write transaction.
async fn execute(store: &SqliteStore, sql: &'static str) {
    store
        .write_tx(move |db| Ok(db.execute_batch(sql)?))
        .await
        .unwrap();
}

/// The lead and object filters find a row whether the indexer has reached it yet or not (schema
/// version 9), through a lead id, a mapped key or an object id; a row that goes takes its entry
/// with it, and an object id set later moves its event's entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_filters_see_rows_before_and_after_they_are_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("l.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    // Indexing from here on only when this test says so.
    store.stop.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    store
        .mapping_put("erp", "buyer@example.com", &["lead-3".into()])
        .await
        .unwrap();
    let ids = |f: EventFilter| {
        let store = &store;
        async move {
            let mut ids: Vec<String> = store
                .list_events(&EventFilter { limit: 50, ..f })
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.event_id)
                .collect();
            ids.sort();
            ids
        }
    };
    let by_lead = |l: &str| EventFilter {
        lead_id: Some(l.into()),
        ..Default::default()
    };
    let by_object = |o: &str| EventFilter {
        object_id: Some(o.into()),
        ..Default::default()
    };
    let by_key = || EventFilter {
        q: Some("BUYER@example.com".into()),
        ..Default::default()
    };
    let indexed = || entries(&store, "lead_links");

    store.ingest(&[event(1), event(2), event(3)]).await.unwrap();
    assert_eq!(indexed().await, (0, 0), "nothing indexed yet");
    assert_eq!(ids(by_lead("lead-2")).await, ["evt-2"]);
    assert_eq!(ids(by_key()).await, ["evt-3"]);
    assert_eq!(ids(by_object("obj-1")).await, ["evt-1"]);

    let n = store
        .writer
        .run_background(|db| search_index::step(db, 2))
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(indexed().await, (2, 2), "a batch stops at its limit");
    store.ingest(&[event(4)]).await.unwrap();
    for lead in ["lead-1", "lead-2", "lead-3", "lead-4"] {
        let n = &lead[5..];
        assert_eq!(ids(by_lead(lead)).await, [format!("evt-{n}")], "{lead}");
        let object = format!("obj-{n}");
        assert_eq!(
            ids(by_object(&object)).await,
            [format!("evt-{n}")],
            "{object}"
        );
    }
    assert_eq!(ids(by_key()).await, ["evt-3"]);
    assert!(ids(by_lead("lead-9")).await.is_empty());

    while store
        .writer
        .run_background(|db| search_index::step(db, 2))
        .await
        .unwrap()
        > 0
    {}
    assert_eq!(indexed().await, (4, 4));
    assert_eq!(ids(by_lead("lead-4")).await, ["evt-4"]);
    assert_eq!(ids(by_key()).await, ["evt-3"]);
    let objects = || entries(&store, "event_objects");
    assert_eq!(objects().await, (4, 4));
    execute(&store, "UPDATE events SET object_id = 'obj-9' WHERE id = 1").await;
    assert!(ids(by_object("obj-1")).await.is_empty());
    assert_eq!(ids(by_object("obj-9")).await, ["evt-1"]);
    assert_eq!(objects().await, (4, 4), "the entry moved");

    execute(
        &store,
        "DELETE FROM event_links WHERE link_id = 2; DELETE FROM links WHERE id = 2;",
    )
    .await;
    assert_eq!(indexed().await, (3, 4), "the link's entry went with it");
    assert!(ids(by_lead("lead-2")).await.is_empty());
    execute(&store, "DELETE FROM events WHERE id = 4").await;
    assert_eq!(objects().await, (3, 4), "the event's entry went with it");
}

/// The indexer started with the store catches up by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_indexer_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("i.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    let events: Vec<NewEvent> = (0..(search_index::STEP as usize + 10)).map(event).collect();
    for chunk in events.chunks(1000) {
        store.ingest(chunk).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let leads = entries(&store, "lead_links").await;
        let objects = entries(&store, "event_objects").await;
        let (count, upto) = (leads.0 + objects.0, leads.1.min(objects.1));
        if count == 2 * events.len() as i64 && upto == events.len() as i64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "indexed {count} of {} (mark {upto})",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.close().await;
}
