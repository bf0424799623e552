//! Retention on SQLite: each call is one short transaction in the writer's background lane
//! (`WriterHandle::run_background`: it runs only when no commit is queued, without an fsync of
//! its own), and it stops once it has held the writer for `STEP_BUDGET`, whatever its limit, so
//! a webhook arriving during a step waits a few milliseconds at most. The caller pauses between
//! steps. Then the freed pages are given back to the file system with `PRAGMA
//! incremental_vacuum`, in steps bounded the same way. The database is kept in
//! `auto_vacuum = INCREMENTAL` mode (`ensure_incremental_vacuum`). And `backup`: `VACUUM INTO`.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};

use super::{RW, Target, drop_orphan};
use crate::store::{Cause, LinkId, Millis, Result, StoreError};

/// How long one retention step may hold the writer: the step stops after the event (or the
/// vacuum chunk) that crosses it. Measured at 1,000,000 events, deleting one event with its
/// index entries takes tens of microseconds, so a step still removes dozens of events.
pub(super) const STEP_BUDGET: Duration = Duration::from_millis(4);

/// Pages the incremental vacuum frees between two looks at the clock.
const VACUUM_CHUNK: i64 = 16;

/// Events delivered before `?1` whose body is still kept, oldest delivery first.
const BODIES_BEFORE: &str = "SELECT id FROM events INDEXED BY events_body_kept
    WHERE delivered_at IS NOT NULL AND body_removed_at IS NULL
      AND delivered_at < ?1 AND state = 'delivered'
    ORDER BY delivered_at LIMIT ?2";

/// They get an empty body and `body_removed_at = ?2`.
const REMOVE_BODY: &str =
    "UPDATE events SET body = '', raw_body = NULL, request_headers = NULL, request_query = NULL,
    body_removed_at = ?2 WHERE id = ?1";

/// What SprintHub answered holds the same personal data as the body.
const REMOVE_EXCERPTS: &str = "UPDATE attempts SET response_excerpt = NULL
    WHERE response_excerpt IS NOT NULL
      AND link_id IN (SELECT link_id FROM event_links WHERE event_pk = ?1)";

const DELIVERED_BEFORE: &str = "SELECT id FROM events INDEXED BY events_delivered_at
    WHERE delivered_at IS NOT NULL AND delivered_at < ?1 AND state = 'delivered'
    ORDER BY delivered_at LIMIT ?2";

const FAILED_BEFORE: &str = "SELECT id FROM events INDEXED BY events_closed
    WHERE state IN ('dead', 'parked', 'discarded') AND received_at < ?1
    ORDER BY received_at LIMIT ?2";

const DETACH_EVENT: &str = "DELETE FROM event_links WHERE event_pk = ?1 RETURNING link_id";

const DELETE_EVENT: &str = "DELETE FROM events WHERE id = ?1";

/// A linked pair no event names any more keeps its row (it is never sent again) but not its
/// history.
const FORGET_LINKED_HISTORY: &str = "DELETE FROM attempts WHERE link_id = ?1
    AND NOT EXISTS (SELECT 1 FROM event_links WHERE link_id = ?1)
    AND EXISTS (SELECT 1 FROM links WHERE id = ?1 AND state = 'linked')";

/// Blanks the bodies of at most `limit` events (fewer once `budget` is spent, but at least one).
pub(super) fn remove_bodies(
    db: &Connection,
    before: Millis,
    now: Millis,
    limit: i64,
    budget: Duration,
) -> Result<u64> {
    let started = Instant::now();
    let ids = select_ids(db, BODIES_BEFORE, before, limit)?;
    let mut blank = db.prepare_cached(REMOVE_BODY)?;
    let mut excerpts = db.prepare_cached(REMOVE_EXCERPTS)?;
    let mut done = 0;
    for id in &ids {
        blank.execute(params![id, now])?;
        excerpts.execute(params![id])?;
        done += 1;
        if started.elapsed() >= budget {
            break;
        }
    }
    Ok(done)
}

pub(super) fn prune_delivered(
    db: &Connection,
    before: Millis,
    now: Millis,
    limit: i64,
    budget: Duration,
) -> Result<u64> {
    let started = Instant::now();
    let ids = select_ids(db, DELIVERED_BEFORE, before, limit)?;
    delete_events(db, &ids, now, started + budget)
}

pub(super) fn prune_failed(
    db: &Connection,
    before: Millis,
    now: Millis,
    limit: i64,
    budget: Duration,
) -> Result<u64> {
    let started = Instant::now();
    let ids = select_ids(db, FAILED_BEFORE, before, limit)?;
    delete_events(db, &ids, now, started + budget)
}

