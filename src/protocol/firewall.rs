//! `firewall.apply` and `firewall.patch` data: JSON -> checked [`RuleSet`] / [`Patch`], each
//! violation with its code and JSON path.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::ErrorCode;
use super::command::{
    Reject, as_array, as_object, as_str, child_path, deny_unknown, echo, invalid, missing, reject,
    u64_field,
};
use crate::firewall::spec::{
    Action, Addr, Defaults, Direction, Established, Iface, Limits, PartialDefaults, Patch, Policy,
    PortRange, Protocol, Rule, RuleSet, is_valid_iface, is_valid_rule_id, is_valid_set_name,
    parse_net,
};

const COMMENT_MAX: usize = 256;

fn bool_field(obj: &Map<String, Value>, key: &str, parent: &str) -> Result<bool, Reject> {
    match obj.get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(
            &child_path(parent, key),
            format!("{key} must be true or false"),
        )),
    }
}

fn enum_field<T: Copy>(
    obj: &Map<String, Value>,
    key: &str,
    parent: &str,
    default: Option<T>,
    choices: &[(&str, T)],
) -> Result<T, Reject> {
    let path = || child_path(parent, key);
    let Some(v) = obj.get(key) else {
        return default.ok_or_else(|| missing(parent, key));
    };
    let s = match v.as_str() {
        Some(s) => s,
        None => as_str(v, &path())?,
    };
    choices
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            invalid(
                &path(),
                format!("{} is not one of {}", echo(s), names.join(", ")),
            )
        })
}

const POLICIES: [(&str, Policy); 2] = [("allow", Policy::Allow), ("drop", Policy::Drop)];

const ESTABLISHED: [(&str, Established); 2] =
    [("cut", Established::Cut), ("keep", Established::Keep)];

/// `"established"` of a rule set or patch: `None` when absent.
fn established(obj: &Map<String, Value>, parent: &str) -> Result<Option<Established>, Reject> {
    match obj.get("established") {
        None => Ok(None),
        Some(_) => enum_field(obj, "established", parent, None, &ESTABLISHED).map(Some),
    }
}

fn defaults(v: &Value, path: &str) -> Result<PartialDefaults, Reject> {
    let obj = as_object(v, path)?;
    deny_unknown(obj, &["in", "out", "forward"], path)?;
    let get = |k: &str| -> Result<Option<Policy>, Reject> {
        match obj.get(k) {
            None => Ok(None),
            Some(_) => enum_field(obj, k, path, None, &POLICIES).map(Some),
        }
    };
    Ok(PartialDefaults {
        input: get("in")?,
        output: get("out")?,
        forward: get("forward")?,
    })
}

fn set_name(s: &str, path: &str) -> Result<String, Reject> {
    if is_valid_set_name(s) {
        Ok(s.to_string())
    } else {
        Err(invalid(
            path,
            format!(
                "set name {} does not match ^[A-Za-z][A-Za-z0-9_-]{{0,30}}$",
                echo(s)
            ),
        ))
    }
}

fn elements(v: &Value, path: &str) -> Result<BTreeSet<IpNet>, Reject> {
    let mut out = BTreeSet::new();
    for (i, e) in as_array(v, path)?.iter().enumerate() {
        // The element's path only when it is wrong: 100 000 of them are decoded per set
        // sometimes, and formatting each path cost more than parsing the address.
        let at = || format!("{path}[{i}]");
        let s = match e.as_str() {
            Some(s) => s,
            None => as_str(e, &at())?,
        };
        out.insert(parse_net(s).map_err(|m| invalid(&at(), m))?);
    }
    Ok(out)
}

/// `{"name": ["addr", ...]}` maps of sets.
fn set_map(v: &Value, path: &str) -> Result<BTreeMap<String, BTreeSet<IpNet>>, Reject> {
    let mut out = BTreeMap::new();
    for (name, elems) in as_object(v, path)? {
        let p = child_path(path, name);
        out.insert(set_name(name, &p)?, elements(elems, &p)?);
    }
    Ok(out)
}

fn addrs(v: Option<&Value>, parent: &str, key: &str) -> Result<Vec<Addr>, Reject> {
    let Some(v) = v else { return Ok(vec![]) };
    let path = || child_path(parent, key);
    let mut out = vec![];
    for (i, e) in as_array(v, &path())?.iter().enumerate() {
        let p = || format!("{}[{i}]", path());
        let s = match e.as_str() {
            Some(s) => s,
            None => as_str(e, &p())?,
        };
        out.push(match s.strip_prefix('$') {
            Some(name) => Addr::Set(set_name(name, &p())?),
            None => Addr::Net(parse_net(s).map_err(|m| invalid(&p(), m))?),
        });
    }
    Ok(out)
}

