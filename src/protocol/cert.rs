//! `cert.install` data: JSON -> [`Bundle`] (shape only; the PEM contents are checked by
//! `certs::validate`, against the host and the CA in use).

use serde_json::Value;

use super::ErrorCode;
use super::command::{
    Reject, as_object, as_str, child_path, deny_unknown, echo, invalid, missing, reject,
};
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

pub(super) fn decode_cert_install(data: &Value) -> Result<Bundle, Reject> {
    let obj = as_object(data, "$.data")?;
    deny_unknown(
        obj,
        &["purpose", "certificate_pem", "private_key_pem", "ca_pem"],
        "$.data",
    )?;
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
    let ca_pem = match obj.get("ca_pem") {
        None | Some(Value::Null) => None,
        Some(_) => Some(pem_field(obj, "ca_pem")?),
    };
    Ok(Bundle {
        certificate_pem: pem_field(obj, "certificate_pem")?,
        private_key_pem: pem_field(obj, "private_key_pem")?,
        ca_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
