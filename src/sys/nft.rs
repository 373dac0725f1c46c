//! Runs the `nft` binary: one `nft -f -` per transaction, input on stdin, never a shell.
//! Spawned through tokio so that no async worker blocks on it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Why an `nft` run failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The binary could not be started.
    #[error("cannot run {path}: {cause}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// nft refused its input (the first lines of its complaint).
    #[error("nft refused the transaction: {0}")]
    Refused(String),
}

/// Keeps the first lines of nft's complaint: enough to locate the error, bounded in size.
fn summarise(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(6)
        .collect();
    let mut s = lines.join(" | ");
    s.truncate(1000);
    s
}

/// The `nft` binary: whole-table transactions (`nft -f -`) and listings.
#[derive(Debug, Clone)]
pub struct Nft {
    /// Where it is (`firewall.nft`).
    pub path: PathBuf,
}

impl Nft {
    /// The binary at `path`.
    pub fn new(path: &Path) -> Nft {
        Nft {
            path: path.to_path_buf(),
        }
    }

    async fn run(&self, args: &[&str], input: Option<&str>) -> Result<Vec<u8>, NftError> {
        let spawn_err = |cause| NftError::Spawn {
            path: self.path.clone(),
            cause,
        };
        let mut child = Command::new(&self.path)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        if let Some(text) = input {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            stdin.write_all(text.as_bytes()).await.map_err(spawn_err)?;
            drop(stdin);
        }
        let out = child.wait_with_output().await.map_err(spawn_err)?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(NftError::Refused(summarise(&out.stderr)))
        }
    }

    /// Applies `batch` as one transaction: all of it or none of it.
    pub async fn apply(&self, batch: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], Some(batch)).await.map(drop)
    }

    /// The table in terse form (no set elements), or `None` when it does not exist.
    pub async fn list_table_terse(&self, table: &str) -> Result<Option<String>, NftError> {
        match self
            .run(&["-t", "list", "table", "inet", table], None)
            .await
        {
            Ok(out) => Ok(Some(String::from_utf8_lossy(&out).into_owned())),
            Err(NftError::Refused(msg)) if msg.contains("No such file or directory") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The table with handles and counters, as JSON (for `rampart rules`).
    pub async fn list_table_json(
        &self,
        table: &str,
    ) -> Result<Option<serde_json::Value>, NftError> {
        match self
            .run(&["-j", "-t", "list", "table", "inet", table], None)
            .await
        {
            Ok(out) => Ok(serde_json::from_slice(&out).ok()),
            Err(NftError::Refused(msg)) if msg.contains("No such file or directory") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes the table if it exists.
    pub async fn delete_table(&self, table: &str) -> Result<(), NftError> {
        self.apply(&format!(
            "add table inet {table}\ndelete table inet {table}\n"
        ))
        .await
    }
}