fn select_ids(db: &Connection, sql: &str, before: Millis, limit: i64) -> Result<Vec<i64>> {
    Ok(db
        .prepare_cached(sql)?
        .query_map(params![before, limit], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?)
}

/// Deletes the events in order, and what only they needed (see the comment on
/// `Store::prune_failed`), until `deadline` (at least one); answers how many went.
fn delete_events(db: &Connection, ids: &[i64], now: Millis, deadline: Instant) -> Result<u64> {
    let mut links: Vec<i64> = Vec::new();
    let mut detach = db.prepare_cached(DETACH_EVENT)?;
    let mut delete = db.prepare_cached(DELETE_EVENT)?;
    let mut done = 0;
    for id in ids {
        let rows = detach.query_map(params![id], |r| r.get(0))?;
        for link in rows {
            links.push(link?);
        }
        delete.execute(params![id])?;
        done += 1;
        if Instant::now() >= deadline {
            break;
        }
    }
    links.sort_unstable();
    links.dedup();
    let mut forget = db.prepare_cached(FORGET_LINKED_HISTORY)?;
    for link in links {
        forget.execute(params![link])?;
        drop_orphan(db, LinkId(link), Some(now))?;
    }
    Ok(done)
}

/// One step of giving freed pages back, inside the caller's transaction: at most `pages`, in
/// chunks of `VACUUM_CHUNK` until `STEP_BUDGET` is spent; answers whether more are free.
pub(super) fn reclaim(db: &Connection, pages: i64) -> Result<bool> {
    let started = Instant::now();
    let free = || -> Result<i64> { Ok(db.query_row("PRAGMA freelist_count", [], |r| r.get(0))?) };
    let mut left = pages.max(1);
    while left > 0 && free()? > 0 {
        let chunk = left.min(VACUUM_CHUNK);
        // Each step of the statement frees one page: it must be stepped to its end (a single
        // `execute` frees one page only).
        let mut st = db.prepare_cached(&format!("PRAGMA incremental_vacuum({chunk})"))?;
        let mut rows = st.query([])?;
        while rows.next()?.is_some() {}
        left -= chunk;
        if started.elapsed() >= STEP_BUDGET {
            break;
        }
    }
    Ok(free()? > 0)
}

/// Puts a database in `auto_vacuum = INCREMENTAL` mode, so that retention can give space back.
/// A new database takes the mode from `open_conn` before its first table; one written by an
/// earlier release (mode `NONE`) can only change with a `VACUUM`, which rewrites the whole file
/// once: it needs free disk space about the size of the database and holds every other
/// connection off while it runs (at start-up, before the service listens).
pub(super) fn ensure_incremental_vacuum(db: &Connection) -> Result<()> {
    let mode: i64 = db.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode == 2 {
        return Ok(());
    }
    let started = Instant::now();
    tracing::info!(
        "converting the database to incremental auto-vacuum (a one-time VACUUM that rewrites the file)"
    );
    // A database that cannot be rewritten (a full disk) still serves; pruning then frees pages
    // for reuse without shrinking the file, and the next start tries again.
    match db.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;") {
        Ok(()) => tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "the database now gives space freed by retention back to the file system"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "converting to incremental auto-vacuum failed; freed space is reused but not given back"
        ),
    }
    Ok(())
}

/// The database file and its write-ahead log, in bytes.
pub(super) fn file_bytes(path: &Path) -> i64 {
    let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len() as i64);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    len(path) + len(Path::new(&wal))
}

/// `VACUUM INTO` a file beside `to`, then linked to it: it reads one snapshot of the database
/// (a read transaction in WAL mode: every commit made before it started, none made after), so it
/// is consistent while the service writes on, and `to` never holds a half-written copy.
pub(super) async fn backup(url: &str, to: &Path) -> Result<()> {
    let target = Target::parse(url)?;
    let Target::File(from) = target.clone() else {
        return Err(StoreError::Invalid(
            "an in-memory database cannot be backed up".into(),
        ));
    };
    if !from.exists() {
        return Err(StoreError::Invalid(format!(
            "no database at {}",
            from.display()
        )));
    }
    if to.exists() {
        return Err(StoreError::Invalid(format!(
            "{} already exists; sprintlink backup never overwrites a file",
            to.display()
        )));
    }
    let to = to.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut partial = to.as_os_str().to_owned();
        partial.push(".partial");
        let partial = std::path::PathBuf::from(partial);
        let _ = std::fs::remove_file(&partial);
        // Read-write without create: VACUUM INTO writes a new file through this connection,
        // which changes nothing in the database itself.
        let conn = target.open(RW)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        let text = partial
            .to_str()
            .ok_or_else(|| StoreError::Invalid("the backup path is not UTF-8".into()))?;
        let copied = conn.execute("VACUUM INTO ?1", params![text]);
        let _ = conn.close();
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&partial);
            return Err(e.into());
        }
        let check = Connection::open(&partial)?;
        let verdict: String = check.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        let _ = check.close();
        if verdict != "ok" {
            let _ = std::fs::remove_file(&partial);
            return Err(StoreError::broken(format!(
                "the copy failed its check: {verdict}"
            )));
        }
        // A link, not a rename: it fails rather than replace a file that appeared meanwhile.
        let linked = std::fs::hard_link(&partial, &to);
        let _ = std::fs::remove_file(&partial);
        linked.map_err(|e| StoreError::Broken(Cause::new(e)))
    })
    .await
    .map_err(|e| StoreError::Broken(Cause::new(e)))?
}
