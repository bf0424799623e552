//! Each backend's group commit and batched completions must answer and store exactly what inserting the same events
//! one by one does.
use std::sync::Arc;

use sqlx::AssertSqlSafe;

use super::*;

fn ev(id: &str, obj: Option<&str>, plan: Plan) -> NewEvent {
    NewEvent {
        source: "erp".into(),
        event_id: id.into(),
        event_type: Some("object.created".into()),
        received_at: 1_000,
        request: StoredRequest::json(format!(r#"{{"id":"{id}"}}"#)),
        object_id: obj.map(ObjectId::from),
        plan,
        trace: None,
    }
}

fn links(obj: &str, leads: &[&str]) -> (Option<String>, Plan) {
    (
        Some(obj.to_string()),
        Plan::Links(leads.iter().map(|l| LeadId::from(*l)).collect()),
    )
}

fn linked(id: &str, obj: &str, leads: &[&str]) -> NewEvent {
    let (o, plan) = links(obj, leads);
    ev(id, o.as_deref(), plan)
}

/// A dead pair and a linked pair, as a store that has been running a while has them.
async fn history(s: &dyn Store) {
    let out = s
        .ingest(&[
            linked("old-dead", "o1", &["l1"]),
            linked("old-linked", "o2", &["l2"]),
        ])
        .await
        .unwrap();
    assert_eq!(out, vec![IngestOutcome::Queued, IngestOutcome::Queued]);
    let jobs = s.claim_links(5_000, 65_000, 10).await.unwrap();
    assert_eq!(jobs.len(), 2);
    let done: Vec<Completion> = jobs
        .iter()
        .map(|j| Completion {
            link_id: j.link_id,
            lease: j.lease,
            attempt: None,
            update: if j.object_id == "o1" {
                LinkUpdate::Dead {
                    error: "HTTP 404".into(),
                }
            } else {
                LinkUpdate::Linked
            },
        })
        .collect();
    s.complete_links(&done, 6_000).await.unwrap();
}

fn batch() -> Vec<NewEvent> {
    let mut b = vec![
        linked("a", "o3", &["l3", "l4"]),
        linked("a", "o3", &["l9"]),
        linked("old-dead", "o7", &["l7"]),
        linked("revive", "o1", &["l1"]),
        linked("already", "o2", &["l2"]),
        ev("parked", Some("o8"), Plan::Parked("no lead".into())),
        ev("resolve", Some("o9"), Plan::Resolve),
        linked("shared", "o3", &["l3"]),
        linked("twice", "o5", &["l5", "l5"]),
        linked("none", "o6", &[]),
    ];
    for i in 0..300 {
        b.push(linked(
            &format!("f{i}"),
            &format!("o{}", 100 + i % 250),
            &["lx"],
        ));
    }
    b
}

/// What an operator sees of every event: its state and its links.
async fn snapshot(s: &dyn Store, events: &[NewEvent]) -> Vec<String> {
    let mut out = Vec::new();
    for e in events {
        let found = s.find_events(&e.event_id, Some("erp")).await.unwrap();
        let d = s
            .event_detail(found[0].pk, LinkPage::default())
            .await
            .unwrap()
            .unwrap();
        let mut ls: Vec<String> = d
            .links
            .iter()
            .map(|l| {
                let attempts: Vec<(Option<i64>, Option<String>)> = l
                    .attempts
                    .iter()
                    .map(|a| (a.status_code, a.error.clone()))
                    .collect();
                format!(
                    "{}/{}={}:{:?}:{attempts:?}",
                    l.object_id, l.lead_id, l.state, l.next_attempt_at
                )
            })
            .collect();
        ls.sort();
        out.push(format!(
            "{} {} {:?} [{}]",
            e.event_id,
            d.summary.state,
            d.summary.reason,
            ls.join(" ")
        ));
    }
    out.sort();
    out.dedup();
    out
}

async fn compare(batched: Arc<dyn Store>, one_by_one: Arc<dyn Store>) {
    history(&*batched).await;
    history(&*one_by_one).await;
    let events = batch();
    let a = batched.ingest(&events).await.unwrap();
    let mut b = Vec::new();
    for e in &events {
        b.extend(one_by_one.ingest(std::slice::from_ref(e)).await.unwrap());
    }
    assert_eq!(a, b);
    use IngestOutcome::*;
    assert_eq!(
        &a[..10],
        &[
            Queued, Duplicate, Duplicate, Queued, Queued, Parked, Queued, Queued, Queued, Queued
        ]
    );
    assert_eq!(a[10..].iter().filter(|o| **o == Queued).count(), 300);
    let mut all = events.clone();
    all.push(linked("old-linked", "o2", &["l2"]));
    let (sa, sb) = (
        snapshot(&*batched, &all).await,
        snapshot(&*one_by_one, &all).await,
    );
    assert_eq!(sa, sb);
    let find = |id: &str| {
        sa.iter()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap()
            .clone()
    };
    assert!(
        find("old-dead").contains(" queued "),
        "{}",
        find("old-dead")
    );
    assert!(
        find("revive").contains("o1/l1=pending:Some(1000)"),
        "{}",
        find("revive")
    );
    assert!(
        find("already").contains(" delivered "),
        "{}",
        find("already")
    );
    assert!(find("none").contains(" delivered "), "{}", find("none"));
    assert!(find("parked").contains(" parked "), "{}", find("parked"));
    assert_eq!(find("twice").matches("o5/l5").count(), 1);
    let (mut ta, mut tb) = (
        batched.stats().await.unwrap(),
        one_by_one.stats().await.unwrap(),
    );
    // Backends list the groups in their own order.
    for t in [&mut ta, &mut tb] {
        t.events_by_state.sort();
        t.links_by_state.sort();
    }
    assert_eq!(format!("{ta:?}"), format!("{tb:?}"));
    assert_eq!(
        batched
            .claim_links(2_000_000, 2_060_000, 1000)
            .await
            .unwrap()
            .len(),
        one_by_one
            .claim_links(2_000_000, 2_060_000, 1000)
            .await
            .unwrap()
            .len()
    );
}

/// Completions of every kind, for the links a store handed out.
fn completions(jobs: &[LinkJob], twice: bool) -> Vec<Completion> {
    let mut out: Vec<Completion> = jobs
        .iter()
        .map(|j| {
            let n: u32 = j
                .object_id
                .as_str()
                .trim_start_matches('o')
                .parse()
                .unwrap_or(0);
            let attempt = Attempt {
                at: 7_000,
                status_code: Some(if n.is_multiple_of(5) { 200 } else { 503 }),
                error: (!n.is_multiple_of(5)).then(|| format!("HTTP {n}")),
                response_excerpt: Some("{}".into()),
                duration_ms: 3,
            };
            let update = match n % 5 {
                0 | 4 => LinkUpdate::Linked,
                1 => LinkUpdate::Retry {
                    due_at: 9_000,
                    counted: true,
                    error: "HTTP 503".into(),
                },
                2 => LinkUpdate::Dead {
                    error: "HTTP 404".into(),
                },
                _ => LinkUpdate::Release,
            };
            let release = matches!(update, LinkUpdate::Release);
            Completion {
                link_id: j.link_id,
                lease: j.lease,
                attempt: (!release).then_some(attempt),
                update,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.attempt.is_some(), a.link_id).cmp(&(&b.attempt.is_some(), b.link_id)));
    if twice && let Some(first) = out.last().cloned() {
        // A stale completion of a link that is also in the batch.
        out.push(Completion {
            lease: first.lease ^ 1,
            update: LinkUpdate::Retry {
                due_at: 9_500,
                counted: true,
                error: "late".into(),
            },
            ..first
        });
    }
    out
}

async fn compare_completions(batched: Arc<dyn Store>, one_by_one: Arc<dyn Store>, twice: bool) {
    let mut events = Vec::new();
    for i in 0..90 {
        let leads: Vec<String> = (0..1 + i % 3)
            .map(|k| format!("l{}", (i + k) % 7))
            .collect();
        let leads: Vec<&str> = leads.iter().map(String::as_str).collect();
        events.push(linked(&format!("c{i}"), &format!("o{}", i % 40), &leads));
    }
    for s in [&batched, &one_by_one] {
        s.ingest(&events).await.unwrap();
    }
    let ja = batched.claim_links(5_000, 65_000, 1000).await.unwrap();
    let jb = one_by_one.claim_links(5_000, 65_000, 1000).await.unwrap();
    assert_eq!(ja.len(), jb.len());
    assert!(ja.len() > 64, "spans more than one chunk");
    batched
        .complete_links(&completions(&ja, twice), 8_000)
        .await
        .unwrap();
    for c in completions(&jb, twice) {
        one_by_one
            .complete_links(std::slice::from_ref(&c), 8_000)
            .await
            .unwrap();
    }
    let (sa, sb) = (
        snapshot(&*batched, &events).await,
        snapshot(&*one_by_one, &events).await,
    );
    assert_eq!(sa, sb);
    for state in ["delivered", "queued", "dead"] {
        assert!(
            sa.iter().any(|l| l.contains(&format!(" {state} "))),
            "no {state} event"
        );
    }
    let (ta, tb) = (
        batched.stats().await.unwrap(),
        one_by_one.stats().await.unwrap(),
    );
    assert_eq!(format!("{ta:?}"), format!("{tb:?}"));
}

#[tokio::test]
async fn sqlite_batched_completions_equal_one_by_one() {
    for twice in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let url = |n: &str| format!("sqlite://{}", dir.path().join(n).display());
        let a = open(&url("a.db")).await.unwrap();
        let b = open(&url("b.db")).await.unwrap();
        compare_completions(a, b, twice).await;
    }
}

#[tokio::test]
async fn sqlite_batched_ingest_equals_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = |n: &str| format!("sqlite://{}", dir.path().join(n).display());
    let a = open(&url("a.db")).await.unwrap();
    let b = open(&url("b.db")).await.unwrap();
    compare(a, b).await;
}

/// Runs `scenario` on two fresh PostgreSQL databases, dropped afterwards.
async fn on_pg_pair<F, Fut>(scenario: F)
where
    F: FnOnce(Arc<dyn Store>, Arc<dyn Store>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use sqlx::Connection;
    let server = std::env::var("SPRINTLINK_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .expect("PostgreSQL for tests (SPRINTLINK_SKIP_PG=1 skips)");
    let names: Vec<String> = (0..2)
        .map(|i| {
            format!(
                "sprintlink_unit_{}_{}_{i}",
                std::process::id(),
                fastrand::u32(..)
            )
        })
        .collect();
    for n in &names {
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {n}")))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let a = open(&format!("{server}/{}", names[0])).await.unwrap();
    let b = open(&format!("{server}/{}", names[1])).await.unwrap();
    let run = tokio::spawn(scenario(a.clone(), b.clone())).await;
    a.close().await;
    b.close().await;
    for n in &names {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {n} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
    }
    run.unwrap();
}

#[tokio::test]
async fn postgres_batched_writes_equal_one_by_one() {
    if std::env::var("SPRINTLINK_SKIP_PG").is_ok_and(|v| v == "1") {
        eprintln!("SPRINTLINK_SKIP_PG=1: skipping");
        return;
    }
    on_pg_pair(compare).await;
    on_pg_pair(|a, b| compare_completions(a, b, false)).await;
    on_pg_pair(|a, b| compare_completions(a, b, true)).await;
}

/// SQLite's group commit is its own code (`sqlite::group`): it must store what PostgreSQL's
/// does, event by event.
#[tokio::test]
async fn sqlite_group_commit_equals_postgres_one_by_one() {
    if std::env::var("SPRINTLINK_SKIP_PG").is_ok_and(|v| v == "1") {
        eprintln!("SPRINTLINK_SKIP_PG=1: skipping");
        return;
    }
    on_pg_pair(|pg, _| async move {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("a.db").display());
        let sqlite = open(&url).await.unwrap();
        compare(sqlite.clone(), pg).await;
        sqlite.close().await;
    })
    .await;
}

/// The stored pause: an operator's pause is never shortened by a throttling pause, a shorter
/// one is extended, a resume clears it; on PostgreSQL, heartbeats list the live replicas in the
/// order they joined and a replica that left or went silent is not listed.
async fn pause_and_heartbeats(s: Arc<dyn Store>, shared: bool) {
    let op = |until| Pause {
        reason: PauseReason::Operator,
        until,
    };
    let throttled = |until| Pause {
        reason: PauseReason::Throttled,
        until: Some(until),
    };
    assert_eq!(s.delivery_pause().await.unwrap(), None);
    s.throttle_pause(61_000, 1_000).await.unwrap();
    assert_eq!(s.delivery_pause().await.unwrap(), Some(throttled(61_000)));
    // A later throttling answer extends it; an earlier end does not shorten it.
    s.throttle_pause(70_000, 10_000).await.unwrap();
    s.throttle_pause(65_000, 5_000).await.unwrap();
    assert_eq!(s.delivery_pause().await.unwrap(), Some(throttled(70_000)));
    // An operator's pause until resumed is kept whatever throttling says.
    s.set_delivery_pause(Some(op(None)), 11_000).await.unwrap();
    s.throttle_pause(80_000, 20_000).await.unwrap();
    assert_eq!(s.delivery_pause().await.unwrap(), Some(op(None)));
    // A short operator pause gives way to a longer throttling pause.
    s.set_delivery_pause(Some(op(Some(30_000))), 21_000)
        .await
        .unwrap();
    s.throttle_pause(90_000, 22_000).await.unwrap();
    assert_eq!(s.delivery_pause().await.unwrap(), Some(throttled(90_000)));
    assert!(throttled(90_000).holds(89_999) && !throttled(90_000).holds(90_000));
    s.set_delivery_pause(None, 23_000).await.unwrap();
    assert_eq!(s.delivery_pause().await.unwrap(), None);

    let live = s.heartbeat("b", 2, 1_000, 0).await.unwrap();
    if !shared {
        assert_eq!(live, None, "one replica only");
        return;
    }
    assert_eq!(live.unwrap().len(), 1);
    s.heartbeat("a", 1, 2_000, 0).await.unwrap();
    let live = s.heartbeat("b", 3, 3_000, 0).await.unwrap().unwrap();
    let ids: Vec<(&str, i64, i64)> = live
        .iter()
        .map(|r| (r.id.as_str(), r.joined_at, r.in_flight))
        .collect();
    assert_eq!(ids, vec![("b", 1_000, 3), ("a", 2_000, 1)]);
    // "a" last seen at 2 000: not live after 2 500.
    let live = s.heartbeat("b", 0, 4_000, 2_500).await.unwrap().unwrap();
    assert_eq!(live.len(), 1);
    s.heartbeat("a", 0, 5_000, 0).await.unwrap();
    s.leave("b").await.unwrap();
    let live = s.heartbeat("a", 0, 6_000, 0).await.unwrap().unwrap();
    assert_eq!(
        live.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["a"]
    );
}

#[tokio::test]
async fn sqlite_pause_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&format!("sqlite://{}", dir.path().join("p.db").display()))
        .await
        .unwrap();
    pause_and_heartbeats(s.clone(), false).await;
    s.close().await;
}

