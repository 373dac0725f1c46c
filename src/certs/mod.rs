//! The agent's own TLS identity: `cert.install` validation, the identities installed under
//! `state_dir` (switched atomically, the previous one kept), and which files are in use.
//! Private key material never leaves this module in a message, a log line or an ack.

pub mod request;
pub mod store;
pub mod tls;

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;

use crate::certs::tls::{CertInfo, Identity, cert_info};

/// Largest PEM text accepted per field (a long chain fits easily).
pub const MAX_PEM_BYTES: usize = 64 * 1024;

/// `cert.install` data after the wire checks: the PEM texts, not yet validated.
pub struct Bundle {
    /// The new certificate, then its intermediates.
    pub certificate_pem: String,
    /// `None`: use the pending key of the last `cert.request`.
    pub private_key_pem: Option<String>,
    /// A new CA bundle to verify the broker with (a CA transition); `None`: keep the one
    /// in use.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for Bundle {
    // The key never reaches a log line or a test failure message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("certificate_pem_bytes", &self.certificate_pem.len())
            .field("private_key_pem", &"<redacted>")
            .field("ca_pem_bytes", &self.ca_pem.as_ref().map(String::len))
            .finish()
    }
}

impl PartialEq for Bundle {
    fn eq(&self, other: &Self) -> bool {
        self.certificate_pem == other.certificate_pem
            && self.private_key_pem == other.private_key_pem
            && self.ca_pem == other.ca_pem
    }
}

impl Clone for Bundle {
    fn clone(&self) -> Self {
        Bundle {
            certificate_pem: self.certificate_pem.clone(),
            private_key_pem: self.private_key_pem.clone(),
            ca_pem: self.ca_pem.clone(),
        }
    }
}

/// Why a bundle is refused. Messages name the problem, never the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// A PEM field does not parse as what it must hold.
    #[error("{what}: {message}")]
    BadPem {
        /// The field, as a JSON path (`$.data.certificate_pem`).
        field: &'static str,
        /// What it should hold (`certificate_pem`, `the private key`, ...).
        what: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The key is not the certificate's.
    #[error("the private key does not match the certificate's public key")]
    KeyMismatch,
    /// No key in the command and none pending from a `cert.request`.
    #[error("no private_key_pem and no pending key: send cert.request first")]
    NoPendingKey,
    /// The certificate is past its validity.
    #[error("the certificate expired on {not_after}")]
    Expired {
        /// Its end of validity.
        not_after: String,
    },
    /// The certificate is not valid yet.
    #[error("the certificate is not valid before {not_before}")]
    NotYetValid {
        /// Its start of validity.
        not_before: String,
    },
    /// The certificate is for another host.
    #[error("the certificate names {names}, not this host ({host})")]
    WrongHost {
        /// The names it holds (CN and DNS names).
        names: String,
        /// This host's id.
        host: String,
    },
    /// With certificate login, the new CN would log in as another broker user.
    #[error(
        "the broker logs in by certificate CN: the new CN {new} is not the agent's user {user}"
    )]
    LoginName {
        /// The new certificate's CN.
        new: String,
        /// The broker user the agent logs in as.
        user: String,
    },
    /// The certificate does not chain to the CA it must.
    #[error("the certificate does not chain to {against}: {message}")]
    UntrustedChain {
        /// Which CA (the one in use, or the bundle's new one).
        against: &'static str,
        /// What the verifier said.
        message: String,
    },
}

/// A bundle that passed every check, ready to be tried and installed.
pub struct Validated {
    /// The new identity, parsed.
    pub identity: Identity,
    /// The CA the agent verifies the broker with from now on (the new `ca_pem`, or the
    /// CA in use), as PEM text and as a store.
    pub ca_pem: String,
    /// The same CA, as the TLS client's trust roots.
    pub roots: RootCertStore,
    /// The certificate chain, as it will be written.
    pub certificate_pem: String,
    /// The key, as it will be written (mode 0600).
    pub private_key_pem: String,
}

fn certs(
    pem: &str,
    field: &'static str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bad = |message: String| CertError::BadPem {
        field,
        what,
        message,
    };
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn roots_from(
    certs: &[CertificateDer<'static>],
    field: &'static str,
) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c.clone()).map_err(|e| CertError::BadPem {
            field,
            what: "CA bundle",
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The private key is the certificate's.
fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<(), CertError> {
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| CertError::BadPem {
            field: "$.data.private_key_pem",
            what: "private key",
            message: format!("unsupported key: {e}"),
        })?;
    let certified = rustls::sign::CertifiedKey::new(chain.to_vec(), signing);
    match certified.keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(CertError::KeyMismatch)
        }
        Err(e) => Err(CertError::BadPem {
            field: "$.data.certificate_pem",
            what: "certificate",
            message: e.to_string(),
        }),
    }
}