fn port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p > 0)
}

fn ports(v: Option<&Value>, parent: &str, key: &str) -> Result<Vec<PortRange>, Reject> {
    let Some(v) = v else { return Ok(vec![]) };
    let path = || child_path(parent, key);
    let mut out = vec![];
    for (i, e) in as_array(v, &path())?.iter().enumerate() {
        let p = || format!("{}[{i}]", path());
        let s = match e.as_str() {
            Some(s) => s,
            None => as_str(e, &p())?,
        };
        let range = match s.split_once('-') {
            None => port(s).map(|x| PortRange { lo: x, hi: x }),
            Some((a, b)) => match (port(a), port(b)) {
                (Some(lo), Some(hi)) if lo <= hi => Some(PortRange { lo, hi }),
                _ => None,
            },
        };
        out.push(range.ok_or_else(|| {
            invalid(
                &p(),
                format!(
                    "{} is not a port (1-65535) or an ascending range a-b",
                    echo(s)
                ),
            )
        })?);
    }
    Ok(out)
}

fn ifaces(v: Option<&Value>, parent: &str, key: &str) -> Result<Vec<Iface>, Reject> {
    let Some(v) = v else { return Ok(vec![]) };
    let path = || child_path(parent, key);
    let mut out = vec![];
    for (i, e) in as_array(v, &path())?.iter().enumerate() {
        let p = || format!("{}[{i}]", path());
        let s = match e.as_str() {
            Some(s) => s,
            None => as_str(e, &p())?,
        };
        if !is_valid_iface(s) {
            return Err(invalid(
                &p(),
                format!(
                    "{} is not an interface name (1-15 of [A-Za-z0-9_.-], optional trailing *)",
                    echo(s)
                ),
            ));
        }
        out.push(Iface(s.to_string()));
    }
    Ok(out)
}

const RULE_KEYS: [&str; 12] = [
    "id",
    "priority",
    "action",
    "direction",
    "protocol",
    "sources",
    "destinations",
    "ports",
    "applied_to",
    "log",
    "disabled",
    "comment",
];

/// A rule's `id`, checked.
fn rule_id<'a>(obj: &'a serde_json::Map<String, Value>, path: &str) -> Result<&'a str, Reject> {
    let id_path = || child_path(path, "id");
    let id = obj.get("id").ok_or_else(|| missing(path, "id"))?;
    let id = match id.as_str() {
        Some(id) => id,
        None => as_str(id, &id_path())?,
    };
    if !is_valid_rule_id(id) {
        return Err(invalid(
            &id_path(),
            format!(
                "rule id {} does not match ^[A-Za-z0-9][A-Za-z0-9._:-]{{0,63}}$",
                echo(id)
            ),
        ));
    }
    Ok(id)
}

/// A rule's `comment` (empty when absent), at most [`COMMENT_MAX`] characters.
fn comment(obj: &serde_json::Map<String, Value>, path: &str) -> Result<String, Reject> {
    Ok(match obj.get("comment") {
        None => String::new(),
        Some(v) => {
            let p = child_path(path, "comment");
            let s = as_str(v, &p)?;
            if s.chars().count() > COMMENT_MAX {
                return Err(invalid(
                    &p,
                    format!("comment is longer than {COMMENT_MAX} characters"),
                ));
            }
            s.to_string()
        }
    })
}

