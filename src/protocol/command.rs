//! Command decoding: bytes and AMQP properties in, a checked [`Request`] or a precise
//! [`Rejection`] out. Security checks (size, sender, signature) run before the body is parsed.

use base64::Engine;
use serde_json::{Map, Value};

use super::strict_json::StrictError;
use super::{AckError, ErrorCode};

/// Longest key or value echoed back in an error message, so a hostile body cannot make the
/// ack or the log line huge.
const ECHO_MAX: usize = 64;

/// What the broker handed us, before any check.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    /// The body, as delivered.
    pub body: Vec<u8>,
    /// The AMQP `message_id`.
    pub message_id: Option<String>,
    /// The AMQP `type`.
    pub kind: Option<String>,
    /// The AMQP `user_id` (the broker checked it is the publisher's user).
    pub user_id: Option<String>,
    /// The `x-rampart-signature` header.
    pub signature: Option<String>,
}

/// What decoding needs to know about this agent.
#[derive(Debug, Clone)]
pub struct DecodeContext {
    /// The host commands must name.
    pub host_id: String,
    /// Broker users whose commands are accepted.
    pub trusted_senders: Vec<String>,
    /// Larger bodies are `too_large`.
    pub max_body_bytes: usize,
    /// When any: commands must be signed under one of them.
    pub signing_keys: Vec<ed25519_dalek::VerifyingKey>,
    /// A rule set's limits.
    pub limits: crate::firewall::spec::Limits,
    /// Oldest command accepted, by its `timestamp` (replay window).
    pub max_age_ms: u64,
}

/// How far a command's `timestamp` may lie in the future (clock skew between hosts).
pub const MAX_FUTURE_MS: u64 = 5 * 60 * 1000;

/// A command that passed every check of the contract.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command id (the dedup key).
    pub id: String,
    /// The manager that sent it.
    pub source: String,
    /// When it was sent (ms since the epoch).
    pub timestamp: u64,
    /// What it asks for.
    pub kind: RequestKind,
}

/// What a checked command asks for, one variant per command type.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestKind {
    /// `ping`.
    Ping,
    /// `counters`: the answer also carries every rule's packet and byte counts.
    StateSync {
        /// Every rule's counters in the answer too.
        counters: bool,
    },
    /// `firewall.apply`: a whole rule set.
    FirewallApply {
        /// The rule set, checked.
        rules: Box<crate::firewall::spec::RuleSet>,
        /// The `data` JSON as received, compact: what the snapshot stores.
        raw: String,
        /// Checked and planned only: nothing changed, nothing recorded.
        dry_run: bool,
    },
    /// `firewall.patch`: a change on top of the rule set in force.
    FirewallPatch {
        /// The patch, checked.
        patch: Box<crate::firewall::spec::Patch>,
        /// The `data` JSON as received, compact: what the journal stores.
        raw: String,
        /// Checked and planned only: nothing changed, nothing recorded.
        dry_run: bool,
    },
    /// `router.create`: make or converge a router.
    RouterCreate(Box<crate::router::spec::RouterSpec>),
    /// `cert.request`: a new key pair and its CSR.
    CertRequest(Box<crate::certs::request::CertRequest>),
    /// `cert.install`: a new identity, make-before-break.
    CertInstall(Box<crate::certs::Bundle>),
    /// `router.delete`.
    RouterDelete {
        /// The router's id.
        id: String,
    },
}

impl RequestKind {
    /// The command type, as the wire spells it.
    pub fn type_name(&self) -> &'static str {
        match self {
            RequestKind::Ping => "ping",
            RequestKind::StateSync { .. } => "state.sync",
            RequestKind::FirewallApply { .. } => "firewall.apply",
            RequestKind::FirewallPatch { .. } => "firewall.patch",
            RequestKind::RouterCreate(_) => "router.create",
            RequestKind::CertRequest(_) => "cert.request",
            RequestKind::CertInstall(_) => "cert.install",
            RequestKind::RouterDelete { .. } => "router.delete",
        }
    }
}

/// A command refused before it could have any effect.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The command's id, when it could be read.
    pub correlation_id: Option<String>,
    /// Its type, when it could be read.
    pub command_type: Option<String>,
    /// Why it was refused.
    pub error: AckError,
}

