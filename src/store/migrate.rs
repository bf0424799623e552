//! Versioned schema migrations, one list per backend, each a plain SQL file in that backend's
//! dialect under `migrations/`. The version reached is recorded in `schema_version`; `serve`
//! applies what is pending when it opens the store, and `sprintlink migrate` lists or applies it
//! alone. A database written by a newer release is refused rather than guessed at.

use super::{Millis, Result, StoreError, now_ms};

/// One step of the schema, applied in one transaction with its `schema_version` row.
#[derive(Debug)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    sql: &'static str,
}

/// Release 0.1.0 created its tables with `IF NOT EXISTS` and recorded no version; version 1 is
/// that layout, written the same way, so such a database takes version 1 unchanged.
pub(super) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../../migrations/sqlite/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "retention",
        sql: include_str!("../../migrations/sqlite/0002_retention.sql"),
    },
    Migration {
        version: 3,
        name: "request_bytes",
        sql: include_str!("../../migrations/sqlite/0003_request_bytes.sql"),
    },
    Migration {
        version: 4,
        name: "objects",
        sql: include_str!("../../migrations/sqlite/0004_objects.sql"),
    },
    Migration {
        version: 5,
        name: "alert_slots",
        sql: include_str!("../../migrations/sqlite/0005_alert_slots.sql"),
    },
    Migration {
        version: 6,
        name: "fleet",
        sql: include_str!("../../migrations/sqlite/0006_fleet.sql"),
    },
    Migration {
        version: 7,
        name: "search",
        sql: include_str!("../../migrations/sqlite/0007_search.sql"),
    },
    Migration {
        version: 8,
        name: "trace",
        sql: include_str!("../../migrations/sqlite/0008_trace.sql"),
    },
    Migration {
        version: 9,
        name: "write_paths",
        sql: include_str!("../../migrations/sqlite/0009_write_paths.sql"),
    },
];

pub(super) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "retention",
        sql: include_str!("../../migrations/postgres/0002_retention.sql"),
    },
    Migration {
        version: 3,
        name: "request_bytes",
        sql: include_str!("../../migrations/postgres/0003_request_bytes.sql"),
    },
    Migration {
        version: 4,
        name: "objects",
        sql: include_str!("../../migrations/postgres/0004_objects.sql"),
    },
    Migration {
        version: 5,
        name: "alert_slots",
        sql: include_str!("../../migrations/postgres/0005_alert_slots.sql"),
    },
    Migration {
        version: 6,
        name: "fleet",
        sql: include_str!("../../migrations/postgres/0006_fleet.sql"),
    },
    Migration {
        version: 7,
        name: "search",
        sql: include_str!("../../migrations/postgres/0007_search.sql"),
    },
    Migration {
        version: 8,
        name: "trace",
        sql: include_str!("../../migrations/postgres/0008_trace.sql"),
    },
    Migration {
        version: 9,
        name: "write_paths",
        sql: include_str!("../../migrations/postgres/0009_write_paths.sql"),
    },
];

/// The same statement on both backends (no parameters); each records a version in its own
/// dialect.
pub(super) const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL)";

pub(super) const CURRENT_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM schema_version";

/// Where a database stands against this binary's migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The version the database had (0: a new database, or one of release 0.1.0).
    pub current: i64,
    /// The last version this binary knows.
    pub latest: i64,
    /// `(version, name)` of each migration that was pending, in order.
    pub pending: Vec<(i64, &'static str)>,
}

/// What of `list` a database at `current` still needs; an error if it is newer than all of it.
pub(super) fn plan(list: &'static [Migration], current: i64) -> Result<Vec<&'static Migration>> {
    let latest = list.last().map_or(0, |m| m.version);
    if current > latest {
        return Err(StoreError::SchemaTooNew {
            database: current,
            binary: latest,
        });
    }
    Ok(list.iter().filter(|m| m.version > current).collect())
}

pub(super) fn status(list: &'static [Migration], current: i64) -> Result<Status> {
    Ok(Status {
        current,
        latest: list.last().map_or(0, |m| m.version),
        pending: plan(list, current)?
            .iter()
            .map(|m| (m.version, m.name))
            .collect(),
    })
}

impl Migration {
    pub(super) fn sql(&self) -> &'static str {
        self.sql
    }
}

/// When a migration was applied, in the store's unit.
pub(super) fn applied_at() -> Millis {
    now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_increasing_and_the_same_on_both_backends() {
        for list in [SQLITE, POSTGRES] {
            assert!(list.windows(2).all(|w| w[0].version < w[1].version));
            assert_eq!(list.first().map(|m| m.version), Some(1));
        }
        let names = |l: &[Migration]| l.iter().map(|m| (m.version, m.name)).collect::<Vec<_>>();
        assert_eq!(names(SQLITE), names(POSTGRES));
    }

    #[test]
    fn plans_what_is_pending_and_refuses_a_newer_database() {
        assert_eq!(plan(SQLITE, 0).unwrap().len(), SQLITE.len());
        let latest = SQLITE.last().unwrap().version;
        assert!(plan(SQLITE, latest).unwrap().is_empty());
        let err = plan(SQLITE, latest + 1).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("version {}", latest + 1))
                && text.contains(&format!("version {latest}")),
            "{text}"
        );
    }
}
