//! Every Google API call each service and the job makes is granted to its service account in
//! `terraform/iam.tf`, and nothing more: a missing grant fails in production, an unused one is a
//! privilege nobody needs.
//!
//! What each service calls is read from its code: the Pub/Sub topics it builds publishers for,
//! the Cloud Tasks queues it creates tasks in, whether it reads or writes Cloud Storage, whether
//! it writes BigQuery or runs BigQuery jobs. Each client is built from a setting (`DELIVERIES_TOPIC`, `UPLOAD_QUEUE`,
//! …), and `terraform/run.tf` names the resource behind it. Secrets are granted from the same
//! table that puts them in the environment (`local.secret_env`), and the database is reached
//! over the private network with the URL from its secret, so neither needs more here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

/// A permission a service needs, or has.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Access {
    Publish {
        topic: String,
    },
    Enqueue {
        queue: String,
    },
    /// Creating tasks whose OIDC token is signed as the tasks invoker.
    ActAsTasksInvoker,
    ReadObjects,
    ReadWriteObjects,
    WriteLogTables,
    RunBigQueryJobs,
}

const SERVICES: [(&str, &str); 4] = [
    ("trigger", "trigger"),
    ("list_uploader", "list-uploader"),
    ("sender", "sender"),
    ("completion", "completion"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn source_of(dir: &str) -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut text = String::new();
    walk(&root().join("services").join(dir).join("src"), &mut text);
    text
}

/// The config fields that `pattern` (ending just before the field name) is applied to.
fn fields_after(source: &str, pattern: &str) -> Vec<String> {
    source
        .match_indices(pattern)
        .map(|(at, _)| {
            source[at + pattern.len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
        })
        .collect()
}

/// The environment variable a service's config field is read from.
fn env_of<C: CommandFactory>(field: &str) -> String {
    let command = C::command();
    let arg = command
        .get_arguments()
        .find(|a| a.get_id() == field)
        .unwrap_or_else(|| panic!("no setting `{field}`"));
    arg.get_env().unwrap_or_else(|| panic!("`{field}` has no variable")).to_string_lossy().into_owned()
}

/// The `env` block of one service in `terraform/run.tf`.
fn env_block<'a>(run_tf: &'a str, service: &str) -> &'a str {
    let start =
        run_tf.find(&format!("    {service} = merge(")).unwrap_or_else(|| panic!("no env of {service}"));
    let end = run_tf[start..].find("\n    })").map(|e| start + e).unwrap();
    &run_tf[start..end]
}

/// The Terraform expression a variable is set to in an env block.
fn value_of<'a>(block: &'a str, variable: &str) -> &'a str {
    block
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once('=')?;
            (name.trim() == variable).then(|| value.trim())
        })
        .unwrap_or_else(|| panic!("{variable} is not set in run.tf"))
}

/// `google_pubsub_topic.topic["key"].name` → `key`; `google_cloud_tasks_queue.key.name` → `key`.
fn resource_key(expression: &str) -> String {
    if let Some(rest) = expression.strip_prefix("google_pubsub_topic.topic[\"") {
        return rest.split('"').next().unwrap().to_owned();
    }
    if let Some(rest) = expression.strip_prefix("google_cloud_tasks_queue.") {
        return rest.split('.').next().unwrap().to_owned();
    }
    panic!("`{expression}` names no topic or queue")
}

/// What a service's code calls.
fn needed<C: CommandFactory>(service: &str, dir: &str, run_tf: &str) -> BTreeSet<Access> {
    let source = source_of(dir);
    let env = env_block(run_tf, service);
    let mut needs = BTreeSet::new();
    let mut topic_fields = Vec::new();
    for connect in ["Topic::connect(", "Topic::connect_unbatched("] {
        for args in ["gcp, &config.", "&config.common.gcp, &config.", "&config.gcp, &config."] {
            topic_fields.extend(fields_after(&source, &format!("{connect}{args}")));
        }
    }
    for field in topic_fields {
        needs.insert(Access::Publish { topic: resource_key(value_of(env, &env_of::<C>(&field))) });
    }
    for field in fields_after(&source, "queue_path(&config.") {
        needs.insert(Access::Enqueue { queue: resource_key(value_of(env, &env_of::<C>(&field))) });
        needs.insert(Access::ActAsTasksInvoker);
    }
    if source.contains("Blobs::connect(") {
        let writes = source.contains("blobs.write(");
        needs.insert(if writes { Access::ReadWriteObjects } else { Access::ReadObjects });
    }
    if source.contains("BigQuerySink::new(") {
        needs.insert(Access::WriteLogTables);
    }
    if source.contains("BigQuery::new(") {
        needs.insert(Access::RunBigQueryJobs);
    }
    needs
}

