//! The services read their configuration from the environment exactly as Terraform sets it:
//! every variable a service reads is set for it in `terraform/run.tf` (but for the few that
//! Cloud Run sets itself or that only the local stack uses), every variable Terraform sets is
//! read, and every Terraform input variable is used.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use haishin_local::stack::env_names;

/// Read by the services but never set by Terraform: Cloud Run sets `PORT`; the rest point the
/// services at the local stand-ins or bind them to loopback.
const NOT_FROM_TERRAFORM: [&str; 7] = [
    "PORT",
    "LISTEN_HOST",
    "PUBSUB_ENDPOINT",
    "TASKS_ENDPOINT",
    "STORAGE_ENDPOINT",
    "BIGQUERY_ENDPOINT",
    "SNS_CERTIFICATE_ORIGIN",
];

fn terraform_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../terraform"))
}

/// The text between the braces that open right after `start` (which ends with `{` or `(`).
fn block<'a>(text: &'a str, start: &str) -> &'a str {
    let at = text.find(start).unwrap_or_else(|| panic!("run.tf has no `{start}`")) + start.len();
    let mut depth = 1;
    for (i, c) in text[at..].char_indices() {
        match c {
            '{' | '(' => depth += 1,
            '}' | ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[at..at + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced block after `{start}`")
}

/// Upper-case keys assigned in a block (`NAME = …`).
fn keys(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            let (key, _) = line.trim().split_once('=')?;
            let key = key.trim();
            (!key.is_empty() && key.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .then(|| key.to_owned())
        })
        .collect()
}

/// What Terraform sets for each service (plain and secret environment).
fn terraform_env() -> BTreeMap<&'static str, BTreeSet<String>> {
    let run = std::fs::read_to_string(terraform_dir().join("run.tf")).unwrap();
    let telemetry = std::fs::read_to_string(terraform_dir().join("telemetry.tf")).unwrap();
    let mut common = keys(block(&run, "common_env = merge({"));
    if block(&run, "common_env = merge(").contains("local.telemetry_env") {
        common.extend(keys(block(&telemetry, "telemetry_env = {")));
    }
    let push = keys(block(&run, "push_env = {"));
    let feedback = keys(block(&run, "feedback_env = {"));
    let env = block(&run, "\n  env = {");
    let secrets = block(&run, "secret_env = {");
    ["trigger", "list_uploader", "sender", "completion", "unsubscribe"]
        .into_iter()
        .map(|service| {
            let merged = block(env, &format!("{service} = merge("));
            let mut set = keys(merged);
            if merged.contains("local.common_env") {
                set.extend(common.iter().cloned());
            }
            if merged.contains(&format!("local.push_env.{service}")) {
                set.extend(push.iter().cloned());
            }
            if merged.contains("local.feedback_env") {
                set.extend(feedback.iter().cloned());
            }
            set.extend(keys(block(secrets, &format!("{service} = {{"))));
            (service, set)
        })
        .collect()
}

fn read_by_services() -> BTreeMap<&'static str, BTreeSet<String>> {
    // Every service also reads RUST_LOG, through its log filter rather than its arguments, and
    // the export settings of its traces and metrics.
    let read = |names: Vec<String>| -> BTreeSet<String> {
        names
            .into_iter()
            .chain(["RUST_LOG".to_owned()])
            .chain(haishin_shared::telemetry::export::VARIABLES.map(str::to_owned))
            .filter(|n| !NOT_FROM_TERRAFORM.contains(&n.as_str()))
            .collect()
    };
    // The public entry reads GOOGLE_CLOUD_PROJECT through its log format alone (for the traces
    // of its Cloud Logging entries), the other services through their Google API settings too.
    let mut public = env_names::<haishin_trigger::public::PublicConfig>();
    public.push("GOOGLE_CLOUD_PROJECT".to_owned());
    BTreeMap::from([
        ("trigger", read(env_names::<haishin_trigger::Config>())),
        ("list_uploader", read(env_names::<haishin_list_uploader::Config>())),
        ("sender", read(env_names::<haishin_sender::Config>())),
        ("completion", read(env_names::<haishin_completion::Config>())),
        ("unsubscribe", read(public)),
    ])
}

#[test]
fn every_variable_a_service_reads_is_set_by_terraform_and_nothing_else_is() {
    let set = terraform_env();
    for (service, read) in read_by_services() {
        let missing: Vec<_> = read.difference(&set[service]).collect();
        let unread: Vec<_> = set[service].difference(&read).collect();
        assert!(missing.is_empty(), "{service} reads {missing:?}, which terraform/run.tf does not set");
        assert!(unread.is_empty(), "terraform/run.tf sets {unread:?} for {service}, which it never reads");
    }
}

#[test]
fn every_terraform_input_variable_is_used() {
    let dir = terraform_dir();
    let variables = std::fs::read_to_string(dir.join("variables.tf")).unwrap();
    let names: Vec<&str> =
        variables.lines().filter_map(|l| l.strip_prefix("variable \"")?.split('"').next()).collect();
    assert!(names.len() > 10, "variables.tf was read: {names:?}");
    let others: String = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tf") && !p.ends_with("variables.tf"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let unused: Vec<&&str> = names
        .iter()
        .filter(|name| {
            let used = |text: &str| {
                text.match_indices(&format!("var.{name}"))
                    .any(|(i, m)| !text[i + m.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_'))
            };
            // A variable may also be used by another variable's validation.
            !used(&others) && !used(&variables.replace(&format!("variable \"{name}\""), ""))
        })
        .collect();
    assert!(unused.is_empty(), "terraform variables never used: {unused:?}");
}

#[test]
fn the_parser_sees_what_each_service_is_given() {
    let set = terraform_env();
    assert!(set["trigger"].contains("ESP_SLOTS") && set["trigger"].contains("DATABASE_URL"));
    assert!(set["sender"].contains("PUSH_AUDIENCE") && set["sender"].contains("ESP_API_KEY"));
    assert!(!set["completion"].contains("PUSH_AUDIENCE"), "the job receives no pushes");
    assert!(
        set["unsubscribe"].contains("UNSUBSCRIBE_SECRET") && !set["unsubscribe"].contains("PUSH_AUDIENCE")
    );
}