/// Valid at `now`, names the host, keeps the login CN.
fn check_validity_and_names(
    info: &CertInfo,
    host_id: &str,
    login_cn: Option<&str>,
    now: UnixTime,
) -> Result<(), CertError> {
    let secs = now.as_secs() as i64;
    if secs < info.not_before_unix {
        return Err(CertError::NotYetValid {
            not_before: info.not_before.clone(),
        });
    }
    if secs > info.not_after_unix {
        return Err(CertError::Expired {
            not_after: info.not_after.clone(),
        });
    }
    let names_host =
        info.common_name.as_deref() == Some(host_id) || info.sans.iter().any(|s| s == host_id);
    if !names_host {
        let mut names: Vec<String> = info
            .common_name
            .iter()
            .map(|cn| format!("CN={cn}"))
            .collect();
        names.extend(info.sans.iter().map(|s| format!("SAN={s}")));
        return Err(CertError::WrongHost {
            names: if names.is_empty() {
                "no name".into()
            } else {
                names.join(", ")
            },
            host: host_id.to_string(),
        });
    }
    if let Some(user) = login_cn
        && info.common_name.as_deref() != Some(user)
    {
        return Err(CertError::LoginName {
            new: info.common_name.clone().unwrap_or_else(|| "(none)".into()),
            user: user.to_string(),
        });
    }
    Ok(())
}

/// Checks a bundle for this host: PEM, key matches, valid at `now`, names the host, keeps
/// the CN the broker maps to the agent's user (`login_cn`, with EXTERNAL login), chains to
/// the new CA when one is given, else to the CA in use (`current_ca_pem`).
pub fn validate(
    bundle: &Bundle,
    host_id: &str,
    login_cn: Option<&str>,
    current_ca_pem: &str,
    now: UnixTime,
) -> Result<Validated, CertError> {
    let chain = certs(
        &bundle.certificate_pem,
        "$.data.certificate_pem",
        "certificate",
    )?;
    let key_pem = bundle
        .private_key_pem
        .as_deref()
        .ok_or(CertError::NoPendingKey)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        CertError::BadPem {
            field: "$.data.private_key_pem",
            what: "private key",
            // The parser's message names the PEM section, never its contents.
            message: format!("no PKCS#8, SEC1 or RSA private key: {e}"),
        }
    })?;
    let info = cert_info(&chain[0]).map_err(|message| CertError::BadPem {
        field: "$.data.certificate_pem",
        what: "certificate",
        message,
    })?;
    check_key_matches(&chain, &key)?;
    check_validity_and_names(&info, host_id, login_cn, now)?;
    let (ca_pem, against) = match &bundle.ca_pem {
        Some(pem) => (pem.clone(), "the new CA (ca_pem)"),
        None => (current_ca_pem.to_string(), "the CA in use"),
    };
    let ca_certs = certs(&ca_pem, "$.data.ca_pem", "CA bundle")?;
    let roots = roots_from(&ca_certs, "$.data.ca_pem")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots.clone()),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| CertError::UntrustedChain {
        against,
        message: e.to_string(),
    })?;
    verifier
        .verify_client_cert(&chain[0], &chain[1..], now)
        .map_err(|e| CertError::UntrustedChain {
            against,
            message: e.to_string(),
        })?;
    Ok(Validated {
        identity: Identity { chain, key, info },
        ca_pem,
        roots,
        certificate_pem: bundle.certificate_pem.clone(),
        private_key_pem: key_pem.to_string(),
    })
}

/// The identity the agent uses now.
#[derive(Debug, Clone)]
pub struct Current {
    /// What the certificate says.
    pub info: CertInfo,
    /// The files it was read from.
    pub files: store::InUse,
    /// The CA bundle the broker is verified with (what a new certificate must chain to
    /// when `cert.install` brings no `ca_pem`).
    pub ca_pem: String,
}

impl Current {
    /// The identity in use at start: the newest installed one, else the configured files.
    pub fn load(
        state_dir: &std::path::Path,
        broker: &crate::config::BrokerConfig,
    ) -> Result<(Current, Identity, Arc<rustls::ClientConfig>), crate::certs::tls::TlsError> {
        let files = store::in_use(state_dir, broker);
        let (identity, tls) = crate::certs::tls::from_files(&files.cert, &files.key, &files.ca)?;
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(&files.key)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    key = %files.key.display(),
                    mode = format!("{:04o}", meta.permissions().mode() & 0o7777),
                    "the private key is readable by others than its owner; chmod 600 it"
                );
            }
        }
        let ca_pem = std::fs::read_to_string(&files.ca).map_err(|cause| {
            crate::certs::tls::TlsError::Read {
                path: files.ca.clone(),
                cause,
            }
        })?;
        let current = Current {
            info: identity.info.clone(),
            files,
            ca_pem,
        };
        Ok((current, identity, tls))
    }

    /// `certificate` of the state summary and heartbeats.
    pub fn summary(&self) -> Summary {
        Summary {
            subject: self.info.subject.clone(),
            serial: self.info.serial.clone(),
            not_after: self.info.not_after.clone(),
            sha256: self.info.sha256.clone(),
            days_left: days_left(&self.info, crate::ids::now_ms() as i64 / 1000),
        }
    }
}

