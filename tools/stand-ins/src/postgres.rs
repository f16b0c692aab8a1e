//! A throwaway PostgreSQL cluster started from the machine's binaries.
//!
//! The cluster lives in a temporary directory and listens only on a Unix
//! socket inside it, so clusters never compete for ports. It is watched by a
//! small shell process that holds the read end of a pipe whose write end
//! belongs to this process: when this process exits, however it exits, the
//! pipe closes and the watcher stops the server and removes the directory.
//!
//! Set `DATABASE_URL` to use a running server instead: each
//! [`TestDatabase`] is then a fresh database on that server.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::{Connection, PgConnection};
use std::process::{Child, Command};

/// A running throwaway cluster (or a server given by `DATABASE_URL`).
///
/// The server stops when this process exits or when [`PgCluster::stop`] is called; dropping the
/// value also stops it.
#[derive(Debug)]
pub struct PgCluster {
    /// URL of the `postgres` maintenance database.
    admin_url: String,
    dir: Option<PathBuf>,
    /// The watcher; dropping it (or exiting) closes its stdin and stops the server.
    watcher: Option<Child>,
}

impl PgCluster {
    /// Starts a cluster, or uses the server named by `DATABASE_URL` when it is set.
    pub async fn start() -> anyhow::Result<Self> {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return Ok(Self { admin_url: url, dir: None, watcher: None });
        }
        let bin = find_pg_bin()?;
        let dir = std::env::temp_dir().join(format!("haishin-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).context("creating the cluster directory")?;
        let as_root = running_as_root();
        if as_root {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .context("chown of the cluster directory")?;
            if !status.success() {
                bail!("could not hand {} to the postgres user", dir.display());
            }
        }
        let run = if as_root { "runuser -u postgres --" } else { "" };
        let data = dir.join("data");
        // fsync is off (the data lives only as long as this process), but every commit still
        // reaches the operating system before it is acknowledged, so a crash-like restart of
        // the server loses nothing.
        // The watcher starts the server in the foreground of a subshell and
        // stops it (immediate shutdown) when its stdin reaches end of file.
        let script = format!(
            r#"set -e
{run} "{bin}/initdb" -D "{data}" -A trust -U postgres --no-sync -E UTF8 >"{dir}/initdb.log" 2>&1
{run} "{bin}/postgres" -D "{data}" -k "{dir}" -c listen_addresses='' -c fsync=off \
  -c full_page_writes=off -c max_connections=400 \
  -c shared_buffers=128MB >"{dir}/server.log" 2>&1 &
pid=$!
cat >/dev/null || true
{run} "{bin}/pg_ctl" -D "{data}" stop -m immediate -w >/dev/null 2>&1 || kill -QUIT $pid 2>/dev/null || true
wait $pid 2>/dev/null || true
rm -rf "{dir}"
"#,
            run = run,
            bin = bin.display(),
            data = data.display(),
            dir = dir.display(),
        );
        let watcher = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the PostgreSQL watcher")?;
        let admin_url = format!("postgres://postgres@localhost/postgres?host={}", dir.display());
        let cluster = Self { admin_url, dir: Some(dir), watcher: Some(watcher) };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match PgConnection::connect(&self.admin_url).await {
                Ok(conn) => {
                    conn.close().await.ok();
                    return Ok(());
                }
                Err(err) if tokio::time::Instant::now() > deadline => {
                    let log = self.server_log();
                    bail!("PostgreSQL did not start: {err}\n{log}");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn server_log(&self) -> String {
        let Some(dir) = &self.dir else { return String::new() };
        ["initdb.log", "server.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Creates a fresh, empty database and returns its URL.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        let name = format!("haishin_{}", uuid::Uuid::new_v4().simple());
        let mut conn =
            PgConnection::connect(&self.admin_url).await.context("connecting to the maintenance database")?;
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut conn)
            .await
            .context("creating a test database")?;
        conn.close().await.ok();
        Ok(database_url(&self.admin_url, &name))
    }

    /// Restarts the server as a crash would (immediate shutdown, then start), keeping its data.
    pub async fn restart(&self) -> anyhow::Result<()> {
        let Some(dir) = &self.dir else { bail!("the server was not started here") };
        let bin = find_pg_bin()?;
        let data = dir.join("data");
        let mut command = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join("pg_ctl"));
            c
        } else {
            Command::new(bin.join("pg_ctl"))
        };
        command
            .arg("-D")
            .arg(&data)
            .args(["restart", "-m", "immediate", "-w", "-l"])
            .arg(dir.join("restart.log"));
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let status = tokio::task::spawn_blocking(move || command.status()).await??;
        if !status.success() {
            bail!("pg_ctl restart failed: {status}\n{}", self.server_log());
        }
        self.wait_ready().await
    }

    /// Stops the server now and removes its directory.
    pub async fn stop(mut self) {
        if let Some(mut watcher) = self.watcher.take() {
            drop(watcher.stdin.take());
            let _ = tokio::task::spawn_blocking(move || watcher.wait()).await;
        }
    }
}

/// Replaces the database name in a PostgreSQL URL, keeping its query string.
fn database_url(admin_url: &str, name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn find_pg_bin() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    candidates.sort();
    if let Some(dir) = candidates.pop() {
        return Ok(dir);
    }
    // Fall back to whatever is on PATH.
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .context("looking for initdb")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match Path::new(&path).parent() {
        Some(dir) if !path.is_empty() => Ok(dir.to_path_buf()),
        _ => bail!("no PostgreSQL server binaries found: install postgresql or set PG_BIN"),
    }
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn database_url_swaps_the_name_and_keeps_the_socket() {
        assert_eq!(
            database_url("postgres://postgres@localhost/postgres?host=/tmp/x", "db1"),
            "postgres://postgres@localhost/db1?host=/tmp/x"
        );
        assert_eq!(
            database_url("postgres://u:p@127.0.0.1:5432/postgres", "db2"),
            "postgres://u:p@127.0.0.1:5432/db2"
        );
    }
}
