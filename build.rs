//! Turns "this machine lacks X" into `cfg`s, so that the integration tests needing X are
//! compiled as `#[ignore]` and `cargo test` reports them as ignored (skipped), never as passed.
//! Without them, a missing prerequisite fails its test with a message saying what to install.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for (var, cfg) in [
        ("SPRINTLINK_SKIP_PG", "sl_skip_pg"),
        ("SPRINTLINK_SKIP_BROWSER", "sl_skip_browser"),
    ] {
        println!("cargo::rerun-if-env-changed={var}");
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if std::env::var(var).is_ok_and(|v| v == "1") {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
    // Mounting a tmpfs (the full-disk test) needs root; the tests run as the user who builds.
    println!("cargo::rustc-check-cfg=cfg(sl_not_root)");
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or(false);
    if !root {
        println!("cargo::rustc-cfg=sl_not_root");
    }
}