#[derive(Debug)]
pub(super) struct Reject {
    pub(super) code: ErrorCode,
    pub(super) message: String,
    pub(super) field: Option<String>,
}

pub(super) fn reject(code: ErrorCode, message: impl Into<String>, field: Option<String>) -> Reject {
    Reject {
        code,
        message: message.into(),
        field,
    }
}

/// The command id a delivery claims (AMQP `message_id`, else the body's `id`), learned
/// without any check that depends on configuration, so that a redelivery is recognised
/// even when the senders, keys or limits changed since it was first processed.
pub fn claimed_id(incoming: &Incoming) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    let id = match &incoming.message_id {
        Some(mid) => mid.clone(),
        None => serde_json::from_slice::<IdOnly>(&incoming.body).ok()?.id?,
    };
    valid_command_id(&id).then_some(id)
}

/// Checks one delivery against PROTOCOL.md section 3.
pub fn decode(ctx: &DecodeContext, incoming: &Incoming) -> Result<Request, Rejection> {
    let mut correlation_id = incoming.message_id.clone();
    let mut command_type = incoming.kind.clone();
    decode_inner(ctx, incoming, &mut correlation_id, &mut command_type).map_err(|r| Rejection {
        correlation_id,
        command_type,
        error: AckError {
            code: r.code,
            message: r.message,
            field: r.field,
        },
    })
}

fn decode_inner(
    ctx: &DecodeContext,
    incoming: &Incoming,
    correlation_id: &mut Option<String>,
    command_type: &mut Option<String>,
) -> Result<Request, Reject> {
    let obj = checked_object(ctx, incoming)?;
    // Learn the id and type first, so that every later rejection is correlated.
    if correlation_id.is_none()
        && let Some(Value::String(id)) = obj.get("id")
        && valid_command_id(id)
    {
        *correlation_id = Some(id.clone());
    }
    if command_type.is_none()
        && let Some(Value::String(t)) = obj.get("type")
        && t.len() <= ECHO_MAX
    {
        *command_type = Some(t.clone());
    }
    let (id, kind) = envelope_id_and_type(incoming, &obj)?;
    let (source, timestamp) = envelope_origin(ctx, &obj)?;
    let data = obj.get("data").ok_or_else(|| missing("$", "data"))?;
    Ok(Request {
        id: id.to_string(),
        source: source.to_string(),
        timestamp,
        kind: decode_kind(ctx, kind, data)?,
    })
}

/// The checks before parsing (size, sender, signature), then the body as a strict JSON
/// object.
fn checked_object(
    ctx: &DecodeContext,
    incoming: &Incoming,
) -> Result<serde_json::Map<String, Value>, Reject> {
    let body = &incoming.body;
    if body.len() > ctx.max_body_bytes {
        return Err(reject(
            ErrorCode::TooLarge,
            format!(
                "body is {} bytes, the limit is {}",
                body.len(),
                ctx.max_body_bytes
            ),
            None,
        ));
    }
    check_sender(ctx, incoming.user_id.as_deref())?;
    check_signature(ctx, body, incoming.signature.as_deref())?;

    let text = std::str::from_utf8(body).map_err(|e| {
        reject(
            ErrorCode::InvalidUtf8,
            format!(
                "body is not UTF-8: invalid byte at offset {}",
                e.valid_up_to()
            ),
            None,
        )
    })?;
    let value = super::strict_json::parse(text).map_err(|e| match e {
        StrictError::Syntax(e) => reject(
            ErrorCode::InvalidJson,
            format!("body is not JSON: {e}"),
            None,
        ),
        StrictError::DuplicateKey(path) => reject(
            ErrorCode::DuplicateKey,
            format!("key {path} appears more than once"),
            Some(path),
        ),
    })?;
    let Value::Object(obj) = value else {
        return Err(reject(
            ErrorCode::NotAnObject,
            "body must be a JSON object",
            Some("$".into()),
        ));
    };
    Ok(obj)
}

