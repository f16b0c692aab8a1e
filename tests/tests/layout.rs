//! The layout the architecture promises (ARCHITECTURE.md): files a reader can hold in one sitting,
//! a shared crate that holds only what several services use, and tools that depend on the
//! product's contracts rather than its internals.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SERVICES: [&str; 4] = ["trigger", "list-uploader", "sender", "completion"];
const MAX_LINES: usize = 400;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources_of(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    files.into_iter().map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap())).collect()
}

#[test]
fn no_source_file_of_the_product_is_longer_than_a_reader_holds_at_once() {
    let mut long = Vec::new();
    let mut dirs = vec![root().join("shared/src")];
    dirs.extend(SERVICES.iter().map(|s| root().join("services").join(s).join("src")));
    for dir in dirs {
        for (path, text) in sources_of(&dir) {
            let lines = text.lines().count();
            if lines > MAX_LINES {
                long.push(format!("{} has {lines} lines", path.strip_prefix(root()).unwrap().display()));
            }
        }
    }
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:#?}");
}

#[test]
fn every_public_module_of_the_shared_crate_is_used_by_two_services_or_more() {
    let lib = std::fs::read_to_string(root().join("shared/src/lib.rs")).unwrap();
    let modules: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').trim())
        .collect();
    assert!(modules.len() >= 5, "shared/src/lib.rs lists its modules: {modules:?}");
    let sources: Vec<(&str, String)> = SERVICES
        .iter()
        .map(|s| {
            let text = sources_of(&root().join("services").join(s).join("src"))
                .into_iter()
                .map(|(_, t)| t)
                .collect::<Vec<_>>()
                .join("\n");
            (*s, text)
        })
        .collect();
    let mut lonely = BTreeMap::new();
    for module in modules {
        let users: Vec<&str> = sources
            .iter()
            .filter(|(_, text)| text.contains(&format!("haishin_shared::{module}")))
            .map(|(service, _)| *service)
            .collect();
        if users.len() < 2 {
            lonely.insert(module, users);
        }
    }
    assert!(lonely.is_empty(), "public modules of shared/ used by fewer than two services: {lonely:?}");
}

/// Each package of Cargo.lock and the names of the packages it depends on (dev-dependencies too).
fn lock_graph() -> BTreeMap<String, Vec<String>> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    let mut graph = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let name = block
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .map(|n| n.trim_matches('"').to_owned())
            .expect("a package has a name");
        let deps = match block.split_once("dependencies = [") {
            Some((_, rest)) => rest
                .split(']')
                .next()
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    l.trim().trim_end_matches(',').trim_matches('"').split(' ').next().map(str::to_owned)
                })
                .filter(|d| !d.is_empty())
                .collect(),
            None => Vec::new(),
        };
        graph.entry(name).or_insert_with(Vec::new).extend(deps);
    }
    graph
}

#[test]
fn the_esp_simulator_depends_on_no_database_or_google_crate() {
    let graph = lock_graph();
    let mut seen = BTreeSet::new();
    let mut next = vec!["haishin-esp-sim".to_owned()];
    while let Some(package) = next.pop() {
        if seen.insert(package.clone()) {
            next.extend(graph.get(&package).cloned().unwrap_or_default());
        }
    }
    assert!(seen.contains("axum"), "the walk reaches the simulator's dependencies: {seen:?}");
    let unwanted: Vec<&String> = seen
        .iter()
        .filter(|p| p.starts_with("sqlx") || p.starts_with("google-cloud") || p.as_str() == "haishin-shared")
        .collect();
    assert!(unwanted.is_empty(), "the simulator pulls in {unwanted:?}");
}
