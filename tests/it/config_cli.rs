//! `sprintlink check-config` run as an operator runs it: the real binary, a configuration file
//! and environment variables. What it must refuse, what it only warns about, and that no secret
//! value (each test uses a distinctive one) ever reaches its output.

use std::path::Path;
use std::process::{Command, Output};

const WEBHOOK: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A valid configuration; `extra` is appended (later tables may be added there).
fn config(dir: &Path, head: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("sprintlink.toml");
    let text = format!(
        r#"{head}
[sprinthub]
instance = "acme"
api_token = "env:CLI_TEST_API_TOKEN"
[[sources]]
name = "erp"
scheme = "standard-webhooks"
secrets = ["{WEBHOOK}"]
object_id = "/data/object_id"
[sources.lead]
id = "/data/lead_id"
{extra}
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `check-config` with only the given variables in the environment (plus PATH).
fn check_config(path: &Path, vars: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sprintlink"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CLI_TEST_API_TOKEN", "api-token-value")
        .args(["check-config", "--config"])
        .arg(path);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run sprintlink");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code().unwrap_or(-1), text)
}

#[test]
fn a_numeric_api_token_override_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    // No api_token in the file: the override alone sets it.
    let path = dir.path().join("sprintlink.toml");
    std::fs::write(
        &path,
        format!(
            "[sprinthub]\ninstance = \"acme\"\n[[sources]]\nname = \"erp\"\nscheme = \"standard-webhooks\"\nsecrets = [\"{WEBHOOK}\"]\nobject_id = \"/o\"\n[sources.lead]\nid = \"/l\"\n"
        ),
    )
    .unwrap();
    let (code, out) = check_config(
        &path,
        &[("SPRINTLINK_SPRINTHUB__API_TOKEN", "918273645546372819")],
    );
    assert!(!out.contains("918273645546372819"), "{out}");
    assert_eq!(code, 0, "a numeric token is a token: {out}");
}

#[test]
fn a_wrong_file_target_for_the_database_url_is_not_printed() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("shadow");
    std::fs::write(&target, "root:$6$Xq-DISTINCT-hash-77:19000:0:99999:7:::\n").unwrap();
    let path = config(
        dir.path(),
        &format!("[storage]\nurl = \"file:{}\"", target.display()),
        "",
    );
    let (code, out) = check_config(&path, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("storage.url"), "{out}");
    assert!(!out.contains("DISTINCT"), "{out}");
}

#[test]
fn a_password_in_the_database_url_query_is_not_printed() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(
        dir.path(),
        "[storage]\nurl = \"postgres://app@db.internal/app?sslmode=verify-full&password=Qw-DISTINCT-db-pw\"",
        "",
    );
    let (code, out) = check_config(&path, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("db.internal"), "{out}");
    assert!(!out.contains("Qw-DISTINCT-db-pw"), "{out}");
}

