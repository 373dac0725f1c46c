//! The identity's commands: `cert.request` (a new key pair, its CSR in the ack) and
//! `cert.install`, make-before-break: a session on the new identity first, then the files
//! switched in one rename; the session is handed over once the ack is out.

use serde_json::json;

use super::{CertContext, DispatchError, Domain, Executed, Recorded, Rotation, SettingsWatch};
use crate::certs::Current;
use crate::state::{Change, StateError};

/// An identity command, checked.
pub(super) enum CertCommand {
    Request(Box<crate::certs::request::CertRequest>),
    Install(Box<crate::certs::Bundle>),
}

/// What an identity command leaves: no record of its own (the files are the state), and
/// the session on the new identity when one was installed.
pub(super) struct CertEffect(Option<Box<Rotation>>);

impl Recorded for CertEffect {
    fn record(&mut self) -> Change {
        Change::None
    }

    fn rotation(&mut self) -> Option<Box<Rotation>> {
        self.0.take()
    }
}

/// The identity domain: the identity in use, the settings to open trial sessions with.
pub(super) struct Certs {
    pub(super) ctx: CertContext,
    settings: SettingsWatch,
    host_id: String,
}

impl Domain for Certs {
    type Request = CertCommand;
    /// Identity commands run one at a time anyway (the pipeline is sequential).
    type Held<'a> = ();
    type Effect = CertEffect;

    async fn hold(&self) {}

    async fn execute(
        &self,
        _held: &mut Self::Held<'_>,
        id: &str,
        request: CertCommand,
    ) -> Result<(Executed, CertEffect), StateError> {
        Ok(match request {
            CertCommand::Request(req) => (self.request(*req).await, CertEffect(None)),
            CertCommand::Install(bundle) => {
                let (executed, rotation) = self.install(&bundle, id).await;
                (executed, CertEffect(rotation))
            }
        })
    }