/// The envelope's fields known, its version, id and type checked (against the AMQP
/// properties too).
fn envelope_id_and_type<'a>(
    incoming: &Incoming,
    obj: &'a serde_json::Map<String, Value>,
) -> Result<(&'a str, &'a str), Reject> {
    const ENVELOPE: [&str; 7] = [
        "specversion",
        "id",
        "type",
        "source",
        "host",
        "timestamp",
        "data",
    ];
    deny_unknown(obj, &ENVELOPE, "$")?;

    let specversion = required_str(obj, "specversion", "$")?;
    if specversion != "1.0" {
        return Err(reject(
            ErrorCode::UnsupportedVersion,
            format!(
                "specversion {} is not supported (expected \"1.0\")",
                echo(specversion)
            ),
            Some("$.specversion".into()),
        ));
    }
    let id = required_str(obj, "id", "$")?;
    if !valid_command_id(id) {
        return Err(reject(
            ErrorCode::InvalidField,
            "id must be 1-128 printable ASCII characters",
            Some("$.id".into()),
        ));
    }
    if let Some(mid) = &incoming.message_id
        && mid != id
    {
        return Err(reject(
            ErrorCode::IdMismatch,
            format!(
                "body id {} differs from AMQP message_id {}",
                echo(id),
                echo(mid)
            ),
            Some("$.id".into()),
        ));
    }
    let kind = required_str(obj, "type", "$")?;
    if let Some(t) = &incoming.kind
        && t != kind
    {
        return Err(reject(
            ErrorCode::TypeMismatch,
            format!(
                "body type {} differs from AMQP type {}",
                echo(kind),
                echo(t)
            ),
            Some("$.type".into()),
        ));
    }
    Ok((id, kind))
}

/// The envelope's source, host and timestamp checked.
fn envelope_origin<'a>(
    ctx: &DecodeContext,
    obj: &'a serde_json::Map<String, Value>,
) -> Result<(&'a str, u64), Reject> {
    let source = required_str(obj, "source", "$")?;
    if source.is_empty() || source.chars().count() > 256 || source.chars().any(char::is_control) {
        return Err(reject(
            ErrorCode::InvalidField,
            "source must be 1-256 characters without control characters",
            Some("$.source".into()),
        ));
    }
    let host = required_str(obj, "host", "$")?;
    if host != ctx.host_id {
        return Err(reject(
            ErrorCode::WrongHost,
            format!(
                "command is for host {}, this is {}",
                echo(host),
                ctx.host_id
            ),
            Some("$.host".into()),
        ));
    }
    let timestamp = match obj.get("timestamp") {
        None => return Err(missing("$", "timestamp")),
        Some(v) => v.as_u64().ok_or_else(|| {
            reject(
                ErrorCode::InvalidField,
                "timestamp must be a non-negative integer (milliseconds since the epoch)",
                Some("$.timestamp".into()),
            )
        })?,
    };
    check_timestamp(ctx, timestamp, crate::ids::now_ms())?;
    Ok((source, timestamp))
}

/// The data of a command of type `kind`, decoded by its domain's decoder.
fn decode_kind(ctx: &DecodeContext, kind: &str, data: &Value) -> Result<RequestKind, Reject> {
    Ok(match kind {
        "ping" => {
            empty_object(data, "$.data")?;
            RequestKind::Ping
        }
        "state.sync" => RequestKind::StateSync {
            counters: state_sync_counters(data)?,
        },
        "firewall.apply" => RequestKind::FirewallApply {
            rules: Box::new(super::firewall::decode_rule_set(data, &ctx.limits)?),
            raw: data.to_string(),
            dry_run: super::firewall::is_dry_run(data),
        },
        "firewall.patch" => RequestKind::FirewallPatch {
            patch: Box::new(super::firewall::decode_patch(data, &ctx.limits)?),
            raw: data.to_string(),
            dry_run: super::firewall::is_dry_run(data),
        },
        "cert.request" => RequestKind::CertRequest(Box::new(super::cert::decode_cert_request(
            data,
            &ctx.host_id,
        )?)),
        "cert.install" => {
            RequestKind::CertInstall(Box::new(super::cert::decode_cert_install(data)?))
        }
        "router.create" => RequestKind::RouterCreate(Box::new(super::router::decode_router(data)?)),
        "router.delete" => RequestKind::RouterDelete {
            id: super::router::decode_router_delete(data)?,
        },
        other => {
            return Err(reject(
                ErrorCode::UnknownType,
                format!("command type {} is not handled by this agent", echo(other)),
                Some("$.type".into()),
            ));
        }
    })
}