#[tokio::test]
async fn postgres_pause_and_heartbeats_are_stored() {
    if std::env::var("SPRINTLINK_SKIP_PG").is_ok_and(|v| v == "1") {
        eprintln!("SPRINTLINK_SKIP_PG=1: skipping");
        return;
    }
    on_pg_pair(|pg, _| pause_and_heartbeats(pg, true)).await;
}

/// `list_events` picks its query by how many events a time range or an id prefix covers
/// (SQLite: the received-time index for a small range; PostgreSQL: a union for a rare prefix);
/// each way it must answer the same newest-first page as the plain definition of the filter.
async fn search_plans_agree(s: Arc<dyn Store>, _unused: Arc<dyn Store>) {
    const N: i64 = 12_000;
    let events: Vec<NewEvent> = (0..N)
        .map(|i| NewEvent {
            received_at: 1_000_000 + i,
            ..linked(&format!("p-{i:05}"), &format!("o{i}"), &["l1"])
        })
        .collect();
    for chunk in events.chunks(500) {
        s.ingest(chunk).await.unwrap();
    }
    let expect = |keep: &dyn Fn(i64) -> bool| -> Vec<String> {
        (0..N)
            .rev()
            .filter(|&i| keep(i))
            .take(50)
            .map(|i| format!("p-{i:05}"))
            .collect()
    };
    let page = |f: EventFilter| {
        let s = s.clone();
        async move {
            s.list_events(&EventFilter { limit: 50, ..f })
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.event_id)
                .collect::<Vec<_>>()
        }
    };
    // 11,000 events: more than a small range.
    let large = page(EventFilter {
        until: Some(1_000_000 + 11_000),
        ..Default::default()
    })
    .await;
    assert_eq!(large, expect(&|i| i < 11_000));
    let small = page(EventFilter {
        since: Some(1_000_000 + 5_000),
        until: Some(1_000_000 + 5_100),
        ..Default::default()
    })
    .await;
    assert_eq!(small, expect(&|i| (5_000..5_100).contains(&i)));
    let small_page_two = page(EventFilter {
        since: Some(1_000_000 + 5_000),
        until: Some(1_000_000 + 5_100),
        before: Some(EventPk(0)),
        ..Default::default()
    })
    .await;
    assert!(small_page_two.is_empty());
    // "p-0" is the prefix of 10,000 ids, "p-110" of a hundred.
    let common = page(EventFilter {
        q: Some("p-0".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(common, expect(&|i| i < 10_000));
    let rare = page(EventFilter {
        q: Some("p-110".into()),
        state: Some(EventState::Queued),
        ..Default::default()
    })
    .await;
    assert_eq!(rare, expect(&|i| (11_000..11_100).contains(&i)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_search_plans_agree() {
    let dir = tempfile::tempdir().unwrap();
    let url = |n: &str| format!("sqlite://{}", dir.path().join(n).display());
    let a = open(&url("a.db")).await.unwrap();
    let b = open(&url("b.db")).await.unwrap();
    search_plans_agree(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_search_plans_agree() {
    if std::env::var("SPRINTLINK_SKIP_PG").is_ok_and(|v| v == "1") {
        eprintln!("SPRINTLINK_SKIP_PG=1: skipping");
        return;
    }
    on_pg_pair(search_plans_agree).await;
}
