//! Installed identities under `state_dir`: each in its own directory
//! (`identities/<time>-<sha256 prefix>/{cert.pem,key.pem,ca.pem,installed.json}`), written
//! and synced before a symlink `identity` is switched to it with one rename. A crash leaves
//! either the old or the new identity whole; `identity.prev` points at the one before.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Validated;
use crate::config::BrokerConfig;

const CURRENT: &str = "identity";
const PREVIOUS: &str = "identity.prev";
const DIR: &str = "identities";

/// Where an identity was installed from, for `rampart cert`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Installed {
    /// When (ms since the epoch).
    pub installed_ms: u64,
    /// By which `cert.install`.
    pub command_id: String,
}

/// The files the agent uses for its TLS identity.
#[derive(Debug, Clone, Serialize)]
pub struct InUse {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
    /// The CA bundle the broker is verified with.
    pub ca: PathBuf,
    /// `installed` (by `cert.install`, under state_dir) or `configured` (broker.*_file).
    pub source: &'static str,
    /// When and by which command, for an installed one.
    pub installed: Option<Installed>,
}

/// The newest installed identity in `state_dir`, else the configured files.
pub fn in_use(state_dir: &Path, broker: &BrokerConfig) -> InUse {
    let dir = state_dir.join(CURRENT);
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    if cert.is_file() && key.is_file() && ca.is_file() {
        let installed = std::fs::read(dir.join("installed.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        return InUse {
            cert,
            key,
            ca,
            source: "installed",
            installed,
        };
    }
    InUse {
        cert: broker.cert_file.clone(),
        key: broker.key_file.clone(),
        ca: broker.ca_file.clone(),
        source: "configured",
        installed: None,
    }
}

fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `v` into a new directory under `state_dir/identities`, synced; nothing points at it
/// yet. The key is created 0600.
pub fn stage(state_dir: &Path, v: &Validated, command_id: &str) -> std::io::Result<PathBuf> {
    let root = state_dir.join(DIR);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
    }
    let now = crate::ids::now_ms();
    let dir = root.join(format!("{now}-{}", &v.identity.info.sha256[..12]));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    }
    write_synced(&dir.join("cert.pem"), v.certificate_pem.as_bytes(), 0o644)?;
    write_synced(&dir.join("key.pem"), v.private_key_pem.as_bytes(), 0o600)?;
    write_synced(&dir.join("ca.pem"), v.ca_pem.as_bytes(), 0o644)?;
    let meta = Installed {
        installed_ms: now,
        command_id: command_id.to_string(),
    };
    write_synced(
        &dir.join("installed.json"),
        &serde_json::to_vec(&meta).expect("serialises"),
        0o644,
    )?;
    sync_dir(&dir)?;
    sync_dir(&root)?;
    Ok(dir)
}

/// Points `identity` at `staged` (one rename), `identity.prev` at what it pointed at, and
/// removes staged or old directories that neither points at.
pub fn switch(state_dir: &Path, staged: &Path) -> std::io::Result<()> {
    let name = staged
        .file_name()
        .ok_or_else(|| std::io::Error::other("staged identity has no name"))?;
    let target = Path::new(DIR).join(name);
    let current = state_dir.join(CURRENT);
    let old = std::fs::read_link(&current).ok();
    let tmp = state_dir.join("identity.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp)?;
    std::fs::rename(&tmp, &current)?;
    if let Some(old) = &old
        && *old != target
    {
        let tmp = state_dir.join("identity.prev.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(old, &tmp)?;
        std::fs::rename(&tmp, state_dir.join(PREVIOUS))?;
    }
    sync_dir(state_dir)?;
    prune(state_dir);
    Ok(())
}

/// Removes identity directories that neither `identity` nor `identity.prev` points at.
fn prune(state_dir: &Path) {
    let keep: Vec<PathBuf> = [CURRENT, PREVIOUS]
        .iter()
        .filter_map(|l| std::fs::read_link(state_dir.join(l)).ok())
        .filter_map(|t| t.file_name().map(PathBuf::from))
        .collect();
    let Ok(entries) = std::fs::read_dir(state_dir.join(DIR)) else {
        return;
    };
    for e in entries.flatten() {
        if !keep.iter().any(|k| k.as_os_str() == e.file_name()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