/// The replay window of PROTOCOL.md section 3.
fn check_timestamp(ctx: &DecodeContext, timestamp: u64, now: u64) -> Result<(), Reject> {
    let field = Some("$.timestamp".to_string());
    if timestamp > now.saturating_add(MAX_FUTURE_MS) {
        return Err(reject(
            ErrorCode::BadTimestamp,
            format!(
                "timestamp is {} ms in the future (at most {MAX_FUTURE_MS} allowed)",
                timestamp - now
            ),
            field,
        ));
    }
    let age = now.saturating_sub(timestamp);
    if age > ctx.max_age_ms {
        return Err(reject(
            ErrorCode::BadTimestamp,
            format!(
                "command is {age} ms old, older than commands.max_age_ms ({})",
                ctx.max_age_ms
            ),
            field,
        ));
    }
    Ok(())
}

fn check_sender(ctx: &DecodeContext, user_id: Option<&str>) -> Result<(), Reject> {
    match user_id {
        None => Err(reject(
            ErrorCode::UntrustedSender,
            "no user_id property: the broker cannot vouch for the sender",
            None,
        )),
        Some(u) if ctx.trusted_senders.iter().any(|t| t == u) => Ok(()),
        Some(u) => Err(reject(
            ErrorCode::UntrustedSender,
            format!("sender {} is not a trusted sender", echo(u)),
            None,
        )),
    }
}

fn check_signature(ctx: &DecodeContext, body: &[u8], header: Option<&str>) -> Result<(), Reject> {
    if ctx.signing_keys.is_empty() {
        return Ok(());
    }
    let Some(header) = header else {
        return Err(reject(
            ErrorCode::MissingSignature,
            "signing keys are configured and the command has no x-rampart-signature header",
            None,
        ));
    };
    let bad = |why: &str| reject(ErrorCode::BadSignature, why.to_string(), None);
    let raw = base64::engine::general_purpose::STANDARD
        .decode(header.trim())
        .map_err(|_| bad("x-rampart-signature is not base64"))?;
    let sig = ed25519_dalek::Signature::from_slice(&raw)
        .map_err(|_| bad("x-rampart-signature is not a 64-byte Ed25519 signature"))?;
    if ctx
        .signing_keys
        .iter()
        .any(|k| k.verify_strict(body, &sig).is_ok())
    {
        Ok(())
    } else {
        Err(bad(
            "signature does not verify with any configured signing key",
        ))
    }
}

fn valid_command_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// A value quoted for a one-line message, shortened so hostile input stays small.
pub(super) fn invalid(path: &str, message: impl Into<String>) -> Reject {
    reject(ErrorCode::InvalidField, message, Some(path.to_string()))
}

pub(super) fn as_object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, Reject> {
    v.as_object()
        .ok_or_else(|| invalid(path, "must be an object"))
}

pub(super) fn as_array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>, Reject> {
    v.as_array()
        .ok_or_else(|| invalid(path, "must be an array"))
}

pub(super) fn as_str<'a>(v: &'a Value, path: &str) -> Result<&'a str, Reject> {
    v.as_str().ok_or_else(|| invalid(path, "must be a string"))
}

pub(super) fn u64_field(obj: &Map<String, Value>, key: &str, parent: &str) -> Result<u64, Reject> {
    obj.get(key)
        .ok_or_else(|| missing(parent, key))?
        .as_u64()
        .ok_or_else(|| {
            invalid(
                &child_path(parent, key),
                format!("{key} must be a non-negative integer"),
            )
        })
}

pub(super) fn echo(s: &str) -> String {
    let short: String = s.chars().take(ECHO_MAX).collect();
    if short.len() < s.len() {
        format!("{short:?}...")
    } else {
        format!("{short:?}")
    }
}

/// JSON path of `key` under `parent`, in bracket form when the key is not a plain name.
pub(super) fn child_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= ECHO_MAX
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        format!("{parent}.{key}")
    } else {
        format!("{parent}[{}]", echo(key))
    }
}

pub(super) fn missing(parent: &str, key: &str) -> Reject {
    reject(
        ErrorCode::MissingField,
        format!("required field {key} is missing"),
        Some(child_path(parent, key)),
    )
}