fn rule(v: &Value, path: &str) -> Result<Rule, Reject> {
    let obj = as_object(v, path)?;
    deny_unknown(obj, &RULE_KEYS, path)?;
    let id = rule_id(obj, path)?;
    let priority = u64_field(obj, "priority", path)?;
    let priority = u32::try_from(priority).map_err(|_| {
        invalid(
            &child_path(path, "priority"),
            "priority must be at most 4294967295",
        )
    })?;
    let action = enum_field(
        obj,
        "action",
        path,
        None,
        &[
            ("allow", Action::Allow),
            ("drop", Action::Drop),
            ("reject", Action::Reject),
        ],
    )?;
    let direction = enum_field(
        obj,
        "direction",
        path,
        None,
        &[
            ("in", Direction::In),
            ("out", Direction::Out),
            ("both", Direction::Both),
        ],
    )?;
    let protocol = enum_field(
        obj,
        "protocol",
        path,
        Some(Protocol::Any),
        &[
            ("any", Protocol::Any),
            ("tcp", Protocol::Tcp),
            ("udp", Protocol::Udp),
            ("icmp", Protocol::Icmp),
            ("icmpv6", Protocol::Icmpv6),
        ],
    )?;
    let ports = ports(obj.get("ports"), path, "ports")?;
    if !ports.is_empty() && !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
        return Err(invalid(
            &child_path(path, "ports"),
            "ports need protocol tcp or udp",
        ));
    }
    let comment = comment(obj, path)?;
    Ok(Rule {
        id: id.to_string(),
        priority,
        action,
        direction,
        protocol,
        sources: addrs(obj.get("sources"), path, "sources")?,
        destinations: addrs(obj.get("destinations"), path, "destinations")?,
        ports,
        applied_to: ifaces(obj.get("applied_to"), path, "applied_to")?,
        log: bool_field(obj, "log", path)?,
        disabled: bool_field(obj, "disabled", path)?,
        comment,
    })
}

fn too_many(path: &str, what: &str, limit: usize) -> Reject {
    reject(
        ErrorCode::TooMany,
        format!("more than {limit} {what}"),
        Some(path.to_string()),
    )
}

/// Refuses a rule that would render to more kernel rules than the limit allows, before
/// anything is rendered (PROTOCOL.md section 4, `firewall.max_rule_expansion`).
fn check_expansion(r: &Rule, path: &str, limits: &Limits) -> Result<(), Reject> {
    let n = crate::firewall::render::expansion(r);
    if n > limits.max_rule_expansion {
        return Err(reject(
            ErrorCode::TooMany,
            format!(
                "rule {} expands to {n} kernel rules (sources x destinations x interfaces x families), more than firewall.max_rule_expansion {}",
                echo(&r.id),
                limits.max_rule_expansion
            ),
            Some(path.to_string()),
        ));
    }
    Ok(())
}

/// `firewall.apply` data -> a whole, valid rule set.
/// `"dry_run": true` in `firewall.apply` or `firewall.patch` data (checked by the decoders
/// above: absent or a boolean).
pub(crate) fn is_dry_run(data: &Value) -> bool {
    data.get("dry_run") == Some(&Value::Bool(true))
}

pub(crate) fn decode_rule_set(v: &Value, limits: &Limits) -> Result<RuleSet, Reject> {
    let path = "$.data";
    let obj = as_object(v, path)?;
    deny_unknown(
        obj,
        &[
            "generation",
            "defaults",
            "established",
            "address_sets",
            "rules",
            "dry_run",
        ],
        path,
    )?;
    bool_field(obj, "dry_run", path)?;
    let established = established(obj, path)?.unwrap_or_default();
    let generation = u64_field(obj, "generation", path)?;
    let d = match obj.get("defaults") {
        None => PartialDefaults::default(),
        Some(v) => defaults(v, "$.data.defaults")?,
    };
    let sets = match obj.get("address_sets") {
        None => BTreeMap::new(),
        Some(v) => set_map(v, "$.data.address_sets")?,
    };
    let elements: usize = sets.values().map(BTreeSet::len).sum();
    if elements > limits.max_elements {
        return Err(too_many(
            "$.data.address_sets",
            "set elements",
            limits.max_elements,
        ));
    }
    let mut rules = BTreeMap::new();
    if let Some(list) = obj.get("rules") {
        let list = as_array(list, "$.data.rules")?;
        if list.len() > limits.max_rules {
            return Err(too_many("$.data.rules", "rules", limits.max_rules));
        }
        for (i, r) in list.iter().enumerate() {
            let p = format!("$.data.rules[{i}]");
            let r = rule(r, &p)?;
            check_expansion(&r, &p, limits)?;
            if let Some((name, at)) = r.first_missing_set(|n| sets.contains_key(n)) {
                return Err(reject(
                    ErrorCode::UnknownSet,
                    format!("address set {} is not defined", echo(&name)),
                    Some(format!("{p}.{at}")),
                ));
            }
            if rules.contains_key(&r.id) {
                return Err(reject(
                    ErrorCode::DuplicateId,
                    format!("rule id {} appears more than once", echo(&r.id)),
                    Some(child_path(&p, "id")),
                ));
            }
            rules.insert(r.id.clone(), r);
        }
    }
    let base = Defaults::default();
    Ok(RuleSet {
        generation,
        defaults: Defaults {
            input: d.input.unwrap_or(base.input),
            output: d.output.unwrap_or(base.output),
            forward: d.forward.unwrap_or(base.forward),
        },
        established,
        sets,
        rules,
    })
}

