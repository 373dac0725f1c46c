//! `cert.install` data: JSON -> [`Bundle`] (shape only; the PEM contents are checked by
//! `certs::validate`, against the host and the CA in use).

use serde_json::Value;

use super::ErrorCode;
use super::command::{
    Reject, as_object, as_str, child_path, deny_unknown, echo, invalid, missing, reject,
};
use crate::certs::request::CertRequest;
use crate::certs::{Bundle, MAX_PEM_BYTES};

fn pem_field(obj: &serde_json::Map<String, Value>, key: &str) -> Result<String, Reject> {
    let path = child_path("$.data", key);
    let s = as_str(obj.get(key).ok_or_else(|| missing("$.data", key))?, &path)?;
    if s.len() > MAX_PEM_BYTES {
        return Err(reject(
            ErrorCode::TooLarge,
            format!("{key} is {} bytes, over {MAX_PEM_BYTES}", s.len()),
            Some(path),
        ));
    }
    if s.trim().is_empty() {
        return Err(invalid(&path, format!("{key} is empty")));
    }
    Ok(s.to_string())
}

fn check_purpose(obj: &serde_json::Map<String, Value>) -> Result<(), Reject> {
    let purpose_path = child_path("$.data", "purpose");
    let purpose = as_str(
        obj.get("purpose")
            .ok_or_else(|| missing("$.data", "purpose"))?,
        &purpose_path,
    )?;
    if purpose != "broker-client" {
        return Err(invalid(
            &purpose_path,
            format!("purpose {} is not broker-client", echo(purpose)),
        ));
    }
    Ok(())
}

/// Most DNS names a `cert.request` may add to the CSR.
const MAX_DNS_NAMES: usize = 16;

/// A DNS name (or the CN): labels of [A-Za-z0-9-] (and `_`, as host ids allow), 1-253 in
/// all; no wildcard, no trailing dot.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

pub(super) fn decode_cert_request(data: &Value, host_id: &str) -> Result<CertRequest, Reject> {
    let obj = as_object(data, "$.data")?;
    deny_unknown(
        obj,
        &["purpose", "subject_cn", "dns_names", "key_type"],
        "$.data",
    )?;
    check_purpose(obj)?;
    if let Some(v) = obj.get("key_type") {
        let p = child_path("$.data", "key_type");
        let k = as_str(v, &p)?;
        if k != "ecdsa-p256" {
            return Err(invalid(
                &p,
                format!("key_type {} is not supported (ecdsa-p256)", echo(k)),
            ));
        }
    }
    let subject_cn = match obj.get("subject_cn") {
        None => host_id.to_string(),
        Some(v) => {
            let p = child_path("$.data", "subject_cn");
            let cn = as_str(v, &p)?;
            if !is_dns_name(cn) {
                return Err(invalid(
                    &p,
                    format!("subject_cn {} is not a host name", echo(cn)),
                ));
            }
            cn.to_string()
        }
    };
    let mut dns_names = vec![subject_cn.clone()];
    if let Some(v) = obj.get("dns_names") {
        let p = child_path("$.data", "dns_names");
        let list = super::command::as_array(v, &p)?;
        if list.len() > MAX_DNS_NAMES {
            return Err(reject(
                ErrorCode::TooMany,
                format!("more than {MAX_DNS_NAMES} dns_names"),
                Some(p),
            ));
        }
        for (i, e) in list.iter().enumerate() {
            let ep = format!("{p}[{i}]");
            let name = as_str(e, &ep)?;
            if !is_dns_name(name) {
                return Err(invalid(&ep, format!("{} is not a DNS name", echo(name))));
            }
            if !dns_names.iter().any(|n| n == name) {
                dns_names.push(name.to_string());
            }
        }
    }
    Ok(CertRequest {
        subject_cn,
        dns_names,
    })
}

pub(super) fn decode_cert_install(data: &Value) -> Result<Bundle, Reject> {
    let obj = as_object(data, "$.data")?;
    deny_unknown(
        obj,
        &["purpose", "certificate_pem", "private_key_pem", "ca_pem"],
        "$.data",
    )?;
    check_purpose(obj)?;
    let ca_pem = match obj.get("ca_pem") {
        None | Some(Value::Null) => None,
        Some(_) => Some(pem_field(obj, "ca_pem")?),
    };
    Ok(Bundle {
        certificate_pem: pem_field(obj, "certificate_pem")?,
        // Absent: the pending key of the last cert.request.
        private_key_pem: match obj.get("private_key_pem") {
            None | Some(Value::Null) => None,
            Some(_) => Some(pem_field(obj, "private_key_pem")?),
        },
        ca_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_name_the_host_and_refuse_odd_names() {
        let r = decode_cert_request(&json!({"purpose":"broker-client"}), "h1").unwrap();
        assert_eq!(r.subject_cn, "h1");
        assert_eq!(r.dns_names, vec!["h1"]);
        let r = decode_cert_request(
            &json!({"purpose":"broker-client","dns_names":["h1","h1.example"],"key_type":"ecdsa-p256"}),
            "h1",
        )
        .unwrap();
        assert_eq!(r.dns_names, vec!["h1", "h1.example"]);
        let field = |v: Value| decode_cert_request(&v, "h1").unwrap_err().field.unwrap();
        assert_eq!(
            field(json!({"purpose":"broker-client","key_type":"rsa-1024"})),
            "$.data.key_type"
        );
        assert_eq!(
            field(json!({"purpose":"broker-client","dns_names":["ok","*.evil"]})),
            "$.data.dns_names[1]"
        );
        assert_eq!(
            field(json!({"purpose":"broker-client","subject_cn":"a/b"})),
            "$.data.subject_cn"
        );
        assert_eq!(
            field(json!({"purpose":"broker-client","private_key_pem":"k"})),
            "$.data.private_key_pem"
        );
    }

    #[test]
    fn shape_is_checked() {
        let ok = json!({"purpose":"broker-client","certificate_pem":"c","private_key_pem":"k"});
        let b = decode_cert_install(&ok).unwrap();
        assert_eq!(b.ca_pem, None);
        let field = |v: Value| decode_cert_install(&v).unwrap_err().field.unwrap();
        assert_eq!(
            field(json!({"purpose":"web","certificate_pem":"c","private_key_pem":"k"})),
            "$.data.purpose"
        );
        assert_eq!(
            field(json!({"purpose":"broker-client","private_key_pem":"k"})),
            "$.data.certificate_pem"
        );
        let pending =
            decode_cert_install(&json!({"purpose":"broker-client","certificate_pem":"c"}));
        assert_eq!(pending.unwrap().private_key_pem, None);
        assert_eq!(
            field(
                json!({"purpose":"broker-client","certificate_pem":"c","private_key_pem":"k","x":1})
            ),
            "$.data.x"
        );
        assert_eq!(
            field(json!({"purpose":"broker-client","certificate_pem":"c","private_key_pem":" "})),
            "$.data.private_key_pem"
        );
        let big = "x".repeat(MAX_PEM_BYTES + 1);
        let r = decode_cert_install(
            &json!({"purpose":"broker-client","certificate_pem":big,"private_key_pem":"k"}),
        )
        .unwrap_err();
        assert_eq!(r.code, ErrorCode::TooLarge);
    }
}