pub(super) fn deny_unknown(
    obj: &Map<String, Value>,
    allowed: &[&str],
    parent: &str,
) -> Result<(), Reject> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(reject(
            ErrorCode::UnknownField,
            format!("unknown field {}", echo(k)),
            Some(child_path(parent, k)),
        )),
        None => Ok(()),
    }
}

pub(super) fn required_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    parent: &str,
) -> Result<&'a str, Reject> {
    match obj.get(key) {
        None => Err(missing(parent, key)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(reject(
            ErrorCode::InvalidField,
            format!("{key} must be a string"),
            Some(child_path(parent, key)),
        )),
    }
}

/// `state.sync` data: `{}`, or `{"counters": true}` for the rules' counters too.
fn state_sync_counters(v: &Value) -> Result<bool, Reject> {
    empty_object_but(v, "$.data", &["counters"])?;
    match v.get("counters") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(reject(
            ErrorCode::InvalidField,
            "counters must be true or false",
            Some("$.data.counters".into()),
        )),
    }
}

fn empty_object(v: &Value, path: &str) -> Result<(), Reject> {
    empty_object_but(v, path, &[])
}

fn empty_object_but(v: &Value, path: &str, allowed: &[&str]) -> Result<(), Reject> {
    match v {
        Value::Object(m) => deny_unknown(m, allowed, path),
        _ => Err(reject(
            ErrorCode::InvalidField,
            "data must be an object",
            Some(path.to_string()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer;

    fn ctx() -> DecodeContext {
        DecodeContext {
            host_id: "host-1".into(),
            trusted_senders: vec!["manager".into()],
            max_body_bytes: 1024,
            signing_keys: vec![],
            limits: Default::default(),
            max_age_ms: u64::MAX,
        }
    }

    fn incoming(body: &str) -> Incoming {
        Incoming {
            body: body.as_bytes().to_vec(),
            user_id: Some("manager".into()),
            ..Default::default()
        }
    }

    fn ping(extra: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"c1","type":"ping","source":"m","host":"host-1","timestamp":1,"data":{{}}{extra}}}"#
        )
    }

    fn code_of(r: Result<Request, Rejection>) -> (ErrorCode, Option<String>) {
        let e = r.unwrap_err().error;
        (e.code, e.field)
    }

    #[test]
    fn valid_ping_decodes() {
        let r = decode(&ctx(), &incoming(&ping(""))).unwrap();
        assert_eq!(r.kind, RequestKind::Ping);
        assert_eq!(r.id, "c1");
        assert_eq!(r.timestamp, 1);
    }

    #[test]
    fn timestamps_outside_the_window_are_bad() {
        let mut c = ctx();
        c.max_age_ms = 7_500_000;
        let now = crate::ids::now_ms();
        let at = |ts: u64| ping("").replace(r#""timestamp":1"#, &format!(r#""timestamp":{ts}"#));
        for ok in [now, now - 7_400_000, now + 60_000] {
            assert!(decode(&c, &incoming(&at(ok))).is_ok(), "{ok}");
        }
        for bad in [1, now - 7_600_000, now + 6 * 60_000] {
            let (code, field) = code_of(decode(&c, &incoming(&at(bad))));
            assert_eq!(code, ErrorCode::BadTimestamp, "{bad}");
            assert_eq!(field.as_deref(), Some("$.timestamp"));
        }
    }

    #[test]
    fn a_repeated_key_is_rejected_with_its_path() {
        let twice = ping("").replace(r#""host":"host-1","#, r#""host":"host-1","host":"host-2","#);
        let r = decode(&ctx(), &incoming(&twice)).unwrap_err();
        assert_eq!(r.error.code, ErrorCode::DuplicateKey);
        assert_eq!(r.error.field.as_deref(), Some("$.host"));
        // Still correlated, so the manager learns why.
        assert_eq!(r.correlation_id, None);
        let deep = r#"{"specversion":"1.0","id":"c1","type":"firewall.apply","source":"m","host":"host-1","timestamp":1,"data":{"generation":1,"rules":[{"id":"r1","priority":1,"action":"drop","action":"allow","direction":"in"}]}}"#;
        let (code, field) = code_of(decode(&ctx(), &incoming(deep)));
        assert_eq!(code, ErrorCode::DuplicateKey);
        assert_eq!(field.as_deref(), Some("$.data.rules[0].action"));
    }

    /// Found by the `decode` fuzz target: a repeated key deep in the tree gave a path (and a
    /// message) of kilobytes.
    #[test]
    fn a_repeated_key_deep_down_still_gives_a_short_line() {
        let key = format!("k{}", "x".repeat(60));
        let mut data = r#"{"d":1,"d":2}"#.to_string();
        for _ in 0..100 {
            data = format!(r#"{{"{key}":{data}}}"#);
        }
        let body = ping("").replace(r#""data":{}"#, &format!(r#""data":{data}"#));
        let mut c = ctx();
        c.max_body_bytes = 1 << 20;
        let e = decode(&c, &incoming(&body)).unwrap_err().error;
        assert_eq!(e.code, ErrorCode::DuplicateKey);
        assert!(e.message.len() < 600, "{} bytes", e.message.len());
        assert!(
            e.field.as_ref().is_some_and(|f| f.len() <= 256),
            "{:?}",
            e.field
        );
        assert!(e.field.unwrap().starts_with("$.data.k"));
    }

    #[test]
    fn every_malformation_has_its_code_and_field() {
        let c = ctx();
        let cases: Vec<(String, ErrorCode, Option<&str>)> = vec![
            ("{".into(), ErrorCode::InvalidJson, None),
            ("[1]".into(), ErrorCode::NotAnObject, Some("$")),
            (ping(r#","x":1"#), ErrorCode::UnknownField, Some("$.x")),
            (
                ping("").replace(r#""data":{}"#, r#""data":{"a b":1}"#),
                ErrorCode::UnknownField,
                Some("$.data[\"a b\"]"),
            ),
            (
                ping("").replace("host-1", "host-2"),
                ErrorCode::WrongHost,
                Some("$.host"),
            ),
            (
                ping("").replace(r#""ping""#, r#""router.teleport""#),
                ErrorCode::UnknownType,
                Some("$.type"),
            ),
            (
                ping("").replace(r#""1.0""#, r#""2.0""#),
                ErrorCode::UnsupportedVersion,
                Some("$.specversion"),
            ),
            (
                ping("").replace(r#""timestamp":1,"#, ""),
                ErrorCode::MissingField,
                Some("$.timestamp"),
            ),
            (
                ping("").replace(r#""timestamp":1"#, r#""timestamp":-1"#),
                ErrorCode::InvalidField,
                Some("$.timestamp"),
            ),
            (
                ping("").replace(r#""c1""#, r#""""#),
                ErrorCode::InvalidField,
                Some("$.id"),
            ),
            (
                ping("").replace(r#""data":{}"#, r#""data":[]"#),
                ErrorCode::InvalidField,
                Some("$.data"),
            ),
        ];
        for (body, code, field) in cases {
            let (got, got_field) = code_of(decode(&c, &incoming(&body)));
            assert_eq!(got, code, "{body}");
            assert_eq!(got_field.as_deref(), field, "{body}");
        }
    }

    #[test]
    fn size_utf8_and_sender_are_checked_first() {
        let c = ctx();
        let big = Incoming {
            body: vec![b'x'; 1025],
            ..incoming("")
        };
        assert_eq!(code_of(decode(&c, &big)).0, ErrorCode::TooLarge);
        let bad_utf8 = Incoming {
            body: vec![b'{', 0xff, b'}'],
            ..incoming("")
        };
        assert_eq!(code_of(decode(&c, &bad_utf8)).0, ErrorCode::InvalidUtf8);
        let anonymous = Incoming {
            user_id: None,
            ..incoming(&ping(""))
        };
        assert_eq!(
            code_of(decode(&c, &anonymous)).0,
            ErrorCode::UntrustedSender
        );
        let stranger = Incoming {
            user_id: Some("host-2".into()),
            ..incoming(&ping(""))
        };
        assert_eq!(code_of(decode(&c, &stranger)).0, ErrorCode::UntrustedSender);
    }

    #[test]
    fn amqp_properties_must_agree_with_the_body() {
        let c = ctx();
        let m = Incoming {
            message_id: Some("other".into()),
            ..incoming(&ping(""))
        };
        let r = decode(&c, &m).unwrap_err();
        assert_eq!(r.error.code, ErrorCode::IdMismatch);
        assert_eq!(r.correlation_id.as_deref(), Some("other"));
        let t = Incoming {
            kind: Some("state.sync".into()),
            ..incoming(&ping(""))
        };
        assert_eq!(code_of(decode(&c, &t)).0, ErrorCode::TypeMismatch);
    }

    #[test]
    fn rejections_are_correlated_by_body_id_when_possible() {
        let r = decode(&ctx(), &incoming(&ping(r#","bogus":true"#))).unwrap_err();
        assert_eq!(r.correlation_id.as_deref(), Some("c1"));
        assert_eq!(r.command_type.as_deref(), Some("ping"));
    }

    #[test]
    fn hostile_keys_are_echoed_short_and_escaped() {
        let key = format!("{}\n\"; drop", "k".repeat(500));
        let body = ping(&format!(r#",{}:1"#, serde_json::to_string(&key).unwrap()));
        let e = decode(&ctx(), &incoming(&body)).unwrap_err().error;
        assert_eq!(e.code, ErrorCode::UnknownField);
        assert!(e.message.len() < 200, "{}", e.message);
        assert!(!e.message.contains('\n'));
    }

    #[test]
    fn signatures_are_enforced_when_keys_are_configured() {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let mut c = ctx();
        c.signing_keys = vec![sk.verifying_key()];
        let body = ping("");
        assert_eq!(
            code_of(decode(&c, &incoming(&body))).0,
            ErrorCode::MissingSignature
        );
        let sig =
            base64::engine::general_purpose::STANDARD.encode(sk.sign(body.as_bytes()).to_bytes());
        let signed = Incoming {
            signature: Some(sig.clone()),
            ..incoming(&body)
        };
        assert!(decode(&c, &signed).is_ok());
        let tampered = Incoming {
            signature: Some(sig),
            ..incoming(&body.replace("\"m\"", "\"n\""))
        };
        assert_eq!(code_of(decode(&c, &tampered)).0, ErrorCode::BadSignature);
    }
}

/// Hostile input: random bytes and mutated valid commands never panic, and every rejection
/// stays one short line.
#[cfg(test)]
mod robustness {
    use super::*;

    /// A small deterministic generator (xorshift64*): repeatable without a crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn ctx() -> DecodeContext {
        DecodeContext {
            host_id: "host-1".into(),
            trusted_senders: vec!["manager".into()],
            max_body_bytes: 1 << 20,
            signing_keys: vec![],
            limits: Default::default(),
            max_age_ms: u64::MAX,
        }
    }

    const SEEDS: [&str; 7] = [
        r#"{"specversion":"1.0","id":"c1","type":"ping","source":"m","host":"host-1","timestamp":1,"data":{}}"#,
        r#"{"specversion":"1.0","id":"c2","type":"firewall.apply","source":"m","host":"host-1","timestamp":1,"data":{"generation":2,"defaults":{"in":"drop"},"address_sets":{"web":["10.0.0.0/24","2001:db8::1"]},"rules":[{"id":"r1","priority":1,"action":"reject","direction":"both","protocol":"tcp","ports":["22","80-90"],"sources":["$web"],"applied_to":["tap*"],"log":true,"comment":"x"}]}}"#,
        r#"{"specversion":"1.0","id":"c3","type":"firewall.patch","source":"m","host":"host-1","timestamp":1,"data":{"base_generation":2,"generation":3,"add_addresses":{"web":["10.0.1.1"]},"delete_rules":["r1"],"upsert_rules":[{"id":"r2","priority":5,"action":"allow","direction":"in"}]}}"#,
        r#"{"specversion":"1.0","id":"c4","type":"router.create","source":"m","host":"host-1","timestamp":1,"data":{"id":"lr1","interfaces":[{"name":"lif0","addresses":["192.168.10.1/24","fd00::1/64"],"mtu":1500,"bridge":"br-tenant"}],"routes":[{"destination":"0.0.0.0/0","via":"192.168.10.254"}]}}"#,
        r#"{"specversion":"1.0","id":"c5","type":"router.delete","source":"m","host":"host-1","timestamp":1,"data":{"id":"lr1"}}"#,
        r#"{"specversion":"1.0","id":"c7","type":"cert.request","source":"m","host":"host-1","timestamp":1,"data":{"purpose":"broker-client","subject_cn":"host-1","dns_names":["host-1.example"],"key_type":"ecdsa-p256"}}"#,
        r#"{"specversion":"1.0","id":"c6","type":"cert.install","source":"m","host":"host-1","timestamp":1,"data":{"purpose":"broker-client","certificate_pem":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n","private_key_pem":"-----BEGIN PRIVATE KEY-----\nMC4C\n-----END PRIVATE KEY-----\n","ca_pem":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}}"#,
    ];

    const TOKENS: [&str; 14] = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        "\\u0000",
        "null",
        "-1",
        "1e999",
        "\"$x\"",
        "\"10.0.0.0/33\"",
        "\u{ff}",
    ];

    fn check(body: Vec<u8>) {
        let incoming = Incoming {
            body,
            user_id: Some("manager".into()),
            ..Default::default()
        };
        if let Err(r) = decode(&ctx(), &incoming) {
            assert!(!r.error.message.contains('\n'), "{:?}", r.error.message);
            assert!(r.error.message.len() < 600, "{:?}", r.error.message);
        }
    }

    #[test]
    fn mutated_and_random_bodies_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut body = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(body.len() + 1);
                match rng.below(4) {
                    0 if !body.is_empty() => {
                        let i = rng.below(body.len());
                        body[i] ^= 1 << rng.below(8);
                    }
                    1 => body.truncate(at),
                    2 => {
                        let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                        body.splice(at..at, t.iter().copied());
                    }
                    _ => {
                        let end = (at + rng.below(16)).min(body.len());
                        body.drain(at..end);
                    }
                }
            }
            check(body);
        }
        for _ in 0..5_000 {
            let len = rng.below(64);
            check((0..len).map(|_| rng.next() as u8).collect());
        }
    }

    /// Replaces, removes or adds one node somewhere in the tree.
    fn mutate(v: &mut Value, rng: &mut Rng) {
        let replacements = [
            Value::Null,
            Value::Bool(true),
            serde_json::json!(-1),
            serde_json::json!(u64::MAX),
            serde_json::json!(1.5),
            serde_json::json!(""),
            serde_json::json!("$web"),
            serde_json::json!("x\"; flush ruleset"),
            serde_json::json!("10.0.0.1/8"),
            serde_json::json!("::/0"),
            serde_json::json!("65536"),
            serde_json::json!("*"),
            serde_json::json!([]),
            serde_json::json!({}),
            serde_json::json!(["10.0.0.0/24", "$nope"]),
        ];
        match v {
            Value::Object(m) if !m.is_empty() && rng.below(3) > 0 => {
                let keys: Vec<String> = m.keys().cloned().collect();
                let k = &keys[rng.below(keys.len())];
                match rng.below(4) {
                    0 => {
                        m.remove(k);
                    }
                    1 => {
                        m.insert(
                            format!("{k}x"),
                            replacements[rng.below(replacements.len())].clone(),
                        );
                    }
                    _ => mutate(m.get_mut(k).expect("key exists"), rng),
                }
            }
            Value::Array(a) if !a.is_empty() && rng.below(3) > 0 => {
                let i = rng.below(a.len());
                if rng.below(4) == 0 {
                    let dup = a[i].clone();
                    a.push(dup);
                } else {
                    mutate(&mut a[i], rng);
                }
            }
            _ => *v = replacements[rng.below(replacements.len())].clone(),
        }
    }

    #[test]
    fn structurally_mutated_commands_never_panic() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let mut v: Value = serde_json::from_str(SEEDS[rng.below(SEEDS.len())]).expect("seed");
            for _ in 0..1 + rng.below(3) {
                // Mostly below the top level, where the interesting checks are.
                let keys: Vec<String> = v
                    .as_object()
                    .expect("seed is an object")
                    .keys()
                    .cloned()
                    .collect();
                if keys.is_empty() {
                    break;
                }
                let k = &keys[rng.below(keys.len())];
                if rng.below(8) == 0 {
                    mutate(&mut v, &mut rng);
                } else {
                    mutate(v.get_mut(k.as_str()).expect("key exists"), &mut rng);
                }
                if !v.is_object() {
                    break;
                }
            }
            check(serde_json::to_vec(&v).expect("serialises"));
        }
    }
}