#[test]
fn an_empty_webhook_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(
        dir.path(),
        "",
        "[[sources]]\nname = \"shop\"\nscheme = \"github\"\nsecrets = [\"\"]\nobject_id = \"/o\"\n[sources.lead]\nid = \"/l\"",
    );
    let (code, out) = check_config(&path, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("sources.shop.secrets[0]"), "{out}");
    // An env: reference to an empty variable is refused as before.
    let path = config(
        dir.path(),
        "",
        "[[sources]]\nname = \"shop\"\nscheme = \"github\"\nsecrets = [\"env:CLI_EMPTY\"]\nobject_id = \"/o\"\n[sources.lead]\nid = \"/l\"",
    );
    let (code, out) = check_config(&path, &[("CLI_EMPTY", "")]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn weak_admin_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for token in ["x", "REPLACE_ME", "changeme"] {
        let path = config(dir.path(), &format!("[admin]\ntoken = \"{token}\""), "");
        let (code, out) = check_config(&path, &[]);
        assert_eq!(code, 1, "{token}: {out}");
        assert!(out.contains("admin.token"), "{token}: {out}");
    }
    let path = config(
        dir.path(),
        "[admin]\ntoken = \"Tk-DISTINCT-admin-0123456789\"",
        "",
    );
    let (code, out) = check_config(&path, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Tk-DISTINCT"), "{out}");
}

#[test]
fn a_short_webhook_key_is_a_warning_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(
        dir.path(),
        "",
        "[[sources]]\nname = \"shop\"\nscheme = \"github\"\nsecrets = [\"Sh-DISTINCT\"]\nobject_id = \"/o\"\n[sources.lead]\nid = \"/l\"",
    );
    let (code, out) = check_config(&path, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning"), "{out}");
    assert!(out.contains("sources.shop.secrets[0]"), "{out}");
    assert!(!out.contains("Sh-DISTINCT"), "{out}");
}

#[test]
fn the_readme_and_compose_admin_token_variable_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(
        dir.path(),
        "[admin]\ntoken = \"env:SPRINTLINK_ADMIN_TOKEN\"",
        "",
    );
    let (code, out) = check_config(
        &path,
        &[("SPRINTLINK_ADMIN_TOKEN", "Ad-DISTINCT-admin-token-42")],
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Ad-DISTINCT"), "{out}");
    assert!(
        !out.contains("warning"),
        "a named variable is not a look-alike: {out}"
    );
}

#[test]
fn a_look_alike_variable_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "", "");
    let (code, out) = check_config(&path, &[("SPRINTLINK_SERVER_LISTEN", "Lk-DISTINCT")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning"), "{out}");
    assert!(out.contains("SPRINTLINK_SERVER__LISTEN"), "{out}");
    assert!(!out.contains("Lk-DISTINCT"), "{out}");
}

#[test]
fn an_overflowing_lease_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(
        dir.path(),
        "[delivery]\nlease_seconds = 9223372036854776",
        "",
    );
    let (code, out) = check_config(&path, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("delivery.lease_seconds"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}

/// Replaces every `file:DIR/name` reference with a file of `dir`, written with `value(name)`.
fn with_secret_files(
    text: &str,
    secrets_dir: &str,
    dir: &Path,
    value: impl Fn(&str) -> String,
) -> String {
    let mut out = text.to_string();
    let prefix = format!("file:{secrets_dir}/");
    while let Some(start) = out.find(&prefix) {
        let rest = &out[start + prefix.len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .collect();
        let file = dir.join(&name);
        std::fs::write(&file, value(&name)).unwrap();
        out.replace_range(
            start..start + prefix.len() + name.len(),
            &format!("file:{}", file.display()),
        );
    }
    out
}

fn deploy_secret(name: &str) -> String {
    match name {
        n if n.contains("webhook") => WEBHOOK.to_string(),
        n if n.contains("database") => {
            "postgres://sprintlink:Db-DISTINCT-pw@postgres:5432/sprintlink".into()
        }
        n if n.contains("admin") => "Ad-DISTINCT-0123456789abcdef".into(),
        _ => "Api-DISTINCT-token".into(),
    }
}

#[test]
fn the_shipped_deployment_configurations_pass_check_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, secrets_dir, vars) in [
        (
            "deploy/compose.sprintlink.toml",
            "/run/secrets",
            vec![("SPRINTLINK_SPRINTHUB__INSTANCE", "acme")],
        ),
        (
            "deploy/base/sprintlink.toml",
            "/etc/sprintlink/secrets",
            vec![],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let text = with_secret_files(&text, secrets_dir, dir.path(), deploy_secret);
        let path = dir.path().join("sprintlink.toml");
        std::fs::write(&path, text).unwrap();
        let (code, out) = check_config(&path, &vars);
        assert_eq!(code, 0, "{file}: {out}");
        assert!(!out.contains("warning"), "{file}: {out}");
        assert!(!out.contains("DISTINCT"), "{file}: {out}");
    }
}

#[test]
fn the_readme_example_configuration_passes_check_config() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("```toml\n[server]")
        .expect("the README's example configuration")
        + "```toml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = with_secret_files(&readme[start..end], "/run/secrets", dir.path(), |_| {
        "Shop-DISTINCT-secret-0123456789".into()
    })
    .replace(
        "sqlite://sprintlink.db",
        &format!("sqlite://{}/x.db", dir.path().display()),
    );
    let path = dir.path().join("sprintlink.toml");
    std::fs::write(&path, text).unwrap();
    let (code, out) = check_config(
        &path,
        &[
            ("SPRINTHUB_API_TOKEN", "Api-DISTINCT-token"),
            ("SPRINTLINK_ADMIN_TOKEN", "Ad-DISTINCT-0123456789abcdef"),
            ("ERP_WEBHOOK_SECRET", WEBHOOK),
            (
                "ERP_WEBHOOK_SECRET_NEXT",
                "whsec_dGhlIG5leHQgc2VjcmV0IGJ5dGVzIDEyMzQ=",
            ),
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    assert!(!out.contains("DISTINCT"), "{out}");
}