    async fn roll_back(&self, _held: &mut Self::Held<'_>, _effect: &CertEffect) {}

    async fn commit(&self, _held: Self::Held<'_>, _effect: CertEffect) {}
}

impl Certs {
    pub(super) fn new(ctx: CertContext, settings: SettingsWatch, host_id: String) -> Certs {
        Certs {
            ctx,
            settings,
            host_id,
        }
    }

    /// `cert.request`: a new key pair kept as the pending key, the CSR in the ack.
    async fn request(&self, req: crate::certs::request::CertRequest) -> Executed {
        let dir = self.ctx.state_dir.clone();
        let made = tokio::task::spawn_blocking(move || {
            crate::certs::request::generate(&dir, &req).map(|csr| (csr, req))
        })
        .await
        .expect("key generation panicked");
        match made {
            Ok((csr_pem, req)) => {
                tracing::info!(subject_cn = %req.subject_cn, dns_names = ?req.dns_names, "new key pair made; CSR in the ack");
                Executed::applied(json!({ "csr_pem": csr_pem, "key_type": "ecdsa-p256",
                            "subject_cn": req.subject_cn, "dns_names": req.dns_names }))
            }
            Err(e) => Executed::failed(DispatchError::Request(e.to_string()), json!({})),
        }
    }

    /// `cert.install`, make-before-break: validate; open a session with the new identity;
    /// only once the broker took it, write the files and switch to them. Any failure
    /// before the switch changes nothing and the old session carries on.
    /// The bundle, with the pending key of the last cert.request when the command carries
    /// no key (then true).
    async fn with_pending_key(
        &self,
        bundle: &crate::certs::Bundle,
    ) -> (crate::certs::Bundle, bool) {
        let mut bundle = bundle.clone();
        if bundle.private_key_pem.is_some() {
            return (bundle, false);
        }
        let dir = self.ctx.state_dir.clone();
        match tokio::task::spawn_blocking(move || crate::certs::request::read_pending(&dir))
            .await
            .expect("pending key reader panicked")
        {
            Ok(key) => bundle.private_key_pem = key,
            Err(e) => tracing::error!(error = %e, "cannot read the pending key"),
        }
        (bundle, true)
    }

    /// A session with the new identity (make-before-break); `Err` says why there is none.
    async fn trial_session(
        &self,
        validated: &crate::certs::Validated,
        broker: &crate::config::BrokerConfig,
    ) -> Result<(crate::broker::Connector, crate::broker::Session), String> {
        let connector =
            crate::certs::tls::client_config(validated.roots.clone(), &validated.identity)
                .map_err(|e| e.to_string())
                .and_then(|tls| {
                    crate::broker::Connector::new(broker, tls, format!("rampart/{}", self.host_id))
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| format!("cannot use the new identity: {e}"))?;
        match connector.connect_first().await {
            Ok(session) => Ok((connector, session)),
            Err(why) => {
                tracing::warn!(error = %why, "trial session with the new identity failed");
                Err(format!(
                    "the broker did not accept a session with the new identity ({why}); the old identity stays"
                ))
            }
        }
    }

    /// Writes the new identity under the state directory and switches to it in one rename;
    /// the CA bundle and the files now in use.
    async fn write_identity(
        &self,
        validated: crate::certs::Validated,
        id: &str,
        from_request: bool,
        broker: crate::config::BrokerConfig,
    ) -> std::io::Result<(String, crate::certs::store::InUse)> {
        let state_dir = self.ctx.state_dir.clone();
        let command_id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let staged = crate::certs::store::stage(&state_dir, &validated, &command_id)?;
            crate::faults::crash_if(crate::faults::Fault::CrashMidCertRotation, &command_id);
            crate::certs::store::switch(&state_dir, &staged).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&staged);
            })?;
            if from_request {
                // Installed with its certificate; a pending key is good for one install.
                crate::certs::request::clear_pending(&state_dir);
            }
            let files = crate::certs::store::in_use(&state_dir, &broker);
            Ok((validated.ca_pem, files))
        })
        .await
        .expect("identity writer panicked")
    }

    async fn install(
        &self,
        bundle: &crate::certs::Bundle,
        id: &str,
    ) -> (Executed, Option<Box<Rotation>>) {
        let (bundle, from_request) = self.with_pending_key(bundle).await;
        let bundle = &bundle;
        let current = self.ctx.identity.read().expect("identity lock").clone();
        let external = self.settings.borrow().broker.auth == crate::config::AuthMechanism::External;
        let login_cn = current.info.common_name.as_deref().filter(|_| external);
        let validated = match crate::certs::validate(
            bundle,
            &self.host_id,
            login_cn,
            &current.ca_pem,
            rustls::pki_types::UnixTime::now(),
        ) {
            Ok(v) => v,
            Err(e) => return (Executed::failed(e, json!({})), None),
        };
        let info = validated.identity.info.clone();
        let described = json!({
            "subject": info.subject,
            "issuer": info.issuer,
            "serial": info.serial,
            "not_after": info.not_after,
            "sha256": info.sha256,
        });
        if info.sha256 == current.info.sha256 && validated.ca_pem == current.ca_pem {
            let executed = Executed::applied(json!({ "certificate": described, "noop": true }));
            return (executed, None);
        }
        let failed = |message: String| {
            Executed::failed(
                DispatchError::Rotation(message),
                json!({ "certificate": described }),
            )
        };
        // Make: a session with the new identity, against the configured brokers in turn.
        let broker = self.settings.borrow().broker.clone();
        let (connector, session) = match self.trial_session(&validated, &broker).await {
            Ok(made) => made,
            Err(why) => return (failed(why), None),
        };
        // Break: write the new identity, then switch to it in one rename.
        let (ca_pem, files) = match self
            .write_identity(validated, id, from_request, broker)
            .await
        {
            Ok(written) => written,
            Err(e) => {
                crate::broker::close_bounded(&session.connection, "identity not installed").await;
                return (failed(format!("cannot write the new identity: {e}")), None);
            }
        };
        tracing::info!(
            subject = %info.subject,
            serial = %info.serial,
            not_after = %info.not_after,
            cert = %files.cert.display(),
            "new identity installed; switching the broker session over"
        );
        *self.ctx.identity.write().expect("identity lock") = Current {
            info,
            files,
            ca_pem,
        };
        let executed = Executed::applied(json!({ "certificate": described }));
        (executed, Some(Box::new(Rotation { connector, session })))
    }
}
