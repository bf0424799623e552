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

/// A configuration whose one source is `source` (TOML keys of `[[sources]]`, without the lead).
fn source_config(dir: &Path, source: &str) -> std::path::PathBuf {
    let path = dir.join("sprintlink.toml");
    let text = format!(
        r#"
[sprinthub]
instance = "acme"
api_token = "env:CLI_TEST_API_TOKEN"
[[sources]]
name = "snd"
object_id = "/data/object_id"
{source}
[sources.lead]
id = "/data/lead_id"
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn each_contradictory_or_missing_scheme_key_is_one_line() {
    const PK_SHORT: &str = "whpk_c2hvcnQ="; // base64 of "short"
    for (what, source, line) in [
        (
            "both signature places",
            "scheme = \"hmac\"\nsecrets = [\"hmac-secret-0123456789\"]\nsignature_header = \"X-Sig\"\nsignature_query = \"sig\"",
            "sources.snd: signature_header and signature_query are both set",
        ),
        (
            "no signature place",
            "scheme = \"hmac\"\nsecrets = [\"hmac-secret-0123456789\"]",
            "sources.snd.signature_header: required for scheme hmac (or signature_query",
        ),
        (
            "{timestamp} without timestamp_header",
            "scheme = \"hmac\"\nsecrets = [\"hmac-secret-0123456789\"]\nsignature_header = \"X-Sig\"\nsigned_content = \"{timestamp}.{body}\"",
            "sources.snd.timestamp_header: required because signed_content uses {timestamp}",
        ),
        (
            "unknown scheme",
            "scheme = \"shopifyy\"\nsecrets = [\"hmac-secret-0123456789\"]",
            "sources.snd.scheme: unknown scheme or preset \"shopifyy\"; use one of standard-webhooks",
        ),
        (
            "whpk_ not 32 bytes",
            &format!("scheme = \"standard-webhooks\"\nsecrets = [\"{PK_SHORT}\"]"),
            "sources.snd.secrets[0]: a whpk_ key must be whpk_ followed by the base64 of a 32-byte Ed25519 public key",
        ),
        (
            "basic without a colon",
            "scheme = \"basic\"\nsecrets = [\"userWITHOUTcolon-pw\"]",
            "sources.snd.secrets[0]: a basic secret is written user:password",
        ),
        (
            "token in both places",
            "scheme = \"token\"\nsecrets = [\"token-secret-0123456789\"]\ntoken_header = \"X-Token\"\ntoken_query = \"token\"",
            "sources.snd: token_header and token_query are both set",
        ),
        (
            "token in neither place",
            "scheme = \"token\"\nsecrets = [\"token-secret-0123456789\"]",
            "sources.snd.token_header: required for scheme token (or token_query",
        ),
        (
            "a query: reference naming the credential",
            "scheme = \"token\"\nsecrets = [\"token-secret-0123456789\"]\ntoken_query = \"key\"\nevent_id = \"query:key\"",
            "sources.snd.event_id: query:key names the parameter that carries the credential",
        ),
        (
            "a bad template",
            "scheme = \"hmac\"\nsecrets = [\"hmac-secret-0123456789\"]\nsignature_header = \"X-Sig\"\nsigned_content = \"{ts}.{body}\"",
            "sources.snd.signed_content: unknown placeholder {ts}",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (code, out) = check_config(&source_config(dir.path(), source), &[]);
        assert_eq!(code, 1, "{what}: {out}");
        let lines: Vec<&str> = out.lines().filter(|l| l.contains(line)).collect();
        assert_eq!(
            lines.len(),
            1,
            "{what}: expected one line with {line:?} in:\n{out}"
        );
        // No secret value is echoed.
        for secret in [
            "userWITHOUTcolon-pw",
            "hmac-secret-0123456789",
            "token-secret-0123456789",
        ] {
            assert!(!out.contains(secret), "{what}: {out}");
        }
    }
}

#[test]
fn every_preset_and_new_scheme_passes_check_config() {
    let pk = "whpk_O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=";
    for source in [
        "scheme = \"shopify\"\nsecrets = [\"shpss_0123456789abcdef\"]".to_string(),
        "scheme = \"woocommerce\"\nsecrets = [\"wc-secret-0123456789\"]".into(),
        "scheme = \"typeform\"\nsecrets = [\"tf-secret-0123456789\"]".into(),
        "scheme = \"slack\"\nsecrets = [\"slack-secret-0123456789\"]".into(),
        "scheme = \"hotmart\"\nsecrets = [\"hottok-0123456789abc\"]".into(),
        "scheme = \"basic\"\nsecrets = [\"erp:long-password-0123\"]".into(),
        "scheme = \"token\"\nsecrets = [\"token-0123456789abcdef\"]\ntoken_query = \"key\"".into(),
        "scheme = \"hmac\"\nalgorithm = \"sha512\"\nsecrets = [\"hmac-0123456789abcdef\"]\nsignature_query = \"sig\"\nsigned_content = \"{timestamp}.{header:X-Id}.{body}\"\ntimestamp_header = \"X-Ts\"\ntimestamp_unit = \"ms\"".into(),
        format!("scheme = \"standard-webhooks\"\nsecrets = [\"{WEBHOOK}\", \"{pk}\"]"),
        // A preset key overridden explicitly.
        "scheme = \"shopify\"\nsecrets = [\"shpss_0123456789abcdef\"]\nsignature_header = \"X-Other\"".into(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (code, out) = check_config(&source_config(dir.path(), &source), &[]);
        assert_eq!(code, 0, "{source}: {out}");
    }
}

/// Runs `sign` for the source; (exit code, output).
fn sign(path: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sprintlink"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CLI_TEST_API_TOKEN", "api-token-value")
        .args(["sign", "--source", "snd", "--config"])
        .arg(path)
        .args(extra)
        .output()
        .expect("run sprintlink");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn sign_refuses_a_source_with_only_public_keys() {
    let dir = tempfile::tempdir().unwrap();
    let pk = "whpk_O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=";
    let path = source_config(
        dir.path(),
        &format!("scheme = \"standard-webhooks\"\nsecrets = [\"{pk}\"]"),
    );
    let (code, out) = sign(&path, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot sign with a public key"), "{out}");
    // With a whsec_ secret beside it, it signs (v1).
    let path = source_config(
        dir.path(),
        &format!("scheme = \"standard-webhooks\"\nsecrets = [\"{pk}\", \"{WEBHOOK}\"]"),
    );
    let (code, out) = sign(&path, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("webhook-signature: v1,"), "{out}");
}

#[test]
fn sign_prints_the_query_credential_and_a_form_content_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = source_config(
        dir.path(),
        "scheme = \"token\"\nsecrets = [\"tok en&0123456789\"]\ntoken_query = \"key\"",
    );
    let body = dir.path().join("form.txt");
    std::fs::write(&body, "data[object_id]=5&data[lead_id]=7").unwrap();
    let (code, out) = sign(
        &path,
        &[
            "--file",
            body.to_str().unwrap(),
            "--content-type",
            "application/x-www-form-urlencoded",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("query: ?key=tok+en%260123456789"), "{out}");
    assert!(
        out.contains("/webhooks/snd?key=tok+en%260123456789'"),
        "{out}"
    );
    assert!(
        out.contains("'content-type: application/x-www-form-urlencoded'"),
        "{out}"
    );
    assert!(
        out.contains(&format!("--data-binary '@{}'", body.display())),
        "{out}"
    );
    // Slack: the timestamp header and the v0= signature.
    let path = source_config(
        dir.path(),
        "scheme = \"slack\"\nsecrets = [\"slack-secret-0123456789\"]",
    );
    let (code, out) = sign(&path, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("X-Slack-Request-Timestamp: "), "{out}");
    assert!(out.contains("X-Slack-Signature: v0="), "{out}");
}

#[test]
fn telemetry_endpoints_are_checked_at_start_up() {
    for (endpoint, line) in [
        ("grpc://collector:4317", "only http and https"),
        (
            "http://otel:Pw-DISTINCT-9@collector:4318",
            "holds credentials",
        ),
        (
            "http://collector:4318?api_key=Key-DISTINCT-8",
            "must not have a query",
        ),
        ("collector:4318", "not a URL"),
        ("http:///v1", "has no host"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = config(
            dir.path(),
            &format!("[telemetry]\notlp_endpoint = \"{endpoint}\""),
            "",
        );
        let (code, out) = check_config(&path, &[]);
        assert_eq!(code, 1, "{endpoint}: {out}");
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("telemetry.otlp_endpoint") && l.contains(line))
            .collect();
        assert_eq!(lines.len(), 1, "{endpoint}: {out}");
        assert!(!out.contains("DISTINCT"), "{endpoint}: {out}");
    }
    // Accepted: http(s) with a host, a path prefix; an empty override turns tracing off.
    for endpoint in ["http://collector:4318", "https://otel.example.com/otlp/"] {
        let dir = tempfile::tempdir().unwrap();
        let path = config(
            dir.path(),
            &format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"sl-eu\""),
            "",
        );
        let (code, out) = check_config(&path, &[]);
        assert_eq!(code, 0, "{endpoint}: {out}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "[telemetry]\nservice_name = \"\"", "");
    let (code, out) = check_config(&path, &[("SPRINTLINK_TELEMETRY__OTLP_ENDPOINT", "")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("telemetry.service_name"), "{out}");
    assert!(!out.contains("otlp_endpoint"), "{out}");
    let path = config(dir.path(), "[telemetry]\nqueue_size = 0", "");
    let (code, out) = check_config(&path, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("telemetry.queue_size"), "{out}");
}