/// Each `resource "TYPE" "NAME" { … }` block of a Terraform file, as (type, name, body).
fn resources(tf: &str) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for (at, _) in tf.match_indices("\nresource \"") {
        let head = &tf[at + 1..];
        let mut quoted = head.split('"');
        let (kind, name) = (quoted.nth(1).unwrap().to_owned(), quoted.nth(1).unwrap().to_owned());
        let open = head.find('{').unwrap();
        let mut depth = 0;
        let mut end = open;
        for (i, c) in head[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = open + i;
                break;
            }
        }
        found.push((kind, name, head[open..=end].to_owned()));
    }
    found
}

/// What `terraform/iam.tf` grants each runtime service account.
fn granted(iam_tf: &str) -> BTreeSet<(String, Access)> {
    let mut grants = BTreeSet::new();
    let locals_start = iam_tf.find("topic_publishers = {").expect("local.topic_publishers");
    let locals = &iam_tf[locals_start..locals_start + iam_tf[locals_start..].find("\n  }").unwrap()];
    for line in locals.lines().skip(1) {
        let field = |key: &str| {
            let rest = line.split(&format!("{key} = \"")).nth(1)?;
            Some(rest.split('"').next()?.to_owned())
        };
        if let (Some(service), Some(topic)) = (field("service"), field("topic")) {
            grants.insert((service, Access::Publish { topic }));
        }
    }
    for (kind, name, body) in resources(iam_tf) {
        let member = body
            .split("google_service_account.runtime[\"")
            .nth(1)
            .map(|r| r.split('"').next().unwrap().to_owned());
        let Some(service) = member else { continue };
        let role = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("role")?.trim_start().strip_prefix('=')?.split('"').nth(1))
            .unwrap_or_default()
            .to_owned();
        let access = match (kind.as_str(), role.as_str()) {
            ("google_cloud_tasks_queue_iam_member", "roles/cloudtasks.enqueuer") => {
                for queue in body.split("google_cloud_tasks_queue.").skip(1) {
                    let queue = queue.split('.').next().unwrap().to_owned();
                    grants.insert((service.clone(), Access::Enqueue { queue }));
                }
                continue;
            }
            ("google_service_account_iam_member", "roles/iam.serviceAccountUser")
                if body.contains("google_service_account.tasks_invoker.name") =>
            {
                Access::ActAsTasksInvoker
            }
            ("google_storage_bucket_iam_member", "roles/storage.objectViewer") => Access::ReadObjects,
            ("google_storage_bucket_iam_member", "roles/storage.objectUser") => Access::ReadWriteObjects,
            ("google_bigquery_dataset_iam_member", "roles/bigquery.dataEditor") => Access::WriteLogTables,
            ("google_project_iam_member", "roles/bigquery.jobUser") => Access::RunBigQueryJobs,
            other => panic!("iam.tf grants {other:?} to {service} ({name}), which this test cannot place"),
        };
        grants.insert((service, access));
    }
    grants
}

#[test]
fn iam_grants_each_service_exactly_the_google_calls_its_code_makes() {
    let run_tf = read("terraform/run.tf");
    let iam_tf = read("terraform/iam.tf");
    let mut needs = BTreeSet::new();
    for (service, dir) in SERVICES {
        let service_needs = match service {
            "trigger" => needed::<haishin_trigger::Config>(service, dir, &run_tf),
            "list_uploader" => needed::<haishin_list_uploader::Config>(service, dir, &run_tf),
            "sender" => needed::<haishin_sender::Config>(service, dir, &run_tf),
            _ => needed::<haishin_completion::Config>(service, dir, &run_tf),
        };
        needs.extend(service_needs.into_iter().map(|a| (service.to_owned(), a)));
    }
    let grants = granted(&iam_tf);

    assert!(needs.len() >= 10, "the code's calls were found: {needs:#?}");
    let missing: Vec<_> = needs.difference(&grants).collect();
    let unused: Vec<_> = grants.difference(&needs).collect();
    assert!(missing.is_empty(), "called but not granted in iam.tf: {missing:#?}");
    assert!(unused.is_empty(), "granted in iam.tf but never called: {unused:#?}");
}