const PATCH_KEYS: [&str; 11] = [
    "dry_run",
    "base_generation",
    "generation",
    "upsert_rules",
    "delete_rules",
    "set_address_sets",
    "add_addresses",
    "remove_addresses",
    "delete_address_sets",
    "defaults",
    "established",
];

/// `firewall.patch` data -> a checked delta (its fit with the current rule set is checked
/// when it is applied).
pub(crate) fn decode_patch(v: &Value, limits: &Limits) -> Result<Patch, Reject> {
    let path = "$.data";
    let obj = as_object(v, path)?;
    deny_unknown(obj, &PATCH_KEYS, path)?;
    bool_field(obj, "dry_run", path)?;
    let base_generation = u64_field(obj, "base_generation", path)?;
    let generation = u64_field(obj, "generation", path)?;
    if generation <= base_generation {
        return Err(invalid(
            "$.data.generation",
            "generation must be greater than base_generation",
        ));
    }
    let mut upsert_rules = vec![];
    let mut seen = BTreeSet::new();
    if let Some(list) = obj.get("upsert_rules") {
        for (i, r) in as_array(list, "$.data.upsert_rules")?.iter().enumerate() {
            let p = format!("$.data.upsert_rules[{i}]");
            let r = rule(r, &p)?;
            check_expansion(&r, &p, limits)?;
            if !seen.insert(r.id.clone()) {
                return Err(reject(
                    ErrorCode::DuplicateId,
                    format!("rule id {} appears more than once", echo(&r.id)),
                    Some(child_path(&p, "id")),
                ));
            }
            upsert_rules.push(r);
        }
    }
    let names = |key: &str, check: fn(&str) -> bool, what: &str| -> Result<Vec<String>, Reject> {
        let Some(list) = obj.get(key) else {
            return Ok(vec![]);
        };
        let p = child_path(path, key);
        let mut out = vec![];
        for (i, e) in as_array(list, &p)?.iter().enumerate() {
            let ep = format!("{p}[{i}]");
            let s = as_str(e, &ep)?;
            if !check(s) {
                return Err(invalid(&ep, format!("{} is not a valid {what}", echo(s))));
            }
            out.push(s.to_string());
        }
        Ok(out)
    };
    let delete_rules = names("delete_rules", is_valid_rule_id, "rule id")?;
    let delete_address_sets = names("delete_address_sets", is_valid_set_name, "set name")?;
    let map = |key: &str| -> Result<BTreeMap<String, BTreeSet<IpNet>>, Reject> {
        match obj.get(key) {
            None => Ok(BTreeMap::new()),
            Some(v) => set_map(v, &child_path(path, key)),
        }
    };
    Ok(Patch {
        base_generation,
        generation,
        upsert_rules,
        delete_rules,
        set_address_sets: map("set_address_sets")?,
        add_addresses: map("add_addresses")?,
        remove_addresses: map("remove_addresses")?,
        delete_address_sets,
        defaults: match obj.get("defaults") {
            None => PartialDefaults::default(),
            Some(v) => defaults(v, "$.data.defaults")?,
        },
        established: established(obj, path)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rs(v: Value) -> Result<RuleSet, (ErrorCode, Option<String>)> {
        decode_rule_set(&v, &Limits::default()).map_err(|r| (r.code, r.field))
    }

    fn contract_example() -> Value {
        json!({ "generation": 42,
            "defaults": { "in": "allow", "out": "allow", "forward": "allow" },
            "address_sets": { "web": ["10.0.1.0/24", "10.0.2.5", "2001:db8::/64"] },
            "rules": [ { "id": "ssh-in", "priority": 100, "action": "allow", "direction": "in",
                "protocol": "tcp", "sources": ["$web", "192.0.2.0/24"], "destinations": [],
                "ports": ["22", "8000-8080"], "applied_to": [], "log": false,
                "disabled": false, "comment": "..." } ] })
    }

    #[test]
    fn the_contract_example_decodes() {
        let r = rs(contract_example()).unwrap();
        assert_eq!(r.generation, 42);
        assert_eq!(r.sets["web"].len(), 3);
        let rule = &r.rules["ssh-in"];
        assert_eq!(
            rule.ports,
            vec![
                PortRange { lo: 22, hi: 22 },
                PortRange { lo: 8000, hi: 8080 }
            ]
        );
        assert_eq!(rule.sources[0], Addr::Set("web".into()));
    }

    #[test]
    fn each_violation_names_its_path() {
        type Case = (fn(&mut Value), ErrorCode, &'static str);
        let cases: Vec<Case> = vec![
            (
                |v| v["established"] = json!("drop"),
                ErrorCode::InvalidField,
                "$.data.established",
            ),
            (
                |v| v["established"] = json!(true),
                ErrorCode::InvalidField,
                "$.data.established",
            ),
            (
                |v| v["rules"][0]["id"] = json!("bad id"),
                ErrorCode::InvalidField,
                "$.data.rules[0].id",
            ),
            (
                |v| v["rules"][0]["id"] = json!("x\"; flush ruleset; \""),
                ErrorCode::InvalidField,
                "$.data.rules[0].id",
            ),
            (
                |v| v["rules"][0]["sources"][0] = json!("$nope"),
                ErrorCode::UnknownSet,
                "$.data.rules[0].sources[0]",
            ),
            (
                |v| v["rules"][0]["sources"][1] = json!("192.0.2.0/33"),
                ErrorCode::InvalidField,
                "$.data.rules[0].sources[1]",
            ),
            (
                |v| v["address_sets"]["web"][0] = json!("10.0.1.1/24"),
                ErrorCode::InvalidField,
                "$.data.address_sets.web[0]",
            ),
            (
                |v| v["address_sets"]["we}b"] = json!([]),
                ErrorCode::InvalidField,
                "$.data.address_sets[\"we}b\"]",
            ),
            (
                |v| v["rules"][0]["ports"][1] = json!("8080-8000"),
                ErrorCode::InvalidField,
                "$.data.rules[0].ports[1]",
            ),
            (
                |v| v["rules"][0]["ports"][0] = json!("0"),
                ErrorCode::InvalidField,
                "$.data.rules[0].ports[0]",
            ),
            (
                |v| v["rules"][0]["protocol"] = json!("icmp"),
                ErrorCode::InvalidField,
                "$.data.rules[0].ports",
            ),
            (
                |v| v["rules"][0]["action"] = json!("accept"),
                ErrorCode::InvalidField,
                "$.data.rules[0].action",
            ),
            (
                |v| v["rules"][0]["applied_to"] = json!(["eth0 accept"]),
                ErrorCode::InvalidField,
                "$.data.rules[0].applied_to[0]",
            ),
            (
                |v| v["rules"][0]["colour"] = json!(1),
                ErrorCode::UnknownField,
                "$.data.rules[0].colour",
            ),
            (
                |v| v["rules"][0]["comment"] = json!("x".repeat(257)),
                ErrorCode::InvalidField,
                "$.data.rules[0].comment",
            ),
            (
                |v| {
                    let r = v["rules"][0].clone();
                    v["rules"].as_array_mut().unwrap().push(r);
                },
                ErrorCode::DuplicateId,
                "$.data.rules[1].id",
            ),
            (
                |v| v["defaults"]["in"] = json!("reject"),
                ErrorCode::InvalidField,
                "$.data.defaults.in",
            ),
            (
                |v| {
                    v.as_object_mut().unwrap().remove("generation");
                },
                ErrorCode::MissingField,
                "$.data.generation",
            ),
        ];
        for (mutate, code, field) in cases {
            let mut v = contract_example();
            mutate(&mut v);
            assert_eq!(
                rs(v.clone()).unwrap_err(),
                (code, Some(field.to_string())),
                "{v}"
            );
        }
    }

    #[test]
    fn comments_may_hold_anything_because_they_never_reach_nft() {
        let mut v = contract_example();
        v["rules"][0]["comment"] = json!("\"; flush ruleset; # é\n");
        assert!(rs(v).is_ok());
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_rules: 0,
            max_elements: 2,
            max_rule_expansion: 1_000,
        };
        let e = decode_rule_set(&contract_example(), &limits).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooMany);
    }

    /// 2 000 x 2 000 references to one set would render to four million kernel rules.
    fn blow_up_rule(refs: usize) -> Value {
        json!({"id": "wide", "priority": 1, "action": "drop", "direction": "in",
               "sources": vec!["$a"; refs], "destinations": vec!["$a"; refs]})
    }

    #[test]
    fn repeated_references_count_once_and_expansion_is_bounded() {
        let set = json!({"a": ["10.0.0.0/24", "2001:db8::/64"], "b": ["10.1.0.0/24"]});
        // Repeated references collapse: one set per side, two families = 2 kernel rules.
        let rs = decode_rule_set(
            &json!({"generation": 1, "address_sets": set, "rules": [blow_up_rule(2_000)]}),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(crate::firewall::render::expansion(&rs.rules["wide"]), 2);
        // Distinct references multiply: 40 interfaces x 2 (both) x 2 families x 4 x 4.
        let sets: serde_json::Map<String, Value> = (0..4)
            .map(|i| (format!("s{i}"), json!([format!("10.{i}.0.0/16")])))
            .collect();
        let refs: Vec<String> = (0..4).map(|i| format!("$s{i}")).collect();
        let ifaces: Vec<String> = (0..40).map(|i| format!("tap{i}")).collect();
        let wide = json!({"generation": 1, "address_sets": sets, "rules": [
            {"id": "r", "priority": 1, "action": "drop", "direction": "both",
             "sources": refs, "destinations": refs, "applied_to": ifaces}]});
        let e = decode_rule_set(&wide, &Limits::default()).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooMany);
        assert_eq!(e.field.as_deref(), Some("$.data.rules[0]"));
        assert!(e.message.contains("2560"), "{}", e.message);
        // The same in a patch.
        let patch = json!({"base_generation": 1, "generation": 2,
            "upsert_rules": wide["rules"].clone()});
        let e = decode_patch(&patch, &Limits::default()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("$.data.upsert_rules[0]"));
        // Restoring stored state knows no limit.
        assert!(decode_rule_set(&wide, &Limits::NONE).is_ok());
    }

    #[test]
    fn expansion_matches_what_is_rendered() {
        let sets: serde_json::Map<String, Value> = (0..3)
            .map(|i| {
                (
                    format!("s{i}"),
                    json!([format!("10.{i}.0.0/16"), "2001:db8::/64"]),
                )
            })
            .collect();
        let rs = decode_rule_set(
            &json!({"generation": 1, "address_sets": sets, "rules": [
                {"id": "r", "priority": 1, "action": "allow", "direction": "both",
                 "sources": ["$s0", "$s1", "$s0", "10.9.0.0/16"], "destinations": ["$s2"],
                 "applied_to": ["tap0", "tap1", "tap0"]}]}),
            &Limits::default(),
        )
        .unwrap();
        let r = &rs.rules["r"];
        let rendered =
            crate::firewall::render::rule_lines(r, crate::firewall::layout::Hook::Forward);
        assert_eq!(crate::firewall::render::expansion(r), rendered.len());
    }

    #[test]
    fn established_is_cut_unless_the_rule_set_says_keep() {
        let limits = Limits::default();
        let cut = decode_rule_set(&json!({"generation": 1}), &limits).unwrap();
        assert_eq!(cut.established, Established::Cut);
        let keep =
            decode_rule_set(&json!({"generation": 1, "established": "keep"}), &limits).unwrap();
        assert_eq!(keep.established, Established::Keep);
        assert_ne!(cut.digest(), keep.digest(), "part of the digest");
        let p = decode_patch(&json!({"base_generation": 1, "generation": 2}), &limits).unwrap();
        assert_eq!(p.established, None, "a patch without it leaves it as it is");
        let p = decode_patch(
            &json!({"base_generation": 1, "generation": 2, "established": "keep"}),
            &limits,
        )
        .unwrap();
        assert_eq!(p.established, Some(Established::Keep));
    }

    #[test]
    fn patches_decode_and_check_generations() {
        let p = decode_patch(
            &json!({"base_generation": 42, "generation": 43,
            "add_addresses": {"web": ["10.0.9.0/24"]}, "delete_rules": ["ssh-in"]}),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(p.add_addresses["web"].len(), 1);
        assert_eq!(p.delete_rules, vec!["ssh-in"]);
        let e = decode_patch(
            &json!({"base_generation": 42, "generation": 42}),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("$.data.generation"));
        let e = decode_patch(
            &json!({"base_generation": 1, "generation": 2, "bogus": 1}),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownField);
    }
}