/// The identity in use, as heartbeats and `rampart status` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// The subject, as text.
    pub subject: String,
    /// The serial number, hex.
    pub serial: String,
    /// The end of validity.
    pub not_after: String,
    /// The SHA-256 of the certificate (DER), hex: what the broker lists per connection.
    pub sha256: String,
    /// Whole days until it expires (negative once expired).
    pub days_left: i64,
}

/// Whole days until `info` expires (negative once expired).
pub fn days_left(info: &CertInfo, now_unix: i64) -> i64 {
    (info.not_after_unix - now_unix).div_euclid(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

    struct Ca(CertifiedIssuer<'static, KeyPair>);

    fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        Ca(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
    }

    fn issue(ca: &Ca, cn: &str, days: (i64, i64)) -> (String, String) {
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(days.0);
        p.not_after = now + time::Duration::days(days.1);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca.0).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn bundle(cert: &str, key: &str, ca_pem: Option<&str>) -> Bundle {
        Bundle {
            certificate_pem: cert.into(),
            private_key_pem: Some(key.into()),
            ca_pem: ca_pem.map(str::to_string),
        }
    }

    #[test]
    fn each_failure_has_its_own_error() {
        let ca1 = ca("ca1");
        let ca2 = ca("ca2");
        let now = UnixTime::now();
        let (cert, key) = issue(&ca1, "h1", (-1, 30));
        let (_, other_key) = issue(&ca1, "h1", (-1, 30));
        let check = |b: Bundle| validate(&b, "h1", Some("h1"), &ca1.0.pem(), now).map(|_| ());
        assert_eq!(check(bundle(&cert, &key, None)), Ok(()));
        assert!(matches!(
            check(bundle("garbage", &key, None)),
            Err(CertError::BadPem {
                field: "$.data.certificate_pem",
                ..
            })
        ));
        assert!(matches!(
            check(bundle(
                &cert,
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                None
            )),
            Err(CertError::BadPem {
                field: "$.data.private_key_pem",
                ..
            })
        ));
        assert_eq!(
            check(bundle(&cert, &other_key, None)),
            Err(CertError::KeyMismatch)
        );
        let (old, old_key) = issue(&ca1, "h1", (-30, -1));
        assert!(matches!(
            check(bundle(&old, &old_key, None)),
            Err(CertError::Expired { .. })
        ));
        let (future, future_key) = issue(&ca1, "h1", (2, 30));
        assert!(matches!(
            check(bundle(&future, &future_key, None)),
            Err(CertError::NotYetValid { .. })
        ));
        let (other, other_key) = issue(&ca1, "h2", (-1, 30));
        assert!(matches!(
            check(bundle(&other, &other_key, None)),
            Err(CertError::WrongHost { .. })
        ));
        let (foreign, foreign_key) = issue(&ca2, "h1", (-1, 30));
        assert!(matches!(
            check(bundle(&foreign, &foreign_key, None)),
            Err(CertError::UntrustedChain { .. })
        ));
        // With the new CA given, it chains.
        assert_eq!(
            check(bundle(&foreign, &foreign_key, Some(&ca2.0.pem()))),
            Ok(())
        );
        assert!(matches!(
            check(bundle(&foreign, &foreign_key, Some("nope"))),
            Err(CertError::BadPem {
                field: "$.data.ca_pem",
                ..
            })
        ));
    }

    #[test]
    fn no_message_or_debug_output_carries_the_key() {
        let ca1 = ca("ca1");
        let (cert, key) = issue(&ca1, "h1", (-1, 30));
        let (_, other_key) = issue(&ca1, "h1", (-1, 30));
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        let b = bundle(&cert, &other_key, None);
        let e = validate(&b, "h1", None, &ca1.0.pem(), UnixTime::now())
            .err()
            .unwrap();
        let mangled = bundle(&cert, &key.replace('A', "!"), None);
        let e2 = validate(&mangled, "h1", None, &ca1.0.pem(), UnixTime::now())
            .err()
            .unwrap();
        for text in [
            e.to_string(),
            e2.to_string(),
            format!("{b:?}"),
            format!("{e2:?}"),
        ] {
            assert!(!text.contains(&body[..40]), "{text}");
            assert!(!text.contains(&other_key[30..70]), "{text}");
        }
    }
}
