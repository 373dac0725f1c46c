//! `cert.request`: a key pair made on this host, kept as the pending key (0600, written
//! atomically), and a PKCS#10 request for it. The key never leaves the host; the next
//! `cert.install` without `private_key_pem` pairs it with the certificate the manager's CA
//! signed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// What `cert.request` asks for, after the wire checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRequest {
    /// The subject CN (the host id unless the manager said otherwise).
    pub subject_cn: String,
    /// DNS SANs: the CN first, then the requested names, without repeats.
    pub dns_names: Vec<String>,
}

/// Why `cert.request` made no CSR.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The key pair or the CSR could not be made.
    #[error("making the key pair or the request failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The pending key could not be written.
    #[error("keeping the pending key in {path}: {cause}")]
    Store {
        /// The pending key's file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
}

/// Where the pending key lives.
pub fn pending_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("pending-key.pem")
}

/// Makes an ECDSA P-256 key pair and a CSR for it; the key is stored as the pending key
/// (replacing an older one) before the CSR is returned. Blocking (file I/O and fsync).
pub fn generate(state_dir: &Path, req: &CertRequest) -> Result<String, RequestError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(req.dns_names.clone())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, req.subject_cn.as_str());
    let csr = params.serialize_request(&key)?.pem()?;
    let path = pending_key_path(state_dir);
    let store = |cause| RequestError::Store {
        path: path.clone(),
        cause,
    };
    write_private(&path, key.serialize_pem().as_bytes()).map_err(store)?;
    Ok(csr)
}

/// The pending key, if a `cert.request` made one. Blocking.
pub fn read_pending(state_dir: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(pending_key_path(state_dir)) {
        Ok(pem) => Ok(Some(pem)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Forgets the pending key once it is installed (the installed identity has its own copy).
pub fn clear_pending(state_dir: &Path) {
    let _ = std::fs::remove_file(pending_key_path(state_dir));
}

/// tmp (0600 from the start) + fsync + rename + fsync(dir): the old or the new key, whole.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_csr_names_the_host_and_the_key_stays_private() {
        let dir = tempfile::tempdir().unwrap();
        let req = CertRequest {
            subject_cn: "host-1".into(),
            dns_names: vec!["host-1".into(), "host-1.example".into()],
        };
        let csr_pem = generate(dir.path(), &req).unwrap();
        assert!(csr_pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(!csr_pem.contains("PRIVATE KEY"));
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
        let sans: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| format!("{s:?}"))
            .collect();
        assert_eq!(sans.len(), 2, "{sans:?}");
        let path = pending_key_path(dir.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = read_pending(dir.path()).unwrap().unwrap();
        // The CSR is for the stored key.
        let pair = rcgen::KeyPair::from_pem(&key).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(pair.der_bytes(), csr.public_key.der_bytes());
        // A second request replaces the pending key.
        generate(dir.path(), &req).unwrap();
        assert_ne!(read_pending(dir.path()).unwrap().unwrap(), key);
        clear_pending(dir.path());
        assert_eq!(read_pending(dir.path()).unwrap(), None);
    }
}
