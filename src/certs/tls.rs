//! TLS material: PEM files -> rustls `ClientConfig`, built by us (not by the AMQP client) so
//! that the identity can be swapped at run time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Why an identity or a CA bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// A file holds no PEM block of the kind needed.
    #[error("{path}: no PEM {what} found")]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was looked for (`certificate`, `private key`).
        what: &'static str,
    },
    /// A PEM block does not decode.
    #[error("{path}: bad PEM: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A certificate does not parse (or is refused as a trust root).
    #[error("{path}: certificate does not parse: {message}")]
    X509 {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration (a key it cannot use, ...).
    #[error("TLS configuration: {0}")]
    Rustls(rustls::Error),
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Rustls(e)
    }
}

/// The facts about a certificate that acks, events and the CLI show.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    /// The subject, as text.
    pub subject: String,
    /// The subject's CN, if it has one (the broker user with certificate login).
    pub common_name: Option<String>,
    /// The issuer, as text.
    pub issuer: String,
    /// Hex, colon-separated, as `openssl x509 -serial` groups it.
    pub serial: String,
    /// DNS names and IP addresses of the subjectAltName extension.
    pub sans: Vec<String>,
    /// The start of validity, as text.
    pub not_before: String,
    /// The same, in seconds since the epoch.
    pub not_before_unix: i64,
    /// The end of validity, as text.
    pub not_after: String,
    /// The same, in seconds since the epoch.
    pub not_after_unix: i64,
    /// The SHA-256 of the certificate (DER), hex.
    pub sha256: String,
}

/// A client identity: certificate chain and private key.
pub struct Identity {
    /// The certificate, then its intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
    /// What the certificate says.
    pub info: CertInfo,
}

impl std::fmt::Debug for Identity {
    // The key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("info", &self.info)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|cause| TlsError::Read {
        path: path.to_path_buf(),
        cause,
    })
}

/// Every certificate of the PEM file at `path`, in order (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The identity of a certificate chain file and a key file.
pub fn load_identity(cert_file: &Path, key_file: &Path) -> Result<Identity, TlsError> {
    let chain = load_certs(cert_file)?;
    let key_pem = read(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: key_file.to_path_buf(),
        message: e.to_string(),
    })?;
    let info = cert_info(&chain[0]).map_err(|message| TlsError::X509 {
        path: cert_file.to_path_buf(),
        message,
    })?;
    Ok(Identity { chain, key, info })
}

/// The trust roots of a CA bundle file.
pub fn load_roots(ca_file: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots.add(cert).map_err(|e| TlsError::X509 {
            path: ca_file.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// What certificate `der` says; `Err`: it does not parse.
pub fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let not_after = cert.validity().not_after;
    let not_before = cert.validity().not_before;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => sans.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let ip = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).map(std::net::IpAddr::from).ok(),
                        16 => <[u8; 16]>::try_from(*ip).map(std::net::IpAddr::from).ok(),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let rfc2822 = |t: x509_parser::time::ASN1Time| t.to_rfc2822().unwrap_or_else(|_| t.to_string());
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        common_name,
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        sans,
        not_before: rfc2822(not_before),
        not_before_unix: not_before.timestamp(),
        not_after: rfc2822(not_after),
        not_after_unix: not_after.timestamp(),
        sha256: hex::encode(Sha256::digest(der.as_ref())),
    })
}

/// The identity and CA of the configuration's files: the manager's side. (The agent uses
/// `certs::Current`, which prefers an identity installed by `cert.install`.)
pub fn from_config(
    b: &crate::config::BrokerConfig,
) -> Result<(Identity, Arc<rustls::ClientConfig>), TlsError> {
    from_files(&b.cert_file, &b.key_file, &b.ca_file)
}

/// An identity and CA from these files, and the client TLS configuration built from them.
pub fn from_files(
    cert_file: &Path,
    key_file: &Path,
    ca_file: &Path,
) -> Result<(Identity, Arc<rustls::ClientConfig>), TlsError> {
    let identity = load_identity(cert_file, key_file)?;
    let tls = client_config(load_roots(ca_file)?, &identity)?;
    Ok((identity, tls))
}

/// TLS 1.2 and 1.3 only, the broker verified against `roots`, our identity presented.
pub fn client_config(
    roots: RootCertStore,
    identity: &Identity,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    Ok(Arc::new(config))
}
